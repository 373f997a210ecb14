"""The end-to-end shrink pipeline (the manual's flow).

    train(baseline)?  →  test(baseline)  →  structure learning: train_one_epoch(model, lr)
    under the regularizer until the target is met  →  masks (+ expand to the budget)  →
    generate  →  train(shrunk)  →  test(shrunk)  →  report and export

The user's model object is never modified: the pipeline works on a copy.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import numbers
import os
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
import typing
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from . import distributed
from .api import frozen_batchnorm_note, trace
from .algorithm import LearnContext, LearnResult
from .branches import dropped as dropped_branches
from .capacity import AUTO_CAPACITY_GAIN
from .checkpoint import Checkpoints
from .compensate import compensate as fold_removed_channels
from .cost import CostModel, resolve_round_to, resource_table
from .devices import checked_device
from .errors import (ConfigError, DnnshrinkError, DnnshrinkWarning, NoBatchNormError, OutputExistsError, PluginError,
                     ScoreDropError, UnknownOptionError)
from .export import export, get_exporter
from .fileio import atomic_write
from .guard import LEARNING_ADVICE, FiniteGuard
from .generate import build, settled
from .masks import DEFAULT_THRESHOLD, Masks
from .plugins import lookup
from .report import Report, layer_report, report_markdown, summary_table, widths_against_uniform, widths_text
from .target import Target, check_reachable, resolve, smallest_cost
from .timing import runtime_spinning
from .tracing import normalize_inputs
from .validation import check_algorithm, check_exporters, check_options, resolved_scale



@dataclass
class ShrinkOptions:
    """Every pipeline option, with its default. Unknown names are an error, and every value
    is type- and range-checked before any work (see :mod:`dnnshrink_core.validation`).

    The size target is ``target`` (any form :class:`~dnnshrink_core.target.Target` parses:
    ``0.5``, ``"50%"``, ``"1.5M"``, ``{"resource": "macs", "amount": 1.5e6}``) or its short
    spelling ``target_macs`` (``0.5``, ``"50%"``, ``"1.5M"``); half the baseline's MACs when
    neither is given. A bare number is always a fraction in (0, 1]; an absolute count needs
    its unit. Other resources: ``{"resource": "latency" | "params" | "activations", "value": ...}``
    (latency in ms, predicted by the latency ``profile``: a JSON path, default the shipped
    onnxruntime CPU profile); MorphNet then learns with ``morphnet_<resource>`` unless a
    ``regularizer`` is given. ``round_to``: ``"auto"`` rounds each group's width to the
    channel block the profile measured (a group smaller than the block keeps its width); an
    int rounds every group to that multiple. ``measure_target`` (latency targets): before
    any training, time the network at a few widths with onnxruntime and work to the
    predicted budget whose *measured* latency is the target, instead of the profile's word
    (:mod:`dnnshrink_core.feedback`; a resumed run reuses the budget it measured).
    ``onnx_latency``: time the exported ONNX of the
    baseline and the shrunk model with onnxruntime (the profile's threads) for the report.
    ``trust`` (MorphNet): how far the learned widths are followed below the budget where
    structure learning stopped, from 0 (the uniform multiplier's widths, MorphNet's chosen
    channels) to 1; ``"auto"`` trusts them for the share of the way learning went (about
    0.5). Lower trust measured better at 1.5–5% of the MACs on MNIST-1D and worse on digits
    (docs/benchmarks.md).
    ``anneal`` (MorphNet): when the penalty has not brought the network to the midpoint in
    half of ``max_epochs`` (small targets), every later epoch's end cuts an even share of the
    way left to the target and the network trains on without the cut channels; off: one cut
    to the target after learning.
    ``depth``: whether the algorithm may drop whole residual blocks (a branch added to its
    input whose inner channels all go; the generator removes its ops and adds its constant
    output). ``"auto"`` (the default): where the target is below what channels alone can
    reach, as many blocks as meeting it takes; ``true``: also wherever a drop keeps more of
    what the algorithm values at the target; ``false``: channels only (a block whose
    channels all died still goes). For algorithms that choose depth (``chooses_depth``:
    ``morphnet``, ``slimming``, ``magnitude``).
    ``scale``: how the structure is brought to the budget. ``"auto"`` (the default):
    ``"capacity"`` for a latency target with an algorithm that offers it (the user asked
    for time, and capacity per millisecond is what a latency budget should buy); at a MACs,
    parameter or activation target such an algorithm builds both and keeps the
    multiplier's learned proportions unless the capacity step's structure needs at least
    10% less predicted time per MAC (``AUTO_CAPACITY_GAIN``, MorphNet's; ``magnitude``, whose
    multiplier keeps only the architecture's proportions, takes the capacity step wherever
    it is denser), and ``report.json`` says which it took and the gain it saw;
    ``"multiplier"`` for other algorithms. ``"multiplier"``:
    MorphNet's width multiplier, every group scaled alike, which keeps the learned
    proportions; ``"capacity"``: one block of channels at a time, cut from the group where
    the MACs cost the most predicted time (the latency profile; grown the other way to fill
    the budget), no group under half the uniform multiplier's width, or the multiplier's
    structure where that one has more MACs per predicted ms: more MACs for a latency budget,
    less time for a MACs budget (MobileNetV2 at 40% of its latency: 34% more MACs, measured
    faster; docs/benchmarks.md). For algorithms with ``scales_by_capacity`` (``morphnet``,
    ``magnitude``).
    ``max_score_drop``: when the shrunk model scores more than this below the
    baseline, :func:`shrink` raises :class:`~dnnshrink_core.errors.ScoreDropError` after
    writing its report (the CLI exits with 1).
    """

    algorithm: str = "morphnet"
    regularizer: str = "morphnet_flops"
    target_macs: Optional[Union[float, str]] = None
    target: Any = None
    max_epochs: int = 20
    lr: float = 0.1
    strength: Optional[float] = None
    strength_scale: float = 1.0
    threshold: float = DEFAULT_THRESHOLD
    expand: bool = True
    min_width: int = 1
    round_to: Union[int, str] = "auto"
    trust: Union[float, str] = "auto"
    anneal: bool = True
    depth: Union[bool, str] = "auto"
    scale: str = "auto"
    profile: Optional[str] = None
    measure_target: bool = False
    onnx_latency: bool = True
    compensate: bool = True
    device: Optional[str] = None
    find_unused_parameters: bool = False
    train_baseline: bool = False
    finetune: bool = True
    reinit: bool = False
    out_dir: Optional[str] = None
    force: bool = False
    resume: bool = False
    exporters: Sequence[str] = ("pytorch", "onnx", "graph")
    tensorboard: bool = True
    progress: bool = True
    latency_runs: int = 20
    max_score_drop: Optional[float] = None


OPTION_HINTS = typing.get_type_hints(ShrinkOptions)


@dataclass
class ShrinkResult:
    """What :func:`shrink` returns: the shrunk model (an instance of your class where the code
    needed no change), the masks, the report, and the files written."""

    model: nn.Module
    masks: Masks
    report: Report
    baseline_score: float
    score: float
    epochs: int
    files: Dict[str, str] = field(default_factory=dict)

    def summary(self) -> Dict[str, Any]:
        """The ``baseline``/``shrunk`` part of ``report.json``."""
        return {k: self.report.extra[k] for k in ("baseline", "shrunk")}


def _score(value: Any, what: str) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(float(value)):
        raise DnnshrinkError(f"{what} returned {value!r}; test(model) must return one finite number, larger is "
                             "better (for example the accuracy; return 1/loss for a loss)")
    return float(value)


def pick_device(requested: Optional[str], quiet: bool = False) -> torch.device:
    """The requested device (:func:`~dnnshrink_core.devices.checked_device`: a CUDA one with
    its index, which ``torch.cuda.set_device`` needs; one this machine lacks is a
    :class:`ConfigError`, raised before any work), else CUDA when available (the manual's
    default), else CPU."""
    if requested:
        return checked_device(requested, "device",
                              "give device: cpu, or leave it out to run on CUDA where there is one")
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if not quiet:
        print("dnnshrink: CUDA is not available; running on the CPU.")
    return torch.device("cpu")


def measure_latency(model: nn.Module, inputs: tuple, runs: int) -> float:
    """Median seconds of one eval-mode forward pass."""
    was_training = model.training
    model.eval()
    times = []
    with torch.no_grad():
        for i in range(runs + 3):
            start = time.perf_counter()
            model(*inputs)
            if inputs and isinstance(inputs[0], torch.Tensor) and inputs[0].is_cuda:
                torch.cuda.synchronize(inputs[0].device)
            if i >= 3:
                times.append(time.perf_counter() - start)
    model.train(was_training)
    return statistics.median(times)


def get_algorithm(name: str) -> Any:
    """The algorithm plugin called ``name``; a clear error lists the loaded ones."""
    return lookup("algorithm", name)


def shrink(model: nn.Module, example_inputs: Any, *, train_one_epoch: Callable[[nn.Module, float], Any],
           test: Callable[[nn.Module], Any], train: Optional[Callable[[nn.Module], Any]] = None,
           **options: Any) -> ShrinkResult:
    """Shrink ``model`` with the user's own training functions; see :class:`ShrinkOptions`.

    ``train_one_epoch(model, lr)`` trains one epoch; ``train(model)`` trains as the original
    recipe (used for the optional baseline training and to fine-tune the shrunk model);
    ``test(model)`` returns a number, larger is better. ``target_macs`` is a fraction of
    the baseline's MACs in (0, 1] (``0.5``, ``"50%"``) or an absolute count with its unit
    (``"1.5M"``); ``target`` takes the same and the explicit ``{"resource": "macs", "amount": n}``.
    Every option is checked before any work; a bad value raises
    :class:`~dnnshrink_core.errors.ConfigError` naming it, and a target the model cannot reach
    (below its smallest form, above its baseline) :class:`~dnnshrink_core.errors.TargetError`.

    Under ``torchrun`` every rank calls this: the training functions get the model in
    DistributedDataParallel on every rank, while ``test``, generation, export and every file
    are rank 0's (see :mod:`dnnshrink_core.distributed`).
    """
    names = list(ShrinkOptions.__dataclass_fields__)
    for key in options:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else f" Options: {', '.join(names)}."
            raise UnknownOptionError(f"shrink(): unknown option {key!r}.{hint}")
    check_options(options, OPTION_HINTS, "shrink(): ")
    goal = resolve(options.get("target"), options.get("target_macs"))
    if "regularizer" not in options and goal.resource != "macs":
        options = {**options, "regularizer": f"morphnet_{goal.cost_model}"}  # learn with the target's own cost
    elif str(options.get("regularizer", "")).startswith("morphnet_") and \
            options["regularizer"] != f"morphnet_{goal.cost_model}":
        warnings.warn(f"dnnshrink: regularizer {options['regularizer']!r} prices channels by another cost than the "
                      f"target's ({goal.resource}): structure learning aims at the wrong resource. Leave "
                      f"`regularizer` out to learn with morphnet_{goal.cost_model}.", DnnshrinkWarning, stacklevel=3)
    opts = ShrinkOptions(**options)
    if opts.finetune and train is None:
        raise TypeError("shrink needs train(model) to fine-tune the shrunk model (or finetune=False)")
    if opts.reinit and not opts.finetune:
        raise ConfigError("shrink(): reinit=True trains the learned structure from scratch with train(model), "
                          "so it needs finetune=True")
    algorithm = get_algorithm(opts.algorithm)
    check_algorithm(algorithm, opts.max_epochs, opts.scale, "shrink(): ")
    opts = dataclasses.replace(opts, scale=resolved_scale(opts.scale, goal, algorithm))
    check_exporters(opts.exporters, "shrink(): ")
    owns_group = distributed.init_from_env(opts.device)
    if options.get("scale") in (None, "auto") and opts.scale == "capacity":  # (said by rank 0 only)
        _step("scale auto: capacity for a latency target (the most MACs per predicted ms at the budget; "
              "scale: multiplier keeps the learned proportions instead)")
    try:
        with warnings.catch_warnings():
            if not distributed.is_main():  # the same warnings would come from every rank
                warnings.simplefilter("ignore", DnnshrinkWarning)
            result = _shrink(model, example_inputs, train_one_epoch, test, train, opts, algorithm)
    except BaseException:
        if owns_group:
            distributed.shutdown(barrier=False)
        raise
    if owns_group:
        distributed.shutdown()
    return result


@dataclass
class _Run:
    """One shrink run's state, filled in phase by phase (see :func:`_shrink`)."""

    opts: ShrinkOptions
    algorithm: Any
    main: bool
    device: torch.device
    inputs: tuple
    work: nn.Module
    graph: Any
    goal: Any
    costs: Any
    round_notes: List[str]
    target: float
    out_dir: Optional[Path]
    checkpoints: Optional[Checkpoints]
    baseline: Optional[nn.Module] = None  # rank 0's copy of the baseline, for the report
    baseline_score: float = float("nan")
    start_epoch: int = 1
    finished: Optional[Dict[str, Any]] = None  # a resumed run whose structure learning had finished
    trainee: Any = None
    writer: Any = None
    timed_onnx: Optional[Path] = None  # the shrunk model's ONNX this run exported for onnx_latency
    measured: Any = None  # measure_target's MeasuredTarget
    auto_fallback: bool = False  # scale: auto ran as the multiplier: no latency cost model to weigh time
    timing: Tuple[int, str] = (2, "run")  # the report's onnxruntime (threads, spinning): the profile's


def _shrink(model: nn.Module, example_inputs: Any, train_one_epoch: Callable, test: Callable,
            train: Optional[Callable], opts: ShrinkOptions, algorithm: Any) -> ShrinkResult:
    """The run, in phases: checks (before any of the user's code runs or any file is made),
    the baseline, structure learning, generation, fine-tuning, and the report and files."""
    run = _prepare(model, example_inputs, opts, algorithm)
    _baseline(run, train, test)
    learned = _learn(run, train_one_epoch)
    # the structure as the generator builds it (a residual block that would not reduce to a
    # constant keeps a unit), so that the masks and the report count what is built
    learned = dataclasses.replace(learned, keep=settled(run.work, run.graph, learned.keep))
    shrunk, masks, digests = _generate(run, learned, test)
    if run.opts.reinit:
        # MorphNet's own procedure: the learned structure, trained from a fresh start
        reinitialize(shrunk, seed=0 if distributed.active() else None)
    if run.opts.finetune:
        _step("fine-tuning the shrunk model with train(model)")
        _guarded(train, distributed.wrap(shrunk, run.opts.find_unused_parameters), shrunk,
                 "fine-tuning the shrunk model with train(model)")
    return _finish(run, learned, shrunk, masks, digests, test)


def _prepare(model: nn.Module, example_inputs: Any, opts: ShrinkOptions, algorithm: Any) -> _Run:
    """Device, trace, target: all checked before the output folder is made and before any of
    the user's code runs, so a bad run leaves nothing behind."""
    main = distributed.is_main()
    device = pick_device(distributed.local_device(opts.device), quiet=not main)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # collectives of objects use the current device
    inputs = tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in normalize_inputs(example_inputs))
    work = copy.deepcopy(model).to(device)
    graph = trace(work, inputs)
    if not graph.source_modules and getattr(algorithm, "needs_batchnorm", True):
        raise NoBatchNormError(f"{type(model).__name__} has no BatchNorm that scales prunable channels; "
                               f"{opts.algorithm} learns from BatchNorm scales: add a BatchNorm after each conv you "
                               "want shrunk (nn.Conv2d -> nn.BatchNorm2d -> activation), or use algorithm: magnitude, "
                               "which ranks channels by their weights (a LayerNorm network's MLP channels too)."
                               + frozen_batchnorm_note(model))
    if not getattr(algorithm, "needs_batchnorm", True):  # it may remove channels no BatchNorm scales too
        graph = graph.for_weight_ranking()
    goal = resolve(opts.target, opts.target_macs)
    identity = _identity(opts, goal)
    if opts.resume and opts.out_dir is not None:  # before any work: a resumed run is the run it continues
        distributed.on_main(lambda: _check_resumable(Path(opts.out_dir), identity))
    costs = CostModel(graph, work, goal.cost_model, profile=opts.profile)
    auto_fallback, timing = False, (2, "run")
    if costs.kind != "latency" and (opts.profile is not None or opts.scale in ("capacity", "auto")):
        # the profile is read after training otherwise (scale: capacity's step, the report's
        # predicted latency): a wrong path must stop the run before any work, not after it
        try:
            CostModel(graph, work, "latency", profile=opts.profile)
        except PluginError:
            if opts.scale != "auto" or opts.profile is not None:
                raise
            # the default cannot weigh time with no latency cost model loaded: the learned proportions
            _step("scale auto: the width multiplier (no latency cost model is loaded to price the capacity step)")
            opts, auto_fallback = dataclasses.replace(opts, scale="multiplier"), True
    if opts.onnx_latency and "onnx" in opts.exporters:  # a profile the report cannot time with stops the run now
        timing = _timing_settings(graph, work, costs, opts.profile)
    # "auto": one multiple per group, the channel block of the profile's runtime
    round_to, round_notes = resolve_round_to(graph, work, opts.round_to, opts.profile,
                                             latency=costs if costs.kind == "latency" else None)
    for note in round_notes:
        _step(f"round_to {opts.round_to}: {note}")
    if isinstance(opts.round_to, int) and opts.round_to > 1:
        _warn_off_block(graph, work, opts.round_to, opts.profile, costs)
    chooses_depth = bool(getattr(algorithm, "chooses_depth", False))
    depth = opts.depth is not False and chooses_depth
    user_goal, measured = goal, None
    if opts.measure_target:  # the predicted budget whose measured latency is the target
        measured = distributed.on_main(lambda: _measure_target(opts, graph, work, inputs, costs, goal, round_to,
                                                               algorithm))
        goal = Target("latency", fraction=measured.budget)
    minimum = None
    if opts.round_to == "auto" and not isinstance(round_to, int):
        # a target below the smallest rounded network, but not below the unrounded one: keep the
        # target (the user's word) and give up the rounding, saying so
        rounded_min, plain_min = (smallest_cost(graph, costs, opts.min_width, r, depth) for r in (round_to, 1))
        minimum = rounded_min
        if plain_min * (1 - 1e-9) <= goal.absolute(costs.initial) < rounded_min * (1 - 1e-9):
            round_to, round_notes = 1, ["the target is below the smallest network with widths rounded to the "
                                        "runtime's blocks: widths are not rounded"]
            minimum = plain_min
            _step(f"round_to auto: {round_notes[0]}")
    opts = dataclasses.replace(opts, round_to=round_to)
    if minimum is None:  # (round_to: auto priced it above)
        minimum = smallest_cost(graph, costs, opts.min_width, opts.round_to, depth)
    deeper = None
    if opts.depth is False and chooses_depth and \
            goal.absolute(costs.initial) < minimum * (1 - 1e-9):  # would dropping blocks have reached it?
        deeper = smallest_cost(graph, costs, opts.min_width, opts.round_to, True)
    target = check_reachable(goal, costs.initial, minimum,
                             key="target" if opts.target is not None else "target_macs", algorithm=opts.algorithm,
                             grows=bool(getattr(algorithm, "grows_networks", False)), min_width=opts.min_width,
                             depth=depth and bool(graph.branches), deeper=deeper, constant=costs.constant,
                             kept_share=graph.unremovable_share(), kept_by=graph.commonest_reason(),
                             needs_batchnorm=bool(getattr(algorithm, "needs_batchnorm", True)))
    out_dir = distributed.on_main(lambda: _prepare_out_dir(opts))
    if out_dir is not None and not opts.resume:
        distributed.on_main(lambda: _save_identity(out_dir, identity), share=False)
    if measured is not None and out_dir is not None:  # a resumed run works to the same budget
        distributed.on_main(lambda: _save_measured(out_dir / MEASURED_TARGET, measured), share=False)
    checkpoints = Checkpoints(out_dir / "checkpoints") if out_dir is not None and main else None
    return _Run(opts, algorithm, main, device, inputs, work, graph, user_goal, costs, round_notes, target, out_dir,
                checkpoints, measured=measured, auto_fallback=auto_fallback, timing=timing)


