"""Quality on digits: test accuracy against MACs for MorphNet and its baselines.

For each seed, a baseline DigitsNet (dnnshrink_core/demo/digits.py) is trained with
``train(model)``; then, for each MACs target (50%, 25%, 12% of the baseline), each method
picks a structure from that same trained baseline and the result is fine-tuned with the same
budget, one ``train(model)`` call (20 epochs):

* ``morphnet``   dnnshrink's default (FLOP-weighted L1 on BatchNorm scales, expand step);
* ``slimming``   Network Slimming (uniform L1 on the scales, then a global cut);
* ``magnitude``  dnnshrink's one-shot L1-norm filter ranking (same share cut in every group);
* ``uniform``    a uniform width multiplier: every group keeps its first channels;
* ``torch-pruning``  the peer: Torch-Pruning's MetaPruner with L1 magnitude importance, its
                 pruning ratio searched to meet the same MACs target.

    python bench/bench_quality.py [--seeds 0 1 2] [--targets 0.5 0.25 0.12] [--plot docs/quality.png]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

import dnnshrink_core as ds
from dnnshrink_core.demo import digits
from dnnshrink_core.pipeline import shrink

X = digits.example_input()


def macs(model: nn.Module) -> int:
    return ds.layer_report(model, X).totals["macs_before"]


def uniform_width(model: nn.Module, target: float) -> nn.Module:
    """Keep the first channels of every group, the same share everywhere, down to the target."""
    from dnnshrink_plugins.morphnet.structure import uniform_fraction
    from dnnshrink_core.cost import CostModel

    graph = ds.trace(model, X)
    costs = CostModel(graph, model)
    order = -graph.unit_pos.astype(float)  # earlier channels score higher
    keep = uniform_fraction(graph, order, costs.cost, target * costs.initial, ~graph.unit_frozen)
    return ds.generate(model, X, {g.name: keep[g.units] for g in graph.groups})


def torch_pruning(model: nn.Module, target: float) -> nn.Module:
    import torch_pruning as tp

    base = macs(model)

    def pruned(ratio: float) -> nn.Module:
        net = copy.deepcopy(model)
        pruner = tp.pruner.MetaPruner(net, X, importance=tp.importance.MagnitudeImportance(p=1),
                                      pruning_ratio=ratio, ignored_layers=[net.classifier])
        pruner.step()
        return net

    low, high, best = 0.0, 0.99, pruned(0.99)
    for _ in range(14):
        mid = (low + high) / 2
        net = pruned(mid)
        if macs(net) <= target * base:
            best, high = net, mid
        else:
            low = mid
    return best


def run_dnnshrink(model: nn.Module, algorithm: str, target: float) -> nn.Module:
    result = shrink(model, X, train_one_epoch=digits.train_one_epoch, train=lambda m: None, test=digits.test,
                    algorithm=algorithm, target_macs=target, max_epochs=30 if algorithm == "morphnet" else 15,
                    finetune=False, device="cpu", progress=False, latency_runs=1)
    return result.model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--targets", nargs="+", type=float, default=[0.5, 0.25, 0.12])
    parser.add_argument("--methods", nargs="+",
                        default=["morphnet", "slimming", "magnitude", "uniform", "torch-pruning"])
    parser.add_argument("--plot", default="docs/quality.png")
    args = parser.parse_args()
    torch.set_num_threads(2)
    warnings.simplefilter("ignore")
    results = defaultdict(list)  # (method, target) -> [(macs fraction, accuracy)]
    baselines = []
    start = time.perf_counter()
    for seed in args.seeds:
        torch.manual_seed(seed)
        digits._seed[0] = 1000 * seed
        base = digits.DigitsNet()
        digits.train(base)
        base_acc, base_macs = digits.test(base), macs(base)
        baselines.append(base_acc)
        print(f"seed {seed}: baseline accuracy {base_acc:.4f}, {base_macs:,} MACs")
        for target in args.targets:
            for method in args.methods:
                torch.manual_seed(seed)
                model = copy.deepcopy(base)
                if method == "uniform":
                    small = uniform_width(model, target)
                elif method == "torch-pruning":
                    small = torch_pruning(model, target)
                else:
                    small = run_dnnshrink(model, method, target)
                digits.train(small)  # the same fine-tuning budget for every method
                frac, acc = macs(small) / base_macs, digits.test(small)
                results[(method, target)].append((frac, acc))
                print(f"  target {target:.2f} {method:<14} MACs {frac:.3f}  accuracy {acc:.4f}")
    print(f"\n{len(args.seeds)} seeds in {time.perf_counter() - start:.0f} s; baseline accuracy "
          f"{statistics.mean(baselines):.4f} ± {statistics.pstdev(baselines):.4f}\n")
    print("| target MACs | method | MACs kept (mean) | accuracy (mean ± std) |")
    print("|---:|---|---:|---:|")
    for target in args.targets:
        for method in args.methods:
            rows = results[(method, target)]
            fracs, accs = [r[0] for r in rows], [r[1] for r in rows]
            print(f"| {target:.0%} | {method} | {statistics.mean(fracs):.3f} | "
                  f"{statistics.mean(accs):.4f} ± {statistics.pstdev(accs):.4f} |")
    plot(results, args, statistics.mean(baselines))


def plot(results, args, baseline: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for method in args.methods:
        xs = [statistics.mean(r[0] for r in results[(method, t)]) for t in args.targets]
        ys = [statistics.mean(r[1] for r in results[(method, t)]) for t in args.targets]
        es = [statistics.pstdev([r[1] for r in results[(method, t)]]) for t in args.targets]
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=method)
    ax.axhline(baseline, color="grey", linestyle="--", label="baseline")
    ax.set_xscale("log")
    ax.set_xlabel("MACs kept (fraction of the baseline)")
    ax.set_ylabel("test accuracy (digits)")
    ax.set_title(f"Accuracy against MACs, {len(args.seeds)} seeds, same fine-tuning budget")
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=120)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
