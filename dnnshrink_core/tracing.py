"""Tracing a model into torch.fx graphs, one per mode it needs (propagation: :mod:`.propagation`).

Most models give one graph. A model whose forward depends on a mode gives several, all
propagated into one :class:`~dnnshrink_core.labels.LabelStore` so that every module is
rebuilt once and works in every mode:

* ``generate_graph`` (the manual's convention for a tensor output): traced with it set,
  then also in full mode, so layers only the full mode calls keep matching widths;
* ``back_bone_only``: traced as set; the full mode is traced too and every module only
  it calls (the head) keeps its widths;
* train-only or eval-only branches (auxiliary classifiers): the other training mode is
  traced when the first left modules with weights uncalled.
"""
from __future__ import annotations

import contextlib
import types
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import fx, nn

from .errors import InputRunError, TraceError, UntracedModuleWarning
from .handler import OpHandler, spec_of
from .plugins import get_plugin_manager
from .recording import SpecializedTraceWarning, buffers_kept, containers_kept, record
from .shapes import has_hooks, infer_specs

GENERATE_GRAPH = "generate_graph"
BACK_BONE_ONLY = "back_bone_only"


def normalize_inputs(example_inputs: Any) -> Tuple[Any, ...]:
    """Positional arguments for ``model(*args)`` from a tensor or a tuple/list of them."""
    if example_inputs is None:
        raise TraceError("example_inputs is None: pass a tensor shaped like one batch of your "
                         "model's input, e.g. torch.randn(1, 3, 224, 224)")
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    return (example_inputs,)


