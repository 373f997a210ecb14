"""Generator speed: dnnshrink against Torch-Pruning, on torchvision CNNs, on CPU.

What it measures
----------------
Default mode (``python bench/bench_generator.py``), for each model (ResNet-50,
MobileNetV2, DenseNet-121; torchvision, ``weights=None``, eval mode, 2 threads,
input ``torch.randn(1, 3, size, size)``):

1. **dnnshrink.** On a deep copy of the model, gamma and beta are set to zero on a
   random half (fixed seed) of every BatchNorm's channels. Then
   ``ds.trace + ds.alive_masks + ds.generate`` is timed end to end, best of
   ``--repeat``, with the channel-graph cache (``ds.api._graphs``) cleared before each
   repetition so every repetition traces from scratch. The parameter count before and
   after, and the relative error ``||y_small - y|| / ||y||`` of the generated network's
   output (must be < 1e-4: removing channels whose gamma = beta = 0 is exact), are
   printed.
2. **Torch-Pruning.** On a fresh deep copy of the same (gamma-zeroed) model each
   repetition, ``tp.pruner.MetaPruner(model, x, tp.importance.MagnitudeImportance(p=1),
   pruning_ratio=0.5, ignored_layers=[last Linear])`` is built and ``.step()`` run once;
   best of ``--repeat``. The MetaPruner constructor itself calls
   ``tp.DependencyGraph().build_dependency(model, example_inputs=x)``, so this timing
   contains exactly one dependency-graph build plus one pruning step. The time of a
   standalone ``DependencyGraph().build_dependency`` is printed too, for reference.
3. A table: model, seconds for each tool, the ratio TP / dnnshrink (> 1 means dnnshrink
   is faster) and the parameter counts each tool leaves. The two tools do not remove
   the same channels (dnnshrink removes the units whose BatchNorms are all zero,
   Torch-Pruning removes 50 % of every prunable group by L1 magnitude), so the
   parameter counts differ; the timings compare the cost of the machinery.

``--scaling`` times dnnshrink's ``trace + alive_masks + generate`` on DenseNet-121,
-169, -201 and -161 and divides by the number of torch.fx graph nodes
(``len(list(torch.fx.symbolic_trace(model).graph.nodes))``); a roughly constant
seconds-per-node means the cost grows linearly with the size of the graph. It also
times, on DenseNet-161 only, Torch-Pruning's ``DependencyGraph().build_dependency`` and
its full MetaPruner + step (the graph build alone does not enumerate the pruning
groups, which is where Torch-Pruning spends most of its time on DenseNets); each run is
cut off after 300 s, and ``--no-tp-161`` skips both.

How to run
----------
::

    pip install -e '.[bench]'             # torchvision and torch-pruning
    python bench/bench_generator.py       # dnnshrink vs Torch-Pruning table
    python bench/bench_generator.py --scaling
    python bench/bench_generator.py --models resnet50 --repeat 5 --size 160
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import signal
import subprocess
import sys
import time
from contextlib import contextmanager

import torch
from torch import nn

try:
    import torchvision
except ImportError:  # pragma: no cover - depends on the environment
    sys.exit("bench_generator.py needs torchvision: pip install -e '.[bench]'")

import dnnshrink_core as ds

try:
    import torch_pruning as tp
except ImportError:  # pragma: no cover - depends on the environment
    tp = None

MODELS = ["resnet50", "mobilenet_v2", "densenet121"]
SCALING_MODELS = ["densenet121", "densenet169", "densenet201", "densenet161"]
SEED = 0
THREADS = 2
TP_161_LIMIT_S = 300


# --------------------------------------------------------------------------- helpers
def require_tp() -> None:
    if tp is None:
        sys.exit("Torch-Pruning is not installed; it is needed for the comparison.\n"
                 "Install the benchmark extras with:  pip install -e '.[bench]'\n"
                 "(or run `python bench/bench_generator.py --scaling --no-tp-161` for dnnshrink alone)")


def tp_version() -> str:
    if tp is None:
        return "not installed"
    try:  # the package's __version__ may lag the distribution's version
        from importlib.metadata import version
        return version("torch-pruning")
    except Exception:
        return getattr(tp, "__version__", "unknown")


def source_revision() -> str:
    """The git commit of the checkout, with '+changes' when dnnshrink's sources differ from it."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "dnnshrink_core", "plugins"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("+changes" if dirty else "")


def make_model(name: str) -> nn.Module:
    return getattr(torchvision.models, name)(weights=None).eval()


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def n_fx_nodes(model: nn.Module) -> int:
    return len(list(torch.fx.symbolic_trace(model).graph.nodes))


