"""The cost model: what the network costs (MACs, parameters, activations, latency…) for any
set of kept channel units, and each unit's share of it.

The core keeps the vectorised machinery: the conv/linear layers of a
:class:`~dnnshrink_core.graph.ChannelGraph` as a :class:`LayerTable` (MACs factor, weights
per channel pair, kernel, spatial positions…), the count of kept input and output channels
of every layer for a keep-set, and the bincount that turns per-layer partial derivatives
into per-unit weights. *What* a layer costs is a **resource** given by a cost-model plugin
(the ``dnnshrink_cost_model`` hook): the defaults are ``flops``, ``params``,
``activations`` and ``latency`` (``dnnshrink_plugins.costs``). A resource answers two
questions, vectorised over layers: the cost of each layer for its kept input/output counts,
and the partial derivatives of that cost w.r.t. the two counts.

For ``flops`` a conv/linear call costs ``coef · kept_in · kept_out`` (depthwise:
``coef · kept_out``); ``coef`` comes from the handlers (kernel size, groups, traced output
size), so with every unit kept the MACs equal what ``torch.utils.flop_counter`` counts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from .errors import ConfigError, PluginError
from .graph import ChannelGraph, LayerCost

# old and alternative spellings of the cost models' names
ALIASES = {"size": "params", "macs": "flops", "weights": "params"}


@dataclass
class LayerTable:
    """The conv/linear layers of a graph as arrays, one entry per layer: what a resource
    needs to price a layer for any kept channel counts.

    ``coef``: MACs per (input, output) channel pair (depthwise: per output channel) at batch 1;
    ``weights_per_pair``: weights per pair (depthwise: per output channel); ``kernel``:
    kernel elements; ``out_positions``/``in_positions``: spatial positions (or tokens) of
    the output/input per channel; ``op``: ``"conv"``, ``"pointwise"`` (a 1×1 dense conv),
    ``"grouped"`` (a grouped conv that is not depthwise), ``"depthwise"`` or ``"linear"``;
    ``in_size``/``out_size``: the channel counts with every unit kept; ``batch``: the traced
    batch size; ``groups``: a grouped conv's groups (1 for every other row), which pruning
    keeps (each group loses the same channels); ``rows``: what a per-position cost counts,
    the output positions, but for a normalisation or softmax the rows it normalises.
    """

    layers: List[LayerCost]
    coef: np.ndarray
    weights_per_pair: np.ndarray
    kernel: np.ndarray
    out_positions: np.ndarray
    in_positions: np.ndarray
    depthwise: np.ndarray
    op: np.ndarray
    in_size: np.ndarray
    out_size: np.ndarray
    batch: int = 1
    groups: Optional[np.ndarray] = None
    rows: Optional[np.ndarray] = None

    def __post_init__(self) -> None:
        if self.groups is None:
            self.groups = np.ones(len(self.layers), dtype=np.float64)
        if self.rows is None:
            self.rows = np.asarray(self.out_positions, dtype=np.float64)

    def __len__(self) -> int:
        return len(self.layers)

    @classmethod
    def build(cls, layers: Sequence[LayerCost], model: nn.Module, batch: int = 1) -> "LayerTable":
        """The table of ``layers`` (from :meth:`ChannelGraph.layers`, and for a cost model
        that prices them :meth:`ChannelGraph.tensor_ops`) of ``model``. A tensor op's row has
        no MACs and no weights, ``depthwise`` set (its input channels are its output
        channels) and its :data:`~dnnshrink_core.tensor_ops.TENSOR_KINDS` name as ``op``."""
        rows = [_describe(model, layer) for layer in layers]
        column = (lambda i, dtype=np.float64: np.array([r[i] for r in rows], dtype=dtype))
        return cls(list(layers), np.array([l.coef for l in layers], dtype=np.float64), column(0), column(1),
                   column(2), column(3), np.array([l.kind in ("depthwise", "tensor") for l in layers], dtype=bool),
                   column(4, object), np.array([_widths(l)[0] for l in layers], dtype=np.float64),
                   np.array([_widths(l)[1] for l in layers], dtype=np.float64), int(batch), column(5),
                   np.array([l.rows if l.rows is not None else r[2] for l, r in zip(layers, rows)], dtype=np.float64))


def _widths(layer: LayerCost) -> Tuple[int, int]:
    """A row's full input and output channels (a fixed row has no units: its ``widths``)."""
    return layer.widths if layer.widths is not None else (len(layer.in_units), len(layer.out_units))


