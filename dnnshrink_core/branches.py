"""Residual branches that can go whole: depth removal through channel masks.

A residual join ``y = x + f(x)`` whose branch ``f`` has channel groups of its own (a
MobileNetV2 block's expanded channels, a ResNet block's inner widths) becomes ``y = x + c``
when every unit of one of those groups is removed: the layers reading the removed channels
then output their bias alone, so the branch's output no longer depends on ``x`` and is a
per-channel constant ``c``. The generator drops the branch's ops and adds ``c`` (a learnable
parameter) instead, which keeps the network's outputs exact and removes the per-call cost of
every op in the branch, the part of latency no channel cut lowers.

A branch qualifies when (in every traced mode):

* its ops feed the join and nothing else (an exclusive subgraph ending at one operand of an
  ``add``; the other operand is not such a branch too);
* at least one group lives only inside it (its *inner groups*, none with a frozen unit) and
  cuts it: every path from the branch's inputs to its output passes that group's channels,
  all of whose units are removable;
* every conv/linear layer in it reads or writes an inner group, so emptying the inner
  groups zeroes every layer's cost (what cost models count is what is removed).

Whether the constant is really constant (the same at every position, whatever the input) is
checked when a network is generated, by running the branch alone; one that is not keeps a
unit, as any emptied group does.
"""
from __future__ import annotations

import heapq
import operator
from dataclasses import dataclass
from typing import Any, Dict, FrozenSet, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import fx

from .cost import owned_weight
from .handler import iter_chans

_JOIN_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_JOIN_METHODS = ("add", "add_")
_IN_PLACE = (operator.iadd, "add_")


@dataclass(frozen=True)
class Branch:
    """One droppable residual branch: the ``join`` node's argument ``operand`` is computed by
    the fx nodes ``nodes`` (names, per traced mode) alone. ``groups``: the indices of the groups
    that live only inside it (nested branches' groups included), emptied with it; ``own``: its
    *cut* groups (every path from the branch's inputs to its output passes them, so emptying
    one leaves the output constant) that no smaller branch claims: emptying one drops this
    branch. ``layers``: the conv/linear layers that go with it."""

    join: str
    operand: int
    nodes: Tuple[FrozenSet[str], ...]
    groups: FrozenSet[int]
    own: FrozenSet[int]
    layers: FrozenSet[str]

    @property
    def size(self) -> int:
        """The number of ops in the branch (in the first traced mode)."""
        return len(self.nodes[0])


def _is_join(node: fx.Node) -> bool:
    adds = ((node.op == "call_function" and node.target in _JOIN_FUNCTIONS)
            or (node.op == "call_method" and node.target in _JOIN_METHODS))
    return adds and len(node.args) == 2 and node.kwargs.get("alpha", 1) == 1


def is_in_place(node: fx.Node) -> bool:
    """Whether a join adds into its first operand."""
    return node.target in _IN_PLACE


def _live(graph: fx.Graph) -> set:
    """The nodes the graph's outputs depend on."""
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    live, stack = set(), [output]
    while stack:
        node = stack.pop()
        if node not in live:
            live.add(node)
            stack.extend(node.all_input_nodes)
    return live


def _exclusive(b: fx.Node, join: fx.Node, nodes: List[fx.Node], index: Dict[fx.Node, int], live: set) -> set:
    """The nodes that compute ``b`` and feed nothing but it (``b`` itself feeds ``join`` only),
    with the dead ends hanging off them (a shape check, an assert). Users come after the nodes
    they use, so visiting by falling position sees every user first."""
    if set(b.users) != {join}:
        return set()
    inside = {b}
    heap = [(-index[n], id(n), n) for n in b.all_input_nodes]
    heapq.heapify(heap)
    while heap:
        _, _, node = heapq.heappop(heap)
        if node in inside or node.op in ("placeholder", "output"):
            continue
        if node.users and all(u in inside or u not in live for u in node.users):
            inside.add(node)
            for n in node.all_input_nodes:
                heapq.heappush(heap, (-index[n], id(n), n))
    # the dead ends go with the branch when all they read is in it; one that also reads
    # something outside would be left reading a removed value, so the branch is not exclusive
    first = min(index[n] for n in inside)
    for node in nodes[first:index[join]]:
        if node not in live and node not in inside and any(a in inside for a in node.all_input_nodes):
            if not all(a in inside for a in node.all_input_nodes):
                return set()
            inside.add(node)
    for node in inside:
        if any(u not in inside for u in node.users) and node is not b:
            return set()
    return inside


