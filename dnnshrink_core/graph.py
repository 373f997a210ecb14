"""The channel graph: groups of channel units that must be kept or removed together.

After propagation, tied labels form *units* (one channel position shared by, say, the
conv outputs joined by a residual add, the BatchNorms on them and the convs reading
them). Units whose labels share spaces form a *group*: for a ResNet stage, the 256
output channels of every block's last conv and of the downsample conv are one group of
256 units. A mask for a group is one boolean per unit.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from .labels import CONSUMER_ROLES, LabelStore, Space, connected_components


@dataclass
class Group:
    """Channel units that share layers. ``size`` units; a mask has one boolean per unit.

    ``removable[i]`` says whether unit ``i`` may be removed at all: it has a BatchNorm
    source, is not frozen, and reaches every channel-mixing op through such a source (for
    an algorithm that ranks by weights, :meth:`ChannelGraph.for_weight_ranking`: it is not
    frozen).
    """

    index: int
    name: str
    units: np.ndarray
    spaces: List[Space]
    removable: np.ndarray
    frozen_reasons: List[str]

    @property
    def size(self) -> int:
        return int(len(self.units))

    @property
    def members(self) -> List[str]:
        """The layers and ops whose channels belong to this group."""
        return [space.name for space in self.spaces]

    def __repr__(self) -> str:
        return f"Group({self.name!r}, size={self.size}, removable={int(self.removable.sum())})"


@dataclass
class LayerCost:
    """A conv/linear call: the units of its input and output channels and its MACs factor.

    ``name`` is the module that owns the layer's weight; ``weight`` the weight's path
    (``name + ".weight"`` unless a functional call reads another parameter);
    ``params_coef``, when a handler gives it, the weights per (input, output) pair;
    ``out_dim`` the dimension of the weight that holds the output channels (1 for ``x @ W``;
    :func:`~dnnshrink_core.cost.weight_rows` arranges any layer's weight one row per output).

    ``kind`` ``"tensor"``: not a layer but a memory-bound op (an activation, an add, a
    multiply, pooling, a concatenation, a transpose; :mod:`dnnshrink_core.tensor_ops`) with no
    MACs and no weights, which only cost models that price them see; ``op`` says which,
    ``positions`` the elements it reads and writes per channel and image; a normalisation or
    softmax also its ``rows`` per image (the slices it normalises one by one: its cost per
    row does not fall with their length).

    ``widths``: set on the rows of :meth:`ChannelGraph.fixed` (what no channel cut changes:
    they have no units), the input and output channels the row is priced at. Kind
    ``"product"`` is a matrix product of two activations (:mod:`dnnshrink_core.fixed`):
    ``coef`` its rows per image, ``widths`` its inner and output widths, ``positions`` the
    elements it reads per inner column and its rows, ``op`` ``"matmul"``.
    """

    name: str
    kind: str
    in_units: np.ndarray
    out_units: np.ndarray
    coef: float
    weight: str = ""
    params_coef: Optional[float] = None
    op: str = ""
    positions: Optional[Tuple[float, float]] = None
    widths: Optional[Tuple[int, int]] = None
    rows: Optional[float] = None
    out_dim: int = 0

    def __post_init__(self) -> None:
        if not self.weight:
            self.weight = f"{self.name}.weight" if self.name else "weight"

    def macs(self, alive: np.ndarray) -> float:
        """MACs with only the ``alive`` units (a boolean array over all units) kept."""
        n_out = float(alive[self.out_units].sum())
        if self.kind == "depthwise":
            return self.coef * n_out
        return self.coef * float(alive[self.in_units].sum()) * n_out


class ChannelGraph:
    """The traced model as groups of coupled channels (what :func:`dnnshrink_core.trace` returns).

    Printing it shows every group with its size, how many units can be removed, and its
    members, and how many residual branches can go whole (:attr:`branches`). ``traces``
    keeps the fx graphs (one per traced mode) for the generator.
    """

    def __init__(self, store: LabelStore, traces: Sequence[Any], frozen_modules: frozenset,
                 model_name: str, fingerprint: Any = None):
        self.store = store
        self.traces = list(traces)
        self.frozen_modules = frozen_modules
        self.model_name = model_name
        self.fingerprint = fingerprint
        # set when a recorded size came from the values: the weights it was recorded with
        # (dnnshrink_core.api), so that new weights record it again
        self.values_key: Any = None
        a, b = store.ties()
        self.unit_of, self.num_units = connected_components(store.size, a, b)
        for first, second, why in store.same_units:
            if len(first) != len(second) or (self.unit_of[first] != self.unit_of[second]).any():
                store.freeze(first, why)
                store.freeze(second, why)
        self._resolve_units()
        self._build_groups()
        if self._keep_layers_alive():
            self._resolve_units()
            self._build_groups()

    # --- construction ---------------------------------------------------------------
    def _keep_layers_alive(self) -> bool:
        """Freeze the first output channel of every layer whose outputs are only part of
        their group (a concatenation of several layers' outputs joined to a residual, as
        timm's ``MixedConv2d`` makes): a mask may empty such a layer while its group stays,
        and a conv or linear layer with no output channel cannot be built. A layer that
        is its group's only producer is kept alive by the group's own rule (one unit stays
        unless the whole residual branch goes). Returns whether anything was frozen."""
        group_size = np.bincount(self.unit_group, minlength=len(self.groups))
        frozen = False
        for node, info in self.traces[0].infos.items():
            labels = info.get("out_labels") if info.get("layer") else None
            if labels is None or not len(labels):
                continue
            units = np.unique(self.unit_of[labels])
            if self.unit_frozen[units].any():
                continue
            groups = np.unique(self.unit_group[units])
            if len(units) < group_size[groups].sum():
                name = info.get("layer_name", self.traces[0].module_names.get(node, node.name))
                self.store.freeze(np.asarray(labels)[:1], f"{name} keeps at least one output channel (its "
                                  "outputs are only part of their group, beside other layers' outputs)")
                frozen = True
        return frozen

    def _resolve_units(self) -> None:
        store, units = self.store, self.num_units
        reason = np.full(units, -1, dtype=np.int64)
        self.reasons: List[str] = []
        for labels, why in reversed(store.frozen):  # earlier freezes win the explanation
            reason[self.unit_of[labels]] = len(self.reasons)
            self.reasons.append(why)
        self.unit_reason = reason
        self.unit_frozen = reason >= 0

        self.source_modules: List[str] = []
        module_index: Dict[str, int] = {}
        src_units, src_mods, src_chans = [], [], []
        for labels, name, channels in store.sources:
            idx = module_index.setdefault(name, len(module_index))
            if idx == len(self.source_modules):
                self.source_modules.append(name)
            src_units.append(self.unit_of[labels])
            src_mods.append(np.full(len(labels), idx, dtype=np.int64))
            src_chans.append(channels)
        cat = (lambda xs: np.concatenate(xs) if xs else np.zeros(0, dtype=np.int64))
        self.src_unit, self.src_module, self.src_channel = cat(src_units), cat(src_mods), cat(src_chans)
        self.unit_has_source = np.bincount(self.src_unit, minlength=units) > 0
        unguarded = cat([self.unit_of[labels] for labels in store.unguarded])
        self.unit_unguarded = np.bincount(unguarded, minlength=units) > 0
        self.unit_removable = self.unit_has_source & ~self.unit_frozen & ~self.unit_unguarded

    def _build_groups(self) -> None:
        """Cluster units into groups through the producer spaces they share.

        Consumer spaces (a conv's input side, a BatchNorm's features) do not link
        groups: the BatchNorm after a concat reads several independent groups.
        """
        spaces = self.store.spaces
        n_spaces = len(spaces)
        sizes = np.array([s.size for s in spaces], dtype=np.int64)
        space_of_label = np.repeat(np.arange(n_spaces), sizes)
        producer = np.array([s.role not in CONSUMER_ROLES for s in spaces], dtype=bool)[space_of_label]
        has_producer = np.bincount(self.unit_of[producer], minlength=self.num_units) > 0
        linking = np.flatnonzero(producer | ~has_producer[self.unit_of])
        linking = linking[np.argsort(self.unit_of[linking], kind="stable")]
        su, ss = self.unit_of[linking], space_of_label[linking]
        same = su[1:] == su[:-1]
        space_group, n_groups = connected_components(n_spaces, ss[:-1][same], ss[1:][same])
        _, first = np.unique(su, return_index=True)
        raw_group = space_group[ss[first]]
        # renumber groups in the order of their first unit (roughly the network's order)
        _, first_unit = np.unique(raw_group, return_index=True)
        rank = np.empty(n_groups, dtype=np.int64)
        used = raw_group[np.sort(first_unit)]
        rank[used] = np.arange(len(used))
        self.unit_group = rank[raw_group]
        n_groups = len(used)
        unit_order = np.lexsort((np.arange(self.num_units), self.unit_group))
        starts = np.concatenate([[0], np.cumsum(np.bincount(self.unit_group, minlength=n_groups))])
        self.unit_pos = np.empty(self.num_units, dtype=np.int64)
        self.unit_pos[unit_order] = np.arange(self.num_units) - starts[self.unit_group[unit_order]]

        pairs = np.unique(self.unit_group[self.unit_of] * n_spaces + space_of_label)
        group_spaces: List[List[Space]] = [[] for _ in range(n_groups)]
        for pair in pairs:
            group_spaces[pair // n_spaces].append(spaces[pair % n_spaces])
        self.groups: List[Group] = []
        self._by_name: Dict[str, Group] = {}
        for g in range(n_groups):
            units = unit_order[starts[g]:starts[g + 1]]
            members = group_spaces[g]
            name = next((s.owner for s in members if s.role == "out" and space_group[s.index] == used[g]),
                        members[0].name)
            if name in self._by_name:
                name = f"{name}#{g}"
            reasons = sorted({self.reasons[r] for r in self.unit_reason[units] if r >= 0})
            group = Group(g, name, units, members, self.unit_removable[units], reasons)
            self.groups.append(group)
            self._by_name[name] = group

    def layers(self) -> List["LayerCost"]:
        """Every traced call of a layer whose MACs depend on kept channels (conv, linear).

        Handlers describe them with ``info["layer"]``, ``in_labels``, ``out_labels``,
        ``kind`` and ``macs_coef`` (MACs = coef · in · out, or coef · out for depthwise);
        a function handler (``F.conv2d`` on a module's weight) adds ``layer_name`` (the
        module owning the weight), ``weight`` (its path), ``params_coef`` and
        ``weight_out_dim``.
        Only the first traced mode counts, so a layer is counted once per call.
        """
        result = []
        trace = self.traces[0]
        for node, info in trace.infos.items():
            if info.get("layer") and "macs_coef" in info:
                name = info.get("layer_name", trace.module_names.get(node, node.name))
                # handlers count per row of the leading dimension, which may hold more than images
                coef = float(info["macs_coef"]) * trace.per_image(node)
                result.append(LayerCost(name, info["kind"], self.unit_of[info["in_labels"]],
                                        self.unit_of[info["out_labels"]], coef,
                                        info.get("weight", ""), info.get("params_coef"),
                                        out_dim=int(info.get("weight_out_dim", 0))))
        return result

    def for_weight_ranking(self) -> "ChannelGraph":
        """This graph as an algorithm that ranks channels by their weights sees it (one with
        ``needs_batchnorm = False``, such as ``magnitude``): every unit that is not frozen may
        go, those no BatchNorm scales included (the hidden channels of a transformer's or
        ConvNeXt's MLP, between two Linear layers; a conv without BatchNorm). The BatchNorm
        that :attr:`unit_removable` asks for otherwise is what makes a removal *exact* once
        its scale is zero (MorphNet's, network slimming's); removing a live channel changes
        the output with or without it, and the generator slices every op of a unit that is
        not frozen. A copy: the traced graph, cached for the model, is left as it was."""
        view = copy.copy(self)
        view.unit_removable = ~self.unit_frozen
        view.groups = [dataclasses.replace(g, removable=view.unit_removable[g.units]) for g in self.groups]
        view._by_name = {g.name: g for g in view.groups}
        view.__dict__.pop("_branches", None)  # a branch is droppable when its own groups are removable
        return view

    def commonest_reason(self) -> str:
        """Why most of the frozen channel units are kept (the reason that covers the most of
        them), leaving out the network's own input and output; empty when none is."""
        from .propagation import NETWORK_INPUT, NETWORK_OUTPUT

        counts = np.bincount(self.unit_reason[self.unit_frozen], minlength=len(self.reasons))
        for index in np.argsort(-counts, kind="stable"):
            if counts[index] and self.reasons[index] not in (NETWORK_INPUT, NETWORK_OUTPUT):
                return self.reasons[index]
        return ""

    def unremovable_share(self) -> float:
        """The share of the channel units no cut may remove (no BatchNorm scales them, an op
        the graph cannot follow keeps them…), leaving out the groups kept only because they
        are the network's own input or output: what keeps a model from a small target."""
        from .propagation import NETWORK_INPUT, NETWORK_OUTPUT

        ends = {NETWORK_INPUT, NETWORK_OUTPUT}
        inner = [g for g in self.groups if g.removable.any() or not g.frozen_reasons
                 or not set(g.frozen_reasons) <= ends]
        total = sum(g.size for g in inner)
        return sum(g.size - int(g.removable.sum()) for g in inner) / total if total else 0.0

    @property
    def data_sized(self) -> List[str]:
        """Where a recorded size came from the example's values (a detection head's
        post-processing: ``nonzero``, a boolean mask, ``nms``…); empty for a graph torch.fx
        traced. A network generated from such a graph is the model's own class."""
        return [where for tg in self.traces for where in getattr(tg, "data_sized", ())]

    def tensor_ops(self) -> List["LayerCost"]:
        """The memory-bound ops between the layers that a runtime runs as passes of their own
        (activations, adds, multiplies, pooling, concatenations, transposes;
        :mod:`dnnshrink_core.tensor_ops`), as :class:`LayerCost` rows of kind ``"tensor"``,
        found once per graph."""
        from .tensor_ops import find_tensor_ops

        return self._once("_tensor_ops", find_tensor_ops)

    def fixed(self) -> List["LayerCost"]:
        """What no channel cut changes, as :class:`LayerCost` rows without units and with
        their ``widths``: products of two activations (attention's matrix products, kind
        ``"product"``) and conv/linear layers no handler could follow
        (:mod:`dnnshrink_core.fixed`), found once per graph."""
        from .fixed import find_products, find_whole_layers

        return self._once("_fixed", lambda graph: find_whole_layers(graph) + find_products(graph))

    @property
    def branches(self) -> List[Any]:
        """The residual branches a structure may drop whole (:mod:`dnnshrink_core.branches`),
        found once per graph."""
        from .branches import find_branches

        return self._once("_branches", find_branches)

    def _once(self, key: str, find: Callable[["ChannelGraph"], Any]) -> Any:
        """``find(self)``, computed on the first call and kept: the graph does not change."""
        if key not in self.__dict__:
            self.__dict__[key] = find(self)
        return self.__dict__[key]

    # --- queries --------------------------------------------------------------------
    def __getitem__(self, name: str) -> Group:
        return self._by_name[name]

    def __iter__(self) -> Iterator[Group]:
        return iter(self.groups)

    def __len__(self) -> int:
        return len(self.groups)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    @property
    def group_names(self) -> List[str]:
        return [g.name for g in self.groups]

    def group_of(self, module_name: str, role: str = "out") -> Optional[Group]:
        """The group holding a module's channel space (``role`` ``"out"``, ``"in"``, ``"features"``…)."""
        space = self.store.module_spaces.get((module_name, role))
        if space is None:  # a function that reads the module's weight (F.conv2d(x, self.weight))
            space = next((s for s in self.store.param_spaces.values() if s.owner == module_name and s.role == role),
                         None)
        if space is None or space.size == 0:
            return None
        return self.groups[self.unit_group[self.unit_of[space.start]]]

    @staticmethod
    def source_weight(model: torch.nn.Module, name: str) -> Optional[torch.Tensor]:
        """The scale (gamma) of source ``name``: the ``weight`` of the module so named, or the
        parameter at that path (a BatchNorm called functionally with another parameter)."""
        owner, _, attr = name.rpartition(".")
        try:
            return getattr(model.get_submodule(name), "weight", None)
        except AttributeError:
            value = getattr(model.get_submodule(owner), attr, None)
            return value if isinstance(value, torch.Tensor) else None

    def source_weights(self, model: torch.nn.Module) -> List[Optional[torch.Tensor]]:
        """The scale of every source, in the order of :attr:`source_modules`."""
        return [self.source_weight(model, name) for name in self.source_modules]

    def unit_gammas(self, model: torch.nn.Module) -> np.ndarray:
        """Per unit, the largest ``|gamma|`` over its BatchNorm sources (0 where none)."""
        values = np.zeros(self.num_units, dtype=np.float64)
        if not len(self.src_unit):
            return values
        gathered = np.zeros(len(self.src_unit), dtype=np.float64)
        for idx, name in enumerate(self.source_modules):
            weight = self.source_weight(model, name)
            if weight is None:
                continue
            mask = self.src_module == idx
            gammas = weight.detach().abs().float().cpu().numpy()
            gathered[mask] = gammas[self.src_channel[mask]]
        np.maximum.at(values, self.src_unit, gathered)
        return values

    def keep_labels(self, keep_units: np.ndarray) -> np.ndarray:
        """Per label, whether it is kept, from a per-unit keep array."""
        return keep_units[self.unit_of]

    def units_from_masks(self, masks: Mapping[str, Any]) -> np.ndarray:
        """A per-unit keep array from per-group masks (missing groups are kept whole)."""
        keep = np.ones(self.num_units, dtype=bool)
        for name, mask in masks.items():
            group = self._by_name[name]
            keep[group.units] = np.asarray(mask, dtype=bool)
        return keep

    # --- display --------------------------------------------------------------------
    def summary(self) -> Dict[str, int]:
        """Totals: groups, channel units, removable units, frozen units."""
        return {"groups": len(self.groups), "units": int(self.num_units),
                "removable": int(self.unit_removable.sum()), "frozen": int(self.unit_frozen.sum())}

    def table(self, max_members: int = 4) -> str:
        """A text table of the groups."""
        rows = [("group", "size", "removable", "members")]
        for g in self.groups:
            members = g.members
            shown = ", ".join(members[:max_members]) + (f" (+{len(members) - max_members})" if len(members) > max_members else "")
            rows.append((g.name, str(g.size), str(int(g.removable.sum())), shown))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}" for r in rows]
        return "\n".join(lines)

    def __str__(self) -> str:
        s = self.summary()
        head = (f"ChannelGraph of {self.model_name}: {s['groups']} groups, {s['units']} channel units, "
                f"{s['removable']} removable, {s['frozen']} frozen"
                + (f", {len(self.traces)} traced modes" if len(self.traces) > 1 else "")
                + (f", {len(self.branches)} residual branches a mask can drop whole" if self.branches else ""))
        return head + "\n" + self.table()

    def __repr__(self) -> str:
        s = self.summary()
        return f"<ChannelGraph {self.model_name}: {s['groups']} groups, {s['units']} units, {s['removable']} removable>"
