"""The cost models as dnnshrink plugins: ``flops`` (MACs), ``params`` (model size),
``activations`` (activation memory) and ``latency`` (a roofline per op whose constants are
measured on the target runtime by ``dnnshrink calibrate``).

Registered through the ``dnnshrink`` entry point ``costs``.
"""
from __future__ import annotations

from typing import Any, List, Optional

from dnnshrink_core.plugin_api import hookimpl

from .latency import DEFAULT_PROFILE, LatencyCost, Profile, load_profile
from .resources import ActivationsCost, FlopsCost, ParamsCost

__all__ = ["ActivationsCost", "DEFAULT_PROFILE", "FlopsCost", "LatencyCost", "ParamsCost", "Profile", "load_profile"]

COST_MODELS = {"flops": FlopsCost, "params": ParamsCost, "activations": ActivationsCost, "latency": LatencyCost}


@hookimpl(trylast=True)
def dnnshrink_cost_model(name: str) -> Optional[Any]:
    """``flops``, ``params``, ``activations`` and ``latency``."""
    return COST_MODELS.get(name)


@hookimpl
def dnnshrink_cost_model_names() -> List[str]:
    """The cost models this plugin gives."""
    return list(COST_MODELS)