def _measure_target(opts: ShrinkOptions, graph: Any, work: nn.Module, inputs: tuple, costs: CostModel,
                    goal: Target, round_to: Any, algorithm: Any = None) -> Any:
    """``measure_target``: the predicted latency budget whose measured onnxruntime latency is
    the target (:mod:`dnnshrink_core.feedback`), or, when resuming, the one the run measured."""
    from .feedback import MeasuredTarget, measured_budget

    runtime = costs.resource.runtime
    if runtime.get("name") != "onnxruntime" or runtime.get("device", "cpu") != "cpu":
        raise ConfigError(f"measure_target times the network with onnxruntime on the CPU; the latency profile is "
                          f"for {runtime.get('name')} on {runtime.get('device')}. Use an onnxruntime CPU profile "
                          "(dnnshrink calibrate --runtime onnxruntime), or drop measure_target.")
    threads, spinning = int(runtime.get("threads", 2)), runtime_spinning(runtime)  # (a bad value stops it here)
    saved = Path(opts.out_dir) / MEASURED_TARGET if opts.out_dir is not None else None
    if opts.resume and saved is not None and saved.is_file():
        try:
            if saved.stat().st_size > 1 << 20:
                raise ValueError("larger than any measured target")
            measured = MeasuredTarget.from_dict(json.loads(saved.read_text()))
        except (ValueError, UnicodeDecodeError) as exc:  # json's errors are ValueErrors
            raise DnnshrinkError(f"{saved} is not a measured target written by dnnshrink ({exc}); delete it to "
                                 "measure again") from None
        timed = (measured.threads, measured.spinning) == (threads, spinning)
        if measured.asked == goal and timed:
            _step(f"measure_target: the budget measured before, {measured.budget:.3f} of the predicted latency "
                  f"for {measured.target:.3f} measured")
            return measured
        _step(f"measure_target: the run before measured for another target ({measured.asked}): measuring again"
              if measured.asked != goal else
              f"measure_target: the run before timed its sessions another way ({measured.threads} threads, "
              f"spinning {measured.spinning}; the profile's: {threads}, {spinning}): "
              "measuring again")
    minimum = smallest_cost(graph, costs, opts.min_width, round_to)
    _step(f"measure_target: timing the network with onnxruntime ({threads} threads) to set the budget")
    probe = None
    structure = getattr(algorithm, "capacity_probe", None)
    if opts.scale == "capacity" and structure is not None:
        # the structures the algorithm builds with it from the whole network, not the uniform multiplier's
        probe = ("the capacity step", structure(graph, work, costs, opts.profile, opts.min_width, round_to))
    measured = measured_budget(graph, work, inputs, costs, goal, round_to, opts.min_width, minimum, threads,
                               log=_step, probe=probe, spinning=spinning)
    _step(f"measure_target: {measured.target:.3f} of the baseline's measured latency ({measured.baseline_ms:.3g} "
          f"ms) is {measured.budget:.3f} of its predicted latency")
    return measured


