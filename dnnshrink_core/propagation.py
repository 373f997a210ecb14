"""Propagating channels through traced graphs: every node asks the handler plugins how its
op couples the channels at its inputs and outputs, and the answers are written into one
:class:`~dnnshrink_core.labels.LabelStore` (see :func:`propagate`). Tracing itself (the
graphs, per mode) is :mod:`dnnshrink_core.tracing`.
"""
from __future__ import annotations

import operator
import warnings
from typing import Any, Dict, List, Optional, Sequence

from torch import fx

from .errors import PluginError, UnknownOpWarning
from .handler import PropagateContext, TensorSpec, frozen_chans, iter_chans, iter_nodes
from .labels import Chan, ChanCount, LabelStore, ShapeOf
from .tracing import TracedGraph

# why the channels of the network's own input and outputs are kept (no user expects them to change)
NETWORK_INPUT, NETWORK_OUTPUT = "network input", "network output"


class _UnknownOps:
    """Collects ops without a handler so each kind is reported once."""

    def __init__(self) -> None:
        self.seen: Dict[str, List[str]] = {}
        # parameters read by an op treated as opaque: never sliced (see _freeze_unsafe_params)
        self.opaque_params: Dict[str, str] = {}

    def __call__(self, ctx: PropagateContext, reason: str, warn: bool) -> None:
        inputs = ctx.input_chans()
        if ctx.module_name is not None:
            ctx.store.make_opaque(ctx.module_name, reason)
        for chan in inputs:
            ctx.store.freeze(chan.labels, reason)
        for arg in iter_nodes((ctx.node.args, ctx.node.kwargs)):
            path = ctx.param_path(arg)
            if path is not None:
                self.opaque_params.setdefault(path, reason)
        ctx.fresh_output(reason)
        if warn and inputs:
            self.seen.setdefault(_op_key(ctx), []).append(_where(ctx))

    def report(self) -> None:
        for key, where in self.seen.items():
            places = ", ".join(where[:3]) + (f" and {len(where) - 3} more" if len(where) > 3 else "")
            warnings.warn(
                f"dnnshrink: no channel handler for `{key}` (at {places}); the channels crossing it are "
                "kept. To prune through it, register a handler with the `dnnshrink_op_handler` hook "
                "(see docs/plugins.md).", UnknownOpWarning, stacklevel=4)


def _where(ctx: PropagateContext) -> str:
    if ctx.module_name is not None:
        return f"module `{ctx.module_name}`"
    stack = ctx.node.meta.get("nn_module_stack")
    owner = list(stack)[-1] if stack else ""
    inside = f" in `{owner}`" if owner else ""  # nothing to add at the top level of forward
    return f"node `{ctx.node.name}`{inside}"


def _op_key(ctx: PropagateContext) -> str:
    node = ctx.node
    if node.op == "call_module":
        return type(ctx.module).__qualname__
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    target = node.target
    return f"{getattr(target, '__module__', '') or ''}.{getattr(target, '__name__', str(target))}".lstrip(".")


def propagate(graphs: Sequence[TracedGraph], store: LabelStore, pm: Any, frozen_modules: frozenset) -> None:
    """Run every node's handler over every graph, filling ``store``."""
    unknown = _UnknownOps()
    claims: set = set()
    for tg in graphs:
        for node in tg.graph.nodes:
            _propagate_node(tg, node, store, pm, frozen_modules, unknown, claims)
    _freeze_unsafe_params(graphs, store, unknown, claims)
    unknown.report()


