"""MorphNet (arXiv 1711.06798) as dnnshrink plugins: the FLOP and size regularizers, the
threshold mask extractor, and the width rules (minimum width, rounding, expand step).

Registered through the ``dnnshrink`` entry point ``morphnet``.
"""
from __future__ import annotations

from typing import Any, Optional

from dnnshrink_core import hookimpl

from .masks import ThresholdExtractor, gap_threshold, threshold_masks
from .regularizer import GammaRegularizer, morphnet_flops, morphnet_size
from .structure import enforce_widths, expand_to_budget

__all__ = ["GammaRegularizer", "ThresholdExtractor", "enforce_widths", "expand_to_budget", "gap_threshold", "morphnet_flops",
           "morphnet_size", "threshold_masks"]

THRESHOLD = ThresholdExtractor()
REGULARIZERS = {"morphnet_flops": morphnet_flops, "morphnet_size": morphnet_size}


@hookimpl(trylast=True)
def dnnshrink_mask_extractor(name: str) -> Optional[Any]:
    """``threshold``: MorphNet's alive rule."""
    return THRESHOLD if name == "threshold" else None


@hookimpl(trylast=True)
def dnnshrink_regularizer(name: str) -> Optional[Any]:
    """``morphnet_flops`` (default) and ``morphnet_size``."""
    return REGULARIZERS.get(name)
