"""MorphNet's regularizers as gradient hooks on BatchNorm scales.

``morphnet_flops`` (MorphNet's GammaFlops): a conv/linear layer costs
``C · alive_in · alive_out`` MACs, ``C`` from its kernel, groups and traced output size.
The penalty replaces each alive count by the sum of ``|gamma|`` it stands for::

    P = sum over layers  C · (alive_in · sum |gamma_out|  +  alive_out · sum |gamma_in|)

Alive counts come from the threshold and are not differentiated. The ``|gamma|`` of a
channel unit is the largest over its BatchNorm sources (MorphNet's rule for tied
channels), so only that source gets the gradient (split evenly between equal maxima, as
autograd would). ``morphnet_size`` is the same with parameter counts.

The gradient is added in hooks on the BatchNorm weights, so the user's own
``train_one_epoch(model, lr)`` runs unchanged with any optimizer; :meth:`attach`
returns a handle whose ``remove()`` (or ``with``) takes the hooks away.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from torch import nn

from dnnshrink_core import ChannelGraph


class GammaRegularizer:
    """A FLOP- or size-weighted L1 penalty on BatchNorm scales (see the module docstring).

    ``strength`` defaults to ``strength_scale / initial cost`` (MorphNet's rule of thumb).
    """

    def __init__(self, graph: ChannelGraph, model: nn.Module, cost: str = "flops",
                 strength: Optional[float] = None, strength_scale: float = 1.0, threshold: float = 1e-2):
        if cost not in ("flops", "size"):
            raise ValueError(f"cost must be 'flops' or 'size', not {cost!r}")
        self.graph, self.model, self.cost_kind, self.threshold = graph, model, cost, threshold
        layers = graph.layers()
        if not layers:
            raise ValueError("the model has no conv or linear layer whose channels the graph follows")
        self._coef = np.array([self._layer_coef(l) for l in layers], dtype=np.float64)
        self._depthwise = np.array([l.kind == "depthwise" for l in layers], dtype=bool)
        self._in_units = np.concatenate([l.in_units for l in layers])
        self._in_layer = np.concatenate([np.full(len(l.in_units), i) for i, l in enumerate(layers)])
        self._out_units = np.concatenate([l.out_units for l in layers])
        self._out_layer = np.concatenate([np.full(len(l.out_units), i) for i, l in enumerate(layers)])
        self.layer_names = [l.name for l in layers]
        self._removable = graph.unit_removable
        self._params: List[nn.Parameter] = [model.get_submodule(name).weight for name in graph.source_modules]
        self._src_param = graph.src_module
        self._src_channel = graph.src_channel
        self._src_unit = graph.src_unit
        self.initial_cost = self.cost(np.ones(graph.num_units, dtype=bool))
        self.strength = strength if strength is not None else strength_scale / max(self.initial_cost, 1.0)
        self._cache_key: Optional[tuple] = None
        self._grads: Dict[int, torch.Tensor] = {}
        self.last_penalty = 0.0

    def _layer_coef(self, layer: Any) -> float:
        if self.cost_kind == "flops":
            return layer.coef
        module = self.model.get_submodule(layer.name)
        if isinstance(module, nn.modules.conv._ConvNd):
            per_pair = math.prod(module.kernel_size)
            return per_pair if layer.kind == "depthwise" else per_pair / module.groups
        return 1.0

    # --- the cost model -------------------------------------------------------------
    def unit_gammas(self) -> np.ndarray:
        """Per unit, the largest ``|gamma|`` of its sources."""
        return self.graph.unit_gammas(self.model)

    def alive(self, gammas: Optional[np.ndarray] = None) -> np.ndarray:
        """Units kept by the threshold rule (units that cannot be removed always are)."""
        gammas = self.unit_gammas() if gammas is None else gammas
        return ~self._removable | (gammas > self.threshold)

    def _alive_counts(self, alive: np.ndarray):
        n = len(self._coef)
        alive_in = np.bincount(self._in_layer, weights=alive[self._in_units], minlength=n)
        alive_out = np.bincount(self._out_layer, weights=alive[self._out_units], minlength=n)
        return alive_in, alive_out

    def cost(self, alive: Optional[np.ndarray] = None) -> float:
        """MACs (or parameters) of the network with only ``alive`` units kept."""
        alive = self.alive() if alive is None else alive
        alive_in, alive_out = self._alive_counts(alive)
        per_layer = np.where(self._depthwise, self._coef * alive_out, self._coef * alive_in * alive_out)
        return float(per_layer.sum())

    def unit_weights(self, alive: np.ndarray) -> np.ndarray:
        """``dP / d gamma_unit`` for every unit (zero for units that cannot be removed)."""
        alive_in, alive_out = self._alive_counts(alive)
        w = np.zeros(self.graph.num_units, dtype=np.float64)
        out_w = np.where(self._depthwise, self._coef, self._coef * alive_in)[self._out_layer]
        in_w = np.where(self._depthwise, 0.0, self._coef * alive_out)[self._in_layer]
        np.add.at(w, self._out_units, out_w)
        np.add.at(w, self._in_units, in_w)
        w[~self._removable] = 0.0
        return w

    def penalty(self) -> float:
        """The penalty ``P`` at the current scales (unscaled by ``strength``)."""
        gammas = self.unit_gammas()
        return float((self.unit_weights(self.alive(gammas)) * gammas).sum())

    # --- gradients --------------------------------------------------------------------
    def source_gradients(self) -> Dict[int, torch.Tensor]:
        """``strength · dP/d weight`` for each source BatchNorm weight (by index in ``graph.source_modules``)."""
        with torch.no_grad():
            values = np.zeros(len(self._src_unit), dtype=np.float64)
            signs = np.zeros(len(self._src_unit), dtype=np.float64)
            for idx, param in enumerate(self._params):
                mask = self._src_param == idx
                w = param.detach().float().cpu().numpy()[self._src_channel[mask]]
                values[mask] = np.abs(w)
                signs[mask] = np.sign(w)
            unit_max = np.zeros(self.graph.num_units, dtype=np.float64)
            np.maximum.at(unit_max, self._src_unit, values)
            alive = ~self._removable | (unit_max > self.threshold)
            w_unit = self.unit_weights(alive)
            self.last_penalty = float((w_unit * unit_max).sum())
            is_max = values == unit_max[self._src_unit]
            ties = np.bincount(self._src_unit[is_max], minlength=self.graph.num_units)
            share = np.where(is_max, w_unit[self._src_unit] / np.maximum(ties[self._src_unit], 1), 0.0)
            grad_values = self.strength * share * signs
            grads: Dict[int, torch.Tensor] = {}
            for idx, param in enumerate(self._params):
                mask = self._src_param == idx
                g = np.zeros(param.shape[0], dtype=np.float64)
                np.add.at(g, self._src_channel[mask], grad_values[mask])
                grads[idx] = torch.from_numpy(g).to(device=param.device, dtype=param.dtype)
            return grads

    def _grad_for(self, idx: int) -> torch.Tensor:
        key = tuple(p._version for p in self._params) + tuple(p.data_ptr() for p in self._params)
        if key != self._cache_key:
            self._grads = self.source_gradients()
            self._cache_key = key
        return self._grads[idx]

    def attach(self) -> "HookHandle":
        """Add the penalty's gradient to every source BatchNorm weight from now on."""
        handles = []
        for idx, param in enumerate(self._params):
            if param.requires_grad:
                handles.append(param.register_hook(lambda grad, idx=idx: grad + self._grad_for(idx)))
        return HookHandle(handles)


class HookHandle:
    """Removes the regularizer's hooks: ``handle.remove()`` or leave a ``with`` block."""

    def __init__(self, handles: list):
        self._handles = handles

    @property
    def active(self) -> int:
        """How many hooks are still registered."""
        return len(self._handles)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "HookHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def morphnet_flops(graph: ChannelGraph, model: nn.Module, **options: Any) -> GammaRegularizer:
    """MorphNet's GammaFlops regularizer."""
    return GammaRegularizer(graph, model, cost="flops", **options)


def morphnet_size(graph: ChannelGraph, model: nn.Module, **options: Any) -> GammaRegularizer:
    """MorphNet's model-size regularizer (parameter count instead of MACs)."""
    return GammaRegularizer(graph, model, cost="size", **options)
