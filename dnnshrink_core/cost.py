"""The cost model: MACs (or weights) of the network for any set of kept channel units.

A conv/linear call costs ``coef · kept_in · kept_out`` (depthwise: ``coef · kept_out``);
``coef`` comes from the handlers (kernel size, groups, traced output size), so with every
unit kept the MACs equal what ``torch.utils.flop_counter`` counts.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np
from torch import nn

from .graph import ChannelGraph


class CostModel:
    """Vectorised cost of a :class:`ChannelGraph`'s conv/linear layers.

    ``kind``: ``"flops"`` (MACs) or ``"size"`` (weights).
    """

    def __init__(self, graph: ChannelGraph, model: nn.Module, kind: str = "flops"):
        if kind not in ("flops", "size"):
            raise ValueError(f"cost kind must be 'flops' or 'size', not {kind!r}")
        layers = graph.layers()
        if not layers:
            raise ValueError("the model has no conv or linear layer whose channels the graph follows")
        self.graph, self.kind = graph, kind
        self.layers = layers
        self.coef = np.array([l.coef if kind == "flops" else _weights_per_pair(model, l) for l in layers])
        self.depthwise = np.array([l.kind == "depthwise" for l in layers], dtype=bool)
        self.in_units = np.concatenate([l.in_units for l in layers])
        self.in_layer = np.concatenate([np.full(len(l.in_units), i) for i, l in enumerate(layers)])
        self.out_units = np.concatenate([l.out_units for l in layers])
        self.out_layer = np.concatenate([np.full(len(l.out_units), i) for i, l in enumerate(layers)])
        self.initial = self.cost(np.ones(graph.num_units, dtype=bool))

    def counts(self, alive: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Kept input and output channels of every layer."""
        n = len(self.coef)
        return (np.bincount(self.in_layer, weights=alive[self.in_units], minlength=n),
                np.bincount(self.out_layer, weights=alive[self.out_units], minlength=n))

    def cost(self, alive: np.ndarray) -> float:
        """The cost with only the ``alive`` units kept."""
        kept_in, kept_out = self.counts(alive)
        return float(np.where(self.depthwise, self.coef * kept_out, self.coef * kept_in * kept_out).sum())

    def unit_weights(self, alive: np.ndarray) -> np.ndarray:
        """``d cost / d (kept units)`` per unit, with the other side's counts held: MorphNet's
        weight of each unit's ``|gamma|``."""
        kept_in, kept_out = self.counts(alive)
        units = self.graph.num_units
        out_w = np.where(self.depthwise, self.coef, self.coef * kept_in)[self.out_layer]
        in_w = np.where(self.depthwise, 0.0, self.coef * kept_out)[self.in_layer]
        return (np.bincount(self.out_units, weights=out_w, minlength=units)
                + np.bincount(self.in_units, weights=in_w, minlength=units))

    def cheapest_first(self, keep: np.ndarray, scores: np.ndarray, target: float,
                       removable: Optional[np.ndarray] = None) -> np.ndarray:
        """Drop removable units by rising ``scores`` until the cost is at most ``target``
        (keeping one unit per group). Bisection over the ranking: the cost falls as more go."""
        removable = self.graph.unit_removable if removable is None else removable
        candidates = np.flatnonzero(removable & keep)
        candidates = candidates[np.argsort(scores[candidates], kind="stable")]
        protected = np.zeros_like(keep)
        for group in self.graph.groups:  # never empty a group: its best unit stays
            units = group.units[keep[group.units]]
            if len(units):
                protected[units[np.argmax(scores[units])]] = True
        candidates = candidates[~protected[candidates]]

        def dropped(k: int) -> np.ndarray:
            out = keep.copy()
            out[candidates[:k]] = False
            return out

        low, high = 0, len(candidates)
        if self.cost(dropped(high)) > target:
            return dropped(high)
        while low < high:
            mid = (low + high) // 2
            if self.cost(dropped(mid)) <= target:
                high = mid
            else:
                low = mid + 1
        return dropped(low)


def _weights_per_pair(model: nn.Module, layer) -> float:
    if layer.params_coef is not None:  # given by a function handler (F.conv2d on a module's weight)
        return float(layer.params_coef)
    module = model.get_submodule(layer.name)
    if isinstance(module, nn.modules.conv._ConvNd):
        per_pair = math.prod(module.kernel_size)
        return per_pair if layer.kind == "depthwise" else per_pair / module.groups
    return 1.0
