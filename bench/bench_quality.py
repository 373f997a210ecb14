"""Quality: test accuracy against MACs for MorphNet and its baselines, on two offline tasks.

Tasks (``--task``): ``digits`` (scikit-learn's bundled 8×8 digits, ``DigitsNet``) and
``mnist1d`` (MNIST-1D, generated locally by the ``mnist1d`` package; a Conv1d BatchNorm
CNN; the authors' reference CNN reaches 94%). For each seed a baseline is trained with the
task's ``train(model)``; then, for each MACs target, every method picks a structure from
that same trained baseline and the result gets the same fine-tuning budget (one
``train(model, FT)`` call):

* ``morphnet``   dnnshrink's default (FLOP-weighted L1 on BatchNorm scales, width multiplier);
* ``morphnet-reinit``  the same structure trained from a fresh initialisation (``reinit``);
* ``slimming``   Network Slimming (uniform L1 on the scales, then a global cut);
* ``magnitude``  dnnshrink's one-shot L1-norm filter ranking (same share cut in every group);
* ``uniform``    a uniform width multiplier: every group keeps its first channels;
* ``torch-pruning``  the peer: Torch-Pruning's MetaPruner with L1 magnitude importance, its
                 pruning ratio searched to meet the same MACs target.

``--headline`` runs MorphNet's paper experiment instead: learn the structure at a target,
expand it back to 100% of the baseline's MACs with the width multiplier, train it from
scratch, against the baseline architecture trained from scratch for the same total epochs.

    python bench/bench_quality.py --task mnist1d --seeds 0 1 2   # -> bench/results/quality-mnist1d.jsonl
    python bench/bench_quality.py --plot docs/quality.png --from bench/results/quality-digits.jsonl \
        bench/results/quality-mnist1d.jsonl

Rows are appended as they come and a rerun skips the cells already measured, so a sweep
that was stopped resumes; each seed's trained baseline is kept next to the results.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import json
import statistics
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List

import torch
from torch import nn

import dnnshrink_core as ds
from dnnshrink_core.pipeline import shrink
from dnnshrink_core.report import layer_width

RESULTS = Path(__file__).resolve().parent / "results"
TASKS = {"digits": "dnnshrink_core.demo.digits", "mnist1d": "dnnshrink_core.demo.mnist1d"}
METHODS = ["morphnet", "morphnet-reinit", "slimming", "magnitude", "uniform", "torch-pruning"]
TARGETS = [0.5, 0.25, 0.1, 0.05, 0.03, 0.015]
# MorphNet with other settings, for the measurements behind the defaults (learn_exponent,
# min_share, price_at_target, trust: see dnnshrink_plugins.morphnet.algorithm.MorphNet)
VARIANTS = {"morphnet-direct": (1.0, 0.0, False, 1.0), "morphnet-scale": (0.5, 0.0, False, 1.0),
            "morphnet-floor": (1.0, 0.5, False, 1.0), "morphnet-share1": (0.5, 1.0, False, 1.0),
            "morphnet-exp75": (0.75, 0.5, False, 1.0), "morphnet-unpriced": (0.5, 0.5, False, 1.0),
            "morphnet-priced-direct": (1.0, 0.5, True, 1.0), "morphnet-priced-nofloor": (1.0, 0.0, True, 1.0),
            "morphnet-trust50": (0.5, 0.5, True, 0.5), "morphnet-trust25": (0.5, 0.5, True, 0.25),
            "morphnet-trust1": (0.5, 0.5, True, 1.0), "morphnet-trust0": (0.5, 0.5, True, 0.0),
            "morphnet-learn75": (0.75, 0.5, True, "auto"), "morphnet-learn75-trust25": (0.75, 0.5, True, 0.25),
            # (…, anneal): the default anneals from half of max_epochs on; midpoint is the previous default
            "morphnet-midpoint": (0.5, 0.5, True, "auto", False), "morphnet-anneal-trust0": (0.5, 0.5, True, 0.0, True),
            "morphnet-cubic": (0.5, 0.5, True, "auto", True, 3.0), "morphnet-square": (0.5, 0.5, True, "auto", True, 2.0),
            "morphnet-release": (0.5, 0.5, True, "auto", True, 1.0, 0.0),
            "morphnet-quarter": (0.5, 0.5, True, "auto", True, 1.0, 0.25)}


def register_variants() -> None:
    """Make the VARIANTS loadable by name, like any algorithm plugin's."""
    from dnnshrink_plugins.morphnet import algorithm as morphnet

    for name, (exponent, share, priced, trust, *anneal) in VARIANTS.items():
        # the variants measured before annealing existed keep it off
        variant = morphnet.MorphNet(morphnet._regularizer, learn_exponent=exponent, min_share=share,
                                    price_at_target=priced, trust=trust, anneal=bool(anneal and anneal[0]),
                                    anneal_power=anneal[1] if len(anneal) > 1 else 1.0,
                                    anneal_strength=anneal[2] if len(anneal) > 2 else 1.0)
        variant.name = name
        morphnet.ALGORITHMS[name] = variant