def _save_measured(path: Path, measured: Any) -> None:
    with atomic_write(path, "w") as handle:
        json.dump(measured.to_dict(), handle, indent=2)


def _baseline(run: _Run, train: Optional[Callable], test: Callable) -> None:
    """The baseline's weights and score: trained and tested, or read back from the checkpoints
    of the run being resumed (with the learned structure, if learning had finished)."""
    opts, work, checkpoints = run.opts, run.work, run.checkpoints
    if opts.resume:
        def resume() -> tuple:
            start, score = _resume(work, checkpoints, run.out_dir)
            run.baseline = copy.deepcopy(work)
            learned_before = checkpoints.learned()
            # learning that stopped before its epochs ran out had reached its goal; one that used
            # them all continues only when this run allows more
            if learned_before is not None and not (learned_before["epochs"] >= learned_before["max_epochs"]
                                                   and opts.max_epochs > learned_before["epochs"]):
                work.load_state_dict(learned_before.pop("state"))
                return start, score, learned_before
            latest = checkpoints.latest()
            if latest is not None:  # else learning starts from the baseline loaded above
                work.load_state_dict(checkpoints.load(latest)["state"])
            return start, score, None

        run.start_epoch, run.baseline_score, run.finished = distributed.on_main(resume)
        run.trainee = distributed.wrap(work, opts.find_unused_parameters)  # every rank starts from rank 0's weights
        return
    run.trainee = distributed.wrap(work, opts.find_unused_parameters)
    if opts.train_baseline:
        _step("training the baseline with train(model)")
        _guarded(train, run.trainee, work, "training the baseline with train(model)")

    def test_baseline() -> float:
        _step("testing the baseline")
        score = _score(test(work), "test(baseline)")
        run.baseline = copy.deepcopy(work)
        if checkpoints is not None:
            checkpoints.save_baseline(work.state_dict(), score)
        return score

    run.baseline_score = distributed.on_main(test_baseline)


