"""The public functions: :func:`trace`, :func:`alive_masks`, :func:`generate`."""
from __future__ import annotations

import math
import numbers
import warnings
import weakref
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import fx, nn

from .compensate import compensate as fold_removed_channels
from .errors import (
    ConfigError,
    GenerationError,
    DnnshrinkWarning,
    NoBatchNormError,
    NothingRemovedWarning,
    PluginError,
)
from .generate import build, units_to_keep
from .graph import ChannelGraph
from .labels import LabelStore
from .masks import DEFAULT_THRESHOLD, Masks
from .plugins import get_plugin_manager, lookup
from .propagation import propagate
from .shapes import has_hooks, infer_specs
from .tracing import BACK_BONE_ONLY, GENERATE_GRAPH, model_mode, normalize_inputs, trace_modes
from .validation import check_input_count

_graphs: "weakref.WeakKeyDictionary[nn.Module, ChannelGraph]" = weakref.WeakKeyDictionary()


def _fingerprint(model: nn.Module, inputs: tuple, leaf_modules: Sequence[Any]) -> tuple:
    """What the channel graph depends on: structure, parameter shapes, input shapes, modes."""
    modules = list(model.named_modules())
    structure = tuple((name, id(m)) for name, m in modules)
    # one walk of the tree: every module's own parameters (shared ones once, as named_parameters)
    seen: set = set()
    shapes = tuple((f"{name}.{key}" if name else key, tuple(p.shape)) for name, m in modules
                   for key, p in m._parameters.items()
                   if p is not None and id(p) not in seen and not seen.add(id(p)))
    inputs_key = tuple((tuple(x.shape), x.dtype) if hasattr(x, "shape") else repr(x) for x in inputs)
    modes = (model.training, getattr(model, GENERATE_GRAPH, None), getattr(model, BACK_BONE_ONLY, None))
    pm = get_plugin_manager()
    plugins = (id(pm), tuple((name, id(plugin)) for name, plugin in pm.list_name_plugin()))
    return structure, shapes, inputs_key, modes, plugins, tuple(map(repr, leaf_modules))


def _digest(tensor: Any) -> tuple:
    """A tensor's identity and a cheap summary of its values (a write through ``.data``
    does not bump the version counter, so the sums are what shows it)."""
    with torch.no_grad():
        values = tensor.detach()
        sums = (float(values.sum()), float(values.abs().sum())) if values.is_floating_point() else \
            (int(values.sum()),) if values.numel() else ()
    return id(tensor), tensor._version, tensor.data_ptr(), sums


def _values_key(model: nn.Module, inputs: tuple) -> tuple:
    """What a graph whose recorded sizes came from the values
    (:attr:`~dnnshrink_core.tracing.TracedGraph.data_sized`) depends on besides its
    structure: the parameters' and buffers' values, the example's values, and the plain
    settings its modules hold (a detector's score threshold). It is recorded again when
    any of them changes."""
    tensors = [_digest(t) for t in (*model.parameters(), *model.buffers())]
    examples = [_digest(x) for x in inputs if isinstance(x, torch.Tensor)]
    settings = [(name, key, value) for name, module in model.named_modules() for key, value in vars(module).items()
                if not key.startswith("_") and isinstance(value, (bool, int, float, str))]
    return tuple(tensors), tuple(examples), tuple(settings)


def _still_valid(graph: ChannelGraph, model: nn.Module, inputs: tuple, key: tuple) -> bool:
    """Whether a traced ``graph`` still describes ``model`` on ``inputs``: the same fingerprint,
    and for a graph whose recorded sizes came from the values, the same values too."""
    return graph.fingerprint == key and (graph.values_key is None or graph.values_key == _values_key(model, inputs))


def _check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, not {type(model).__name__}")


def trace(model: nn.Module, example_inputs: Any, *, leaf_modules: Sequence[Any] = ()) -> ChannelGraph:
    """Trace ``model`` into a :class:`ChannelGraph` of channel groups.

    ``example_inputs`` is a tensor (or a tuple of positional arguments) shaped like one
    batch of input. ``leaf_modules`` lists module names or types to keep whole (their
    channels are kept unless a handler knows them). The model is not modified; the
    graph is cached for the model until its structure or the input shapes change.
    A count of inputs that ``model.forward`` cannot take is a :class:`TraceError` naming
    both counts (an extra input would otherwise be dropped silently).
    """
    _check_model(model)
    inputs = normalize_inputs(example_inputs)
    check_input_count(model, inputs)
    key = _fingerprint(model, inputs, leaf_modules)
    cached = _graphs.get(model)
    if cached is not None and _still_valid(cached, model, inputs, key):
        return cached
    pm = get_plugin_manager()
    if not pm.hook.dnnshrink_op_handler.get_hookimpls():
        raise PluginError("no channel handler plugin is loaded, so nothing can be traced. Install dnnshrink with "
                          "its default plugins (`pip install -e .` in the source tree) and check that "
                          "`dnnshrink plugins` lists `generators` (it may be blocked by DNNSHRINK_BLOCK_PLUGINS).")
    graphs, frozen = trace_modes(model, inputs, pm, leaf_modules)
    store = LabelStore()
    propagate(graphs, store, pm, frozen)
    graph = ChannelGraph(store, graphs, frozen, type(model).__name__, key)
    graph.leaf_modules = tuple(leaf_modules)
    if any(tg.data_sized for tg in graphs):  # its sizes hold these weights' outputs
        graph.values_key = _values_key(model, inputs)
    _graphs[model] = graph
    return graph