def _freeze_unsafe_params(graphs: Sequence[TracedGraph], store: LabelStore, unknown: _UnknownOps,
                          claims: set) -> None:
    """Keep whole every parameter that some op reads without saying how to slice it.

    A parameter of two or more dimensions is sliced only if every op that reads it claimed
    it (``ctx.param_labels``); one read by an opaque op, or owned by a module that is also
    called whole (whose handler slices it its own way), keeps all its entries, and that
    module keeps its channels.
    """
    unsafe = dict(unknown.opaque_params)
    leaf_modules = {name for tg in graphs for name in tg.module_names.values()}
    for tg in graphs:
        for node, path in tg.param_paths.items():
            spec = tg.specs.get(node)
            owner = path.rpartition(".")[0]
            if owner in leaf_modules:
                unsafe.setdefault(path, f"{path} is read directly although its module `{owner}` is called whole")
                store.make_opaque(owner, unsafe[path])
            elif (isinstance(spec, TensorSpec) and spec.ndim >= 2 and per_channel_dim(spec) is None
                  and any((node, user) not in claims for user in node.users)):
                users = ", ".join(sorted(u.name for u in node.users if (node, u) not in claims))
                unsafe.setdefault(path, f"{path} is read by an op that does not slice it ({users})")
    for path, reason in unsafe.items():
        for labels in store.param_labels(path):
            store.freeze(labels, reason)


def per_channel_dim(spec: Any) -> Optional[int]:
    """The channel dimension of a parameter that holds one value per channel: dim 0 of a
    1-D tensor, or the only dimension longer than 1 (a layer scale of shape ``(C, 1, 1)``
    or ``(1, C, 1, 1)``); None for anything else."""
    if not isinstance(spec, TensorSpec) or spec.ndim == 0:
        return None
    if spec.ndim == 1:
        return 0
    long = [d for d, n in enumerate(spec.shape) if n != 1]
    return long[0] if len(long) == 1 else None


def _propagate_node(tg: TracedGraph, node: fx.Node, store: LabelStore, pm: Any,
                    frozen_modules: frozenset, unknown: _UnknownOps, claims: set) -> None:
    spec = tg.specs.get(node)
    if node.op == "placeholder":
        tg.values[node] = frozen_chans(store, node.name, "input", spec, NETWORK_INPUT)
        return
    if node.op == "get_attr":
        path = tg.param_paths.get(node)
        dim = per_channel_dim(spec)
        if path is not None and dim is not None:
            # a per-channel parameter (a BatchNorm weight read by F.batch_norm, a layer
            # scale of shape (C,) or (C, 1, 1)): its entries are channels at that dim,
            # sliced where the tensor lives
            labels, created = store.param_space(path, dim, spec.shape[dim])
            owner = path.rpartition(".")[0]
            if created and owner in frozen_modules:
                store.freeze(labels, f"{owner} is outside the backbone (back_bone_only)")
            tg.values[node] = Chan(labels, dim=dim)
            return
        tg.values[node] = frozen_chans(store, node.target, "constant", spec, f"constant tensor {node.target}")
        return
    if node.op == "output":
        for arg in iter_nodes(node.args):
            for chan in iter_chans(tg.values.get(arg)):
                store.freeze(chan.labels, NETWORK_OUTPUT)
        return
    if _shape_read(tg, node, store):
        return
    counts = _counts_used(tg, node)
    module = tg.get_submodule(node.target) if node.op == "call_module" else None
    info: Dict[str, Any] = {}
    tg.infos[node] = info
    handler = pm.hook.dnnshrink_op_handler(node=node, module=module)
    any_dim = bool(getattr(handler, "any_channel_dim", False))
    ctx = PropagateContext(node, module, tg.module_names.get(node), store, tg.values, tg.specs, info,
                           tg.allow_rewrite, frozen_modules, unknown, param_paths=tg.param_paths, claims=claims,
                           any_channel_dim=any_dim)
    if handler is not None and not any_dim:
        # the handler reads channels at dim 1 only: channels elsewhere stay as they are
        for chan in ctx.input_chans():
            if chan.dim != 1:
                store.freeze(chan.labels, f"{ctx.describe()} does not follow channels at dim {chan.dim}")
    if handler is None:
        if spec is None or not _has_tensor(spec):
            tg.values[node] = None  # sizes, shapes, ints: nothing to do with channels
        else:
            ctx.unknown(f"{ctx.describe()} has no channel handler")
    else:
        tg.handlers[node] = handler
        try:
            handler.propagate(ctx)
        except Exception as exc:
            raise PluginError(f"channel handler {handler!r} failed on {ctx.describe()}: "
                              f"{type(exc).__name__}: {exc}") from exc
        if not ctx._answered:
            raise PluginError(f"channel handler {handler!r} did not call ctx.output(...) for {ctx.describe()}")
    _check_counts(tg, node, store, counts, ctx.describe())  # also after arithmetic on a count (``C // 2``)