def _learn(run: _Run, train_one_epoch: Callable) -> LearnResult:
    """Structure learning by the algorithm (or what a resumed run had learned), recorded in
    the checkpoints so that a later resume goes straight to generation."""
    opts, checkpoints = run.opts, run.checkpoints
    run.writer = distributed.on_main(lambda: _tensorboard(run.out_dir, opts), share=False)
    if run.writer is not None:
        run.writer.add_scalar("score/baseline", run.baseline_score, 0)
    # rank 0 writes the checkpoint; every rank learns its name (or that writing it failed)
    on_epoch = ((lambda epoch: distributed.on_main(lambda: checkpoints.save_epoch(epoch, run.work.state_dict())))
                if run.out_dir is not None else None)
    context = LearnContext(run.work, run.graph, run.inputs, train_one_epoch, opts, run.target, run.costs,
                           run.writer, opts.progress and run.main, run.start_epoch, on_epoch)
    context.train_one_epoch = _epoch_runner(context, train_one_epoch, run.trainee)
    if run.finished is not None:
        learned = LearnResult(run.finished["keep"], run.finished["epochs"], run.finished["info"])
        _step(f"structure learning had finished after {learned.epochs} epoch(s): going straight to generation")
        return learned
    try:
        learned = run.algorithm.learn(context)
    except KeyboardInterrupt:
        if checkpoints is not None:  # the baseline's checkpoint is there: an epoch's is not needed to resume
            last = checkpoints.latest() or checkpoints.folder / "baseline.pt"
            print(f"\ndnnshrink: stopped during structure learning. The last checkpoint is {last}; "
                  "continue with `dnnshrink run CONFIG --resume` (or shrink(..., resume=True)).")
        raise
    if opts.scale == "auto" and "capacity_gain" in learned.info:
        _step(_auto_scale_line(learned.info))
    cost = run.costs.cost(learned.keep)
    if cost > run.target * (1 + 1e-6):  # any algorithm's, ours or a plugin's: said, and kept in the report
        learned.info["target_met"] = False
        warnings.warn(f"dnnshrink: the {opts.algorithm} algorithm's structure costs {cost / run.costs.initial:.2%} of "
                      f"the baseline's {run.costs.unit}, above the target of {run.target / run.costs.initial:.2%}; "
                      "the network is generated as chosen. Lower min_width or set round_to: 1 if they are what "
                      "keeps it above.", DnnshrinkWarning, stacklevel=2)
    if checkpoints is not None:
        checkpoints.save_learned(learned.keep, learned.epochs, opts.max_epochs, learned.info, run.work.state_dict())
    return learned


