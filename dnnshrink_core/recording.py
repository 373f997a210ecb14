"""Tracing by running: record the torch calls a model makes on its real example input.

``torch.fx.symbolic_trace`` runs ``forward`` on proxies, so Python code that needs a real
value fails: ``if x.shape[-1] % 2``, ``for t in x``, ``math.ceil(x.shape[2] / s)`` (timm's
"same" padding, detection heads). This module runs ``forward`` on the example input
instead and writes down, as a :class:`torch.fx.Graph`, every torch-level call it makes:

* a :class:`~torch.overrides.TorchFunctionMode` sees every ``torch.*``,
  ``torch.nn.functional.*`` and ``Tensor`` method call at the level the user wrote it
  (``F.batch_norm``, ``x.view``, ``torch.cat``), which is the level the channel handlers
  know. Python values computed from shapes (``x.shape[1]``, ``len(x)``) are plain numbers,
  so the control flow follows the example and the graph holds them as literals: it is
  *specialised* to the example's shapes;
* forward hooks on the leaf modules (the same ones fx keeps whole: ``torch.nn`` layers and
  what the plugins and the user name) record one ``call_module`` node per call, and the
  calls inside a leaf are not recorded;
* a model's parameters and buffers read directly become ``get_attr`` nodes of their
  canonical path (so ``F.batch_norm(x, …, self.weight, …)`` is a MorphNet source exactly as
  on the fx path), any other tensor the code meets (a cached anchor grid) a lifted constant.

The result has the same node kinds and targets as a symbolic trace, so the same handlers
propagate channels through it and the generator rebuilds it the same way. Reading tensor
*values* into Python (``bool(t)``, ``t.item()``) specialises the graph to the example's
data, not only its shapes; that is reported with :class:`SpecializedTraceWarning`.
"""
from __future__ import annotations

import contextlib
import inspect
import operator
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import fx, nn
from torch.overrides import TorchFunctionMode

from .errors import DnnshrinkWarning, InputRunError
from .handler import spec_of


class SpecializedTraceWarning(DnnshrinkWarning):
    """The model was traced by running it: the graph follows the example input's shapes
    (and, where ``forward`` read tensor values into Python, its data)."""


# Tensor dunder methods that reach __torch_function__ under their own name, as the
# function fx would record for the same Python expression (reflected ones swap operands).
_DUNDER: Dict[str, Tuple[Callable[..., Any], bool]] = {
    "__getitem__": (operator.getitem, False), "__setitem__": (operator.setitem, False),
    "__rsub__": (operator.sub, True), "__rdiv__": (operator.truediv, True),
    "__rtruediv__": (operator.truediv, True), "__rpow__": (operator.pow, True),
    "__rmatmul__": (operator.matmul, True), "__rfloordiv__": (operator.floordiv, True),
    "__rmod__": (operator.mod, True), "__matmul__": (operator.matmul, False),
    "__floordiv__": (operator.floordiv, False), "__mod__": (operator.mod, False),
    "__pow__": (operator.pow, False), "__and__": (operator.and_, False), "__or__": (operator.or_, False),
    "__xor__": (operator.xor, False), "__invert__": (operator.invert, False),
    "__lshift__": (operator.lshift, False), "__rshift__": (operator.rshift, False),
}
# calls whose Python result depends on a tensor's values, not only its shape
_DATA_READS = frozenset({"__bool__", "item", "tolist", "__int__", "__float__", "__index__", "numpy",
                         "__array__", "__complex__"})
# calls that mutate their first argument and return nothing: recorded for their effect
_EFFECTS = frozenset({"__setitem__"})
# calls whose result's *size* depends on a tensor's values (what a detection head's
# post-processing does: scores over a threshold, non-maximum suppression): the recorded
# graph holds the example's sizes after them, right only for that input and those weights
_DATA_SIZED = frozenset({"nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "_unique2",
                         "bincount", "nms", "batched_nms"})