def _shape_read(tg: TracedGraph, node: fx.Node, store: LabelStore) -> bool:
    """Follow reads of a tensor's shape (``x.shape``, ``x.size()``, ``x.size(1)``, an item
    of a shape): the channel count becomes a :class:`ChanCount`. True when ``node`` was one."""
    def chan_of(arg: Any) -> Optional[Chan]:
        value = tg.values.get(arg) if isinstance(arg, fx.Node) else None
        return value if isinstance(value, Chan) else None

    args = node.args
    if node.op == "call_function" and node.target is getattr and len(args) == 2 and args[1] == "shape" \
            or node.op == "call_method" and node.target == "size" and len(args) == 1 and not node.kwargs:
        chan = chan_of(args[0])
        tg.values[node] = ShapeOf(chan) if chan is not None else None
        return True
    if node.op == "call_method" and node.target == "size" and (len(args) == 2 or "dim" in node.kwargs):
        chan, spec = chan_of(args[0]), tg.specs.get(args[0])
        dim = args[1] if len(args) == 2 else node.kwargs["dim"]
        tg.values[node] = ChanCount(chan.labels) if chan is not None and isinstance(dim, int) and \
            isinstance(spec, TensorSpec) and dim % spec.ndim == chan.dim else None
        return True
    if node.op == "call_function" and node.target is operator.getitem and isinstance(args[0], fx.Node) \
            and isinstance(tg.values.get(args[0]), ShapeOf):
        chan, index, ndim = tg.values[args[0]].chan, args[1], None
        spec = tg.specs.get(args[0].args[0]) if args[0].args else None
        ndim = spec.ndim if isinstance(spec, TensorSpec) else None
        if isinstance(index, int) and ndim:
            tg.values[node] = ChanCount(chan.labels) if index % ndim == chan.dim else None
        else:  # a slice of the shape (``x.shape[1:]``): its users cannot be followed
            store.freeze(chan.labels, f"`{node.name}` takes part of a shape that holds the channel count")
            tg.values[node] = None
        return True
    return False


def _counts_used(tg: TracedGraph, node: fx.Node) -> List[ChanCount]:
    """The channel counts (and whole shapes) among ``node``'s arguments."""
    found: List[ChanCount] = []
    for arg in iter_nodes((node.args, node.kwargs)):
        value = tg.values.get(arg)
        if isinstance(value, ChanCount):
            found.append(value)
        elif isinstance(value, ShapeOf):
            found.append(ChanCount(value.chan.labels))
    return found


def _check_counts(tg: TracedGraph, node: fx.Node, store: LabelStore, counts: List[ChanCount], what: str) -> None:
    """A channel count read from one tensor that sizes this op's output (``x.view(B, C, -1)``
    of a tensor with those channels) stays right when both lose the same channels; used any
    other way (arithmetic, sizing a tensor of other channels) its channels are kept."""
    out = tg.values.get(node)
    for count in counts:
        if isinstance(out, Chan) and len(out) == len(count.labels):
            store.require_same_units(count.labels, out.labels,
                                     f"{what} is sized by a channel count read from another tensor's shape")
        else:
            store.freeze(count.labels, f"{what} uses a channel count read from a tensor's shape")


def _has_tensor(spec: Any) -> bool:
    if isinstance(spec, TensorSpec):
        return True
    return isinstance(spec, tuple) and any(_has_tensor(s) for s in spec)