def _auto_scale_line(info: Dict[str, Any]) -> str:
    """What ``scale: auto`` chose at a target that is not latency, and why (the algorithm's
    ``scale``, ``capacity_gain`` and ``scale_why``; see :class:`~dnnshrink_core.capacity.AutoScale`)."""
    gain, why = float(info["capacity_gain"]), info.get("scale_why", "gain")
    least = float(info.get("capacity_least_gain", AUTO_CAPACITY_GAIN))
    than = f"{gain:.1%} less" if gain >= 0 else f"{-gain:.1%} more"
    if why == "same":
        return "scale auto: the width multiplier's structure, which the capacity step builds too"
    if why == "budget":
        taken = "capacity step's" if info.get("scale") == "capacity" else "width multiplier's"
        return f"scale auto: the {taken} structure, the only one of the two within the budget"
    from_ = f"{100 * least:g}%"
    if info.get("scale") == "capacity":
        taken = f"auto takes it from {from_}" if least > 0 else \
            "this algorithm's multiplier keeps no learned proportions, so auto takes it wherever it is denser"
        return (f"scale auto: the capacity step's structure, which needs {than} predicted time per MAC than the "
                f"width multiplier's ({taken}; scale: multiplier keeps the proportions instead)")
    if least <= 0:
        return (f"scale auto: the width multiplier's structure; the capacity step's is no denser (it needs {than} "
                "predicted time per MAC; scale: capacity takes it anyway)")
    return (f"scale auto: the width multiplier's structure (the learned proportions); the capacity step's needs "
            f"{than} predicted time per MAC, and auto gives the proportions up from {from_} "
            "(scale: capacity takes it anyway)")


