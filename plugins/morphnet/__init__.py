"""MorphNet (arXiv 1711.06798) as dnnshrink plugins: the threshold mask extractor.

Registered through the ``dnnshrink`` entry point ``morphnet``.
"""
from __future__ import annotations

from typing import Any, Optional

from dnnshrink_core import hookimpl

from .masks import gap_threshold, threshold_masks

__all__ = ["gap_threshold", "threshold_masks"]


@hookimpl(trylast=True)
def dnnshrink_mask_extractor(name: str) -> Optional[Any]:
    """``threshold``: MorphNet's alive rule."""
    return threshold_masks if name == "threshold" else None
