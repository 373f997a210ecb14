"""The interface of depth-change handlers, and the contexts the core hands them.

A handler answers two questions for one traced op (see ``docs/plugins.md``):

* :meth:`OpHandler.propagate` — how are the channels at my inputs and outputs coupled?
  It reads the input channels (:meth:`PropagateContext.chan`) and says so with
  :meth:`~PropagateContext.tie`, :meth:`~PropagateContext.freeze`,
  :meth:`~PropagateContext.new_labels`, :meth:`~PropagateContext.module_labels` and
  finally :meth:`~PropagateContext.output`.
* :meth:`OpHandler.rebuild` — given which channels are kept
  (:meth:`RebuildContext.keep`), how do I rebuild myself? A module handler returns a
  new module through :meth:`~RebuildContext.replace_module`; a function handler may
  rewrite literal arguments with :meth:`~RebuildContext.set_args`.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import fx, nn

from .labels import Chan, LabelStore


class TensorSpec:
    """Shape and dtype of one tensor seen while running the traced graph."""

    __slots__ = ("shape", "dtype")

    def __init__(self, shape: Tuple[int, ...], dtype: torch.dtype):
        self.shape = shape
        self.dtype = dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __repr__(self) -> str:
        return f"TensorSpec({tuple(self.shape)}, {self.dtype})"


def spec_of(value: Any) -> Any:
    """A :class:`TensorSpec` for a tensor, a tuple of specs for a tuple or list, else None."""
    if isinstance(value, torch.Tensor):
        return TensorSpec(tuple(value.shape), value.dtype)
    if isinstance(value, (tuple, list)) and not isinstance(value, torch.Size):
        return tuple(spec_of(v) for v in value)
    return None


def conv_terms(in_channels: int, groups: int, kernel: int, positions: float) -> Tuple[str, float]:
    """A conv call's layer kind (``"depthwise"``: one input channel per group,
    ``"grouped"``, ``"dense"``) and MACs factor for :meth:`PropagateContext.declare_layer`,
    from its ``kernel`` elements and the ``positions`` it computes (a transposed conv: its
    input's)."""
    per_pair = kernel * positions
    if groups > 1 and groups == in_channels:
        return "depthwise", per_pair
    return ("grouped" if groups > 1 else "dense"), per_pair / groups


def node_arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """A traced call's argument by position, else by keyword, else ``default``."""
    if index < len(node.args):
        return node.args[index]
    return node.kwargs.get(name, default)


def iter_nodes(value: Any) -> Iterator[fx.Node]:
    """Every :class:`torch.fx.Node` inside a nested argument structure."""
    if isinstance(value, fx.Node):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from iter_nodes(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from iter_nodes(item)
    elif isinstance(value, slice):
        yield from iter_nodes((value.start, value.stop, value.step))


def iter_chans(value: Any) -> Iterator[Chan]:
    """Every :class:`Chan` inside a nested propagated value."""
    if isinstance(value, Chan):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from iter_chans(item)


def frozen_chans(store: LabelStore, owner: str, role: str, spec: Any, reason: str) -> Any:
    """Fresh, frozen channel labels for every tensor (of two or more dims) in ``spec``: the
    network's inputs, lifted constants, and the outputs of ops that make new tensors."""
    if isinstance(spec, TensorSpec):
        if spec.ndim < 2:
            return None
        labels = store.new_space(owner, role, spec.shape[1])
        store.freeze(labels, reason)
        return Chan(labels)
    if isinstance(spec, tuple):
        return tuple(frozen_chans(store, f"{owner}[{i}]", role, s, reason) for i, s in enumerate(spec))
    return None


class OpHandler:
    """Base class of depth-change handlers. Subclass it and override what you need.

    ``name`` shows in messages. The default :meth:`propagate` treats the op as unknown
    (freezes every channel crossing it); the default :meth:`rebuild` changes nothing.

    ``any_channel_dim``: a handler that reads :attr:`Chan.dim <dnnshrink_core.Chan>` and
    follows channels at any tensor dimension (channels-last tensors, per-channel
    parameters) sets it True. For every other handler the core freezes the inputs whose
    channels are not at dim 1 and hides them (``ctx.chan`` gives None), so a handler
    written for the ``N, C, …`` layout can never mistake another dimension for channels.
    """

    name = "op"
    any_channel_dim = False

    def propagate(self, ctx: "PropagateContext") -> None:
        """Describe how the op couples channels; must end with ``ctx.output(...)``."""
        ctx.unknown(f"{self.name} does not describe its channels", warn=False)

    def rebuild(self, ctx: "RebuildContext") -> None:
        """Rebuild the op for the kept channels (default: nothing to change)."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


class PropagateContext:
    """What a handler's ``propagate`` sees of one node, and how it answers."""

    def __init__(self, node: fx.Node, module: Optional[nn.Module], module_name: Optional[str],
                 store: LabelStore, values: Dict[fx.Node, Any], specs: Dict[fx.Node, Any],
                 info: Dict[str, Any], allow_rewrite: bool, frozen_modules: frozenset,
                 on_unknown: Callable[["PropagateContext", str, bool], None], *,
                 param_paths: Optional[Dict[fx.Node, str]] = None, claims: Optional[set] = None,
                 any_channel_dim: bool = True):
        self.node = node
        self.module = module
        self.module_name = module_name
        self.store = store
        self._values = values
        self._specs = specs
        self.info = info
        self.allow_rewrite = allow_rewrite
        self._frozen_modules = frozen_modules
        self._on_unknown = on_unknown
        self._answered = False
        self._param_paths = param_paths or {}
        self._claims = claims if claims is not None else set()
        self._any_dim = any_channel_dim

    # --- reading the inputs -------------------------------------------------------
    def arg(self, index: int, name: str, default: Any = None) -> Any:
        """The op's argument by position, else by keyword, else ``default``."""
        return node_arg(self.node, index, name, default)

    def value(self, arg: Any) -> Any:
        """The propagated value of an argument: a :class:`Chan`, a tuple of them, or None.

        For a handler without ``any_channel_dim``, channels that are not at dim 1 read as
        None (the core has frozen them).
        """
        value = self._values.get(arg) if isinstance(arg, fx.Node) else None
        return value if self._any_dim else _only_dim1(value)

    def chan(self, arg: Any) -> Optional[Chan]:
        """The channels of a tensor argument, or None when it has no tracked channels."""
        value = self.value(arg)
        return value if isinstance(value, Chan) else None

    def spec(self, arg: Any) -> Any:
        """The :class:`TensorSpec` of a tensor argument (None for other arguments)."""
        return self._specs.get(arg) if isinstance(arg, fx.Node) else None

    @property
    def out_spec(self) -> Any:
        """The :class:`TensorSpec` (or tuple of specs) of this op's output."""
        return self._specs.get(self.node)

    def input_chans(self) -> List[Chan]:
        """Every tracked tensor among the op's arguments (whatever its channel dim)."""
        chans = []
        for arg in iter_nodes((self.node.args, self.node.kwargs)):
            chans.extend(iter_chans(self._values.get(arg)))
        return chans

    def param_path(self, arg: Any) -> Optional[str]:
        """The model path (``"block.bn.weight"``) of a parameter or buffer that ``arg`` reads
        directly through ``get_attr``; None for anything else (computed tensors, constants
        fx lifted out of ``forward``)."""
        return self._param_paths.get(arg) if isinstance(arg, fx.Node) else None

    def param_labels(self, arg: Any, dim: int, owner: Optional[str] = None,
                     role: str = "param") -> Optional[np.ndarray]:
        """The persistent labels of dimension ``dim`` of the parameter ``arg`` reads, or None.

        The generator slices that dimension of the tensor, in the module that owns it, by
        these labels. Asking claims this use of the parameter: a parameter of two or more
        dimensions is sliced only when every op that reads it claimed it (one that did not
        would get a tensor of the wrong size), otherwise all its labels are frozen.
        ``owner`` and ``role`` name the space (a conv weight's rows: the layer, ``"out"``).
        """
        path = self.param_path(arg)
        spec = self.spec(arg)
        if path is None or not isinstance(spec, TensorSpec) or not 0 <= dim < spec.ndim:
            return None
        labels, created = self.store.param_space(path, dim, spec.shape[dim], owner, role)
        if created and path.rpartition(".")[0] in self._frozen_modules:
            self.store.freeze(labels, f"{path.rpartition('.')[0]} is outside the backbone (back_bone_only)")
        self._claims.add((arg, self.node))
        return labels

    # --- answering ----------------------------------------------------------------
    def new_labels(self, role: str, size: int) -> np.ndarray:
        """Fresh labels for ``size`` channels this op creates (owned by this node)."""
        return self.store.new_space(self.owner, role, size)

    @property
    def owner(self) -> str:
        """The name shown for this op: its module's name, or the graph node's name."""
        return self.module_name or self.node.name

    def module_labels(self, role: str, size: int) -> np.ndarray:
        """The persistent labels of this module's channel dimension ``role``.

        Every trace of the model (and every call of a shared module) gets the same
        labels, so the module is rebuilt once, consistently. Modules the user keeps whole
        (``back_bone_only`` heads) have theirs frozen.
        """
        labels, created = self.store.module_space(self.owner, role, size)
        if created and self.module_name in self._frozen_modules:
            self.store.freeze(labels, f"{self.module_name} is outside the backbone (back_bone_only)")
        return labels

    def tie(self, a: np.ndarray, b: np.ndarray) -> None:
        """Keep or remove ``a[i]`` and ``b[i]`` together."""
        self.store.tie(a, b)

    def freeze(self, labels: np.ndarray, reason: Optional[str] = None) -> None:
        """Keep every channel in ``labels`` (and everything tied to it)."""
        self.store.freeze(labels, reason or f"crosses {self.describe()}")

    def is_frozen(self, chan: Chan) -> bool:
        """Whether every channel of ``chan`` is already known to be kept whole (the fresh
        labels of an op that was not followed, a network input). Such a tensor's labelled
        dimension carries nothing to remove, so a handler may follow another dimension
        instead (a ``Linear`` over the last dimension of tokens from an unfollowed reshape)."""
        return self.store.frozen_so_far(chan.labels)

    def add_source(self, labels: np.ndarray, channels: Optional[np.ndarray] = None) -> None:
        """Declare this module (a BatchNorm) a MorphNet source of ``labels``."""
        channels = np.arange(len(labels)) if channels is None else channels
        self.store.add_source(labels, self.owner, channels)

    LAYER_KINDS = ("dense", "grouped", "depthwise")

    def declare_layer(self, kind: str, in_labels: np.ndarray, out_labels: np.ndarray, macs_coef: float, *,
                      layer_name: Optional[str] = None, weight: Optional[str] = None,
                      params_coef: Optional[float] = None, out_dim: Optional[int] = None) -> None:
        """Declare this call a layer whose cost depends on kept channels (a conv or a linear), so
        the cost model, the regularizer and the report count it: MACs = ``macs_coef`` · kept
        inputs · kept outputs (``depthwise``: ``macs_coef`` · kept outputs), counted per row of
        the output's leading dimension (per image when it is the batch; the graph scales it
        when patches, windows or tokens share that dimension). A function on a
        module's weight (``F.conv2d(x, self.weight)``) names that module (``layer_name``), the
        weight's path and the weights per channel pair (``params_coef``); ``out_dim``: the
        dimension of that weight that holds the output channels (0 unless said: ``x @ W`` has
        them at 1; a transposed conv's are known from its module)."""
        if kind not in self.LAYER_KINDS:
            raise ValueError(f"layer kind must be one of {', '.join(self.LAYER_KINDS)}, not {kind!r}")
        if not (math.isfinite(macs_coef) and macs_coef >= 0):
            raise ValueError(f"macs_coef must be a finite number >= 0, not {macs_coef!r}")
        self.info.update(layer=True, kind=kind, in_labels=np.asarray(in_labels), out_labels=np.asarray(out_labels),
                         macs_coef=float(macs_coef))
        extra = {"layer_name": layer_name, "weight": weight, "params_coef": params_coef, "weight_out_dim": out_dim}
        self.info.update({k: v for k, v in extra.items() if v is not None})

    def mixes(self, chan: Chan, labels: Optional[np.ndarray] = None) -> None:
        """Declare that this op mixes ``chan``'s channels into others (a conv's inputs).

        Channels that were not zeroed by a BatchNorm on their way here are then never
        removed, because removing them would change the output.
        """
        labels = chan.labels if labels is None else labels
        self.store.mark_unguarded(labels[~chan.guard])

    def output(self, value: Any) -> None:
        """Set what is known of the op's output: a :class:`Chan`, a tuple of them, or None."""
        self._values[self.node] = value
        self._answered = True

    def passthrough(self, arg: Any = None, zero_preserving: bool = True) -> None:
        """The output has the channels of ``arg`` (default: the first argument) unchanged."""
        arg = self.node.args[0] if arg is None and self.node.args else arg
        chan, spec = self.chan(arg), self.spec(arg)
        out = self.out_spec
        if chan is None or not isinstance(out, TensorSpec) or (out.ndim < 2 and chan.dim == 1) \
                or out.ndim <= chan.dim or out.shape[chan.dim] != len(chan) \
                or (chan.dim != 1 and (not isinstance(spec, TensorSpec) or spec.ndim != out.ndim)):
            self.unknown(f"{self.describe()} changes the channel layout", warn=chan is None and out is None)
            return
        self.output(Chan(chan.labels, chan.guard if zero_preserving else np.zeros(len(chan), dtype=bool), chan.dim))

    def unknown(self, reason: str, warn: bool = True) -> None:
        """Treat the op as opaque: freeze every channel in and out of it."""
        self._on_unknown(self, reason, warn)

    def fresh_output(self, reason: str) -> None:
        """Give the op's tensor outputs fresh frozen labels (for ops that make new tensors)."""
        self.output(frozen_chans(self.store, self.owner, "out", self.out_spec, reason))

    def describe(self) -> str:
        """A short description of the op for messages."""
        node = self.node
        if node.op == "call_module":
            return f"module {self.module_name} ({type(self.module).__name__})"
        target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
        return f"`{target}` ({node.name})"


class RebuildContext:
    """What a handler's ``rebuild`` sees of one node, and how it answers."""

    def __init__(self, node: fx.Node, module: Optional[nn.Module], module_name: Optional[str],
                 info: Dict[str, Any], keep_labels: np.ndarray, allow_rewrite: bool):
        self.node = node
        self.module = module
        self.module_name = module_name
        self.info = info
        self._keep_labels = keep_labels
        self.allow_rewrite = allow_rewrite
        self.new_module: Optional[nn.Module] = None
        self.new_tensors: Optional[Dict[str, torch.Tensor]] = None
        self.new_attrs: Optional[Dict[str, Any]] = None
        self.new_args: Optional[tuple] = None
        self.new_kwargs: Optional[dict] = None
        self.module_attrs: Dict[str, Dict[str, Any]] = {}

    def keep(self, labels: np.ndarray) -> np.ndarray:
        """A boolean array: which of ``labels`` are kept."""
        return self._keep_labels[labels]

    def replace_module(self, module: nn.Module) -> None:
        """Use ``module`` instead of the original one in the generated network."""
        self.new_module = module

    def resize(self, tensors: Dict[str, torch.Tensor], attrs: Dict[str, Any]) -> None:
        """Give the module's copy new parameters/buffers (by name) and attributes.

        Cheaper than :meth:`replace_module`: the generator applies it while it copies the
        model once, and the copy keeps the module's class, hooks and flags.
        """
        self.new_tensors, self.new_attrs = dict(tensors), dict(attrs)

    def update_module(self, name: str, attrs: Dict[str, Any]) -> None:
        """Set attributes of module ``name`` in the new network (a function handler whose
        parameters live in a module: the ``groups`` of the conv whose weight it reads).

        The parameters themselves are sliced by the generator (see
        :meth:`PropagateContext.param_labels`).
        """
        self.module_attrs.setdefault(name, {}).update(attrs)

    def set_args(self, args: Optional[Sequence[Any]] = None, kwargs: Optional[Dict[str, Any]] = None) -> None:
        """Rewrite the op's arguments (literal constants such as a view's sizes)."""
        if not self.allow_rewrite:
            raise RuntimeError("a handler rewrote code although the channels it depends on were frozen")
        if args is not None:
            self.new_args = tuple(args)
        if kwargs is not None:
            self.new_kwargs = dict(kwargs)

    def set_arg(self, index: int, name: str, value: Any) -> None:
        """Rewrite one argument where the call gave it: at position ``index`` if it was passed
        positionally, else as the keyword ``name``."""
        args = list(self.node.args if self.new_args is None else self.new_args)
        kwargs = dict(self.node.kwargs if self.new_kwargs is None else self.new_kwargs)
        if len(args) > index:
            args[index] = value
        else:
            kwargs[name] = value
        self.set_args(args, kwargs)


def _only_dim1(value: Any) -> Any:
    """``value`` with every :class:`Chan` whose channels are not at dim 1 replaced by None."""
    if isinstance(value, Chan):
        return value if value.dim == 1 else None
    if isinstance(value, tuple):
        return tuple(_only_dim1(v) for v in value)
    return value


def index_of(keep: np.ndarray, device: torch.device) -> torch.Tensor:
    """The kept positions of a boolean array, as an index tensor on ``device``."""
    return torch.from_numpy(np.flatnonzero(keep)).to(device)


def resized(module: nn.Module, tensors: Dict[str, torch.Tensor], attrs: Dict[str, Any]) -> nn.Module:
    """A deep copy of ``module`` whose named parameters/buffers are replaced and attributes set.

    Only the replaced tensors are new; the copy keeps the module's class, hooks and
    flags, so subclasses of standard layers keep their own ``forward``.
    """
    memo: Dict[int, Any] = {}
    for name, tensor in tensors.items():
        old = getattr(module, name)
        if isinstance(old, nn.Parameter):
            memo[id(old)] = nn.Parameter(tensor.detach().clone(), requires_grad=old.requires_grad)
        else:
            memo[id(old)] = tensor.detach().clone()
    new = copy.deepcopy(module, memo)
    for name, value in attrs.items():
        setattr(new, name, value)
    return new