def _generate(run: _Run, learned: LearnResult, test: Callable) -> tuple:
    """The physically smaller network (rank 0 builds it; the others get it), its masks, and
    every rank's digest of the chosen channels."""
    keep, epochs, work, writer = learned.keep, learned.epochs, run.work, run.writer
    digests = distributed.gather_digests(keep)  # raises unless every rank chose the same channels
    masks = Masks({g.name: keep[g.units] for g in run.graph.groups}, run.graph)

    def generate() -> nn.Module:
        if writer is not None:  # with the score after generation, this shows what generation changed
            learned_score = _score(test(work), "test(model)")
            writer.add_scalar("score/after_structure_learning", learned_score, epochs)
            # said, not only drawn: a structure that learning left near chance shows here first
            _step(f"test score after structure learning: {learned_score:.4g} (baseline {run.baseline_score:.4g})")
        model = build(work, run.graph, keep)
        if run.opts.compensate:
            fold_removed_channels(work, model, run.graph, keep, run.inputs,
                                  max_gamma=run.opts.threshold or DEFAULT_THRESHOLD)
        if writer is not None:
            generated_score = _score(test(model), "test(model)")
            writer.add_scalar("score/after_generation", generated_score, epochs)
            _step(f"test score of the generated network, before fine-tuning: {generated_score:.4g}")
        # sent to the other ranks from the CPU, so that each puts it on its own device
        return model.cpu() if distributed.active() else model

    return distributed.on_main(generate).to(run.device), masks, digests


def _finish(run: _Run, learned: LearnResult, shrunk: nn.Module, masks: Masks, digests: List[str],
            test: Callable) -> ShrinkResult:
    """Test the shrunk network, write the report and the files (rank 0), and enforce
    ``max_score_drop`` once everything is written."""
    opts, keep, epochs = run.opts, learned.keep, learned.epochs

    def finish() -> tuple:
        _step("testing the shrunk model")
        score = _score(test(shrunk), "test(shrunk)")
        report = _report(run, learned, shrunk, score, digests)
        result = ShrinkResult(shrunk, masks, report, run.baseline_score, score, epochs)
        if opts.progress:
            print(report.table())
        print(summary_table(report))
        if run.out_dir is not None:
            result.files = _write_outputs(result, run.baseline, run.inputs, run.out_dir, opts, run.timed_onnx)
        if run.writer is not None:
            run.writer.add_scalar("score/after_fine_tuning" if opts.finetune else "score/shrunk", score, epochs)
            run.writer.add_text("widths", widths_text(run.graph, keep))
            run.writer.close()
        return score, report, result.files

    score, report, files = distributed.on_main(finish)
    result = ShrinkResult(shrunk, masks, report, run.baseline_score, score, epochs, files)
    baseline_score = run.baseline_score
    if opts.max_score_drop is not None and baseline_score - score > opts.max_score_drop:
        where = f"the model and report are in {run.out_dir}" if run.out_dir is not None else "nothing was written"
        raise ScoreDropError(
            f"the shrunk model scores {score:.4g}, {baseline_score - score:.4g} below the baseline's "
            f"{baseline_score:.4g}, more than max_score_drop {opts.max_score_drop:g} allows; {where} for "
            "inspection, but do not ship it. Aim for a larger target, fine-tune longer in train(model), or "
            "raise max_score_drop.", result)
    return result


def _learning_summary(run: _Run, learned: LearnResult) -> Dict[str, Any]:
    """``report.json``'s ``structure_learning``: costs (``target_cost``, an algorithm's
    ``learned_cost``…) in the target resource's unit, named by ``cost_unit``. A MACs target
    also gives them under the ``*_macs`` names reports had before other resources existed."""
    summary = {"algorithm": run.opts.algorithm, "epochs": learned.epochs, "target_cost": run.target,
               "cost_unit": run.costs.unit, "target": run.goal.to_dict(), "reinit": run.opts.reinit, **learned.info}
    if getattr(run.algorithm, "scales_by_capacity", False):  # (the others bring it to the budget their own way)
        # what ran; scale: auto away from a latency target says which of the two it chose, and why
        chose = learned.info.get("scale")
        summary["scale"] = chose if run.opts.scale == "auto" and chose else run.opts.scale
        if run.opts.scale == "auto" or run.auto_fallback:
            summary["scale_option"] = "auto"
        if run.auto_fallback:
            summary["scale_why"] = "no latency cost model"
    if run.goal.resource == "macs":
        summary.update({key[:-len("_cost")] + "_macs": value for key, value in list(summary.items())
                        if key.endswith("_cost") and isinstance(value, (int, float))})
    return summary


def _report(run: _Run, learned: LearnResult, shrunk: nn.Module, score: float, digests: List[str]) -> Report:
    """Every figure of the run: the layer table plus the baseline and shrunk totals, the
    structure learning, widths, resources, rounding, device and ranks."""
    opts, keep, baseline, inputs = run.opts, learned.keep, run.baseline, run.inputs
    report = layer_report(shrunk, inputs, baseline=baseline)
    t = report.totals
    report.extra = {
        "baseline": {"macs": t["macs_before"], "params": t["params_before"], "score": run.baseline_score,
                     "latency_ms": 1e3 * measure_latency(baseline, inputs, opts.latency_runs)},
        "shrunk": {"macs": t["macs_after"], "params": t["params_after"], "score": score,
                   "latency_ms": 1e3 * measure_latency(shrunk, inputs, opts.latency_runs)},
        "structure_learning": _learning_summary(run, learned),
        "widths": widths_against_uniform(run.graph, run.costs, keep, run.target, opts.min_width,
                                         _one_multiple(opts.round_to)),
        "resources": resource_table(run.graph, run.work, keep, opts.profile),
        "round_to": {"multiples": _jsonable(opts.round_to), "notes": run.round_notes},
        # whole residual blocks the structure dropped: the add that joined each, and its layers
        "blocks_dropped": {"depth": opts.depth, "blocks": [{"join": b.join, "layers": sorted(b.layers)}
                                                           for b in dropped_branches(run.graph, keep)]},
        "device": str(run.device),
        "distributed": {"world_size": distributed.world_size(), "mask_digests": digests},
    }
    if opts.max_score_drop is not None:
        drop = run.baseline_score - score
        report.extra["score_check"] = {"max_score_drop": opts.max_score_drop, "drop": drop,
                                       "passed": drop <= opts.max_score_drop}
    if run.measured is not None:
        report.extra["structure_learning"]["measured_target"] = run.measured.to_dict()
    if opts.onnx_latency and "onnx" in opts.exporters:
        report.extra["onnx_latency"] = _onnx_latency(run, shrunk)
    return report


