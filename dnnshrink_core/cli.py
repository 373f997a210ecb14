"""The ``dnnshrink`` command line (also ``python -m dnnshrink_core``)."""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator, List, Optional, TextIO

from . import __version__, distributed
from .errors import ConfigError, DnnshrinkError, InputRunError, OutputExistsError, PluginError
from .plugins import blocked_plugins, get_plugin_manager, list_plugins


def _cmd_plugins(args: argparse.Namespace) -> int:
    pm = get_plugin_manager(blocked=args.block) if args.block else get_plugin_manager()
    infos = list_plugins(pm)
    rows = [("plugin", "from", "hooks")] + [(i.name, i.distribution, ", ".join(i.hooks)) for i in infos]
    widths = [max(len(r[c]) for r in rows) for c in range(2)]
    for r in rows:
        print(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]}")
    blocked = blocked_plugins(pm)
    if blocked:
        print("blocked: " + ", ".join(blocked))
    if not infos:
        print("no plugins loaded: install dnnshrink (`pip install -e .`) so its entry points are registered")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    import torch

    from .api import trace
    from .export import export
    from .report import layer_report
    from .userspec import build_model, parse_shape

    model = build_model(args.model).eval()
    x = torch.randn(parse_shape(args.input_shape, "--input-shape"))
    try:
        graph = trace(model, x)
    except InputRunError as exc:
        raise DnnshrinkError(f"the model cannot run on --input-shape {args.input_shape}: it failed at {exc.failure}. "
                             "Give the shape of one batch of the model's input, e.g. --input-shape 1,3,224,224"
                             ) from exc
    print(graph if args.all else _graph_head(graph, args.top))
    report = layer_report(model, x)
    t = report.totals
    print(f"\n{len(report.rows)} conv/linear layers, {t['macs_before']:,} MACs, {t['params_before']:,} parameters")
    print(_reach(model, graph, args.profile))
    out = args.out or f"{args.model.rpartition(':')[2] or 'model'}.svg"
    result = export(model, x, "graph", out, channel_graph=graph)
    print(f"picture: {result['path']} (blue: channels that can be pruned; grey, dashed: frozen)")
    return 0


def _reach(model: Any, graph: Any, profile: Optional[str]) -> str:
    """The smallest each target resource can go (every removable group at one block of
    channels, ``round_to: auto``), by channels alone and with the droppable residual blocks
    gone: what a target below is refused for; again for ``magnitude`` where it can remove
    channels no BatchNorm scales; and the share no channel cut changes."""
    view = graph.for_weight_ranking()
    extra = int(view.unit_removable.sum() - graph.unit_removable.sum())
    if not view.unit_removable.any():
        return "no removable channel: no target below the baseline can be met"
    lines = []
    if graph.unit_removable.any():
        lines += _smallest(model, graph, profile, "smallest network (every removable group at one channel block, "
                                                  "round_to: auto):")
    else:
        lines.append("no channel a BatchNorm scales: morphnet and slimming cannot shrink this model")
    if extra:
        lines += _smallest(model, view, profile, f"with magnitude, which can also remove {extra} channels that "
                                                 "morphnet and slimming cannot (no BatchNorm makes their removal "
                                                 "exact):")
    if graph.fixed():
        lines.append("  (what no channel cut changes: attention's matrix products and the layers the graph cannot "
                     "follow, priced at their full size)")
    return "\n".join(lines)


def _smallest(model: Any, graph: Any, profile: Optional[str], title: str) -> List[str]:
    """``title``, then per resource the smallest share of the baseline ``graph``'s removable
    channels reach, alone and with the droppable residual blocks gone."""
    from .cost import CostModel, resolve_round_to
    from .target import notable_constant, smallest_cost

    latency = CostModel(graph, model, "latency", profile=profile)
    multiples, _ = resolve_round_to(graph, model, "auto", profile, latency=latency)
    lines = [title]
    for name, label in (("flops", "MACs"), ("params", "parameters"), ("latency", "latency")):
        costs = latency if name == "latency" else CostModel(graph, model, name, profile=profile)
        alone = smallest_cost(graph, costs, 1, multiples) / costs.initial
        line = f"  {label:<11}{alone:6.1%} of the baseline"
        if graph.branches:
            deep = smallest_cost(graph, costs, 1, multiples, depth=True) / costs.initial
            line += f" ({deep:.1%} with the {len(graph.branches)} droppable residual blocks gone, depth: auto)"
        if notable_constant(costs.constant, costs.initial):
            line += f"; {costs.constant / costs.initial:.1%} no channel cut changes"
        if name == "latency":
            line += f"; predicted {costs.initial:.3g} ms, {costs.resource.profile.describe()}"
        lines.append(line)
    return lines