def _sized_by_data(name: str, args: tuple, kwargs: dict) -> bool:
    """Whether a call's result has a size set by its inputs' values: the ops of
    :data:`_DATA_SIZED`, ``torch.where(condition)`` (one argument), indexing with a boolean
    mask, and ``repeat_interleave`` by a tensor of counts."""
    if name in _DATA_SIZED:
        return True
    if name == "where":
        return len(args) + len(kwargs) == 1
    if name == "__getitem__" and len(args) > 1:  # a mask of booleans (or of bytes, torch's older masks)
        index = args[1] if isinstance(args[1], (tuple, list)) else (args[1],)
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in index)
    if name == "repeat_interleave":  # by a tensor of counts, or the counts alone (torch.repeat_interleave(c))
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
        return isinstance(repeats, torch.Tensor) or len(args) + len(kwargs) == 1
    return False


def _is_leaf(tracer: fx.Tracer, module: nn.Module, name: str) -> bool:
    return tracer.is_leaf_module(module, name)


class _Recorder(TorchFunctionMode):
    """Writes the torch calls of one forward pass into an fx graph (see the module docs)."""

    def __init__(self, model: nn.Module, leaf_rule: fx.Tracer):
        super().__init__()
        self.graph = fx.Graph()
        self.specs: Dict[fx.Node, Any] = {}
        self.constants: Dict[str, torch.Tensor] = {}
        self.data_reads: List[str] = []
        self.data_sized: List[str] = []  # where a size came from the values (see _sized_by_data)
        self.unknown_constants: List[str] = []
        self._model = model
        self._values: Dict[int, Tuple[torch.Tensor, fx.Node]] = {}  # id -> (tensor kept alive, node)
        self._attrs: Dict[int, fx.Node] = {}
        self._owned = {id(t): name for name, t in model.named_parameters()}
        self._owned.update((id(t), name) for name, t in model.named_buffers() if id(t) not in self._owned)
        # tensors held as plain attributes of some module (cached grids): constants, not data
        self._held = {id(v) for m in model.modules() for v in vars(m).values() if isinstance(v, torch.Tensor)}
        self._names = {}
        for name, m in model.named_modules():
            self._names.setdefault(id(m), name)
        self._leaf_rule = leaf_rule
        self._depth = 0  # > 0 while inside a leaf module: its own calls are not recorded
        self._stack: List[Tuple[str, type]] = []
        self._handles: List[Any] = []

    # --- values <-> nodes -----------------------------------------------------------
    def _bind(self, value: Any, node: fx.Node) -> None:
        """Remember that ``value`` (a tensor, or a tuple/list of them) is ``node``'s result."""
        self.specs[node] = spec_of(value)
        if isinstance(value, torch.Tensor):
            self._values[id(value)] = (value, node)
        elif isinstance(value, (tuple, list)) and not isinstance(value, torch.Size):
            for i, item in enumerate(value):
                if isinstance(item, (torch.Tensor, tuple, list)) and not isinstance(item, torch.Size):
                    self._bind(item, self._node("call_function", operator.getitem, (node, i), {}))

    def _node(self, op: str, target: Any, args: tuple, kwargs: dict) -> fx.Node:
        node = self.graph.create_node(op, target, args, kwargs)
        if self._stack:
            node.meta["nn_module_stack"] = {name: (name, cls) for name, cls in self._stack}
        return node

    def _arg(self, value: Any) -> Any:
        """``value`` with every tensor replaced by its node (parameters by ``get_attr`` nodes)."""
        if isinstance(value, torch.Tensor):
            known = self._values.get(id(value))
            if known is not None and known[0] is value:
                return known[1]
            return self._attr(value)
        if isinstance(value, torch.Size):
            return tuple(value)
        if isinstance(value, (tuple, list)):
            return type(value)(self._arg(v) for v in value)
        if isinstance(value, dict):
            return {k: self._arg(v) for k, v in value.items()}
        if isinstance(value, slice):
            return slice(self._arg(value.start), self._arg(value.stop), self._arg(value.step))
        return value

    def _attr(self, tensor: torch.Tensor) -> fx.Node:
        node = self._attrs.get(id(tensor))
        if node is not None:
            return node
        path = self._owned.get(id(tensor))
        if path is None:
            path = f"_dnnshrink_constant_{len(self.constants)}"
            self.constants[path] = tensor.detach()
            if id(tensor) not in self._held:
                self.unknown_constants.append(f"{tuple(tensor.shape)}")
        node = self._node("get_attr", path, (), {})
        self.specs[node] = spec_of(tensor)
        self._attrs[id(tensor)] = node
        self._values[id(tensor)] = (tensor, node)
        return node

    # --- torch calls ----------------------------------------------------------------
    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if self._depth:
            return result
        name = getattr(func, "__name__", "")
        if name in _DATA_READS:
            self.data_reads.append(name)
        if _sized_by_data(name, args, kwargs):
            where = self._stack[-1][0] if self._stack else ""
            self.data_sized.append(f"`{'boolean mask' if name == '__getitem__' else name}`"
                                   + (f" in `{where}`" if where else ""))
        if not _holds_tensor(result) and name not in _EFFECTS:
            return result  # sizes, dtypes, flags: plain Python values from here on (specialised)
        op, target, args = self._target(func, name, args)
        if op is None:
            node = self._node("call_function", getattr, (self._arg(args[0]), target), {})
        else:
            node = self._node(op, target, self._arg(tuple(args)), self._arg(kwargs))
        if name in _EFFECTS:
            # the mutated tensor is read through the same node again: later ops see the effect
            # because the generated code runs in the same order
            return result
        self._bind(result, node)
        return result

    @staticmethod
    def _target(func: Any, name: str, args: tuple) -> Tuple[Optional[str], Any, tuple]:
        """How fx would record this call: (op, target, args); op None for an attribute read."""
        if name == "__get__":  # a Tensor property such as x.T or x.data
            return None, getattr(getattr(func, "__self__", None), "__name__", "?"), args
        if name in _DUNDER:
            target, swap = _DUNDER[name]
            return "call_function", target, (args[1], args[0], *args[2:]) if swap else args
        if name and getattr(torch.Tensor, name, None) is func:
            return "call_method", name, args
        return "call_function", func, args

    # --- modules --------------------------------------------------------------------
    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._stack.append((self._names.get(id(module), ""), type(module)))
        if getattr(module, "_dnnshrink_leaf", False):
            self._depth += 1

    def _post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        self._stack.pop()
        if not getattr(module, "_dnnshrink_leaf", False):
            return
        self._depth -= 1
        if self._depth:
            return
        self._depth += 1  # what the recorder itself does with tensors here is not the model's
        try:
            node = self._node("call_module", self._names.get(id(module), ""), self._arg(tuple(args)),
                              self._arg(kwargs))
            self._bind(output, node)
        finally:
            self._depth -= 1

    @contextlib.contextmanager
    def hooked(self) -> Iterator[None]:
        """Forward hooks on every module (leaves record a node, the rest track the stack)."""
        marked = []
        try:
            for name, module in self._model.named_modules():
                if module is not self._model and _is_leaf(self._leaf_rule, module, name):
                    module._dnnshrink_leaf = True
                    marked.append(module)
                self._handles.append(module.register_forward_pre_hook(self._pre, with_kwargs=True))
                self._handles.append(module.register_forward_hook(self._post, with_kwargs=True))
            yield
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles.clear()
            for module in marked:
                del module._dnnshrink_leaf

    def run(self, inputs: Tuple[Any, ...]) -> Any:
        """Run the model on ``inputs`` and record it; returns the model's output."""
        names = _input_names(self._model, len(inputs))
        for name, value in zip(names, inputs):
            node = self.graph.placeholder(name)
            if isinstance(value, torch.Tensor):
                self._values[id(value)] = (value, node)
                self.specs[node] = spec_of(value)
        with self.hooked(), self:
            out = self._model(*inputs)
            self._depth += 1
            self.graph.output(self._arg(out))
            self._depth -= 1
        return out