def reinitialize(model: nn.Module, seed: Optional[int] = None) -> int:
    """Give every layer of ``model`` a fresh initialisation (each module's own
    ``reset_parameters``, which also clears BatchNorm's running statistics); returns how
    many modules were reset. ``seed`` fixes the draw (every rank must draw the same under
    torchrun)."""
    generator_state = torch.random.get_rng_state() if seed is not None else None
    if seed is not None:
        torch.manual_seed(seed)
    count = 0
    for module in model.modules():
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()
            count += 1
    if generator_state is not None:
        torch.random.set_rng_state(generator_state)
    return count


def _one_multiple(round_to: Any) -> int:
    """The most common group multiple (the widths-against-uniform table takes one)."""
    values = np.asarray(round_to, dtype=np.int64).ravel()
    return int(np.bincount(values).argmax()) if values.size else 1


def _jsonable(value: Any) -> Any:
    return value.tolist() if isinstance(value, np.ndarray) else value


def _timing_settings(graph: Any, work: nn.Module, costs: CostModel, profile: Any) -> Tuple[int, str]:
    """The latency profile's ``(threads, spinning)``, how the report's onnxruntime latency
    is timed (the run's own graph, the baseline's structure: no second trace); 2 threads
    spinning within a run where no latency cost model is loaded. A profile's bad
    ``runtime.spinning`` is a :class:`ConfigError`: ``_prepare`` asks, before any work."""
    try:
        latency = costs if costs.kind == "latency" else CostModel(graph, work, "latency", profile=profile)
    except PluginError:  # no latency plugin: its default settings
        return 2, "run"
    runtime = getattr(latency.resource, "runtime", None) or {}  # (a plugin's resource need not say)
    return int(runtime.get("threads", 2)), runtime_spinning(runtime)