def _graph_for(model: nn.Module, example_inputs: Any, masks: Optional[Mapping[str, Any]] = None) -> ChannelGraph:
    graph = getattr(masks, "graph", None)
    if isinstance(graph, ChannelGraph):
        inputs = normalize_inputs(example_inputs)
        if _still_valid(graph, model, inputs, _fingerprint(model, inputs, graph.leaf_modules)):
            return graph
    return trace(model, example_inputs)


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def frozen_batchnorm_note(model: nn.Module) -> str:
    """What to say when ``model``'s normalisations are frozen BatchNorms (torchvision's and
    detectron2's ``FrozenBatchNorm2d``, which pretrained detection backbones are built with):
    their scales are fixed buffers, so no training can move them; ``""`` when it has none."""
    frozen = sorted({type(m).__name__ for m in model.modules() if "FrozenBatchNorm" in type(m).__name__})
    if not frozen:
        return ""
    return (f" Its normalisations are {', '.join(frozen)}: fixed scales (buffers, not parameters), as pretrained "
            "detection backbones are built, which no training can move. Build the model with nn.BatchNorm2d "
            "instead (torchvision's detection builders use it with weights_backbone=None, or take "
            "norm_layer=nn.BatchNorm2d), and load the pretrained weights into it.")


def alive_masks(model: nn.Module, example_inputs: Any, threshold: Optional[float] = DEFAULT_THRESHOLD, *,
                extractor: str = "threshold", round_to: Any = None, profile: Any = None, **options: Any) -> Masks:
    """Per-group keep masks by MorphNet's rule.

    ``round_to``: ``None`` (or 1) keeps the alive count of every group; an int rounds each
    group's count up to a multiple of it, and ``"auto"`` to the channel block the latency
    ``profile`` measured for the group's layers (default profile: onnxruntime CPU), so the
    runtime's fast kernels apply. Rounding keeps the next-best units by ``|gamma|``: dead
    units carry zeros, so the generated network stays exact. A group whose rounded count
    would exceed its size keeps its count, with a warning naming it (``masks.notes``).

    A channel unit lives if any BatchNorm source in it has ``|gamma| > threshold``
    (``threshold=None`` lets the extractor pick one in the gap of the ``|gamma|``
    distribution). Units that cannot be removed exactly (frozen, no BatchNorm source,
    or reaching a conv without passing a BatchNorm) always live. A threshold below zero
    is a :class:`ConfigError`; a group the threshold would empty keeps its unit with the
    largest ``|gamma|``, with a warning naming it.
    """
    _check_model(model)
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, numbers.Real)
                                  or not math.isfinite(threshold) or threshold < 0):
        raise ConfigError(f"alive_masks(): threshold must be a number >= 0 (the |gamma| at or below which a "
                          f"channel is dead), or None to pick one in the gap of the |gamma| distribution; "
                          f"not {threshold!r}")
    if not _has_batchnorm(model):
        raise NoBatchNormError(
            f"{type(model).__name__} has no BatchNorm layer. MorphNet decides which channels to drop from "
            "BatchNorm scales (gamma), so add a BatchNorm after each conv you want shrunk "
            "(nn.Conv2d -> nn.BatchNorm2d -> activation)." + frozen_batchnorm_note(model))
    graph = trace(model, example_inputs)
    extract = lookup("mask extractor", extractor)
    masks = extract(graph, model, threshold=threshold, **options)
    if round_to is not None and round_to != 1:
        masks = _rounded(graph, model, masks, round_to, profile)
    return masks


