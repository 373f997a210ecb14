"""Per-group keep masks."""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import numpy as np
import torch


class Masks(dict):
    """Group name → boolean tensor (one entry per channel unit, True = keep).

    Returned by :func:`dnnshrink_core.alive_masks`; any mapping of the same shape can be
    handed to :func:`dnnshrink_core.generate`. ``graph`` is the
    :class:`~dnnshrink_core.ChannelGraph` the masks were made for, reused by
    ``generate`` so the model is not traced twice.
    """

    def __init__(self, data: Mapping[str, Any], graph: Optional[Any] = None):
        super().__init__({name: torch.as_tensor(np.asarray(mask, dtype=bool)) for name, mask in data.items()})
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
