"""MorphNet (arXiv 1711.06798) as dnnshrink plugins: the FLOP and size regularizers, the
threshold mask extractor, the width rules (minimum width, rounding, expand step), and the
algorithms ``morphnet``, ``slimming`` and ``magnitude`` built on them.

Registered through the ``dnnshrink`` entry point ``morphnet``.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

from dnnshrink_core.plugin_api import hookimpl

from .masks import ThresholdExtractor, gap_threshold, threshold_masks
from .algorithm import ALGORITHMS, REGULARIZERS, Magnitude, MorphNet, Slimming
from .regularizer import GammaRegularizer, HeldScales, morphnet_flops, morphnet_size, slimming_l1
from .structure import enforce_widths, expand_to_budget

__all__ = ["GammaRegularizer", "HeldScales", "Magnitude", "MorphNet", "Slimming", "ThresholdExtractor", "slimming_l1", "enforce_widths", "expand_to_budget", "gap_threshold", "morphnet_flops",
           "morphnet_size", "threshold_masks"]

THRESHOLD = ThresholdExtractor()


@hookimpl(trylast=True)
def dnnshrink_mask_extractor(name: str) -> Optional[Any]:
    """``threshold``: MorphNet's alive rule."""
    return THRESHOLD if name == "threshold" else None


@hookimpl(trylast=True)
def dnnshrink_regularizer(name: str) -> Optional[Any]:
    """``morphnet_flops`` (default), ``morphnet_size``, ``slimming_l1``, and
    ``morphnet_<cost model>`` for every loaded cost model (``morphnet_params``,
    ``morphnet_activations``, ``morphnet_latency``…)."""
    if name in REGULARIZERS:
        return REGULARIZERS[name]
    if name.startswith("morphnet_"):
        from dnnshrink_core.plugin_api import cost_model_names

        cost = name[len("morphnet_"):]
        if cost in cost_model_names():
            return functools.partial(GammaRegularizer, cost=cost)
    return None


@hookimpl
def dnnshrink_mask_extractor_names() -> list:
    """The mask extractors this plugin gives."""
    return ["threshold"]


@hookimpl
def dnnshrink_regularizer_names() -> list:
    """The regularizers this plugin gives: the named ones and one per loaded cost model."""
    from dnnshrink_core.plugin_api import cost_model_names

    return sorted({*REGULARIZERS, *(f"morphnet_{cost}" for cost in cost_model_names())})


@hookimpl(trylast=True)
def dnnshrink_algorithm(name: str) -> Optional[Any]:
    """``morphnet`` (default), ``slimming`` and ``magnitude``."""
    return ALGORITHMS.get(name)


@hookimpl
def dnnshrink_algorithm_names() -> list:
    """The algorithms this plugin gives."""
    return list(ALGORITHMS)