def _graph_head(graph, top: int) -> str:
    text = str(graph).splitlines()
    if len(text) <= top + 2:
        return "\n".join(text)
    return "\n".join(text[: top + 2] + [f"... {len(text) - top - 2} more groups (--all shows them)"])


@contextlib.contextmanager
def _process_group(device: Optional[str]) -> Iterator[None]:
    """Under torchrun, join the process group for the block (before the user's code is
    imported, so that it can ask torch.distributed for its rank to shard its data)."""
    owns = distributed.init_from_env(device)
    done = False
    try:
        yield
        done = True
    finally:
        if owns:
            distributed.shutdown(barrier=done)


def _cmd_run(args: argparse.Namespace) -> int:
    from .config import load_config, run_config

    data = load_config(args.config)
    _check_target(args)
    with _process_group(args.device or data.get("device")):
        run_config(data, out=args.out, force=args.force, device=args.device, progress=not args.quiet,
                   algorithm=args.algorithm, resume=args.resume, target=args.target,
                   max_score_drop=args.max_score_drop, profile=args.profile,
                   measure_target=args.measure_target or None, scale=args.scale)
    return 0


def _check_target(args: argparse.Namespace) -> None:
    """``--target`` parsed as the config's ``target`` is (``0.5``, ``1.5M``, ``latency:0.5``,
    or the YAML mapping ``{resource: latency, value: 0.5}``), so its error names the flag."""
    if args.target is not None:
        from .target import Target

        text = args.target.strip()
        if text.startswith("{"):
            import yaml

            try:
                args.target = yaml.safe_load(text)
            except yaml.YAMLError:
                pass
        Target.parse(args.target, "--target")


def _cmd_demo(args: argparse.Namespace) -> int:
    from importlib import resources

    from .config import load_config, run_config

    with resources.as_file(resources.files("dnnshrink_core.demo") / "digits.yaml") as path:
        data = load_config(path)
    _check_target(args)
    if args.amp:
        from .demo import digits

        digits.mixed_precision(True)
    with _process_group(args.device or data.get("device")):
        result = run_config(data, out=args.out, force=args.force, device=args.device, progress=not args.quiet,
                            algorithm=args.algorithm, target=args.target, max_score_drop=args.max_score_drop,
                            profile=args.profile, measure_target=args.measure_target or None, scale=args.scale)
        if distributed.is_main():
            print(f"\nwrote {len(result.files)} files to {args.out}: "
                  + ", ".join(sorted(Path(p).name for p in result.files.values())))
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from .cost import get_cost_model

    latency = get_cost_model("latency")
    calibrate = getattr(latency, "calibrate", None)
    if calibrate is None:
        raise PluginError("the loaded `latency` cost model has no calibrate(); it comes with dnnshrink's `costs` plugin")
    if args.spinning != "run" and args.runtime != "onnxruntime":  # before the check models are built
        raise ConfigError("--spinning is for --runtime onnxruntime (its threads' wait between ops)")
    options: dict = {"per_position": False} if args.no_per_position else {}  # (a plugin's calibrate need not take it)
    if args.blocks_from:
        options["blocks_from"] = args.blocks_from
    if args.check_model:
        options["check_models"], options["check_input"] = _check_models(args)
    if args.dtype != "float32":  # (a plugin's calibrate need not take it)
        options["dtype"] = args.dtype
    if args.spinning != "run":  # (nor this)
        options["spinning"] = args.spinning
    calibrate(runtime=args.runtime, threads=args.threads, batch=args.batch, device=args.device, out=args.out,
              check=not args.no_check, **options)
    return 0