def load_task(name: str) -> Any:
    """The task module: ``train``, ``train_one_epoch``, ``test``, ``example_input``, ``_seed``, a model class."""
    return importlib.import_module(TASKS[name])


def new_model(task: Any, width: int = 32) -> nn.Module:
    return task.DigitsNet(width) if hasattr(task, "DigitsNet") else task.Mnist1dNet(width)


def macs(model: nn.Module, x: torch.Tensor) -> int:
    return ds.layer_report(model, x).totals["macs_before"]


def widths(model: nn.Module) -> List[int]:
    """Output channels of every conv/linear layer but the classifier."""
    return [layer_width(m)[1] for name, m in model.named_modules()
            if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) and name != "classifier"]


def uniform_width(model: nn.Module, target: float, x: torch.Tensor) -> nn.Module:
    """Keep the first channels of every group, the same share everywhere, down to the target."""
    from dnnshrink_plugins.morphnet.structure import uniform_fraction
    from dnnshrink_core.cost import CostModel

    graph = ds.trace(model, x)
    costs = CostModel(graph, model)
    order = -graph.unit_pos.astype(float)  # earlier channels score higher
    keep = uniform_fraction(graph, order, costs.cost, target * costs.initial, ~graph.unit_frozen)
    return ds.generate(model, x, {g.name: keep[g.units] for g in graph.groups})


def torch_pruning(model: nn.Module, target: float, x: torch.Tensor) -> nn.Module:
    import torch_pruning as tp

    base = macs(model, x)

    def pruned(ratio: float) -> nn.Module:
        net = copy.deepcopy(model)
        pruner = tp.pruner.MetaPruner(net, x, importance=tp.importance.MagnitudeImportance(p=1),
                                      pruning_ratio=ratio, ignored_layers=[net.classifier])
        pruner.step()
        return net

    low, high, best = 0.0, 0.99, pruned(0.99)
    for _ in range(14):
        mid = (low + high) / 2
        net = pruned(mid)
        if macs(net, x) <= target * base:
            best, high = net, mid
        else:
            low = mid
    return best


def run_dnnshrink(task: Any, model: nn.Module, algorithm: str, target: float, **options: Any) -> Any:
    """One shrink of ``model`` by ``algorithm`` to ``target`` of its MACs, with the width
    multiplier (``scale``: the rows stored in the results were measured with it, before
    ``scale: auto`` weighed the capacity step at MACs targets; new rows stay comparable)."""
    return shrink(model, task.example_input(), train_one_epoch=task.train_one_epoch, train=lambda m: None,
                  test=task.test, algorithm=algorithm, target_macs=target,
                  max_epochs=20 if algorithm.startswith("morphnet") else 15, finetune=False, device="cpu", progress=False,
                  latency_runs=1, exporters=(), **{"scale": "multiplier", **options})


def _rows(path: Path) -> List[Dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _append(path: Path, row: Dict[str, Any]) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps(row) + "\n")