def _holds_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (tuple, list)) and not isinstance(value, torch.Size):
        return any(_holds_tensor(v) for v in value)
    return False


def _input_names(model: nn.Module, count: int) -> List[str]:
    try:
        params = [p.name for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    names = [n if n.isidentifier() else f"input_{i}" for i, n in enumerate(params[:count])]
    return names + [f"input_{i}" for i in range(len(names), count)]


@contextlib.contextmanager
def buffers_kept(model: nn.Module) -> Iterator[None]:
    """Put every buffer's values back afterwards: code run or traced in training mode updates
    BatchNorm's running statistics in place (timm's counts ``num_batches_tracked`` with
    ``add_`` even under fx), and the user's model is not ours to change."""
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, value in saved:
                if b.shape == value.shape:
                    b.copy_(value)


_MODULE_INTERNALS = frozenset(vars(nn.Module()))  # nn.Module's own containers (parameters, hooks…)


@contextlib.contextmanager
def containers_kept(model: nn.Module) -> Iterator[None]:
    """Put back the contents of every dict, list and set a module of ``model`` holds as an
    attribute, when tracing or running ``forward`` changed them: a forward that caches into
    one (timm LeViT's and EfficientFormerV2's attention-bias caches) would keep a traced
    ``Proxy`` there, which breaks the user's next run and every later trace of the model or
    of a copy of it. Contents are compared by identity (a ``Proxy`` has no truth value)."""
    saved = []
    for module in model.modules():
        for name, value in vars(module).items():
            if name not in _MODULE_INTERNALS and type(value) in (dict, list, set):
                saved.append((value, type(value)(value)))
    try:
        yield
    finally:
        for live, before in saved:
            if _changed(live, before):
                if isinstance(live, list):
                    live[:] = before
                else:
                    live.clear()
                    live.update(before)


def _changed(live: Any, before: Any) -> bool:
    if len(live) != len(before):
        return True
    if isinstance(live, dict):
        return any(k not in before or live[k] is not before[k] for k in live)
    if isinstance(live, list):
        return any(a is not b for a, b in zip(live, before))
    return {id(v) for v in live} != {id(v) for v in before}


@dataclass
class Recording:
    """What :func:`record` wrote down: the graph, the spec of every node, the constants
    lifted out of ``forward``, notes on what the graph is specialised to, and where a size
    came from the values (``data_sized``: then the graph is right only for the example
    input and the weights it was recorded with)."""

    graph: fx.Graph
    specs: Dict[fx.Node, Any]
    constants: Dict[str, torch.Tensor]
    notes: List[str]
    data_sized: List[str]


def record(model: nn.Module, inputs: Sequence[Any], leaf_rule: fx.Tracer) -> Recording:
    """Trace ``model`` by running it on ``inputs`` (see :class:`Recording`). ``leaf_rule`` is the
    fx tracer whose ``is_leaf_module`` says which modules are recorded whole. The model's
    buffers and the caches its modules keep (:func:`containers_kept`) are restored afterwards.
    """
    recorder = _Recorder(model, leaf_rule)
    with buffers_kept(model), containers_kept(model), torch.no_grad():
        try:
            recorder.run(tuple(inputs))
        except Exception as exc:
            where = recorder._stack[-1][0] if recorder._stack else ""
            inside = f" in module `{where}`" if where else ""
            raise InputRunError(f"`forward`{inside}: {type(exc).__name__}: {exc}") from exc
    notes = []
    if recorder.data_reads:
        reads = sorted(set(recorder.data_reads))
        notes.append(f"forward reads tensor values into Python ({', '.join(reads)}), so the graph follows the "
                     "branches the example input took")
    if recorder.unknown_constants:
        notes.append(f"{len(recorder.unknown_constants)} tensor(s) not made by a recorded op are baked in as "
                     f"constants (shapes {', '.join(recorder.unknown_constants[:4])})")
    sized = list(dict.fromkeys(recorder.data_sized))
    if sized:
        notes.append(f"sizes there depend on the example's values ({', '.join(sized[:4])}"
                     + (f" and {len(sized) - 4} more" if len(sized) > 4 else "") + "), so a generated network is "
                     "your own class, never the recorded graph")
    return Recording(recorder.graph, recorder.specs, recorder.constants, notes, sized)


class InputShapeCheck:
    """A forward pre-hook that refuses inputs whose shapes differ from the example's: a
    network generated from a recorded graph holds the example's sizes as literals."""

    def __init__(self, shapes: Sequence[Optional[Tuple[int, ...]]]):
        self.shapes = [None if s is None else tuple(s) for s in shapes]

    def __call__(self, module: nn.Module, args: tuple) -> None:
        for i, (value, shape) in enumerate(zip(args, self.shapes)):
            if shape is not None and isinstance(value, torch.Tensor) and tuple(value.shape) != shape:
                raise ValueError(
                    f"{type(module).__name__} was generated from a trace specialised to the example input "
                    f"(input {i} of shape {shape}); it got shape {tuple(value.shape)}. Generate again with an "
                    "example input of the shape you need (see docs/tracing.md).")


__all__ = ["InputShapeCheck", "SpecializedTraceWarning", "record"]
