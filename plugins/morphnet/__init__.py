"""MorphNet (arXiv 1711.06798) as dnnshrink plugins: the FLOP and size regularizers, the
threshold mask extractor, the width rules (minimum width, rounding, expand step), and the
algorithms ``morphnet``, ``slimming`` and ``magnitude`` built on them.

Registered through the ``dnnshrink`` entry point ``morphnet``.
"""
from __future__ import annotations

from typing import Any, Optional

from dnnshrink_core import hookimpl

from .masks import ThresholdExtractor, gap_threshold, threshold_masks
from .algorithm import ALGORITHMS, REGULARIZERS, Magnitude, MorphNet, Slimming
from .regularizer import GammaRegularizer, morphnet_flops, morphnet_size, slimming_l1
from .structure import enforce_widths, expand_to_budget

__all__ = ["GammaRegularizer", "Magnitude", "MorphNet", "Slimming", "ThresholdExtractor", "slimming_l1", "enforce_widths", "expand_to_budget", "gap_threshold", "morphnet_flops",
           "morphnet_size", "threshold_masks"]

THRESHOLD = ThresholdExtractor()


@hookimpl(trylast=True)
def dnnshrink_mask_extractor(name: str) -> Optional[Any]:
    """``threshold``: MorphNet's alive rule."""
    return THRESHOLD if name == "threshold" else None


@hookimpl(trylast=True)
def dnnshrink_regularizer(name: str) -> Optional[Any]:
    """``morphnet_flops`` (default), ``morphnet_size`` and ``slimming_l1``."""
    return REGULARIZERS.get(name)


@hookimpl(trylast=True)
def dnnshrink_algorithm(name: str) -> Optional[Any]:
    """``morphnet`` (default), ``slimming`` and ``magnitude``."""
    return ALGORITHMS.get(name)


@hookimpl
def dnnshrink_algorithm_names() -> list:
    """The algorithms this plugin gives."""
    return list(ALGORITHMS)