def _rounded(graph: ChannelGraph, model: nn.Module, masks: Masks, round_to: Any, profile: Any) -> Masks:
    """``masks`` with each group's kept count rounded up to its multiple (see :func:`alive_masks`)."""
    from .cost import per_group_multiples, resolve_round_to

    if not (round_to == "auto" or (isinstance(round_to, numbers.Integral) and not isinstance(round_to, bool)
                                   and round_to >= 1)):
        raise ConfigError(f"alive_masks(): round_to must be None, an integer >= 1 or 'auto', not {round_to!r}")
    multiples, notes = resolve_round_to(graph, model, round_to, profile)
    multiples = per_group_multiples(graph, multiples)
    gammas = graph.unit_gammas(model)
    keep = graph.units_from_masks(masks)
    for group, m in zip(graph.groups, multiples):
        units = group.units
        n = int(keep[units].sum())
        want = int(math.ceil(n / m) * m) if m > 1 else n
        if want == n or n == group.size or not group.removable.any():  # whole or frozen: nothing to round
            continue
        spare = units[~keep[units] & graph.unit_removable[units]]
        if want > n + len(spare):
            notes.append(f"group {group.name!r} is too small to round: {n} of {group.size} channels kept, and the "
                         f"next multiple of {m} is {want}")
            continue
        keep[spare[np.argsort(-gammas[spare], kind="stable")[:want - n]]] = True  # the next-best units
    if notes:
        warnings.warn("dnnshrink: round_to " + repr(round_to) + ": " + "; ".join(notes), DnnshrinkWarning,
                      stacklevel=3)
    result = Masks({g.name: keep[g.units] for g in graph.groups}, graph)
    result.threshold = getattr(masks, "threshold", None)
    result.notes = notes
    return result


def generate(model: nn.Module, example_inputs: Any, masks: Mapping[str, Any], *,
             compensate: bool = True) -> nn.Module:
    """A new, physically smaller network keeping the channel units ``masks`` keeps.

    ``masks`` maps group names (see :func:`trace`) to one boolean per unit; groups not
    named are kept whole. The result is a copy of ``model``'s own class with resized
    layers, or a :class:`torch.fx.GraphModule` when the network's code itself carries a
    channel count that had to be rewritten (such as ``x.view(-1, 16 * 5 * 5)``).
    ``model`` is not modified.

    With ``compensate`` (the default), what a removed channel still carried (``act(beta)``
    when its BatchNorm scale is zero but its shift is not) is folded into the bias of the
    conv/linear layers that read it, measured on ``example_inputs``; see
    :mod:`dnnshrink_core.compensate`. Channels that carried zeros change nothing.
    """
    _check_model(model)
    graph = _graph_for(model, example_inputs, masks)
    keep = units_to_keep(graph, masks, model)
    if keep.all():
        warnings.warn(NothingRemovedWarning(
            f"dnnshrink: the masks keep all {graph.num_units} channel units, so {type(model).__name__} is copied "
            "unchanged. alive_masks keeps a channel whose BatchNorm scale is above the threshold, and an untrained "
            "or unshrunk network has no scale near zero: learn a structure first (dnnshrink run, or "
            "dnnshrink_core.pipeline.shrink), or pass masks of your own."), stacklevel=2)
    shrunk = build(model, graph, keep)
    inputs = normalize_inputs(example_inputs)
    if compensate:
        fold_removed_channels(model, shrunk, graph, keep, inputs)
    _check_runs(shrunk, inputs, graph)
    return shrunk


def _check_runs(shrunk: nn.Module, inputs: tuple, graph: ChannelGraph) -> None:
    """Check that the new network runs on the example (in eval mode, every module's mode
    restored after), so a network that cannot run never reaches the user.

    Where the network is a graph of ops with shape rules (:mod:`dnnshrink_core.shapes`: the
    traced eval-mode graph the user's class was rebuilt from, or the GraphModule returned),
    working out every op's shape with the new layers checks what a run would, at a fraction
    of its cost; anything else runs for real (torch's ``meta`` device was slower than the
    arithmetic of a pruned MobileNetV2)."""
    traced, constants = _checkable_graph(shrunk, graph)
    if traced is not None and not has_hooks(shrunk):
        with model_mode(shrunk, training=False):
            if infer_specs(traced, dict(shrunk.named_modules(remove_duplicate=False)), inputs, constants) is not None:
                return
    try:
        with model_mode(shrunk, training=False), torch.no_grad():
            shrunk(*inputs)
    except Exception as exc:
        raise GenerationError(
            f"dnnshrink: the generated network does not run on the example input ({type(exc).__name__}: "
            f"{str(exc)[:300]}). A channel handler resized something the model's code sizes another way; "
            "please report it with the model's code. Until then, keep the channels around that op whole "
            "(leave its group out of the masks, or freeze its module with back_bone_only).") from exc


def _checkable_graph(shrunk: nn.Module, graph: ChannelGraph) -> tuple:
    """The graph the new network runs, with its lifted constants, when it is known without
    running it: not for graphs recorded on the example (their shapes are literals of it)."""
    if any(tg.specialized for tg in graph.traces):
        return None, None
    if isinstance(shrunk, fx.GraphModule):
        return shrunk.graph, None
    first = graph.traces[0]
    return (first.graph, first.constants) if first.mode == {"training": False} else (None, None)