def _baseline(task: Any, args: argparse.Namespace, seed: int, out: Path) -> nn.Module:
    """The seed's trained baseline, kept next to the results so a resumed sweep reuses it."""
    cache = out.with_name(f"{out.stem}.seed{seed}.pt")
    torch.manual_seed(seed)
    task._seed[0] = 1000 * seed
    base = new_model(task)
    if cache.exists():
        base.load_state_dict(torch.load(cache, weights_only=True))
    else:
        task.train(base, args.epochs)
        tmp = cache.with_suffix(".tmp")
        torch.save(base.state_dict(), tmp)
        tmp.replace(cache)
    return base


def quality(args: argparse.Namespace) -> Dict[str, Any]:
    """The sweep: every seed × target × method. Rows are appended to ``--out`` as they come
    and cells already there are skipped, so a stopped sweep resumes where it stopped."""
    task = load_task(args.task)
    x = task.example_input()
    out = Path(args.out or RESULTS / f"quality-{args.task}.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {(r["seed"], r["target"], r["method"]) for r in _rows(out) if "method" in r}
    learned: Dict[Any, Any] = {}  # (seed, target) -> MorphNet's structure before fine-tuning, for -reinit
    for seed in args.seeds:
        base = _baseline(task, args, seed, out)
        base_acc, base_macs = task.test(base), macs(base, x)
        if not any(r.get("baseline_seed") == seed for r in _rows(out)):
            _append(out, {"baseline_seed": seed, "accuracy": base_acc})
        print(f"seed {seed}: baseline accuracy {base_acc:.4f}, {base_macs:,} MACs, widths {widths(base)}", flush=True)
        for target in args.targets:
            for method in args.methods:
                if (seed, target, method) in done:
                    continue
                torch.manual_seed(seed)
                model = copy.deepcopy(base)
                info: Dict[str, Any] = {}
                started = time.perf_counter()
                if method == "uniform":
                    small = uniform_width(model, target, x)
                elif method == "torch-pruning":
                    small = torch_pruning(model, target, x)
                elif method == "morphnet-reinit" and (seed, target) in learned:
                    small, info = learned[(seed, target)]  # the same structure as morphnet's, from scratch
                    small = copy.deepcopy(small)
                else:
                    algorithm = method if method in VARIANTS else method.split("-")[0]
                    # structure learning's data order the same for every method and cell too
                    task._seed[0] = 1000 * seed + 200
                    result = run_dnnshrink(task, model, algorithm, target, round_to=args.round_to)
                    small = result.model
                    learn = result.report.extra["structure_learning"]
                    info = {k: learn[k] for k in ("epochs", "learned_widths", "widths_per_epoch", "cuts") if k in learn}
                    if method == "morphnet":
                        learned[(seed, target)] = (copy.deepcopy(small), info)
                if method.endswith("-reinit"):  # the same structure, trained from scratch
                    from dnnshrink_core.pipeline import reinitialize
                    reinitialize(small)
                # the same fine-tuning budget and data order for every method: the shuffling seed
                # would otherwise depend on how many training calls ran before in this process
                task._seed[0] = 1000 * seed + 500
                task.train(small, args.finetune)
                frac, acc = macs(small, x) / base_macs, task.test(small)
                row = {"seed": seed, "target": target, "method": method, "macs": frac, "accuracy": acc,
                       "widths": widths(small), "seconds": time.perf_counter() - started, **info}
                _append(out, row)
                print(f"  target {target:.3f} {method:<16} MACs {frac:.4f}  accuracy {acc:.4f}  "
                      f"widths {widths(small)}  {row['seconds']:.0f} s", flush=True)
    return load_results(out, args.task, args.finetune)


def load_results(path: Path, task: str, finetune: int = 15) -> Dict[str, Any]:
    """A sweep's results file as ``{"task", "rows", "baselines", "finetune"}``."""
    rows = _rows(path)
    return {"task": task, "rows": [r for r in rows if "method" in r], "finetune": finetune,
            "baselines": [r["accuracy"] for r in rows if "baseline_seed" in r]}


def headline(args: argparse.Namespace) -> Dict[str, Any]:
    """MorphNet's paper experiment: learn at ``target`` on a seed network ``--seed-width``
    wide, scale the learned structure to the baseline's MACs (width 32) with the width
    multiplier, train it from scratch for ``epochs``; against the baseline trained from
    scratch for as many epochs as the whole MorphNet procedure (seed training, learning,
    training). dnnshrink only removes channels, so with a seed as wide as the baseline the
    expanded structure is the baseline itself: the seed must be wider for a search."""
    from dnnshrink_plugins.morphnet.structure import scale_to_budget
    from dnnshrink_core.cost import CostModel

    task = load_task(args.task)
    x = task.example_input()
    rows = []
    for seed in args.seeds:
        for target in args.targets:
            torch.manual_seed(seed)
            task._seed[0] = 1000 * seed
            seed_net = new_model(task, args.seed_width)
            task.train(seed_net, args.epochs)  # MorphNet starts from a trained seed network
            result = run_dnnshrink(task, copy.deepcopy(seed_net), "morphnet", target, expand=False,
                                   round_to=args.round_to)
            budget = macs(new_model(task), x)  # the baseline architecture's MACs
            learned = result.masks
            graph = ds.trace(seed_net, x)
            costs = CostModel(graph, seed_net)
            keep = learned.keep_vector() if hasattr(learned, "keep_vector") else _keep(graph, learned)
            gammas = graph.unit_gammas(seed_net)
            full = scale_to_budget(graph, keep, gammas, costs.cost, budget)
            expanded = ds.generate(seed_net, x, {g.name: full[g.units] for g in graph.groups})
            from dnnshrink_core.pipeline import reinitialize
            reinitialize(expanded)
            total = args.epochs + result.epochs + args.epochs  # seed training + learning + training
            task.train(expanded, args.epochs)
            torch.manual_seed(seed + 100)
            base = new_model(task)
            task.train(base, total)
            row = {"seed": seed, "target": target, "learning_epochs": result.epochs, "total_epochs": total,
                   "expanded_macs": macs(expanded, x) / macs(base, x), "expanded_widths": widths(expanded),
                   "base_widths": widths(base), "morphnet": task.test(expanded), "baseline": task.test(base)}
            rows.append(row)
            print(row, flush=True)
    return {"task": args.task, "headline": rows}


def _keep(graph: Any, masks: Any) -> Any:
    import numpy as np
    keep = np.zeros(graph.num_units, dtype=bool)
    for group in graph.groups:
        keep[group.units] = np.asarray(masks[group.name], dtype=bool)
    return keep


def parse_log(path: str, task: str) -> Dict[str, Any]:
    """Rebuild the results from a run's printed log (for a sweep stopped before it wrote its JSON)."""
    import re

    rows, baselines, seed = [], [], None
    for line in Path(path).read_text().splitlines():
        head = re.match(r"seed (\d+): baseline accuracy ([\d.]+)", line)
        if head:
            seed = int(head.group(1))
            baselines.append(float(head.group(2)))
            continue
        row = re.match(r"\s+target ([\d.]+) (\S+)\s+MACs ([\d.]+)\s+accuracy ([\d.]+)\s+widths (\[.*\])", line)
        if row:
            rows.append({"seed": seed, "target": float(row.group(1)), "method": row.group(2),
                         "macs": float(row.group(3)), "accuracy": float(row.group(4)),
                         "widths": json.loads(row.group(5))})
    return {"task": task, "rows": rows, "baselines": baselines, "finetune": 15}


def table(data: Dict[str, Any]) -> str:
    """The markdown table of one task's sweep (mean ± std over seeds)."""
    by = defaultdict(list)
    for r in data["rows"]:
        by[(r["target"], r["method"])].append(r)
    targets = sorted({r["target"] for r in data["rows"]}, reverse=True)
    methods = list(dict.fromkeys(r["method"] for r in data["rows"]))
    lines = ["| target MACs | method | seeds | MACs kept (mean) | accuracy (mean ± std) | widths (first seed) |",
             "|---:|---|---:|---:|---:|---|"]
    for t in targets:
        for m in methods:
            rs = by[(t, m)]
            if not rs:
                continue
            accs = [r["accuracy"] for r in rs]
            lines.append(f"| {t:.1%} | {m} | {len(rs)} | {statistics.mean(r['macs'] for r in rs):.4f} | "
                         f"{statistics.mean(accs):.4f} ± {statistics.pstdev(accs):.4f} | {rs[0]['widths']} |")
    return "\n".join(lines)


def plot(datasets: List[Dict[str, Any]], path: str) -> None:
    """Accuracy against MACs with error bars, one panel per task."""
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(datasets), figsize=(6.0 * len(datasets), 4.4), squeeze=False)
    for ax, data in zip(axes[0], datasets):
        by = defaultdict(list)
        for r in data["rows"]:
            by[(r["method"], r["target"])].append(r)
        targets = sorted({r["target"] for r in data["rows"]})
        for method in dict.fromkeys(r["method"] for r in data["rows"]):
            pts = [by[(method, t)] for t in targets if by[(method, t)]]
            xs = [statistics.mean(r["macs"] for r in p) for p in pts]
            ys = [statistics.mean(r["accuracy"] for r in p) for p in pts]
            es = [statistics.pstdev([r["accuracy"] for r in p]) for p in pts]
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=method)
        ax.axhline(statistics.mean(data["baselines"]), color="grey", linestyle="--", label="baseline")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # overlapping labels otherwise
        ax.set_xticks(targets, [f"{t:.1%}".replace(".0%", "%") for t in targets])
        ax.set_xlabel("MACs kept (fraction of the baseline)")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{data['task']}: {len({r['seed'] for r in data['rows']})} seeds, "
                     f"{data['finetune']} fine-tuning epochs for every method", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(TASKS), default="digits")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--targets", nargs="+", type=float, default=TARGETS)
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--epochs", type=int, default=20, help="baseline training epochs")
    parser.add_argument("--finetune", type=int, default=15, help="fine-tuning epochs, the same for every method")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--round-to", default="1", help="dnnshrink's round_to for its methods: an integer "
                        "or 'auto' (default 1: structures compared at the MACs target itself)")
    parser.add_argument("--headline", action="store_true", help="MorphNet's paper experiment (see above)")
    parser.add_argument("--seed-width", type=int, default=48, help="--headline: the seed network's width")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--out", help="the sweep's results, appended as they come (default "
                        "bench/results/quality-TASK.jsonl); a rerun skips what is there")
    parser.add_argument("--plot", help="write the accuracy-against-MACs plot here")
    parser.add_argument("--from", dest="sources", nargs="+", help="plot/tabulate saved --json results only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # dnnshrink's width rounding (1 by default, so every method meets the MACs target as closely
    # as the uniform multiplier does: blocks of 16 on these small nets move the kept MACs in
    # coarse steps, below the target at 50% and 25%)
    args.round_to = args.round_to if args.round_to == "auto" else int(args.round_to)
    warnings.simplefilter("ignore")
    register_variants()
    if args.sources:
        datasets = [json.loads(Path(p).read_text()) if p.endswith(".json") else
                    load_results(Path(p), Path(p).stem.replace("quality-", "")) if p.endswith(".jsonl") else
                    parse_log(p, Path(p).stem) for p in args.sources]
        for data in datasets:
            if "rows" in data:
                print(f"\n### {data['task']}: baseline {statistics.mean(data['baselines']):.4f} ± "
                      f"{statistics.pstdev(data['baselines']):.4f}\n\n{table(data)}")
        if args.plot:
            plot([d for d in datasets if "rows" in d], args.plot)
        return
    start = time.perf_counter()
    data = headline(args) if args.headline else quality(args)
    data["seconds"] = time.perf_counter() - start
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=1))
    if "rows" in data:
        print(f"\n{time.perf_counter() - start:.0f} s\n\n{table(data)}")
        if args.plot:
            plot([data], args.plot)


if __name__ == "__main__":
    main()