def flatten_outputs(value: Any, keep_other: bool = False) -> List[Any]:
    """Every tensor of a nested output (tensors, lists, tuples, dicts in key order), in a
    stable order; with ``keep_other`` the other leaves (numbers, None…) are listed too."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for key in value for t in flatten_outputs(value[key], keep_other)]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in flatten_outputs(item, keep_other)]
    return [value] if keep_other else []


class _Tracer(fx.Tracer):
    """fx tracer that asks the plugins and the user which modules stay whole."""

    def __init__(self, pm: Any, leaf_modules: Sequence[Any]):
        super().__init__()
        self._pm = pm
        self._leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
        self._leaf_names = {m for m in leaf_modules if isinstance(m, str)}
        self.module_stack_names: List[str] = []
        self.inlined: set = set()  # the classes whose forward was traced through

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        leaf = self._is_leaf(m, module_qualified_name)
        if not leaf:
            self.inlined.add(type(m))
        return leaf

    def _is_leaf(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self._leaf_names or (self._leaf_types and isinstance(m, self._leaf_types)):
            return True
        answer = self._pm.hook.dnnshrink_leaf_module(module=m, qualname=module_qualified_name)
        if answer is not None:
            return bool(answer)
        return super().is_leaf_module(m, module_qualified_name)

    def reads_training(self, model: nn.Module) -> bool:
        """Whether code this tracer traced through may read a ``training`` flag, so the graph
        holds the mode it was traced in (timm's ``BatchNormAct2d`` passes ``self.training``
        to ``F.batch_norm``; a drop-path draws its mask only in training)."""
        return any(reads_training(cls) for cls in self.inlined | {type(model)})

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        self.module_stack_names.append(self.path_of_module(m))
        result = super().call_module(m, forward, args, kwargs)
        self.module_stack_names.pop()
        return result


_READS_TRAINING: Dict[type, bool] = {}


def _code_reads_training(code: types.CodeType) -> bool:
    return "training" in code.co_names or any(
        _code_reads_training(c) for c in code.co_consts if isinstance(c, types.CodeType))


def reads_training(cls: type) -> bool:
    """Whether a method of ``cls`` (nn.Module's own excepted) reads an attribute named
    ``training``: traced through, its code is then specialised to the mode it was traced in.
    A read the bytecode names but that does not change the graph costs only a second trace."""
    known = _READS_TRAINING.get(cls)
    if known is None:
        known = False
        for klass in cls.__mro__:
            if klass in (nn.Module, fx.GraphModule, object):
                continue
            for value in vars(klass).values():
                fn = value.fget if isinstance(value, property) else getattr(value, "__func__", value)
                code = getattr(fn, "__code__", None)
                if isinstance(code, types.CodeType) and _code_reads_training(code):
                    known = True
                    break
            if known:
                break
        _READS_TRAINING[cls] = known
    return known


def same_graph(a: fx.Graph, b: fx.Graph) -> bool:
    """Whether two graphs run the same ops on the same arguments, node for node."""
    nodes_a, nodes_b = list(a.nodes), list(b.nodes)
    if len(nodes_a) != len(nodes_b):
        return False
    index_a = {n: i for i, n in enumerate(nodes_a)}
    index_b = {n: i for i, n in enumerate(nodes_b)}
    for x, y in zip(nodes_a, nodes_b):
        if x.op != y.op or x.target != y.target:
            return False
        args_x = fx.map_arg((x.args, x.kwargs), lambda n: ("node", index_a[n]))
        args_y = fx.map_arg((y.args, y.kwargs), lambda n: ("node", index_b[n]))
        try:
            if args_x != args_y:
                return False
        except Exception:  # an argument whose == is not a bool (a tensor): not provably the same
            return False
    return True


@dataclass
class TracedGraph:
    """One traced mode of the model: its fx graph and what propagation learned of it.

    ``graph``'s ``call_module``/``get_attr`` targets are paths from the model's root;
    ``constants`` holds the tensors fx lifted out of ``forward`` (they are not left on the
    user's model). The model itself is held weakly, so a cached graph does not keep it alive.
    """

    mode: Dict[str, Any]
    graph: fx.Graph
    root: Any
    constants: Dict[str, Any]
    specs: Dict[fx.Node, Any]
    module_names: Dict[fx.Node, str] = field(default_factory=dict)
    handlers: Dict[fx.Node, OpHandler] = field(default_factory=dict)
    infos: Dict[fx.Node, Dict[str, Any]] = field(default_factory=dict)
    values: Dict[fx.Node, Any] = field(default_factory=dict)
    allow_rewrite: bool = False
    # get_attr nodes that read one of the model's own parameters or buffers -> its path
    param_paths: Dict[fx.Node, str] = field(default_factory=dict)
    # set when fx could not trace the model and it was recorded by running it on the example
    # input (see dnnshrink_core.recording): the graph holds that input's sizes as literals
    specialized: bool = False
    example_inputs: Tuple[Any, ...] = ()
    notes: List[str] = field(default_factory=list)
    fx_error: str = ""
    # the traced code read a training flag, so the graph holds mode["training"]
    reads_training: bool = False
    # where a recorded size came from the values (a detection head's post-processing): the
    # graph is then right only for the example input and the weights it was recorded with
    data_sized: List[str] = field(default_factory=list)
    # target -> module, filled by get_submodule (the graph is cached only while the model's
    # structure is unchanged, so one table per graph serves every rebuild)
    _modules: Dict[str, nn.Module] = field(default_factory=dict, repr=False)

    def get_submodule(self, target: str) -> nn.Module:
        """The module at ``target`` in the traced model."""
        root = self.root()
        if root is None:
            raise TraceError("the model this graph was traced from no longer exists")
        module = self._modules.get(target)
        if module is None:
            module = self._modules[target] = root.get_submodule(target)
        return module

    @property
    def batch(self) -> Optional[int]:
        """The example input's batch size: dim 0 of the first tensor the network takes (None
        when it takes none). Costs are per image, so a call whose leading dimension holds more
        than the images (patches or windows folded into the batch, tokens sequence-first) is
        counted for all of them (:func:`per_image`)."""
        for node in self.graph.nodes:
            if node.op != "placeholder":
                continue
            shape = getattr(self.specs.get(node), "shape", None)
            if shape is not None and len(shape) >= 1 and shape[0]:
                return int(shape[0])
        return None

    def per_image(self, node: fx.Node) -> float:
        """How many rows of ``node``'s output's leading dimension each image has: 1 for a
        batch-first tensor, the patches per image when a batch was reshaped to ``(B·P, …)``,
        the tokens for a sequence-first ``(N, B, C)`` read as rows. A handler counts a
        layer's MACs per row of that dimension; this turns them into MACs per image."""
        shape = getattr(self.specs.get(node), "shape", None)
        batch = self.batch
        if not batch or shape is None or len(shape) < 1:
            return 1.0
        return float(shape[0]) / batch

    def modules_called(self) -> set:
        """Canonical names of the modules this graph calls or reads weights from."""
        names = set(self.module_names.values())
        for node in self.graph.nodes:
            if node.op == "get_attr":
                names.add(node.target.rsplit(".", 1)[0] if "." in node.target else "")
        return names


@contextlib.contextmanager
def model_mode(model: nn.Module, training: Optional[bool] = None, attrs: Optional[Dict[str, Any]] = None) -> Iterator[None]:
    """Temporarily set training flags and mode attributes; restore them exactly afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    missing = object()
    saved = {name: getattr(model, name, missing) for name in (attrs or {})}
    try:
        if training is not None:
            for m, flag in flags:
                if flag != training:  # Module.__setattr__ is slow; most flags already match
                    m.training = training
        for name, value in (attrs or {}).items():
            setattr(model, name, value)
        yield
    finally:
        for m, flag in flags:
            if m.training != flag:
                m.training = flag
        for name, value in saved.items():
            if value is missing:
                delattr(model, name)
            else:
                setattr(model, name, value)


def _trace_one(model: nn.Module, inputs: Tuple[Any, ...], mode: Dict[str, Any], pm: Any,
               leaf_modules: Sequence[Any]) -> TracedGraph:
    attrs = {k: v for k, v in mode.items() if k != "training"}
    tracer = _Tracer(pm, leaf_modules)
    failure = ""
    # buffers_kept: code traced in training mode runs on the real buffers (timm's BatchNorm
    # counts num_batches_tracked with add_ even under fx), and the real run below may update
    # running statistics
    with model_mode(model, mode["training"], attrs), _restoring_attributes(model) as constants, \
            buffers_kept(model):
        try:
            graph = tracer.trace(model)
        except Exception as exc:  # fx raises many types; all mean "cannot trace"
            where = tracer.module_stack_names[-1] if tracer.module_stack_names else ""
            culprit = f"module `{where}` ({type(model.get_submodule(where)).__name__})" if where else \
                f"the forward of {type(model).__name__}"
            failure = f"torch.fx could not trace {culprit}: {type(exc).__name__}: {exc}"
        if not failure:
            with model_mode(model, False), torch.no_grad():
                modules = dict(model.named_modules(remove_duplicate=False))
                specs = infer_specs(graph, modules, inputs) if not has_hooks(model) else None
                if specs is None:  # an op without a shape rule: run the graph for real
                    specs = {}
                    _Recorder(model, graph, specs).run(*inputs)
    if failure:  # outside the fx context: attributes forward sets while running are its own
        return _record_one(model, inputs, mode, pm, leaf_modules, failure)
    canonical: Dict[int, str] = {}
    for path, module in modules.items():  # the first path met is named_modules()'s canonical one
        canonical.setdefault(id(module), path)
    module_names = {n: canonical[id(modules[n.target])] for n in graph.nodes if n.op == "call_module"}
    return TracedGraph(mode=dict(mode), graph=graph, root=weakref.ref(model), constants=constants, specs=specs,
                       module_names=module_names, param_paths=_param_paths(model, graph, constants),
                       reads_training=tracer.reads_training(model),
                       _modules={path: m for path, m in modules.items() if path})  # not the root: held weakly


def _fx_graph(model: nn.Module, mode: Dict[str, Any], pm: Any, leaf_modules: Sequence[Any]) -> Optional[fx.Graph]:
    """fx's graph of ``model`` in ``mode`` and nothing more (no shapes, no module table), or
    None where fx cannot trace it."""
    attrs = {k: v for k, v in mode.items() if k != "training"}
    with model_mode(model, mode["training"], attrs), _restoring_attributes(model), buffers_kept(model):
        try:
            return _Tracer(pm, leaf_modules).trace(model)
        except Exception:  # fx raises many types; the full trace says why
            return None


def _record_one(model: nn.Module, inputs: Tuple[Any, ...], mode: Dict[str, Any], pm: Any,
                leaf_modules: Sequence[Any], failure: str) -> TracedGraph:
    """The second path: fx failed, so run the model on the example input and record its
    torch calls (:mod:`dnnshrink_core.recording`). The graph is specialised to the example's
    shapes; the same handlers propagate through it."""
    attrs = {k: v for k, v in mode.items() if k != "training"}
    tracer = _Tracer(pm, leaf_modules)
    try:
        with model_mode(model, mode["training"], attrs):  # record() puts the buffers back
            recording = record(model, inputs, tracer)
    except InputRunError as exc:
        # the model does not run on this input at all: an input problem, said as such
        raise InputRunError(f"{exc.failure} (recording it by running, after {failure.splitlines()[0][:300]})") \
            from exc
    shapes = ", ".join(str(tuple(x.shape)) for x in inputs if isinstance(x, torch.Tensor))
    warnings.warn(f"dnnshrink: {failure.splitlines()[0][:300]}; traced {type(model).__name__} by running it on the "
                  f"example input instead, so the graph (and a network generated from it) is specialised to "
                  f"input shape {shapes}" + "".join(f"; {n}" for n in recording.notes) + " (see docs/tracing.md).",
                  SpecializedTraceWarning, stacklevel=4)
    graph, constants = recording.graph, recording.constants
    module_names = {n: n.target for n in graph.nodes if n.op == "call_module"}
    return TracedGraph(mode=dict(mode), graph=graph, root=weakref.ref(model), constants=constants,
                       specs=recording.specs, module_names=module_names,
                       param_paths=_param_paths(model, graph, constants), specialized=True,
                       example_inputs=tuple(inputs), notes=recording.notes, fx_error=failure,
                       reads_training=tracer.reads_training(model), data_sized=recording.data_sized)


def _param_paths(model: nn.Module, graph: fx.Graph, constants: Dict[str, Any]) -> Dict[fx.Node, str]:
    """The canonical path of the model parameter or buffer every ``get_attr`` node reads.

    Constants fx lifted out of ``forward`` are not the model's and are left out, and so is
    anything that is not a tensor the model owns.
    """
    tensors = {id(t): name for name, t in model.named_parameters()}
    tensors.update((id(t), name) for name, t in model.named_buffers() if id(t) not in tensors)
    paths = {}
    for node in graph.nodes:
        if node.op != "get_attr" or node.target in constants:
            continue
        owner, _, attr = node.target.rpartition(".")
        try:
            value = getattr(model.get_submodule(owner), attr)
        except AttributeError:
            continue
        if isinstance(value, torch.Tensor) and id(value) in tensors:
            paths[node] = tensors[id(value)]
    return paths


def eval_graph_module(model: nn.Module, example_inputs: Any = None) -> fx.GraphModule:
    """The model's eval-mode fx graph as a GraphModule, traced with the plugins' leaf rules.

    Tensor constants fx lifts out of ``forward`` are copied into the GraphModule and not left
    on ``model``. When torch.fx cannot follow ``forward`` and ``example_inputs`` are given, the
    graph is recorded by running the model on them (:mod:`dnnshrink_core.recording`), so it
    is specialised to their shapes; the GraphModule's ``dnnshrink_specialized`` says so, and
    its ``dnnshrink_data_sized`` lists where a size came from the example's values (then the
    graph is right for that input alone).
    """
    pm = get_plugin_manager()
    tracer = _Tracer(pm, ())
    try:
        with model_mode(model, training=False), _restoring_attributes(model):
            graph = tracer.trace(model)
            module = fx.GraphModule(tracer.root, graph, class_name=type(model).__name__)
            module.dnnshrink_specialized = False
            module.dnnshrink_data_sized = []
            return module
    except Exception:  # fx raises many types; all mean "cannot trace symbolically"
        if example_inputs is None:
            raise
    with model_mode(model, training=False):
        recording = record(model, normalize_inputs(example_inputs), _Tracer(pm, ()))
    graph = recording.graph
    owned: Dict[str, Any] = dict(recording.constants)
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr") and node.target not in owned:
            owned[node.target] = _fetch(model, node.target)
    module = fx.GraphModule(owned, graph, class_name=type(model).__name__)
    module.dnnshrink_specialized = True
    module.dnnshrink_data_sized = recording.data_sized
    return module


def _fetch(model: nn.Module, target: str) -> Any:
    value: Any = model
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _attribute_names(model: nn.Module) -> Tuple[frozenset, ...]:
    return tuple(frozenset(d) for d in (vars(model), model._parameters, model._buffers, model._modules))


@contextlib.contextmanager
def _restoring_attributes(model: nn.Module) -> Iterator[Dict[str, Any]]:
    """fx stores tensor constants it meets on the traced module, and a forward may cache
    Proxies in its modules' dicts (:func:`containers_kept`); keep the user's model clean."""
    names = _attribute_names(model)
    removed: Dict[str, Any] = {}
    try:
        with containers_kept(model):
            yield removed
    finally:
        for added, container in zip((a - b for a, b in zip(_attribute_names(model), names)),
                                    (vars(model), model._parameters, model._buffers, model._modules)):
            for name in added:
                removed[name] = container.pop(name)


def _plain_message(exc: BaseException) -> str:
    """The error's own message, without what torch.fx appends (the node being executed, an
    empty original traceback, a link to a log parser)."""
    return str(exc).split("While executing")[0].rstrip()


class _Recorder(fx.Interpreter):
    """Runs the graph once and records the shape of every value."""

    def __init__(self, root: nn.Module, graph: fx.Graph, specs: Dict[fx.Node, Any]):
        super().__init__(root, garbage_collect_values=True, graph=graph)
        self.extra_traceback = False  # fx would append its node dump to our error's message
        self._specs = specs

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception as exc:
            where = n.meta.get("nn_module_stack")
            module = f" in module `{list(where)[-1]}`" if where else ""
            raise InputRunError(f"`{n.name}`{module}: {type(exc).__name__}: {_plain_message(exc)}") from exc
        self._specs[n] = spec_of(result)
        return result


def weighted_modules(model: nn.Module) -> Dict[str, nn.Module]:
    """Modules that own parameters or buffers themselves, by canonical name."""
    return {name: m for name, m in model.named_modules()
            if any(t is not None for t in m._parameters.values()) or any(t is not None for t in m._buffers.values())}


def _covered(graphs: Iterable[TracedGraph], weighted: Dict[str, nn.Module]) -> set:
    called: set = set()
    for g in graphs:
        called |= g.modules_called()
    # a module called whole covers its children too
    def under_called(name: str) -> bool:
        parts = name.split(".")
        return any(".".join(parts[:i]) in called for i in range(len(parts), 0, -1))
    return {name for name in weighted if name in called or under_called(name)}


def trace_modes(model: nn.Module, inputs: Tuple[Any, ...], pm: Any,
                leaf_modules: Sequence[Any] = ()) -> Tuple[List[TracedGraph], frozenset]:
    """Trace every mode the model needs. Returns the graphs and the modules to keep whole."""
    has_gen = hasattr(model, GENERATE_GRAPH)
    backbone = bool(getattr(model, BACK_BONE_ONLY, False))
    primary: Dict[str, Any] = {"training": model.training}
    if has_gen:
        primary[GENERATE_GRAPH] = True
    if hasattr(model, BACK_BONE_ONLY):
        primary[BACK_BONE_ONLY] = backbone
    graphs = [_trace_one(model, inputs, primary, pm, leaf_modules)]
    weighted = weighted_modules(model)

    full = dict(primary)
    if has_gen:
        full[GENERATE_GRAPH] = False
    if backbone:
        full[BACK_BONE_ONLY] = False
    candidates = []
    if full != primary:
        candidates.append(full)
    other = {**full, "training": not model.training}
    candidates.append(other)
    # code traced through that reads a training flag holds the mode it was traced in: the
    # other mode is traced too, and a generated GraphModule runs each mode's own graph
    pair = full == primary and graphs[0].reads_training
    if pair and not graphs[0].specialized:  # fx alone tells whether the flag changes the graph
        probe = _fx_graph(model, other, pm, leaf_modules)
        pair = probe is None or not same_graph(probe, graphs[0].graph)
    frozen: set = set()
    primary_cover = _covered(graphs, weighted)
    for mode in candidates:
        if full != primary and mode is full:
            needed = True  # the full mode must always match, even if it calls no new module
        else:
            needed = pair or bool(set(weighted) - _covered(graphs, weighted))
        if not needed:
            continue
        try:
            extra = _trace_one(model, inputs, mode, pm, leaf_modules)
            if pair and mode is other and same_graph(extra.graph, graphs[0].graph):
                pair = False  # the flag was read but did not change the graph: one graph serves both
                if not set(weighted) - _covered(graphs, weighted):
                    continue
            if extra.specialized and not (mode is full and full != primary) \
                    and not _covered([extra], weighted) - _covered(graphs, weighted):
                # a recorded graph follows the example's shapes, so a module it leaves uncalled
                # (a branch for other sizes) stays uncalled in every mode: one that calls
                # nothing new would only forbid rewriting the code's sizes
                continue
            graphs.append(extra)
        except TraceError as exc:
            warnings.warn(f"dnnshrink could not also trace the model in mode {mode}: {exc}. "
                          "Layers only that mode uses may be left with the wrong widths.",
                          UntracedModuleWarning, stacklevel=3)
    if backbone:
        frozen = _covered(graphs, weighted) - primary_cover
    missing = sorted(set(weighted) - _covered(graphs, weighted))
    if missing:
        shown = ", ".join(_shown_name(model, name) for name in missing[:8]) + (" …" if len(missing) > 8 else "")
        warnings.warn(f"dnnshrink: {len(missing)} module(s) with weights are never called in any traced mode "
                      f"({shown}); they are left as they are. If forward does call them in some mode, "
                      "pass leaf_modules or make that mode traceable.", UntracedModuleWarning, stacklevel=3)
    # the code's constants may be rewritten where one graph is emitted, or one per training
    # mode (generate.TrainEvalGraphModule); not where several modes share one network's code
    pair = len(graphs) == 2 and pair and graphs[1].mode == other
    rewrite = (len(graphs) == 1 or pair) and not has_gen and not hasattr(model, BACK_BONE_ONLY)
    for g in graphs:
        g.allow_rewrite = rewrite
    return graphs, frozenset(frozen)


def _shown_name(model: nn.Module, name: str) -> str:
    """A module's name for messages; the model itself (the empty name) shows as the
    ``<root>.name`` of its own parameters and buffers."""
    if name:
        return name
    own = [n for n, _ in model.named_parameters(recurse=False)] + [n for n, _ in model.named_buffers(recurse=False)]
    return ", ".join(f"<root>.{n}" for n in own) or "<root>"
