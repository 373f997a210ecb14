"""The hook specifications of dnnshrink (pluggy project name ``dnnshrink``).

A plugin is any module or object with functions named like the specs below, marked with
``from dnnshrink_core import hookimpl``. Default plugins are registered through the
``dnnshrink`` entry-point group exactly like a third party's, and are marked
``trylast`` so that a third party's answer for the same question wins.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, List, Optional

import pluggy

if TYPE_CHECKING:  # the types only: hook specs import nothing heavy
    from torch import fx, nn

    from .handler import OpHandler
    from .masks import Masks

hookspec = pluggy.HookspecMarker("dnnshrink")


@hookspec(firstresult=True)
def dnnshrink_op_handler(node: "fx.Node", module: Optional["nn.Module"]) -> Optional["OpHandler"]:
    """Return the depth-change handler for one traced op, or ``None`` if you do not know it.

    ``node`` is a :class:`torch.fx.Node`; ``module`` is the called ``nn.Module`` when
    ``node.op == "call_module"`` and ``None`` otherwise. The handler is an
    :class:`dnnshrink_core.OpHandler`: its ``propagate(ctx)`` says how the channels at
    the op's inputs and outputs are coupled (ties, slices, blocks after a flatten,
    new channels, or frozen), and its ``rebuild(ctx)`` rebuilds the op for a keep-set
    (slice weights, rewrite literal constants). The first non-``None`` answer wins; an
    op nobody answers for keeps every channel that crosses it, with a warning.
    """


@hookspec(firstresult=True)
def dnnshrink_leaf_module(module: "nn.Module", qualname: str) -> Optional[bool]:
    """Say whether the tracer keeps ``module`` whole (``True``) or traces into it (``False``).

    Return ``None`` to leave the decision to others (the default keeps the layers of
    ``torch.nn`` whole). A module kept whole needs an op handler (see
    :func:`dnnshrink_op_handler`), or its channels are frozen.
    """


@hookspec(firstresult=True)
def dnnshrink_mask_extractor(name: str) -> Optional[Callable[..., "Masks"]]:
    """Return the mask extractor called ``name``, or ``None``.

    A mask extractor is a callable ``extract(graph, model, **options) -> Masks`` that
    decides, from the trained model and its :class:`dnnshrink_core.ChannelGraph`, which
    channel units of every group stay alive. The default, ``"threshold"``, keeps a unit
    when any BatchNorm source in it has ``|gamma| > threshold``. The width rules after
    structure learning (minimum widths, rounding, the expand step) are the algorithm's.
    """


@hookspec
def dnnshrink_mask_extractor_names() -> List[str]:
    """Return the names of the mask extractors your plugin gives (for listings and messages)."""


@hookspec(firstresult=True)
def dnnshrink_regularizer(name: str) -> Optional[Callable[..., Any]]:
    """Return the regularizer class or factory called ``name``, or ``None``.

    A regularizer adds its gradient to the BatchNorm scales' ``.grad`` in a global
    optimizer step pre-hook (``attach()``), after a GradScaler has unscaled the gradients
    and DistributedDataParallel has averaged them, while the user's own
    ``train_one_epoch(model, lr)`` runs with any ``torch.optim`` optimizer.
    """


@hookspec
def dnnshrink_regularizer_names() -> List[str]:
    """Return the names of the regularizers your plugin gives (for listings and messages)."""


@hookspec(firstresult=True)
def dnnshrink_algorithm(name: str) -> Optional[Any]:
    """Return the structure-learning algorithm called ``name`` (``morphnet``, ``slimming``,
    ``magnitude``…), or ``None``.

    An algorithm is an object with ``learn(ctx) -> LearnResult``: given a
    :class:`dnnshrink_core.algorithm.LearnContext` (the working model, its channel graph,
    the user's ``train_one_epoch``, the options and the MACs target) it trains as it needs
    and returns which channel units to keep. The generator, exporters and report are shared.
    Optional attributes tell the core what the algorithm needs: ``learns_over_epochs``
    (default True; False lets ``max_epochs`` be 0), ``needs_batchnorm`` (default True: it
    learns from BatchNorm scales; False: it ranks channels by something else, so a model
    without BatchNorm is let through and every channel that is not frozen is removable to it,
    :meth:`~dnnshrink_core.graph.ChannelGraph.for_weight_ranking`), ``grows_networks``
    (default False: a target above the baseline is then an error), ``chooses_depth`` (default False; True: its structure
    may drop whole residual blocks, so the reachability check counts them, as the ``depth``
    option allows), ``scales_by_capacity`` (default False; True: its step to the budget
    honours the ``scale: capacity`` option, which ``scale: auto`` picks at latency targets),
    ``chooses_scale`` (default False; True: at other targets its step gets ``scale: auto``
    itself, builds both structures and keeps the one
    :func:`~dnnshrink_core.plugin_api.auto_scaled` chooses, saying which in ``info["scale"]``,
    ``info["capacity_gain"]``, ``info["scale_why"]`` and ``info["capacity_least_gain"]``
    (the gain it held the capacity step to: ``AUTO_CAPACITY_GAIN`` where its multiplier keeps
    learned proportions); without it ``auto`` is the multiplier there); an optional
    ``capacity_probe(graph, model, costs, profile, min_width, round_to)`` returning ``budget
    -> keep flags`` gives ``measure_target`` the structures it builds (else the uniform
    multiplier's are timed).
    """


@hookspec
def dnnshrink_algorithm_names() -> List[str]:
    """Return the names of the algorithms your plugin gives (for listings and messages)."""


@hookspec(firstresult=True)
def dnnshrink_exporter(fmt: str) -> Optional[Any]:
    """Return the exporter for format ``fmt`` (``"pytorch"``, ``"onnx"``, ``"graph"``…), or ``None``.

    An exporter is an object with ``export(model, example_inputs, path, **options)``,
    which writes the file (atomically), verifies it before it reports the export as done,
    and returns a dict of what it measured (at least ``"path"``). It may also have
    ``load(path)``; ``suffix`` is the file suffix it suggests (the pipeline writes
    ``model<suffix>``, or ``filename`` when the exporter has one), and ``wants_baseline =
    True`` makes the pipeline pass ``baseline=`` (the model before shrinking).
    """


@hookspec
def dnnshrink_export_formats() -> List[str]:
    """Return the names of the formats your exporters write (for listings and messages)."""


@hookspec(firstresult=True)
def dnnshrink_cost_model(name: str) -> Optional[Callable[..., Any]]:
    """Return the cost model (a *resource*) called ``name``, or ``None``.

    The defaults (plugin ``costs``) are ``flops`` (MACs), ``params`` (weights),
    ``activations`` (output elements of every conv/linear layer) and ``latency`` (a
    roofline per op calibrated on the target runtime, see ``dnnshrink calibrate``).

    The answer is a factory ``make(table, **options) -> resource``. ``table`` is a
    :class:`dnnshrink_core.cost.LayerTable` (one entry per conv/linear layer: MACs factor,
    weights per channel pair, kernel, spatial positions, op kind, full widths); ``options``
    are the cost model's own (``profile=`` for ``latency``; ignore the ones you do not know).
    The resource has ``unit`` (its unit word, as targets write it: ``MACs``, ``ms``…),
    ``fixed`` (a cost that no channel changes, e.g. a runtime's overhead per run; 0 if
    none), and two vectorised methods over the layers, given the kept input and output
    channel counts (float arrays, one entry per layer):

    * ``layer_costs(kept_in, kept_out) -> array``: each layer's cost;
    * ``partials(kept_in, kept_out) -> (d_in, d_out)``: its partial derivatives w.r.t. the
      two counts. The core turns them into each channel unit's weight (MorphNet's weight
      of the unit's ``|gamma|``). For a depthwise layer (input channels tied to output
      channels) charge everything to ``kept_out``.

    A resource may also give ``channel_multiples() -> (per-layer input multiple, output
    multiple)``: the channel block the runtime's kernels need, used by ``round_to: auto``.
    A factory with ``prices_tensor_ops = True`` gets, after the layers, one more entry per
    memory-bound op between them (an activation other than ReLU, an add, a multiply,
    pooling, a concatenation, a transpose: :mod:`dnnshrink_core.tensor_ops`),
    with ``op`` its kind, no MACs or weights, ``depthwise`` set, and the elements it reads and
    writes per channel as positions. A concatenation's row is followed by one row per input
    with ``op`` :data:`~dnnshrink_core.plugin_api.PIECE_OP` (its channel units, no positions),
    so that a resource can tell whether every piece fits a block; price those at nothing.

    The factory is also called with a table of what no channel cut changes (products of two
    activations, with ``op`` ``"matmul"``, and layers no handler could follow:
    :mod:`dnnshrink_core.fixed`), and ``layer_costs`` with those rows' full widths; the sum
    is the cost model's ``constant``.
    """


@hookspec
def dnnshrink_cost_model_names() -> List[str]:
    """Return the names of the cost models your plugin gives (for listings and messages)."""
