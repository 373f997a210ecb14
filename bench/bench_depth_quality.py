"""Which residual blocks go, when a latency target is below what channels alone can reach:
MorphNet's choice (``depth: auto``, the blocks whose loss keeps most |gamma|) against the
magnitude ranking's and against dropping the same number of blocks from the end or the
start of the network, after the same fine-tuning.

Task: scikit-learn's digits (the demo's data) with a residual CNN of six basic blocks
(ResDigits below), trained ``--epochs`` per seed. Every method shrinks the same trained
baseline to ``--latency`` of its predicted latency (the shipped onnxruntime profile, where a
per-op cost dominates this small network, so its channels alone cannot get there), then
fine-tunes ``--finetune`` epochs with the same data order. The naive rows keep every
channel of the blocks that stay and scale the widths to the budget with one multiplier.

    python bench/bench_depth_quality.py [--seeds 0 1 2] [--latency 0.6 | --macs 0.3] [--scales multiplier capacity auto]
        [--algorithms morphnet magnitude]
        [--network resdigits|mobilenet_v2] [--json rows.json]
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import dnnshrink_core as ds
from dnnshrink_core import branches
from dnnshrink_core.cost import CostModel
from dnnshrink_core.demo import digits as task
from dnnshrink_core.pipeline import shrink
from dnnshrink_core.target import smallest_cost
from dnnshrink_plugins.morphnet.structure import scale_to_budget


def conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout))


class Basic(nn.Module):
    """Two 3×3 conv-BN layers added to the input (ResNet's basic block)."""

    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(conv_bn(c, c), nn.ReLU(inplace=True), conv_bn(c, c))

    def forward(self, x):
        return torch.relu(x + self.body(x))


class ResDigits(nn.Module):
    """A stem, three blocks at 8×8, a pooling, three blocks at 4×4, a linear classifier."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(1, width), nn.ReLU(inplace=True))
        self.blocks = nn.Sequential(*[Basic(width) for _ in range(3)], nn.MaxPool2d(2),
                                    *[Basic(width) for _ in range(3)])
        self.classifier = nn.Linear(width, 10)

    def forward(self, x):
        return self.classifier(self.blocks(self.stem(x)).mean((2, 3)))


def digits_mobilenet_v2() -> nn.Module:
    """torchvision's MobileNetV2 (width 0.5) for the digits: the 8×8 image upsampled to
    32×32 and a one-channel stem of stride 1, so that its depthwise stages see 32×32 to 2×2
    (a network whose layers differ in time per MAC, as MobileNetV2's do at 224×224)."""
    import torchvision

    net = torchvision.models.mobilenet_v2(num_classes=10, width_mult=0.5)
    net.features[0][0] = nn.Conv2d(1, net.features[0][0].out_channels, 3, 1, 1, bias=False)
    return nn.Sequential(nn.Upsample(scale_factor=4, mode="bilinear"), net)


NETWORKS = {"resdigits": ResDigits, "mobilenet_v2": digits_mobilenet_v2}


def naive(model: nn.Module, x: torch.Tensor, k: int, from_end: bool, fraction: float) -> nn.Module:
    """``model`` with ``k`` blocks dropped from its end (or start) and every other group
    scaled by one multiplier to ``fraction`` of the predicted latency."""
    graph = ds.trace(model, x)
    latency = CostModel(graph, model, "latency")
    order = sorted(graph.branches, key=lambda b: min(b.layers), reverse=from_end)
    keep = np.ones(graph.num_units, dtype=bool)
    for b in order[:k]:
        for g in b.own:
            keep[graph.groups[g].units] = False
    keep = scale_to_budget(graph, branches.settle(graph, keep), -graph.unit_pos.astype(float), latency.cost,
                           fraction * latency.initial, 1, 16)
    return ds.generate(model, x, {g.name: keep[g.units] for g in graph})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--latency", type=float, default=0.6)
    parser.add_argument("--macs", type=float, help="a MACs target instead of the latency one (no naive rows)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--finetune", type=int, default=15)
    parser.add_argument("--scales", nargs="+", default=["multiplier"], choices=["multiplier", "capacity", "auto"],
                        help="the pipeline's scale option for morphnet and magnitude: each is a row of its own "
                             "(the naive rows come with multiplier)")
    parser.add_argument("--algorithms", nargs="+", default=["morphnet", "magnitude"], choices=["morphnet", "magnitude"],
                        help="the pipeline's algorithms to run (each with every --scales)")
    parser.add_argument("--network", choices=sorted(NETWORKS), default="resdigits",
                        help="ResDigits (six basic blocks) or MobileNetV2 at 32×32 (digits_mobilenet_v2)")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    x = task.example_input()
    rows = []
    for seed in args.seeds:
        torch.manual_seed(seed)
        task._seed[0] = 1000 * seed
        base = NETWORKS[args.network]()
        task.train(base, args.epochs)
        graph = ds.trace(base, x)
        latency = CostModel(graph, base, "latency")
        floor = smallest_cost(graph, latency, 1, 16) / latency.initial
        print(f"seed {seed}: baseline accuracy {task.test(base):.4f}; channels alone reach {floor:.3f} of the "
              f"predicted latency; target {args.latency if args.macs is None else f'MACs {args.macs}'}", flush=True)
        dropped = {}
        methods = [f"{m}" if scale == "multiplier" else f"{m} ({scale})" for scale in args.scales
                   for m in args.algorithms]
        methods += ["last blocks", "first blocks"] if "multiplier" in args.scales and args.macs is None else []
        for method in methods:
            started = time.perf_counter()
            model = copy.deepcopy(base)
            task._seed[0] = 1000 * seed + 200
            algorithm, _, scale = method.partition(" (")
            if algorithm in ("morphnet", "magnitude"):
                with contextlib.redirect_stdout(io.StringIO()):
                    result = shrink(model, x, train_one_epoch=task.train_one_epoch, test=task.test, algorithm=algorithm,
                                    target={"resource": "latency", "value": args.latency} if args.macs is None
                                    else {"resource": "macs", "value": args.macs},
                                    scale=scale.rstrip(")") or "multiplier",
                                    max_epochs=20 if algorithm == "morphnet" else 0, finetune=False, device="cpu",
                                    progress=False, latency_runs=1, exporters=())
                small = result.model
                dropped[method] = [b["join"] for b in result.report.extra["blocks_dropped"]["blocks"]]
                learning = result.report.extra["structure_learning"]
                chosen = {"scale": learning.get("scale"), "capacity_gain": learning.get("capacity_gain")}
            else:
                small = naive(model, x, len(dropped["morphnet"]), method == "last blocks", args.latency)
                chosen = {}
            task._seed[0] = 1000 * seed + 500
            task.train(small, args.finetune)
            g = ds.trace(small, x)
            row = {"seed": seed, "method": method, "accuracy": task.test(small),
                   "predicted_latency": CostModel(g, small, "latency").initial / latency.initial,
                   "macs": CostModel(g, small, "flops").initial / CostModel(graph, base, "flops").initial,
                   "blocks_dropped": len(graph.branches) - len(g.branches), "joins": dropped.get(method),
                   "seconds": time.perf_counter() - started, **chosen}
            rows.append(row)
            print(f"  {method:<13} accuracy {row['accuracy']:.4f}  latency {row['predicted_latency']:.3f}  "
                  f"MACs {row['macs']:.3f}  blocks dropped {row['blocks_dropped']} {row['joins'] or ''}"
                  + (f"  auto chose {chosen['scale']} (gain {chosen['capacity_gain']:.3f})"
                     if chosen.get("capacity_gain") is not None else ""), flush=True)
    print(f"\n{'method':<14}{'accuracy':>18}{'MACs kept':>11}{'blocks':>8}")
    for method in dict.fromkeys(r["method"] for r in rows):
        sel = [r for r in rows if r["method"] == method]
        acc = [r["accuracy"] for r in sel]
        spread = statistics.stdev(acc) if len(acc) > 1 else 0.0
        print(f"{method:<14}{statistics.mean(acc):>10.4f} ± {spread:.4f}"
              f"{statistics.mean(r['macs'] for r in sel):>11.3f}{statistics.mean(r['blocks_dropped'] for r in sel):>8.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
