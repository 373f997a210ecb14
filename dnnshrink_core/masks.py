"""Per-group keep masks.

A mask holds one keep flag per channel unit of its group. The accepted values: booleans
(``True`` = keep), and integers or floats that are all 0 or 1 (``1`` = keep), as tensors,
NumPy arrays or lists. Anything else (a score such as ``0.3``, ``-1``, ``NaN``) is refused
with :class:`~dnnshrink_core.errors.MaskError`: turn scores into flags yourself
(``scores > t``) so that nothing is kept or dropped by an implicit rule.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import numpy as np
import torch

from .errors import MaskError

#: MorphNet's alive threshold: a channel whose largest |gamma| is at or below it is dead (the
#: |gamma| values become bimodal while structure is learned; the gap holds this value).
DEFAULT_THRESHOLD = 1e-2


def keep_flags(mask: Any, name: str = "?") -> np.ndarray:
    """``mask`` as a boolean array by the rule above; ``name`` (the group) is for the error."""
    array = np.asarray(mask.detach().cpu() if isinstance(mask, torch.Tensor) else mask)
    if array.dtype == bool:
        return array
    if array.dtype.kind in "iuf":
        if np.isin(array, (0, 1)).all():
            return array.astype(bool)
        bad = array[~np.isin(array, (0, 1))].ravel()[0].item()
        raise MaskError(f"mask for group {name!r} holds {bad!r}; masks are booleans (True = keep) or 0/1. For "
                        "scores, choose the flags yourself, e.g. `scores > threshold`.")
    raise MaskError(f"mask for group {name!r} must be booleans (True = keep) or 0/1 numbers, not "
                    f"{array.dtype} values such as {array.ravel()[:1].tolist()}")


class Masks(dict):
    """Group name → boolean tensor (one entry per channel unit, True = keep).

    Returned by :func:`dnnshrink_core.alive_masks`; any mapping of the same shape can be
    handed to :func:`dnnshrink_core.generate`. ``graph`` is the
    :class:`~dnnshrink_core.ChannelGraph` the masks were made for, reused by
    ``generate`` so the model is not traced twice. Values follow the module's rule:
    booleans, or numbers that are all 0 or 1.
    """

    def __init__(self, data: Mapping[str, Any], graph: Optional[Any] = None):
        super().__init__({name: torch.as_tensor(keep_flags(mask, name)) for name, mask in data.items()})
        self.graph = graph

    def kept(self) -> Dict[str, int]:
        """Number of kept units per group."""
        return {name: int(mask.sum()) for name, mask in self.items()}

    def fraction_kept(self) -> float:
        """Kept units over all units."""
        total = sum(int(m.numel()) for m in self.values())
        return sum(self.kept().values()) / total if total else 1.0

    def __repr__(self) -> str:
        total = sum(int(m.numel()) for m in self.values())
        return f"<Masks: {sum(self.kept().values())}/{total} units kept in {len(self)} groups>"