def _groups(graph: Any, labels: np.ndarray) -> np.ndarray:
    """The distinct groups of ``labels`` (most tensors hold one group: no sort needed)."""
    if not len(labels):
        return np.zeros(0, np.int64)
    groups = graph.unit_group[graph.unit_of[labels]]
    return groups[:1] if groups.min() == groups.max() else np.unique(groups)


def _node_groups(graph: Any, tg: Any) -> Tuple[Dict[fx.Node, np.ndarray], Dict[fx.Node, int]]:
    """Per node, the groups of the channels it reads as a layer or makes; and, for a node
    whose value's channels (at dimension 1) all belong to one group, that group."""
    touched, carries = {}, {}
    for node in tg.graph.nodes:
        chans = list(iter_chans(tg.values.get(node)))
        labels = [c.labels for c in chans]
        if chans and all(c.dim == 1 for c in chans):
            own = _groups(graph, np.concatenate(labels))
            if len(own) == 1:
                carries[node] = int(own[0])
        info = tg.infos.get(node) or {}
        for key in ("in_labels", "out_labels"):
            if key in info:
                labels.append(np.asarray(info[key], dtype=np.int64))
        if labels:
            touched[node] = _groups(graph, np.concatenate(labels))
    return touched, carries


def _trace_branches(graph: Any, tg: Any) -> Dict[Tuple[str, int], tuple]:
    nodes = list(tg.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    live = _live(tg.graph)
    groups_of, carries = _node_groups(graph, tg)
    removable_group = np.array([bool(g.removable.all()) for g in graph.groups], dtype=bool)
    frozen_group = np.array([bool(graph.unit_frozen[g.units].any()) for g in graph.groups], dtype=bool)
    # per group, how many nodes touch it: a group all of whose nodes are inside a branch is inner
    touches = np.bincount(np.concatenate(list(groups_of.values()) or [np.zeros(0, np.int64)]),
                          minlength=len(graph.groups))
    found = {}
    for join in nodes:
        if not _is_join(join):
            continue
        args = join.args
        if not all(isinstance(a, fx.Node) for a in args):
            continue
        shapes = [getattr(tg.specs.get(a), "shape", None) for a in args]
        out = getattr(tg.specs.get(join), "shape", None)
        if out is None or any(s != out for s in shapes):  # no broadcasting from either side
            continue
        sides = [_side(graph, tg, touches, groups_of, removable_group, frozen_group, _exclusive(args[i], join, nodes, index, live),
                       carries, index) for i in range(2)]
        usable = [i for i, side in enumerate(sides) if side is not None]
        if len(usable) == 1:  # both sides droppable: dropping both would leave nothing of the join's shape
            found[(join.name, usable[0])] = sides[usable[0]]
    return found


def _cuts(group: int, inside: set, carries: Dict[fx.Node, int], index: Dict[fx.Node, int]) -> bool:
    """Whether every path from the branch's inputs to its output passes a tensor of ``group``
    alone: emptied, the group leaves the output independent of the input."""
    output = next(n for n in inside if all(u not in inside for u in n.users))
    reached = set()
    for node in sorted(inside, key=index.__getitem__):
        if carries.get(node) == group or node.op == "get_attr":
            continue
        if any(a not in inside or a in reached for a in node.all_input_nodes):
            reached.add(node)
    return output not in reached


def _side(graph: Any, tg: Any, touches: np.ndarray, groups_of: Dict[fx.Node, np.ndarray],
          removable_group: np.ndarray, frozen_group: np.ndarray, inside: set, carries: Dict[fx.Node, int],
          index: Dict[fx.Node, int]) -> Optional[tuple]:
    """``(node names, inner groups, layers, cut groups)`` of one operand's exclusive subgraph if
    it is a droppable branch, else None: the cut groups are the inner groups every path from
    the branch's inputs to its output passes, so emptying one leaves a constant.
    ``touches``: per group, the number of nodes touching it."""
    touched_inside = [groups_of[n] for n in inside if n in groups_of]
    if not touched_inside:
        return None
    touched = np.concatenate(touched_inside)
    counts = np.bincount(touched, minlength=len(touches))
    everything = {int(g) for g in np.flatnonzero((counts == touches) & (counts > 0))}
    inner = {g for g in everything if removable_group[g]}
    inner = {g for g in inner if _cuts(g, inside, carries, index)}
    if not inner:
        return None
    layers = set()
    for n in inside:
        info = tg.infos.get(n) or {}
        if info.get("layer") and "macs_coef" in info:
            labels = np.concatenate([np.asarray(info["in_labels"], np.int64), np.asarray(info["out_labels"], np.int64)])
            if not set(graph.unit_group[graph.unit_of[labels]].tolist()) & everything:
                return None  # a layer emptying the inner groups would not remove
            layers.add(info.get("layer_name", tg.module_names.get(n, n.name)))
    if not layers or any(frozen_group[g] for g in everything):  # what must stay cannot go with it
        return None
    return (frozenset(n.name for n in inside), frozenset(everything), frozenset(layers), frozenset(inner))


def find_branches(graph: Any) -> List[Branch]:
    """Every droppable residual branch of ``graph`` (see the module's docstring), smallest first."""
    per_trace = [_trace_branches(graph, tg) for tg in graph.traces]
    common = []
    for key, (nodes, inner, layers, cut) in per_trace[0].items():
        others = [t.get(key) for t in per_trace[1:]]
        if any(o is None or o[1] != inner or o[3] != cut for o in others):
            continue
        common.append((key, (nodes,) + tuple(o[0] for o in others), inner, layers, cut))
    common.sort(key=lambda item: len(item[1][0]))
    branches, claimed = [], set()
    for (join, operand), nodes, inner, layers, cut in common:  # a group belongs to the smallest branch it cuts
        own = frozenset(cut - claimed)
        claimed |= cut
        if own:
            branches.append(Branch(join, operand, nodes, frozenset(inner), own, frozenset(layers)))
    return branches


def dropped(graph: Any, keep: np.ndarray) -> List[Branch]:
    """The branches ``keep`` drops (one of their own groups keeps no unit), outermost only.
    Where no group is emptied the graph's branches are not even looked for."""
    empty = {g.index for g in graph.groups if not keep[g.units].any()}
    if not empty:
        return []
    hit = [b for b in graph.branches if b.own & empty]
    outer = []
    for b in sorted(hit, key=lambda b: -b.size):
        if not any(b.nodes[0] <= o.nodes[0] for o in outer):
            outer.append(b)
    return outer


def settle(graph: Any, keep: np.ndarray) -> np.ndarray:
    """``keep`` with every group inside a dropped branch emptied, so what the generator removes
    is what cost models count."""
    hit = dropped(graph, keep)
    if not hit:
        return keep
    keep = keep.copy()
    for b in hit:
        for g in b.groups:
            keep[graph.groups[g].units] = False
    return keep


def emptiable(graph: Any) -> np.ndarray:
    """Per group, whether removing every unit is allowed (it is a droppable branch's own group)."""
    result = np.zeros(len(graph.groups), dtype=bool)
    for b in graph.branches:
        result[list(b.own)] = True
    return result


def branch_outputs(tg: Any, branch: Branch, trace_index: int, zeroed: Dict[str, torch.Tensor],
                   seeds: Sequence[int]) -> Optional[List[Any]]:
    """Run ``branch`` alone (eval mode) on random inputs of the traced shapes, one draw per
    seed, with the parameters in ``zeroed`` in place of the model's; None if its inputs are
    not all tensors."""
    names = branch.nodes[trace_index]
    by_name = {n.name: n for n in tg.graph.nodes}
    inside = [n for n in tg.graph.nodes if n.name in names]
    sub = fx.Graph()
    env: Dict[fx.Node, fx.Node] = {}
    specs = []
    for node in inside:
        for arg in node.all_input_nodes:
            if arg.name in names or arg in env:
                continue
            spec = tg.specs.get(arg)
            if not hasattr(spec, "shape"):
                return None
            env[arg] = sub.placeholder(f"in_{len(specs)}")
            specs.append(spec)
    for node in inside:
        env[node] = sub.node_copy(node, lambda n: env[n])
    sub.output(env[by_name[branch.join].args[branch.operand]])
    owners = {node.target: _resolve(tg, node) for node in sub.nodes if node.op in ("call_module", "get_attr")}
    module = fx.GraphModule(owners, sub)
    module.eval()
    names_here = {name for name, _ in module.named_parameters()} | {name for name, _ in module.named_buffers()}
    overrides = {k: v for k, v in zeroed.items() if k in names_here}
    reference = next(iter(tg.root().parameters()), None)
    device = reference.device if reference is not None else torch.device("cpu")
    outputs = []
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        feeds = tuple(torch.randn(spec.shape, generator=generator).to(device=device, dtype=spec.dtype)
                      if spec.dtype.is_floating_point else torch.zeros(spec.shape, dtype=spec.dtype, device=device)
                      for spec in specs)
        with torch.no_grad():
            outputs.append(torch.func.functional_call(module, overrides, feeds))
    return outputs


def _resolve(tg: Any, node: fx.Node) -> Any:
    """What a ``call_module`` or ``get_attr`` node of the traced graph names."""
    if node.op == "call_module":
        return tg.get_submodule(node.target)
    if node.target in tg.constants:
        return tg.constants[node.target]
    owner, _, attr = node.target.rpartition(".")
    return getattr(tg.get_submodule(owner), attr)


def constant_of(values: Sequence[torch.Tensor]) -> Optional[torch.Tensor]:
    """The per-channel constant (shape ``1, C, 1, …``) all ``values`` equal at every position and
    sample, or None where they differ."""
    first = values[0]
    if first.dim() < 2:
        return None
    dims = [d for d in range(first.dim()) if d != 1]
    c = first.mean(dim=dims, keepdim=True)
    scale = float(c.abs().max()) if c.numel() else 0.0
    for v in values:
        if v.shape != first.shape or float((v - c).abs().max()) > 1e-5 * scale + 1e-6:
            return None
    return c


def zeroed_sources(graph: Any, model: Any, units: np.ndarray) -> Optional[Dict[str, torch.Tensor]]:
    """Copies of the BatchNorm scales and shifts of ``units``' sources with those channels
    zeroed (``{path: tensor}``), and, for units no BatchNorm scales (which only an
    algorithm ranking by weights removes), of the conv/linear weight rows and biases that
    make them; None when a source has no module with both, or a layer's weight has no row
    per output channel (a transposed conv)."""
    chosen = np.isin(graph.src_unit, units)
    result: Dict[str, torch.Tensor] = {}
    for idx in np.unique(graph.src_module[chosen]):
        name = graph.source_modules[int(idx)]
        channels = graph.src_channel[chosen & (graph.src_module == idx)]
        try:
            module = model.get_submodule(name)
        except AttributeError:
            return None
        for attr in ("weight", "bias"):
            tensor = getattr(module, attr, None)
            if not isinstance(tensor, torch.Tensor):
                return None
            path = f"{name}.{attr}" if name else attr
            value = result.get(path, tensor.detach()).clone()
            value[torch.as_tensor(channels, dtype=torch.long, device=value.device)] = 0.0
            result[path] = value
    units = np.asarray(units, dtype=np.int64)
    unscaled = units[~graph.unit_has_source[units]]
    return _zeroed_layers(graph, model, unscaled, result) if len(unscaled) else result


def _zeroed_layers(graph: Any, model: Any, units: np.ndarray,
                   result: Dict[str, torch.Tensor]) -> Optional[Dict[str, torch.Tensor]]:
    """``result`` with the weight rows and biases that make ``units`` zeroed, so that those
    channels carry zeros as a zero BatchNorm scale and shift would make them."""
    for layer in graph.layers():
        rows = np.isin(layer.out_units, units)
        if not rows.any():
            continue
        module, attr, weight = owned_weight(model, layer)
        if module is None or not isinstance(weight, torch.Tensor) or getattr(module, "transposed", False) \
                or weight.ndim <= layer.out_dim or weight.shape[layer.out_dim] != len(layer.out_units):
            return None
        index = torch.as_tensor(np.flatnonzero(rows), dtype=torch.long, device=weight.device)
        bias = getattr(module, "bias", None) if attr == "weight" and layer.out_dim == 0 else None
        if isinstance(bias, torch.Tensor) and tuple(bias.shape) != (len(layer.out_units),):
            return None  # a bias that is not this layer's outputs' (``x @ module.weight`` adds none)
        prefix = layer.weight[: -len(attr)]  # "block.fc." of "block.fc.weight"; "" of a bare "weight"
        for path, tensor, dim in ((layer.weight, weight, layer.out_dim), (prefix + "bias", bias, 0)):
            if isinstance(tensor, torch.Tensor):
                result[path] = result.get(path, tensor.detach()).clone().index_fill_(dim, index, 0.0)
    return result


def parameter_name(branch: Branch) -> str:
    """The attribute of a generated network that holds a dropped branch's constant."""
    return f"dropped_{branch.join}"


def _eval_index(graph: Any) -> int:
    """The trace whose mode is eval (the constants are eval-mode values)."""
    for i, tg in enumerate(graph.traces):
        if not tg.mode.get("training", False):
            return i
    return 0


def constants(graph: Any, model: Any, keep: np.ndarray, zero: bool = True,
              seed: int = 0) -> Tuple[Dict[Branch, torch.Tensor], List[Branch]]:
    """For every branch ``keep`` drops, its output as a per-channel constant over the kept
    channels of the join (``{branch: tensor}``), and the branches whose output is not constant.
    ``zero``: the inner groups' BatchNorm scales and shifts are taken as zero (the generator's
    exactness: removed channels carry zeros); otherwise the model's own (near-constant
    channels, as compensation measures them)."""
    index = _eval_index(graph)
    tg = graph.traces[index]
    by_name = {n.name: n for n in tg.graph.nodes}
    keep_labels = graph.keep_labels(keep)
    result, failed = {}, []
    for b in dropped(graph, keep):
        units = np.concatenate([graph.groups[g].units for g in b.groups])
        zeroed = zeroed_sources(graph, model, units) if zero else {}
        values = None if zeroed is None else branch_outputs(tg, b, index, zeroed, (seed, seed + 1))
        c = None if values is None or any(v is None or not isinstance(v, torch.Tensor) for v in values) \
            else (constant_of(values) if zero else values[0].mean(dim=[d for d in range(values[0].dim()) if d != 1],
                                                                  keepdim=True))
        if c is None:
            failed.append(b)
            continue
        chan = next(iter_chans(tg.values.get(by_name[b.join].args[b.operand])), None)
        if chan is None or chan.dim != 1 or len(chan.labels) != c.shape[1]:
            failed.append(b)
            continue
        kept = torch.as_tensor(np.flatnonzero(keep_labels[chan.labels]), dtype=torch.long, device=c.device)
        result[b] = c.index_select(1, kept).detach()
    return result, failed