def _describe(model: nn.Module, layer: LayerCost) -> tuple:
    """(weights per pair, kernel elements, output positions, input positions, op, groups) of
    a layer (of a tensor op: none, 1, the elements it writes and reads per channel, its kind, 1).

    Why positions come from ``coef / weights per pair``: the handlers give
    ``coef = kernel · positions / groups`` and ``weights per pair = kernel / groups`` (for a
    linear layer, positions and 1), so the ratio is the traced output's positions for module
    and functional layers alike, without re-running the model.
    """
    if layer.kind in ("tensor", "product"):
        read, written = layer.positions or (0.0, 0.0)
        return 0.0, 1.0, written, read, layer.op, 1.0
    per_pair = _weights_per_pair(model, layer)
    weight = _weight(model, layer)
    kernel = float(math.prod(weight.shape[2:])) if weight is not None and weight.ndim > 2 else 1.0
    out_positions = layer.coef / per_pair if per_pair else layer.coef
    in_positions = out_positions
    module = _module(model, layer.name)
    if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
        in_positions = out_positions * math.prod(module.stride)  # a strided conv reads more than it writes
    groups = 1.0
    if weight is not None and weight.ndim == 2 or isinstance(module, nn.Linear):
        op = "linear"
    elif layer.kind == "depthwise":
        op = "depthwise"
    elif layer.kind == "grouped":
        op = "grouped"
        # the weight holds each group's input channels: in_channels / groups
        groups = float(_widths(layer)[0] / weight.shape[1]) if weight is not None and weight.shape[1] else 1.0
        if isinstance(module, nn.modules.conv._ConvNd) and module.transposed:
            groups = float(module.groups)
    else:
        op = "pointwise" if kernel == 1 else "conv"
    return per_pair, kernel, out_positions, in_positions, op, groups


def _module(model: nn.Module, name: str) -> Optional[nn.Module]:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def owned_weight(model: nn.Module, layer: LayerCost) -> Tuple[Optional[nn.Module], str, Any]:
    """``(module, attribute, weight)`` of ``layer``'s weight path in ``model``: the module that
    holds it (None where the model has no such module), the attribute's name and its value
    (None where there is none)."""
    owner, _, attr = layer.weight.rpartition(".")
    module = _module(model, owner)
    return module, attr, (getattr(module, attr, None) if module is not None else None)


def _weight(model: nn.Module, layer: LayerCost) -> Any:
    return owned_weight(model, layer)[2]


