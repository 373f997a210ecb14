"""The generator: a new, physically smaller network from a channel graph and a keep-set."""
from __future__ import annotations

import collections
import copy
import difflib
import functools
import operator
import warnings
from typing import Any, Dict, Mapping, Tuple

import numpy as np
import torch
from torch import fx, nn

from . import branches
from .errors import DnnshrinkWarning, GenerationError, MaskError, PluginError
from .graph import ChannelGraph
from .handler import RebuildContext, index_of
from .masks import keep_flags
from .recording import InputShapeCheck
from .tracing import flatten_outputs, model_mode


def units_to_keep(graph: ChannelGraph, masks: Mapping[str, Any], model: nn.Module) -> np.ndarray:
    """Validate ``masks`` against ``graph`` and return one keep flag per channel unit.

    Values are booleans or 0/1 numbers (see :mod:`dnnshrink_core.masks`; others are a
    :class:`MaskError`). A group that would lose every unit keeps its unit with the largest
    ``|gamma|``, so no layer collapses to zero width, and a warning names the group; unless
    it is the inner group of a residual branch, which the generator then drops whole
    (:mod:`dnnshrink_core.branches`).
    """
    if not isinstance(masks, Mapping):
        raise MaskError(f"masks must be a mapping of group name to boolean mask, not {type(masks).__name__}")
    keep = np.ones(graph.num_units, dtype=bool)
    gammas = None
    can_empty = None
    for name, mask in masks.items():
        if name not in graph:
            close = difflib.get_close_matches(str(name), graph.group_names, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise MaskError(f"mask for unknown group {name!r}.{hint} Groups are listed by dnnshrink_core.trace(model, x).")
        group = graph[name]
        array = np.asarray(mask.detach().cpu() if isinstance(mask, torch.Tensor) else mask)
        if array.shape != (group.size,):
            raise MaskError(f"mask for group {name!r} has shape {tuple(array.shape)}; the group has {group.size} units")
        array = keep_flags(array, name)
        dropped_frozen = ~array & graph.unit_frozen[group.units]
        if dropped_frozen.any():
            reason = graph.reasons[graph.unit_reason[group.units[np.flatnonzero(dropped_frozen)[0]]]]
            raise MaskError(f"mask for group {name!r} removes {int(dropped_frozen.sum())} frozen unit(s) "
                            f"({reason}); frozen units must be kept")
        if not array.any():
            can_empty = branches.emptiable(graph) if can_empty is None else can_empty
            if can_empty[group.index]:  # its residual branch goes whole (see dnnshrink_core.branches)
                keep[group.units] = False
                continue
            gammas = graph.unit_gammas(model) if gammas is None else gammas
            array = array.copy()
            array[group.units == _best_unit(group.units, gammas)] = True
            warnings.warn(f"dnnshrink: the mask for group {name!r} removes every unit; one unit (the largest "
                          "|gamma|) is kept so the layer does not collapse.", DnnshrinkWarning, stacklevel=3)
        keep[group.units] = array
    return keep


def _best_unit(units: np.ndarray, gammas: np.ndarray) -> int:
    """The unit with the largest ``|gamma|`` of ``units``: what a group that may not be
    emptied keeps."""
    return int(units[int(np.argmax(gammas[units]))])


def build(model: nn.Module, graph: ChannelGraph, keep_units: np.ndarray) -> nn.Module:
    """Rebuild every traced op for ``keep_units`` and assemble the new model."""
    cut = ~keep_units & graph.unit_frozen
    if cut.any():  # an algorithm's structure that drops what must stay: never build it
        unit = int(np.flatnonzero(cut)[0])
        group = next(g.name for g in graph.groups if unit in g.units)
        raise MaskError(f"the structure removes {int(cut.sum())} frozen unit(s), for example in group {group!r} "
                        f"({graph.reasons[graph.unit_reason[unit]]}); frozen units must be kept")
    keep_units, dropped = _droppable(model, graph, keep_units)
    skip = [set().union(*(b.nodes[i] for b in dropped)) for i in range(len(graph.traces))]
    keep_labels = graph.keep_labels(keep_units)
    replacements: Dict[str, nn.Module] = {}
    resizes: Dict[str, Tuple[Dict[str, torch.Tensor], Dict[str, Any]]] = {}
    rewrites: Dict[fx.Node, Tuple[Any, Any]] = {}
    for tg, gone in zip(graph.traces, skip):
        for node, handler in tg.handlers.items():
            if node.name in gone:  # a dropped branch's ops are not rebuilt: they go
                continue
            name = tg.module_names.get(node)
            if name is not None and (name in replacements or name in resizes):
                continue
            module = tg.get_submodule(node.target) if node.op == "call_module" else None
            ctx = RebuildContext(node, module, name, tg.infos[node], keep_labels, tg.allow_rewrite)
            try:
                handler.rebuild(ctx)
            except Exception as exc:
                raise PluginError(f"channel handler {handler!r} failed to rebuild `{node.name}`: "
                                  f"{type(exc).__name__}: {exc}") from exc
            if ctx.new_module is not None:
                replacements[name] = ctx.new_module
            elif ctx.new_tensors is not None:
                resizes[name] = (ctx.new_tensors, ctx.new_attrs)
            if ctx.new_args is not None or ctx.new_kwargs is not None:
                rewrites[node] = (ctx.new_args, ctx.new_kwargs)
            for owner, attrs in ctx.module_attrs.items():
                resizes.setdefault(owner, ({}, {}))[1].update(attrs)
    sliced = _slice_params(model, graph, keep_labels, resizes)
    new_model = clone_module(model, _clone_memo(model, replacements, resizes))
    for name in sliced:
        _sync_sizes(new_model.get_submodule(name))
    for name, (_, attrs) in resizes.items():
        module = new_model.get_submodule(name)
        for attr, value in attrs.items():
            setattr(module, attr, value)
    specialized = [tg for tg in graph.traces if tg.specialized]
    if not rewrites and not specialized and not dropped:
        return new_model
    for branch, value in dropped.items():  # a dropped branch leaves its output, a learnable constant
        setattr(new_model, branches.parameter_name(branch), nn.Parameter(value.clone()))
    plans = [(skip[i], {b.join: b for b in dropped}) for i in range(len(graph.traces))]
    plan_of = {id(tg): plan for tg, plan in zip(graph.traces, plans)}
    pair = _mode_pair(graph.traces)
    if pair is None:
        rebuilt = _rewritten(graph.traces[0], new_model, rewrites, type(model).__name__, plans[0])
    else:  # the code holds the mode it was traced in: each mode runs its own graph
        evaluation, training = pair
        rebuilt = TrainEvalGraphModule(new_model, _rewritten_graph(evaluation, new_model, rewrites, plan_of[id(evaluation)]),
                                       type(model).__name__,
                                       _rewritten_graph(training, new_model, rewrites, plan_of[id(training)]))
        rebuilt.train(new_model.training)
    if not specialized:
        return rebuilt
    # A graph recorded by running the model holds the example's sizes as literals. The
    # user's own class, with the resized layers, is returned when its forward computes the
    # same outputs as the recorded graph (its shape code then did not hold a channel count
    # that changed); otherwise the GraphModule, which refuses inputs of other shapes.
    for name in graph.traces[0].constants:
        if name in vars(new_model):
            delattr(new_model, name)
    inputs = specialized[0].example_inputs
    if graph.data_sized:
        return _own_class(new_model, inputs, graph.data_sized, bool(dropped))
    if not dropped and _same_outputs(new_model, rebuilt, inputs):  # the user's class would run a dropped branch
        return new_model
    rebuilt.register_forward_pre_hook(InputShapeCheck(
        [tuple(x.shape) if isinstance(x, torch.Tensor) else None for x in inputs]))
    rebuilt.dnnshrink_specialized_to = [tuple(x.shape) if isinstance(x, torch.Tensor) else None for x in inputs]
    return rebuilt


def _other_input(inputs: Tuple[Any, ...]) -> Tuple[Any, ...]:
    """A second, random input of the example's shapes (its floating-point tensors redrawn)."""
    generator = torch.Generator().manual_seed(0)
    return tuple(torch.randn(x.shape, generator=generator).to(x) if isinstance(x, torch.Tensor)
                 and x.is_floating_point() else x for x in inputs)


def _same_output(x: Any, y: Any) -> bool:
    """Whether one output of the candidate, ``x``, is the reference's ``y``: a tensor of the
    same shape and values (to float32 rounding), or an equal plain value."""
    if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
        return False
    if not isinstance(x, torch.Tensor):
        return x == y
    scale = float(y.abs().max()) if y.numel() else 0.0
    return x.shape == y.shape and torch.allclose(x, y, rtol=1e-5, atol=1e-6 * scale + 1e-12)


def _same_outputs(candidate: nn.Module, reference: nn.Module, inputs: Tuple[Any, ...]) -> bool:
    """Whether ``candidate`` computes what ``reference`` does on ``inputs`` and on a second,
    random input of the same shapes (so a branch taken on the example's values shows)."""
    with model_mode(candidate, training=False), model_mode(reference, training=False), torch.no_grad():
        for args in (inputs, _other_input(inputs)):
            try:
                a, b = flatten_outputs(candidate(*args), True), flatten_outputs(reference(*args), True)
            except Exception:  # the user's code cannot take the new widths
                return False
            if len(a) != len(b) or not all(_same_output(x, y) for x, y in zip(a, b)):
                return False
    return True


def _own_class(candidate: nn.Module, inputs: Tuple[Any, ...], data_sized: list, dropped: bool) -> nn.Module:
    """The user's own class with the resized layers, for a model whose recorded sizes came
    from the example's values (``data_sized``): the recorded graph holds those sizes as
    literals, right for that input and the weights it was recorded with alone, so it is no
    reference either (removing channels whose scales were small but not zero moves a score
    across a threshold, and with it every later size). The class must run on the example and
    on another input of its shapes; otherwise :class:`GenerationError` says why, before
    anything is returned."""
    where = ", ".join(data_sized[:3]) + (f" and {len(data_sized) - 3} more" if len(data_sized) > 3 else "")
    problem = "a residual branch is dropped whole, which your class's forward would still run" if dropped else ""
    if not problem:
        with model_mode(candidate, training=False), torch.no_grad():
            for args, which in ((inputs, "the example"),
                                (_other_input(inputs), "another input of the example's shapes")):
                try:
                    candidate(*args)
                except Exception as exc:
                    problem = f"it fails on {which}: {type(exc).__name__}: {str(exc)[:200]}"
                    break
    if not problem:
        return candidate
    raise GenerationError(
        f"dnnshrink: sizes in this model's forward depend on its input's values ({where}), so the graph recorded on "
        f"the example holds that input's sizes and only your model's own class can be generated; with the new widths "
        f"it cannot be ({problem}). Shrink the part of the model before those ops (e.g. a detector's backbone and "
        "head, without its post-processing), or keep the channels that code sizes another way whole.")


def _slice_params(model: nn.Module, graph: ChannelGraph, keep_labels: np.ndarray,
                  resizes: Dict[str, Tuple[Dict[str, torch.Tensor], Dict[str, Any]]]) -> set:
    """Slice every parameter or buffer that function handlers read (``F.batch_norm`` with a
    module's own weights, a layer scale) along its labelled dimensions, in the module that
    owns it; adds them to ``resizes`` and returns the modules changed."""
    cuts: Dict[str, list] = {}
    for (path, dim), space in graph.store.param_spaces.items():
        keep = keep_labels[space.start:space.start + space.size]
        if not keep.all():
            cuts.setdefault(path, []).append((dim, keep))
    changed = set()
    for path, dims in cuts.items():
        owner, _, attr = path.rpartition(".")
        tensor = getattr(model.get_submodule(owner), attr).detach()
        for dim, keep in dims:
            tensor = tensor.index_select(dim, index_of(keep, tensor.device))
        resizes.setdefault(owner, ({}, {}))[0][attr] = tensor
        changed.add(owner)
    return changed


def _sync_sizes(module: nn.Module) -> None:
    """Set a standard layer's size attributes from its (sliced) tensors, so that a
    ``BatchNorm2d`` subclass that calls ``F.batch_norm`` itself still says how wide it is."""
    weight = getattr(module, "weight", None)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        ref = weight if weight is not None else module.running_mean
        if ref is not None:
            module.num_features = int(ref.shape[0])
    elif isinstance(module, nn.GroupNorm) and weight is not None:
        module.num_channels = int(weight.shape[0])
    elif isinstance(module, nn.Linear) and weight is not None:
        module.out_features, module.in_features = int(weight.shape[0]), int(weight.shape[1])
    elif isinstance(module, nn.modules.conv._ConvNd) and weight is not None:
        rows, cols = int(weight.shape[0]), int(weight.shape[1]) * module.groups
        if module.transposed:
            module.in_channels, module.out_channels = rows, cols
        else:
            module.out_channels, module.in_channels = rows, cols


_SHARED = (int, float, complex, str, bytes, bool, type(None), torch.dtype, torch.device, torch.Size,
           torch.memory_format, type)


def _immutable(value: Any) -> bool:
    return isinstance(value, _SHARED) or (isinstance(value, tuple) and all(_immutable(v) for v in value))


def clone_module(module: nn.Module, memo: Dict[int, Any]) -> nn.Module:
    """``copy.deepcopy(module, memo)``, faster for module trees.

    Modules are copied structurally: fresh ``_parameters``/``_buffers``/``_modules`` dicts
    (tensors come from ``memo``), immutable attributes shared, anything else deep-copied
    with the same memo. Modules with their own ``__deepcopy__`` use it.
    """
    if id(module) in memo:
        return memo[id(module)]
    cls = type(module)
    if getattr(cls, "__deepcopy__", None) is not None or cls.__reduce_ex__ is not object.__reduce_ex__:
        return copy.deepcopy(module, memo)
    new = object.__new__(cls)
    memo[id(module)] = new
    state = {}
    for key, value in module.__dict__.items():
        if key in ("_parameters", "_buffers"):
            state[key] = {k: (None if v is None else memo[id(v)] if id(v) in memo else copy.deepcopy(v, memo))
                          for k, v in value.items()}
        elif key == "_modules":
            state[key] = {k: None if v is None else clone_module(v, memo) for k, v in value.items()}
        elif _immutable(value):
            state[key] = value
        elif type(value) in (dict, collections.OrderedDict, set) and not value:
            state[key] = type(value)()
        else:
            state[key] = copy.deepcopy(value, memo)
    new.__dict__.update(state)
    return new


def _clone_memo(model: nn.Module, replacements: Dict[str, nn.Module],
                resizes: Dict[str, Tuple[Dict[str, torch.Tensor], Dict[str, Any]]]) -> Dict[int, Any]:
    """A deepcopy memo with the rebuilt modules, the resized tensors, and clones of every
    other tensor.

    Cloning tensors up front is several times faster than letting deepcopy reach them
    through ``Parameter.__deepcopy__``.
    """
    memo: Dict[int, Any] = {id(model.get_submodule(name)): new for name, new in replacements.items()}
    with torch.no_grad():
        for name, (tensors, _) in resizes.items():
            module = model.get_submodule(name)
            for attr, tensor in tensors.items():
                old = getattr(module, attr)
                memo[id(old)] = (nn.Parameter(tensor.detach(), requires_grad=old.requires_grad)
                                 if isinstance(old, nn.Parameter) else tensor.detach())
        for p in model.parameters():
            if id(p) not in memo:
                memo[id(p)] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
        for b in model.buffers():
            if id(b) not in memo:
                memo[id(b)] = b.clone()
    return memo


def settled(model: nn.Module, graph: ChannelGraph, keep: np.ndarray) -> np.ndarray:
    """``keep`` as :func:`build` builds it: every group inside a dropped residual branch
    emptied, and a branch whose output is not constant once emptied given back the best
    unit of its emptied groups (with a warning). The same flags give the same network."""
    return _droppable(model, graph, keep)[0]


def _droppable(model: nn.Module, graph: ChannelGraph, keep: np.ndarray) -> Tuple[np.ndarray, Dict[Any, torch.Tensor]]:
    """``keep`` settled for the branches it drops, and each dropped branch's constant. A branch
    whose output turns out not to be constant keeps the best unit of its emptied groups."""
    if not branches.dropped(graph, keep):
        return keep, {}
    keep = branches.settle(graph, keep)
    values, failed = branches.constants(graph, model, keep)
    if failed:
        gammas = graph.unit_gammas(model)
        keep = keep.copy()
        for b in failed:
            for g in b.groups:
                units = graph.groups[g].units
                if not keep[units].any():
                    keep[_best_unit(units, gammas)] = True
        warnings.warn("dnnshrink: the residual branch(es) ending at " + ", ".join(repr(b.join) for b in failed)
                      + " do not reduce to a constant when emptied; one unit of each emptied group is kept.",
                      DnnshrinkWarning, stacklevel=4)
        keep = branches.settle(graph, keep)
        values, _ = branches.constants(graph, model, keep)
    return keep, values


def _rewritten(trace: Any, root: nn.Module, rewrites: Dict[fx.Node, Tuple[Any, Any]],
               class_name: str, drop: Tuple[set, Dict[str, Any]]) -> fx.GraphModule:
    """A GraphModule over ``root``'s (rebuilt) modules whose code has the rewritten constants."""
    result = fx.GraphModule(root, _rewritten_graph(trace, root, rewrites, drop), class_name=class_name)
    result.train(root.training)
    return result


def _mode_pair(traces: list) -> Any:
    """``(eval trace, training trace)`` when the model was traced once per training mode
    because its code reads the flag (see ``tracing.trace_modes``); None otherwise."""
    if len(traces) != 2 or not all(t.allow_rewrite for t in traces):
        return None
    a, b = traces
    rest = [{k: v for k, v in t.mode.items() if k != "training"} for t in traces]
    if rest[0] != rest[1] or a.mode["training"] == b.mode["training"]:
        return None
    return (b, a) if a.mode["training"] else (a, b)


def _rewritten_graph(trace: Any, root: nn.Module, rewrites: Dict[fx.Node, Tuple[Any, Any]],
                     drop: Tuple[set, Dict[str, Any]] = (set(), {})) -> fx.Graph:
    """A copy of ``trace``'s graph with the rewritten constants, and each dropped branch's
    output read from its parameter on ``root`` (``drop``: the names of the dropped nodes, and
    the dropped branches by their join's name); the constants fx lifted out of forward are
    put on ``root``."""
    new_graph = fx.Graph()
    env: Dict[fx.Node, fx.Node] = {}
    gone, joins = drop
    for node in trace.graph.nodes:
        if node.name in gone:
            continue
        if node.name in joins:
            branch = joins[node.name]
            constant = new_graph.get_attr(branches.parameter_name(branch))
            other = env[node.args[1 - branch.operand]]
            if branches.is_in_place(node) and branch.operand == 0:  # never add into the parameter
                env[node] = new_graph.call_function(operator.add, (other, constant))
            else:
                args = list(node.args)
                args[branch.operand] = constant
                args[1 - branch.operand] = other
                env[node] = new_graph.create_node(node.op, node.target, tuple(args), dict(node.kwargs), node.name)
            continue
        new_node = new_graph.node_copy(node, lambda n: env[n])
        if node in rewrites:
            args, kwargs = rewrites[node]
            if args is not None:
                new_node.args = fx.map_arg(args, lambda n: env[n])
            if kwargs is not None:
                new_node.kwargs = fx.map_arg(kwargs, lambda n: env[n])
        env[node] = new_node
    # constants fx lifted out of forward were kept beside the graph, not on the user's model
    for name, value in trace.constants.items():
        if not hasattr(root, name):
            setattr(root, name, value)
    return new_graph


def _install(to: nn.Module, source: nn.Module, target: str) -> None:
    """Make ``to.<target>`` the object ``source.<target>`` is, as ``fx.GraphModule`` does for
    its own graph's targets (containers on the way are new; the layer or tensor is shared)."""
    *path, last = target.split(".")
    for item in path:
        source = getattr(source, item)
        inner = getattr(to, item, None)
        if inner is None:
            inner = nn.Module()
            setattr(to, item, inner)
        to = inner
    if hasattr(to, last):
        return
    value = getattr(source, last)
    if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
        to.register_buffer(last, value)
    else:
        setattr(to, last, value)


class TrainEvalGraphModule(fx.GraphModule):
    """A generated network whose code depends on the training mode (timm's ``BatchNormAct2d``
    passes ``self.training`` to ``F.batch_norm``; a drop-path draws its mask only while
    training). ``graph`` is the eval-mode graph, the one exporters, the artifact and shape
    checks read; ``train_graph`` runs while ``training`` is set. Both run over the same
    layers and tensors, so ``.to()``, ``state_dict`` and the optimizer see each once.
    """

    def __init__(self, root: Any, graph: fx.Graph, class_name: str = "GraphModule",
                 train_graph: Any = None, train_root: Any = None):
        if train_graph is None:  # deepcopy re-initialises from a copy of the instance's __dict__
            train_graph = root.__dict__["train_graph"]
        self.__dict__["train_graph"] = train_graph  # recompile(), run by __init__, compiles it
        super().__init__(root, graph, class_name)
        for node in train_graph.nodes:  # what only the training graph reads
            if node.op in ("call_module", "get_attr"):
                _install(self, train_root if train_root is not None else root, node.target)

    def recompile(self) -> Any:
        """Compile both graphs; ``forward`` runs the one for the current mode."""
        code = super().recompile()
        cls = type(self)
        evaluation = cls.forward
        python = self.__dict__["train_graph"].python_code(root_module="self")
        namespace = dict(python.globals)
        exec(compile(python.src, "<dnnshrink: the training-mode graph>", "exec"), namespace)  # noqa: S102 (fx's own code)
        training = namespace["forward"]

        @functools.wraps(evaluation)
        def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
            return (training if self.training else evaluation)(self, *args, **kwargs)

        cls.forward = forward
        return code

    def _deepcopy_init(self) -> Any:
        # torch's deepcopy re-initialises the copy with this (GraphModule.__init__ by default)
        return TrainEvalGraphModule.__init__

    def __copy__(self) -> "TrainEvalGraphModule":
        return TrainEvalGraphModule(self, self.graph, type(self).__name__, self.train_graph)

    def __reduce__(self) -> Any:
        # each graph pickled as torch pickles a GraphModule (its code); the layers they share
        # are one object in the pickle, and one again after loading
        return (_train_eval_from, (fx.GraphModule(self, self.graph, type(self).__name__),
                                   fx.GraphModule(self, self.train_graph)))


def _train_eval_from(evaluation: fx.GraphModule, training: fx.GraphModule) -> TrainEvalGraphModule:
    """Unpickle a :class:`TrainEvalGraphModule` from its two graphs' modules."""
    result = TrainEvalGraphModule(evaluation, evaluation.graph, type(evaluation).__name__, training.graph, training)
    result.train(evaluation.training)
    return result