def _check_models(args: argparse.Namespace) -> tuple:
    """The networks ``--check-model`` names, built and run once on ``--check-input-shape``
    before the calibration starts, so that a bad name or shape is said before any timing."""
    import torch

    from .userspec import build_model, parse_shape

    if args.no_check:
        raise DnnshrinkError("--check-model adds networks to the check that --no-check skips: drop one of them")
    shape = parse_shape(args.check_input_shape, "--check-input-shape")
    if len(shape) != 3:
        raise DnnshrinkError(f"--check-input-shape {args.check_input_shape!r} must be channels,height,width "
                             "(the batch is --batch)")
    models = {}
    for spec in args.check_model:
        model = build_model(spec).eval()
        try:
            with torch.no_grad():
                model(torch.randn(args.batch, *shape))
        except Exception as exc:
            raise DnnshrinkError(f"--check-model {spec} cannot run on one batch of --check-input-shape "
                                 f"{args.check_input_shape}: {type(exc).__name__}: {exc}") from exc
        models[spec] = model
    return models, shape


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``dnnshrink`` command."""
    parser = argparse.ArgumentParser(prog="dnnshrink", description="Make trained PyTorch networks physically smaller.")
    parser.add_argument("--version", action="version", version=f"dnnshrink {__version__}")
    debug_help = "show tracebacks of errors, and where each warning comes from"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    plugins = sub.add_parser("plugins", parents=[common], help="list the loaded plugins and the hooks each implements")
    plugins.add_argument("--block", action="append", default=[], metavar="NAME",
                         help="do not load plugin NAME (repeatable; DNNSHRINK_BLOCK_PLUGINS works too)")
    plugins.set_defaults(func=_cmd_plugins)
    inspect = sub.add_parser("inspect", parents=[common], help="show the channel groups the generator finds, and draw the network")
    inspect.add_argument("model", help="`package.module:factory`, `file.py:factory`, or a torchvision model name")
    inspect.add_argument("--input-shape", required=True, help="one batch's shape, e.g. 1,3,224,224")
    inspect.add_argument("--out", help="picture path (.svg, .png or .pdf; default MODEL.svg)")
    inspect.add_argument("--top", type=int, default=40, help="groups to print (default 40)")
    inspect.add_argument("--all", action="store_true", help="print every group")
    inspect.add_argument("--profile", help="latency profile for the latency figures (default: the shipped one)")
    inspect.set_defaults(func=_cmd_inspect)
    run = sub.add_parser("run", parents=[common], help="shrink the model a YAML config names")
    run.add_argument("config", help="the YAML config (see dnnshrink_core/demo/digits.yaml)")
    demo = sub.add_parser("demo", parents=[common], help="shrink a small CNN on scikit-learn's digits (a few minutes on a CPU)")
    demo.add_argument("--amp", action="store_true",
                      help="train in mixed precision (autocast: float16 with a GradScaler on CUDA, bfloat16 on the CPU)")
    for p in (run, demo):
        p.add_argument("--out", required=p is demo, help="output folder" + (" (default: the config's `out`)" if p is run else ""))
        p.add_argument("--force", action="store_true", help="overwrite a non-empty output folder")
        p.add_argument("--device", help="cpu, cuda, cuda:1… (default: CUDA when available)")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        p.add_argument("--algorithm", help="morphnet (default), slimming, magnitude, or a plugin's")
        p.add_argument("--target", help="size target, replacing the config's: a fraction of the baseline's MACs "
                                        "in (0, 1] (0.5, 50%%) or a count with its unit (1.5M, 300K, 2G); "
                                        "for another resource the YAML form {resource: latency, value: 0.5}")
        p.add_argument("--profile", help="latency profile (JSON from `dnnshrink calibrate`) for latency targets, "
                                         "round_to: auto and the report (default: the shipped onnxruntime CPU one)")
        p.add_argument("--measure-target", action="store_true",
                       help="with a latency target: time the network with onnxruntime at a few widths before "
                            "training and meet the target as measured, not only as the profile predicts")
        p.add_argument("--scale", choices=["auto", "multiplier", "capacity"],
                       help="how the structure is brought to the budget: one width multiplier, or capacity: "
                            "blocks of channels cut where the MACs cost the most predicted time (default auto: "
                            "capacity for a latency target; for other targets the multiplier unless the capacity "
                            "step's structure needs 10%% less predicted time per MAC (morphnet) or any less "
                            "(magnitude))")
        p.add_argument("--max-score-drop", type=float, metavar="DROP",
                       help="exit with 1 (after writing the report) if the shrunk model scores more than DROP "
                            "below the baseline")
    run.add_argument("--resume", action="store_true",
                     help="continue an interrupted run from its last checkpoint (same --out)")
    run.set_defaults(func=_cmd_run)
    cal = sub.add_parser("calibrate", parents=[common],
                         help="measure a latency profile of your runtime (a sweep of layer and activation shapes, "
                              "< 2 min)")
    cal.add_argument("--runtime", default="onnxruntime", choices=["onnxruntime", "torch"])
    cal.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2)")
    cal.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    cal.add_argument("--device", default="cpu", help="cpu, or cuda with --runtime torch")
    cal.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                     help="with --runtime torch: the number format the network runs in (model.half() for float16; "
                          "default float32)")
    cal.add_argument("--spinning", default="run", choices=["run", "always", "never"],
                     help="with --runtime onnxruntime: how its threads wait for work: spin within each run and "
                          "stop at its end (run, the default: how a deployed session runs one call), spin on "
                          "after it too (always: onnxruntime's default for back-to-back calls), or sleep between "
                          "ops (never: a process that shares its cores); the pipeline's measured latency and "
                          "measure_target time sessions the profile's way")
    cal.add_argument("--out", default="latency-profile.json", help="where to write the profile (JSON)")
    cal.add_argument("--no-check", action="store_true",
                     help="skip timing the five torchvision networks the fit did not see")
    cal.add_argument("--check-model", action="append", default=[], metavar="MODEL",
                     help="also time and predict this network in the check, whole and at a quarter of its widths "
                          "(`package.module:factory`, `file.py:factory` or a torchvision name; repeatable)")
    cal.add_argument("--check-input-shape", default="3,224,224", metavar="C,H,W",
                     help="the input of the --check-model networks (default 3,224,224)")
    cal.add_argument("--no-per-position", action="store_true",
                     help="fit no cost per output position (nor sweep thin layers): the fit of profiles made "
                          "before 2026-12; it predicts shrunk networks 2-5x worse (docs/benchmarks.md)")
    cal.add_argument("--per-position", action="store_true", help=argparse.SUPPRESS)  # the default now
    cal.add_argument("--blocks-from", metavar="PROFILE",
                     help="keep the channel blocks of this profile (same runtime) instead of measuring them again: "
                          "they move on a busy machine")
    cal.set_defaults(func=_cmd_calibrate)
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    shown = warnings.showwarning
    if not args.debug:  # a warning's source line (dnnshrink's own code) reads like a crash
        warnings.showwarning = _show_warning
    try:
        return args.func(args)
    except DnnshrinkError as exc:
        if args.debug:
            raise
        # every rank meets the same errors; the others print only their own distributed trouble
        if _launch_rank() == 0 or isinstance(exc, distributed.DistributedError):
            print(f"dnnshrink: error{_rank_tag()}: {_cli_message(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if args.debug:
            raise
        if _launch_rank() == 0:
            print("dnnshrink: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = shown


def _cli_message(exc: DnnshrinkError) -> str:
    """The error in the command line's words (its flags rather than Python's keywords)."""
    if isinstance(exc, OutputExistsError):
        return f"output folder {exc.path} already exists and is not empty; choose another --out or pass --force"
    return str(exc)


def _show_warning(message: Any, category: type, filename: str, lineno: int, file: Optional[TextIO] = None,
                  line: Optional[str] = None) -> None:
    """``WarningClass: message``, without the file, line and source that Python adds
    (``--debug`` keeps them)."""
    text = str(message)
    text = text[len("dnnshrink: "):] if text.startswith("dnnshrink: ") else text
    try:
        print(f"{category.__name__}: {text}", file=file if file is not None else sys.stderr)
    except OSError:  # stderr closed: the warning is lost, as with Python's own showwarning
        pass


def _launch_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _rank_tag() -> str:
    return f" (rank {_launch_rank()})" if distributed.launched() else ""


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