def zero_half_of_batchnorms(model: nn.Module, seed: int = SEED) -> nn.Module:
    """A deep copy of ``model`` with gamma = beta = 0 on a random half of every BN's channels."""
    model = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                dead = torch.randperm(m.num_features, generator=gen)[: m.num_features // 2]
                m.weight[dead] = 0
                m.bias[dead] = 0
    return model


def last_linear(model: nn.Module) -> nn.Module:
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def rel_error(model: nn.Module, small: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        y, y_small = model(x), small(x)
    return ((y_small - y).norm() / y.norm()).item()


@contextmanager
def time_limit(seconds: int | None):
    """Raise TimeoutError if the body runs longer than ``seconds`` (None: no limit; Unix only)."""
    if seconds is None or not hasattr(signal, "SIGALRM"):
        yield
        return

    def on_alarm(signum, frame):
        raise TimeoutError(f"took longer than {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# --------------------------------------------------------------------------- timed bodies
def run_dnnshrink(model: nn.Module, x: torch.Tensor, repeat: int):
    """Best-of-``repeat`` seconds of trace + alive_masks + generate, phase times of the best run, small model."""
    best, phases, small = float("inf"), None, None
    for _ in range(repeat):
        ds.api._graphs.clear()  # every repetition traces from scratch
        t0 = time.perf_counter()
        ds.trace(model, x)
        t1 = time.perf_counter()
        masks = ds.alive_masks(model, x, threshold=1e-2)
        t2 = time.perf_counter()
        small = ds.generate(model, x, masks)
        t3 = time.perf_counter()
        if t3 - t0 < best:
            best, phases = t3 - t0, (t1 - t0, t2 - t1, t3 - t2)
    ds.api._graphs.clear()
    return best, phases, small


def run_tp_prune(model: nn.Module, x: torch.Tensor, repeat: int, limit_s: int | None = None):
    """Best-of-``repeat`` seconds of MetaPruner construction (one DG build) + one step; pruned model."""
    best, pruned = float("inf"), None
    for _ in range(repeat):
        m = copy.deepcopy(model)  # fresh model each repetition, copied outside the timing
        ignored = [last_linear(m)]
        t0 = time.perf_counter()
        with time_limit(limit_s):
            pruner = tp.pruner.MetaPruner(m, example_inputs=x,
                                          importance=tp.importance.MagnitudeImportance(p=1),
                                          pruning_ratio=0.5, ignored_layers=ignored)
            pruner.step()
        best = min(best, time.perf_counter() - t0)
        pruned = m
    return best, pruned


def run_tp_graph(model: nn.Module, x: torch.Tensor, repeat: int, limit_s: int | None = None) -> float:
    """Best-of-``repeat`` seconds of ``tp.DependencyGraph().build_dependency`` alone."""
    best = float("inf")
    for _ in range(repeat):
        m = copy.deepcopy(model)
        t0 = time.perf_counter()
        with time_limit(limit_s):
            tp.DependencyGraph().build_dependency(m, example_inputs=x)
        best = min(best, time.perf_counter() - t0)
    return best


def warm_up() -> None:
    """Pay one-time costs (plugin loading, first-call dispatch) outside the timings."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 2)).eval()
    x = torch.randn(1, 3, 16, 16)
    run_dnnshrink(zero_half_of_batchnorms(model), x, 1)
    if tp is not None:
        run_tp_prune(model, x, 1)


# --------------------------------------------------------------------------- modes
def print_header(args) -> None:
    print(f"# torch {torch.__version__}, torchvision {torchvision.__version__}, torch-pruning {tp_version()}, "
          f"dnnshrink {ds.__version__} (git {source_revision()}), Python {platform.python_version()}")
    print(f"# threads={torch.get_num_threads()}, input=1x3x{args.size}x{args.size}, best of {args.repeat}, "
          f"seed={SEED}")
    if hasattr(os, "getloadavg"):  # other work on the machine inflates wall-clock timings
        print(f"# load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())} "
              f"on {os.cpu_count()} CPUs")


def compare(args) -> int:
    require_tp()
    x = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(SEED))
    rows, failed = [], False
    for name in args.models:
        print(f"\n== {name}")
        base = zero_half_of_batchnorms(make_model(name))
        p0 = n_params(base)

        t_ds, (t_tr, t_mk, t_gen), small = run_dnnshrink(base, x, args.repeat)
        err = rel_error(base, small, x)
        ok = err < 1e-4
        failed |= not ok
        print(f"dnnshrink     {t_ds:7.3f} s  (trace {t_tr:.3f} + alive_masks {t_mk:.3f} + generate {t_gen:.3f})  "
              f"params {p0:,} -> {n_params(small):,}  output rel. error {err:.2e}  {'OK' if ok else 'FAILED'}")

        t_tp, pruned = run_tp_prune(base, x, args.repeat)
        t_dg = run_tp_graph(base, x, args.repeat)
        print(f"Torch-Pruning {t_tp:7.3f} s  (DependencyGraph build alone {t_dg:.3f})  "
              f"params {p0:,} -> {n_params(pruned):,}")
        rows.append((name, p0, t_ds, t_tp, t_tp / t_ds, n_params(small), n_params(pruned), err, t_dg))

    print("\n| model | params | dnnshrink s | Torch-Pruning s | TP / dnnshrink | dnnshrink params | "
          "TP params | dnnshrink rel. err. | TP DG build alone s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, p0, t_ds, t_tp, ratio, p_ds, p_tp, err, t_dg in rows:
        print(f"| {name} | {p0:,} | {t_ds:.3f} | {t_tp:.3f} | {ratio:.2f} | {p_ds:,} | {p_tp:,} | "
              f"{err:.1e} | {t_dg:.3f} |")
    if failed:
        print("\nERROR: a dnnshrink output check failed (relative error >= 1e-4).")
    return 1 if failed else 0


def scaling(args) -> int:
    x = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(SEED))
    rows, failed = [], False
    for name in SCALING_MODELS:
        base = zero_half_of_batchnorms(make_model(name))
        nodes = n_fx_nodes(base)
        t_ds, (t_tr, t_mk, t_gen), small = run_dnnshrink(base, x, args.repeat)
        err = rel_error(base, small, x)
        failed |= not err < 1e-4
        rows.append((name, nodes, t_ds, t_tr, t_mk, t_gen, err))
        print(f"{name}: {nodes} fx nodes, {t_ds:.3f} s (trace {t_tr:.3f} + alive_masks {t_mk:.3f} + "
              f"generate {t_gen:.3f}), {1e3 * t_ds / nodes:.3f} ms/node, rel. error {err:.1e}")

    print("\n| model | fx nodes | dnnshrink s | ms per node | trace s | alive_masks s | generate s | rel. err. |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, nodes, t_ds, t_tr, t_mk, t_gen, err in rows:
        print(f"| {name} | {nodes} | {t_ds:.3f} | {1e3 * t_ds / nodes:.3f} | {t_tr:.3f} | {t_mk:.3f} | "
              f"{t_gen:.3f} | {err:.1e} |")

    if args.no_tp_161:
        print("\nTorch-Pruning on densenet161: skipped (--no-tp-161)")
    else:
        require_tp()
        base = zero_half_of_batchnorms(make_model("densenet161"))
        nodes = n_fx_nodes(base)
        ds_161 = next(r[2] for r in rows if r[0] == "densenet161")
        print()
        # The DependencyGraph build alone does not enumerate the pruning groups; MetaPruner's
        # constructor and step() do, so the full prune is timed as well (same limit per run).
        for label, body in [("DependencyGraph build", lambda: run_tp_graph(base, x, args.repeat, TP_161_LIMIT_S)),
                            ("MetaPruner + step (pruning_ratio 0.5)",
                             lambda: run_tp_prune(base, x, args.repeat, TP_161_LIMIT_S)[0])]:
            try:
                t = body()
                print(f"Torch-Pruning {label} on densenet161: {t:.3f} s, {1e3 * t / nodes:.3f} ms/node, "
                      f"{t / ds_161:.2f}x dnnshrink's trace+alive_masks+generate")
            except TimeoutError:
                print(f"Torch-Pruning {label} on densenet161: did not finish within {TP_161_LIMIT_S} s")
    if failed:
        print("\nERROR: a dnnshrink output check failed (relative error >= 1e-4).")
    return 1 if failed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=MODELS, choices=list(dict.fromkeys(MODELS + SCALING_MODELS)), metavar="MODEL",
                        help="torchvision models to compare, among %(choices)s (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions; the best is kept (default: 3)")
    parser.add_argument("--size", type=int, default=224, help="input height and width (default: 224)")
    parser.add_argument("--scaling", action="store_true",
                        help="time dnnshrink on DenseNet-121/169/201/161 per fx graph node instead")
    parser.add_argument("--no-tp-161", action="store_true",
                        help="with --scaling, skip Torch-Pruning's DependencyGraph build on DenseNet-161")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")

    torch.set_num_threads(THREADS)
    torch.manual_seed(SEED)
    print_header(args)
    warm_up()
    return scaling(args) if args.scaling else compare(args)


if __name__ == "__main__":
    sys.exit(main())