def weight_rows(model: nn.Module, layer: LayerCost) -> Optional[torch.Tensor]:
    """``layer``'s weight (a row of :meth:`ChannelGraph.layers`) arranged one row per output
    channel, in the order of ``layer.out_units``, the rest of each output's weights flattened
    after it (a conv's filter; a transposed conv's ``(in, out/groups, k…)`` regrouped; the
    column of ``x @ W``); None where the weight is not a tensor of the model's. A view of the
    parameter where it can be (detached): read it, do not write to it."""
    owner, attr, weight = owned_weight(model, layer)
    if not isinstance(weight, torch.Tensor) or weight.ndim == 0:
        return None
    weight = weight.detach()
    if isinstance(owner, nn.modules.conv._ConvNd) and owner.transposed and attr == "weight":
        g = owner.groups  # (in, out/g, k…) -> one row per output channel, group by group
        weight = weight.reshape(g, weight.shape[0] // g, weight.shape[1], -1).permute(0, 2, 1, 3)
        return weight.reshape(g * weight.shape[1], -1)
    return weight.movedim(layer.out_dim, 0).reshape(weight.shape[layer.out_dim], -1)


def cost_model_names() -> List[str]:
    """The names of the loaded cost models (``flops``, ``params``, ``activations``, ``latency``…)."""
    from .plugins import plugin_names

    return plugin_names("cost model")


def get_cost_model(name: str) -> Any:
    """The cost-model factory called ``name`` (see the ``dnnshrink_cost_model`` hook)."""
    from .plugins import lookup

    return lookup("cost model", ALIASES.get(name, name))


class CostModel:
    """Vectorised cost of a :class:`ChannelGraph`'s conv/linear layers for one resource.

    ``kind``: a cost model's name: ``"flops"`` (MACs, the default), ``"params"`` (weights;
    ``"size"`` is the old spelling), ``"activations"``, ``"latency"``, or a third party's.
    ``options`` go to the cost model (``profile=`` for ``latency``). ``resource`` is the
    bound plugin object; ``unit`` its unit word; ``constant`` what no channel cut changes
    (attention's matrix products, layers kept whole: :meth:`ChannelGraph.fixed`), which every
    keep-set pays.
    """

    def __init__(self, graph: ChannelGraph, model: nn.Module, kind: str = "flops", batch: int = 1,
                 **options: Any):
        layers = graph.layers()
        if not layers:
            raise ValueError("the model has no conv or linear layer whose channels the graph follows")
        self.graph, self.kind = graph, ALIASES.get(kind, kind)
        self.layers = layers
        factory = get_cost_model(self.kind)
        # the table's rows: the layers, then the tensor ops for a cost model that prices them
        rows = self.rows = layers + (graph.tensor_ops() if getattr(factory, "prices_tensor_ops", False) else [])
        self.table = LayerTable.build(rows, model, batch)
        self.resource = factory(self.table, **options)
        self.unit = getattr(self.resource, "unit", self.kind)
        self.coef = self.table.coef if self.kind == "flops" else self.table.weights_per_pair
        self.depthwise = self.table.depthwise
        self.in_units = np.concatenate([l.in_units for l in rows])
        self.in_layer = np.concatenate([np.full(len(l.in_units), i) for i, l in enumerate(rows)])
        self.out_units = np.concatenate([l.out_units for l in rows])
        self.out_layer = np.concatenate([np.full(len(l.out_units), i) for i, l in enumerate(rows)])
        # each row's units lie in one run of in_units/out_units: a segment sum counts them
        self._in_runs = _runs([len(l.in_units) for l in rows])
        self._out_runs = _runs([len(l.out_units) for l in rows])
        self.constant = self._fixed_cost(graph, model, factory, batch, options)
        self.initial = self.cost(np.ones(graph.num_units, dtype=bool))

    @staticmethod
    def _fixed_cost(graph: ChannelGraph, model: nn.Module, factory: Any, batch: int, options: dict) -> float:
        """What the graph's fixed rows cost (:meth:`ChannelGraph.fixed`: products of
        activations, layers kept whole): no channel changes it, so it is priced once, each
        row at its ``widths``."""
        rows = graph.fixed()
        if not rows:
            return 0.0
        table = LayerTable.build(rows, model, batch)
        return float(np.sum(factory(table, **options).layer_costs(table.in_size, table.out_size)))

    def counts(self, alive: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Kept input and output channels of every layer."""
        alive = np.asarray(alive, dtype=np.float64)  # (the structure rules call this thousands of times)
        return _segment_sums(alive[self.in_units], *self._in_runs), _segment_sums(alive[self.out_units], *self._out_runs)

    def layer_costs(self, alive: np.ndarray) -> np.ndarray:
        """Each layer's cost with only the ``alive`` units kept. A layer left with no output
        channel, or with no input channel (not depthwise), is gone (its residual branch is
        dropped, see :mod:`dnnshrink_core.branches`) and costs nothing, its fixed per-call
        cost included."""
        kept_in, kept_out = self.counts(alive)
        costs = np.asarray(self.resource.layer_costs(kept_in, kept_out), dtype=np.float64)
        gone = (kept_out == 0) | ((kept_in == 0) & ~self.depthwise)
        return np.where(gone, 0.0, costs) if gone.any() else costs

    def cost(self, alive: np.ndarray) -> float:
        """The cost with only the ``alive`` units kept."""
        return float(self.layer_costs(alive).sum() + float(getattr(self.resource, "fixed", 0.0)) + self.constant)

    def unit_weights(self, alive: np.ndarray) -> np.ndarray:
        """``d cost / d (kept units)`` per unit, with the other side's counts held: MorphNet's
        weight of each unit's ``|gamma|``.

        A depthwise layer's input channels are its output channels (tied units), so its
        cost is charged once, through the outputs.
        """
        kept_in, kept_out = self.counts(alive)
        d_in, d_out = self.resource.partials(kept_in, kept_out)
        d_in = np.where(self.depthwise, 0.0, d_in)
        units = self.graph.num_units
        return (np.bincount(self.out_units, weights=np.asarray(d_out, dtype=np.float64)[self.out_layer],
                            minlength=units)
                + np.bincount(self.in_units, weights=d_in[self.in_layer], minlength=units))

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


def _runs(lengths: Sequence[int]) -> Tuple[np.ndarray, np.ndarray]:
    """The start of every non-empty run of the given lengths, laid end to end, and which runs
    are non-empty."""
    lengths = np.asarray(lengths, dtype=np.int64)
    starts = np.cumsum(lengths) - lengths
    nonempty = lengths > 0
    return starts[nonempty], nonempty


def _segment_sums(values: np.ndarray, starts: np.ndarray, nonempty: np.ndarray) -> np.ndarray:
    """The sum of each run of ``values`` (:func:`_runs`); 0 for an empty run."""
    out = np.zeros(len(nonempty), dtype=np.float64)
    if len(starts):
        out[nonempty] = np.add.reduceat(values, starts)
    return out


def group_multiples(graph: ChannelGraph, layer_multiples: Tuple[np.ndarray, np.ndarray],
                    layers: Sequence[LayerCost]) -> Tuple[np.ndarray, List[str]]:
    """Per group, the channel multiple its kept count is rounded to, and notes on the groups
    too small to round.

    ``layer_multiples`` is ``(per-layer multiple on the input side, on the output side)``
    (from the latency profile: the channel block the runtime's kernels need). A group takes
    the largest multiple among the layer sides that read or write it; a group no wider than
    its multiple keeps its count unrounded (rounding would keep it whole), and a note says so.
    """
    mult_in, mult_out = layer_multiples
    per_unit = np.ones(graph.num_units, dtype=np.int64)
    for i, layer in enumerate(layers):
        np.maximum.at(per_unit, layer.in_units, int(mult_in[i]))
        np.maximum.at(per_unit, layer.out_units, int(mult_out[i]))
    multiples = np.ones(len(graph.groups), dtype=np.int64)
    notes = []
    for g, group in enumerate(graph.groups):
        m = int(per_unit[group.units].max()) if group.size else 1
        removable = int(group.removable.sum())
        if m > 1 and removable and group.size <= m:  # one block or less: rounding would keep it whole
            notes.append(f"group {group.name!r} has {group.size} channels, no more than the runtime's block of "
                         f"{m}: its width is kept unrounded")
            m = 1
        multiples[g] = m
    return multiples, notes


def per_group_multiples(graph: ChannelGraph, multiple: Union[int, np.ndarray]) -> np.ndarray:
    """One channel multiple per group from ``round_to`` as :func:`resolve_round_to` gives it
    (one int for all groups, or an array with one per group)."""
    return np.broadcast_to(np.asarray(multiple, dtype=np.int64), (len(graph.groups),))


def resolve_round_to(graph: ChannelGraph, model: nn.Module, round_to: Union[int, str, None],
                     profile: Any = None, latency: Optional[CostModel] = None
                     ) -> Tuple[Union[int, np.ndarray], List[str]]:
    """``round_to`` as the width rules take it: an int as given (``None`` → 1), or for
    ``"auto"`` one multiple per group from the latency profile (see :func:`group_multiples`),
    with notes on the groups kept unrounded. ``latency``: the graph's latency cost model
    under that profile, when the caller has built it already."""
    if round_to is None:
        return 1, []
    if isinstance(round_to, str):
        if round_to != "auto":
            raise ValueError(f"round_to must be an integer >= 1 or 'auto', not {round_to!r}")
        costs = latency if latency is not None else CostModel(graph, model, "latency", profile=profile)
        multiples = getattr(costs.resource, "channel_multiples", None)
        if multiples is None:
            return 1, ["the latency cost model gives no channel multiples: widths are not rounded"]
        return group_multiples(graph, multiples(), costs.rows)
    return int(round_to), []


def _weights_per_pair(model: nn.Module, layer: LayerCost) -> float:
    if layer.params_coef is not None:  # given by a function handler (F.conv2d on a module's weight)
        return float(layer.params_coef)
    module = model.get_submodule(layer.name)
    if isinstance(module, nn.modules.conv._ConvNd):
        per_pair = math.prod(module.kernel_size)
        return per_pair if layer.kind == "depthwise" else per_pair / module.groups
    return 1.0


RESOURCE_COSTS = (("macs", "flops"), ("params", "params"), ("activations", "activations"), ("latency_ms", "latency"))


def resource_table(graph: ChannelGraph, model: nn.Module, keep: np.ndarray, profile: Any = None) -> dict:
    """Every resource before (all units kept) and after (``keep``): MACs, parameters and
    activations of the conv/linear layers, and the latency the profile predicts (ms, with the
    ``runtime`` the profile describes where its cost model says). A cost model that is not
    loaded is left out."""
    table = {}
    for key, name in RESOURCE_COSTS:
        try:
            costs = CostModel(graph, model, name, profile=profile)
        except (PluginError, ConfigError):  # a cost model not loaded, or a profile it cannot read: the run is done
            continue
        table[key] = {"before": costs.initial, "after": costs.cost(keep), "unit": costs.unit}
        runtime = getattr(getattr(costs.resource, "profile", None), "runtime", None)
        if isinstance(runtime, dict):
            table[key]["runtime"] = {k: runtime[k] for k in ("name", "device", "threads", "batch") if k in runtime}
    return table


def largest_fitting(build: Callable[[float], np.ndarray], cost: Callable[[np.ndarray], float], budget: float,
                    low: float, high: float, fallback: np.ndarray, steps: int = 40) -> np.ndarray:
    """Bisection for the largest ``x`` in ``[low, high]`` whose keep-set ``build(x)`` costs at
    most ``budget`` (the cost grows with ``x``); ``fallback`` when none does. Width rules
    (a uniform multiplier, an expand step) are searches of this kind."""
    best = fallback
    for _ in range(steps):
        mid = (low + high) / 2
        candidate = build(mid)
        if cost(candidate) <= budget:
            best, low = candidate, mid
        else:
            high = mid
    return best


def uniform_keep(graph: ChannelGraph, cost: Callable[[np.ndarray], float], budget: float, min_width: int = 1,
                 round_to: Union[int, np.ndarray] = 1, steps: int = 40) -> np.ndarray:
    """The uniform width multiplier at ``budget``: every group keeps the same share of its
    removable units (its first ones; at least ``min_width`` and one unit, rounded up to the
    group's multiple of ``round_to``), the largest share whose ``cost`` fits (bisection)."""
    removable = graph.unit_removable
    multiples = per_group_multiples(graph, round_to)

    def build(share: float) -> np.ndarray:
        keep = ~removable.copy()
        for group, multiple in zip(graph.groups, multiples):
            free = group.units[removable[group.units]]
            n = max(int(math.ceil(share * len(free) - 1e-9)), min_width - (len(group.units) - len(free)), 1)
            if multiple > 1:
                n = int(math.ceil(n / multiple) * multiple)
            keep[free[:min(n, len(free))]] = True
        return keep

    return largest_fitting(build, cost, budget, 0.0, 1.0, build(0.0), steps)