def _onnx_latency(run: _Run, shrunk: nn.Module) -> Dict[str, Any]:
    """The exported ONNX's onnxruntime latency, baseline and shrunk interleaved, at the
    latency profile's threads: the measured speed-up next to the predicted one."""
    from .timing import onnx_latency

    baseline, inputs, opts = run.baseline, run.inputs, run.opts
    threads, spinning = run.timing  # (read in _prepare, where this run was going to be timed)
    # the shrunk model's verified export is the run's model.onnx too: _write_outputs moves it
    keep = {"shrunk": run.out_dir / TIMED_ONNX} if run.out_dir is not None and "onnx" in opts.exporters else None
    try:
        timed = onnx_latency({"baseline": copy.deepcopy(baseline).cpu().eval(),
                              "shrunk": copy.deepcopy(shrunk).cpu().eval()}, inputs, threads,
                             rounds=max(2, opts.latency_runs // 4), runs=4, keep=keep, timed_only=["baseline"],
                             spinning=spinning)
    except Exception as exc:  # said in the report, not fatal: the files are still written
        if keep is not None:
            keep["shrunk"].unlink(missing_ok=True)
        return {"error": f"{type(exc).__name__}: {exc}"}
    if keep is not None:
        run.timed_onnx = keep["shrunk"]
    (b_fast, b_med), (s_fast, s_med) = timed["baseline"], timed["shrunk"]
    return {"threads": threads, "spinning": spinning, "baseline_ms": 1e3 * b_fast, "shrunk_ms": 1e3 * s_fast,
            "baseline_median_ms": 1e3 * b_med, "shrunk_median_ms": 1e3 * s_med, "speedup": b_fast / s_fast}


def _epoch_runner(context: LearnContext, train_one_epoch: Callable, trainee: nn.Module) -> Callable:
    """The user's ``train_one_epoch`` as the algorithm calls it: the working model is swapped
    for its DistributedDataParallel wrapper, and a loss that turned NaN stops the run."""
    calls = [0]

    def run(model: nn.Module, lr: float) -> Any:
        epoch = context.start_epoch + calls[0]
        calls[0] += 1
        with FiniteGuard(model) as guard:
            out = train_one_epoch(trainee if model is context.model else model, lr)
        guard.check(f"structure learning diverged in epoch {epoch}", LEARNING_ADVICE, context.last_good)
        return out

    return run


def _guarded(train: Callable, trainee: nn.Module, model: nn.Module, what: str) -> None:
    with FiniteGuard(model) as guard:
        train(trainee)
    guard.check(f"{what} diverged", "Lower the learning rate of train(model).")


def _step(text: str) -> None:
    if distributed.is_main():
        print(f"dnnshrink: {text}")


def _resume(work: nn.Module, checkpoints: Optional[Checkpoints], out_dir: Optional[Path]) -> tuple:
    """Load the baseline into ``work``; return the epoch to continue from and the baseline score.
    A run stopped before its first epoch finished resumes from its trained and tested baseline
    (the baseline's training, which can be the longest step, is not lost)."""
    if checkpoints is None or not (checkpoints.folder / "baseline.pt").is_file():
        where = out_dir / "checkpoints" if out_dir is not None else "(no output folder given)"
        raise DnnshrinkError(f"nothing to resume: no checkpoints in {where}. Start the run without --resume.")
    base = checkpoints.load(checkpoints.folder / "baseline.pt")
    work.load_state_dict(base["state"])
    latest = checkpoints.latest()
    if latest is None:
        _step(f"resuming from the baseline ({checkpoints.folder / 'baseline.pt'}): no epoch had finished")
        return 1, float(base["score"])
    epoch = int(checkpoints.load(latest)["epoch"])
    _step(f"resuming after epoch {epoch} ({latest})")
    return epoch + 1, float(base["score"])


def _warn_off_block(graph: Any, work: nn.Module, round_to: int, profile: Any, costs: CostModel) -> None:
    """Warn when an integer ``round_to`` is no multiple of the channel block the latency
    profile measured for the runtime's kernels: its widths then miss the block, and the
    shrunk network can run slower than the baseline (round_to 3 did, in a user's first hour)."""
    try:
        with warnings.catch_warnings():  # the blocks are only compared here: what auto would warn of is not said
            warnings.simplefilter("ignore", DnnshrinkWarning)
            blocks, _ = resolve_round_to(graph, work, "auto", profile,
                                         latency=costs if costs.kind == "latency" else None)
    except DnnshrinkError:  # no latency cost model loaded, or no profile: nothing to compare with
        return
    off = sorted({int(b) for b in np.atleast_1d(blocks) if b > 1 and round_to % int(b)})
    if off:
        warnings.warn(f"dnnshrink: round_to {round_to} is no multiple of the channel block{'s' if len(off) > 1 else ''} "
                      f"{', '.join(map(str, off))} the latency profile measured for this runtime's kernels: widths "
                      "that miss it run on slower kernels, and the shrunk network may run slower than the baseline. "
                      "round_to: auto (the default) rounds to the block.", DnnshrinkWarning, stacklevel=4)


RUN_IDENTITY = "run.json"  # in the checkpoints folder: what a resumed run must ask for again
# the options that decide what structure learning aims at: a resumed run must give the same
_IDENTITY_OPTIONS = ("algorithm", "regularizer", "round_to", "min_width", "depth", "scale", "threshold",
                     "strength", "strength_scale", "expand", "trust", "anneal", "profile", "measure_target")


def _identity(opts: ShrinkOptions, goal: Target) -> Dict[str, Any]:
    """The run's target and the options that decide its structure, as plain JSON values."""
    return {"target": str(goal), **{key: json.loads(json.dumps(getattr(opts, key), default=str))
                                    for key in _IDENTITY_OPTIONS}}


def _save_identity(out_dir: Path, identity: Dict[str, Any]) -> None:
    folder = out_dir / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_write(folder / RUN_IDENTITY, "w") as f:
        json.dump(identity, f, indent=2)


def _check_resumable(out_dir: Path, identity: Dict[str, Any]) -> None:
    """A resumed run continues the run in ``out_dir`` as it was (a finished one goes on from
    its learned structure, or learns on where this run allows more epochs): refused, before
    any work, when it asks for another target or structure than that run had."""
    saved = out_dir / "checkpoints" / RUN_IDENTITY
    if not saved.is_file():  # a run from before this record was kept: nothing to compare with
        return
    try:
        before = json.loads(saved.read_text()) if saved.stat().st_size < 1 << 16 else None
    except (ValueError, UnicodeDecodeError):
        before = None
    if not isinstance(before, dict):
        raise DnnshrinkError(f"{saved} is not a run record written by dnnshrink; delete it to resume anyway")
    changed = [key for key in identity if key in before and before[key] != identity[key]]
    if changed:
        said = "; ".join(f"{key} {before[key]!r} then, {identity[key]!r} now" for key in changed)
        had = ", ".join(f"{key}: {before[key]}" for key in changed)
        was_default = "scale" in changed and before["scale"] == "multiplier" and identity["scale"] in ("capacity",
                                                                                                      "auto")
        why = (" (the default scale, auto, chooses the capacity step at a latency target, and at other targets "
               f"where it needs {AUTO_CAPACITY_GAIN:.0%} less predicted time per MAC, with magnitude wherever it is "
               "denser; that run was made with the multiplier, the default before)" if was_default else "")
        raise DnnshrinkError(f"--resume continues the run in {out_dir} as it was, and this one asks for another "
                             f"structure ({said}){why}. Resume with the options it had ({had}), or start a new run "
                             "(another --out, or --force).")


def _prepare_out_dir(opts: ShrinkOptions) -> Optional[Path]:
    if opts.out_dir is None:
        if opts.resume:
            raise DnnshrinkError("resume needs the output folder of the run to continue (out_dir / --out)")
        return None
    out = Path(opts.out_dir)
    if opts.resume:
        return out
    if out.exists() and any(out.iterdir()) and not opts.force:
        raise OutputExistsError(out)
    out.mkdir(parents=True, exist_ok=True)
    # a fresh run: an older run's checkpoints must not be resumed as if they were this one's
    for stale in (out / "checkpoints").glob("*.pt"):
        stale.unlink()
    return out


def _tensorboard(out_dir: Optional[Path], opts: ShrinkOptions) -> Any:
    if out_dir is None or not opts.tensorboard:
        return None
    from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter(str(out_dir / "tensorboard"))


# the shrunk model's ONNX as the measured latency exported it, until _write_outputs names it
TIMED_ONNX = ".model.timed.onnx"
MEASURED_TARGET = "measured_target.json"  # measure_target's budget, read back by a resumed run


def _write_outputs(result: ShrinkResult, baseline: nn.Module, inputs: tuple, out_dir: Path,
                   opts: ShrinkOptions, timed: Optional[Path] = None) -> Dict[str, str]:
    """Every exporter's file, the layer chart and the reports; ``timed``: the shrunk model's
    ONNX this run already exported and verified for its measured latency, used as model.onnx."""
    files: Dict[str, str] = {}
    cpu_inputs = tuple(x.cpu() if isinstance(x, torch.Tensor) else x for x in inputs)
    model = copy.deepcopy(result.model).cpu().eval()
    for fmt in opts.exporters:
        exporter = get_exporter(fmt)
        # an exporter names its file (``filename``) or gets model<suffix>; one that draws the
        # change (``wants_baseline``) gets the model before shrinking too
        name = getattr(exporter, "filename", None) or f"model{getattr(exporter, 'suffix', '.' + fmt)}"
        options = {"baseline": copy.deepcopy(baseline).cpu()} if getattr(exporter, "wants_baseline", False) else {}
        if fmt == "onnx" and timed is not None and timed.exists():  # exported and verified the same way
            os.replace(timed, out_dir / name)
            files[fmt] = str(out_dir / name)
            continue
        done = export(model, cpu_inputs, fmt, out_dir / name, **options)
        files[fmt] = done["path"]
    # the layer table is in report.json and report.md already; the chart is the only new thing
    files["layers.png"] = str(result.report.bar_chart(out_dir / "layers.png"))
    with atomic_write(out_dir / "report.json", "w") as f:
        json.dump(result.report.to_dict(), f, indent=2)
    with atomic_write(out_dir / "report.md", "w") as f:
        f.write(report_markdown(result))
    files["report.json"] = str(out_dir / "report.json")
    files["report.md"] = str(out_dir / "report.md")
    return files
