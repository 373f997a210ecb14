"""MorphNet's regularizers as gradient hooks on BatchNorm scales.

``morphnet_flops`` (MorphNet's GammaFlops): a conv/linear layer costs
``C · alive_in · alive_out`` MACs, ``C`` from its kernel, groups and traced output size.
The penalty replaces each alive count by the sum of ``|gamma|`` it stands for::

    P = sum over layers  C · (alive_in · sum |gamma_out|  +  alive_out · sum |gamma_in|)

Alive counts come from the threshold and are not differentiated. The ``|gamma|`` of a
channel unit is the largest over its BatchNorm sources (MorphNet's rule for tied
channels), so only that source gets the gradient (split evenly between equal maxima, as
autograd would). ``morphnet_size`` is the same with parameter counts.

The gradient is added to the BatchNorm weights' ``.grad`` just before every step of a
``torch.optim`` optimizer (a global optimizer step pre-hook), so the user's own
``train_one_epoch(model, lr)`` runs unchanged with any optimizer. Added there, it
meets the gradients after a ``GradScaler`` has unscaled them and after
DistributedDataParallel has averaged them, so mixed precision does not dilute it and every
rank adds the same. :meth:`attach` returns a handle whose ``remove()`` (or ``with``)
takes the hook away.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import numpy as np
import torch
from torch import nn

from dnnshrink_core.plugin_api import DEFAULT_THRESHOLD, ChannelGraph, CostModel


class GammaRegularizer:
    """An L1 penalty on BatchNorm scales, weighted by each unit's share of the cost.

    ``cost``: ``"flops"`` (MorphNet's GammaFlops), ``"size"``/``"params"`` (parameters),
    ``"activations"``, ``"latency"`` (the calibrated roofline; ``profile=`` picks the
    profile), any other loaded cost model, or ``"uniform"`` (every unit weighs 1: Network
    Slimming's plain L1). ``strength`` defaults to ``strength_scale / initial cost``
    (MorphNet's rule of thumb; 1e-4 for uniform).
    """

    def __init__(self, graph: ChannelGraph, model: nn.Module, cost: str = "flops",
                 strength: Optional[float] = None, strength_scale: float = 1.0, threshold: float = DEFAULT_THRESHOLD,
                 profile: Any = None):
        self.graph, self.model, self.cost_kind, self.threshold = graph, model, cost, threshold
        # the uniform penalty still reports MACs; every other name is a cost model (plugin)
        self.costs = CostModel(graph, model, "flops" if cost == "uniform" else cost, profile=profile)
        self._removable = graph.unit_removable
        self._params: List[nn.Parameter] = graph.source_weights(model)
        self._src_param = graph.src_module
        self._src_channel = graph.src_channel
        self._src_unit = graph.src_unit
        self.initial_cost = self.costs.initial
        if strength is None:
            strength = strength_scale * (1e-4 if cost == "uniform" else 1.0 / max(self.initial_cost, 1.0))
        self.strength = strength
        self._index: Dict[int, int] = {}
        self.priced_at: Optional[np.ndarray] = None  # see price_at()
        self._fixed_weights: Optional[np.ndarray] = None  # the prices at priced_at, computed once
        self.steps = 0  # optimizer steps that took the penalty since attach()
        self.last_penalty = 0.0
        # squared norms of the scales' gradients from the data and from the penalty, summed over
        # steps on the device (no sync per step), read and reset by gradient_share()
        self._data_sq: Any = 0.0
        self._penalty_sq: Any = 0.0

    # --- the cost model -------------------------------------------------------------
    def unit_gammas(self) -> np.ndarray:
        """Per unit, the largest ``|gamma|`` of its sources."""
        return self.graph.unit_gammas(self.model)

    def alive(self, gammas: Optional[np.ndarray] = None) -> np.ndarray:
        """Units kept by the threshold rule (units that cannot be removed always are)."""
        gammas = self.unit_gammas() if gammas is None else gammas
        return ~self._removable | (gammas > self.threshold)

    def cost(self, alive: Optional[np.ndarray] = None) -> float:
        """MACs (or parameters) of the network with only ``alive`` units kept."""
        return self.costs.cost(self.alive() if alive is None else alive)

    def unit_weights(self, alive: np.ndarray) -> np.ndarray:
        """``dP / d gamma_unit`` for every unit (zero for units that cannot be removed)."""
        if self.cost_kind == "uniform":
            w = np.ones(self.graph.num_units, dtype=np.float64)
        elif self._fixed_weights is not None:
            w = self._fixed_weights.copy()
        else:
            w = self.costs.unit_weights(alive)
        w[~self._removable] = 0.0
        return w

    def price_at(self, structure: Optional[np.ndarray]) -> None:
        """Fix every unit's weight at what it costs in ``structure`` (a per-unit keep array)
        instead of in the current alive structure; None goes back to the current one.

        Why: the cost is bilinear, so at the current structure a channel's price is set by
        its neighbours' *current* widths; as one layer thins, its neighbours look ever cheaper
        and it is pressed ever harder, a feedback loop that ends in a bottleneck. Priced at
        the structure the network is heading for (the uniform multiplier's at the target),
        the relative prices are those of the network that will ship and stay put. They are
        scaled to the mean price at full width, so ``strength`` means the same either way.
        """
        self.priced_at = None if structure is None else np.asarray(structure, dtype=bool)
        self._fixed_weights = None
        if self.priced_at is not None:  # fixed, so computed here once rather than at every optimizer step
            fixed = self.costs.unit_weights(self.priced_at)
            full = self.costs.unit_weights(np.ones(self.graph.num_units, dtype=bool))[self._removable]
            mean = fixed[self._removable].mean() if self._removable.any() else 0.0
            self._fixed_weights = fixed * (float(full.mean() / mean) if mean > 0 else 1.0)

    def penalty(self) -> float:
        """The penalty ``P`` at the current scales (unscaled by ``strength``)."""
        gammas = self.unit_gammas()
        return float((self.unit_weights(self.alive(gammas)) * gammas).sum())

    # --- gradients --------------------------------------------------------------------
    def _prepare_gather(self) -> None:
        """Index arrays that gather every source's scale from one flat vector of all scales."""
        sizes = [p.numel() for p in self._params]
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._flat_index = offsets[self._src_param] + self._src_channel
        self._flat_size = int(offsets[-1])
        self._sizes = sizes
        self._by_unit = np.argsort(self._src_unit, kind="stable")
        self._unit_starts = np.flatnonzero(np.r_[True, np.diff(self._src_unit[self._by_unit]) != 0])
        self._units_with_source = self._src_unit[self._by_unit][self._unit_starts]

    def source_gradients(self) -> Dict[int, torch.Tensor]:
        """``strength · dP/d weight`` for each source BatchNorm weight (by index in ``graph.source_modules``)."""
        if not hasattr(self, "_flat_index"):
            self._prepare_gather()
        units = self.graph.num_units
        with torch.no_grad():
            flat = torch.cat([p.detach().reshape(-1) for p in self._params]).double().cpu().numpy()
        raw = flat[self._flat_index]
        values, signs = np.abs(raw), np.sign(raw)
        unit_max = np.zeros(units, dtype=np.float64)
        if len(values):
            unit_max[self._units_with_source] = np.maximum.reduceat(values[self._by_unit], self._unit_starts)
        alive = ~self._removable | (unit_max > self.threshold)
        w_unit = self.unit_weights(alive)
        self.last_penalty = float((w_unit * unit_max).sum())
        is_max = values == unit_max[self._src_unit]
        ties = np.bincount(self._src_unit[is_max], minlength=units)
        share = np.where(is_max, w_unit[self._src_unit] / np.maximum(ties[self._src_unit], 1), 0.0)
        flat_grad = np.bincount(self._flat_index, weights=self.strength * share * signs, minlength=self._flat_size)
        first = self._params[0] if self._params else None
        if first is None:
            return {}
        moved = torch.from_numpy(flat_grad).to(device=first.device, dtype=first.dtype)
        return {idx: chunk.view_as(p) for idx, (chunk, p) in enumerate(zip(moved.split(self._sizes), self._params))}

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Add ``strength · dP/d gamma`` to the ``.grad`` of every scale this optimizer steps."""
        grads: Optional[Dict[int, torch.Tensor]] = None
        for group in optimizer.param_groups:
            for param in group["params"]:
                idx = self._index.get(id(param))
                if idx is None:
                    continue
                if grads is None:
                    grads = self.source_gradients()  # once per step, from the current scales
                self._penalty_sq = self._penalty_sq + grads[idx].detach().pow(2).sum()
                if param.grad is None:
                    param.grad = grads[idx].clone()
                else:
                    self._data_sq = self._data_sq + param.grad.detach().pow(2).sum()
                    param.grad.add_(grads[idx])
        if grads is not None:
            self.steps += 1

    def gradient_share(self) -> Optional[float]:
        """The penalty's share of the scales' gradient since the last call (norm of the
        penalty's part over the sum of both parts' norms; None before any step). It says
        how hard the regularizer pulls against the user's loss, which dnnshrink does not see."""
        data, penalty = float(self._data_sq) ** 0.5, float(self._penalty_sq) ** 0.5
        self._data_sq, self._penalty_sq = 0.0, 0.0
        return None if data + penalty == 0 else penalty / (data + penalty)

    def attach(self) -> "HookHandle":
        """Add the penalty's gradient to every source BatchNorm weight from now on."""
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        self._index = {id(p): idx for idx, p in enumerate(self._params) if p.requires_grad}
        self.steps = 0
        return HookHandle([register_optimizer_step_pre_hook(self._before_step)])


class HeldScales:
    """Channel units cut during training: their BatchNorm scales are set to zero by
    :meth:`hold` and kept there after every ``torch.optim`` optimizer step while attached,
    so what the rest of the network learns from then on is learned without them. Why after
    the step: the user's optimizer (momentum, weight decay) would move a scale that was only
    zeroed once. It works beside any regularizer (a plugin's too). Units that cannot be
    removed are never held."""

    def __init__(self, graph: ChannelGraph, model: nn.Module):
        self.graph = graph
        self._params = graph.source_weights(model)
        self._shifts = [_shift(model, name) for name in graph.source_modules]
        self._held: Dict[int, torch.Tensor] = {}  # per source weight, the channels held at zero
        self.units = np.zeros(graph.num_units, dtype=bool)  # per unit, whether it is held

    def _channels(self, units: np.ndarray) -> Dict[int, torch.Tensor]:
        """Per source weight, the channels of ``units``."""
        graph = self.graph
        sources = np.flatnonzero(units[graph.src_unit])
        owners = graph.src_module[sources]
        return {int(idx): torch.as_tensor(graph.src_channel[sources[owners == idx]], dtype=torch.long,
                                          device=self._params[idx].device)
                for idx in np.unique(owners) if self._params[idx] is not None}

    def hold(self, units: np.ndarray) -> None:
        """Hold the scales of ``units`` (a per-unit bool array) at zero from now on, instead
        of the units held before."""
        self.units = np.asarray(units, dtype=bool) & self.graph.unit_removable
        self._held = self._channels(self.units)
        self._zero()

    def revive_kept(self, keep: np.ndarray, scale: float) -> int:
        """Revive (:meth:`revive`) the held units that ``keep`` keeps; returns how many. Call
        it before holding the next cut's units."""
        again = np.asarray(keep, dtype=bool) & self.units
        if again.any():
            self.revive(again, scale)
        return int(again.sum())

    def revive(self, units: np.ndarray, scale: float) -> None:
        """Give ``units`` a scale of ``scale`` and a zero shift: units a cut held and a later
        cut keeps again (a dropped block's time bought them back). Left as they were, their
        scale is zero and, under a ReLU with a negative shift, no gradient reaches it, so they
        would stay dead through fine-tuning (measured: 0.10 accuracy on digits, where the
        same structure from a magnitude ranking fine-tuned to 0.99)."""
        with torch.no_grad():
            for idx, channels in self._channels(np.asarray(units, dtype=bool)).items():
                self._params[idx].index_fill_(0, channels, float(scale))
                if self._shifts[idx] is not None:
                    self._shifts[idx].index_fill_(0, channels, 0.0)

    def _zero(self, *_: Any) -> None:
        with torch.no_grad():
            for idx, channels in self._held.items():
                self._params[idx].index_fill_(0, channels, 0.0)

    def attach(self) -> "HookHandle":
        """Keep the held scales at zero after every optimizer step from now on."""
        from torch.optim.optimizer import register_optimizer_step_post_hook

        return HookHandle([register_optimizer_step_post_hook(self._zero)])


def _shift(model: nn.Module, name: str) -> Optional[torch.Tensor]:
    """The shift (beta) of the BatchNorm module ``name``; None for a scale reached
    functionally, whose shift is not known."""
    try:
        value = getattr(model.get_submodule(name), "bias", None)
    except AttributeError:
        return None
    return value if isinstance(value, torch.Tensor) else None


class HookHandle:
    """Removes the regularizer's hook(s): ``handle.remove()`` or leave a ``with`` block."""

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


def slimming_l1(graph: ChannelGraph, model: nn.Module, **options: Any) -> GammaRegularizer:
    """Network Slimming's uniform L1 penalty on BatchNorm scales (Liu et al. 2017)."""
    return GammaRegularizer(graph, model, cost="uniform", **options)
