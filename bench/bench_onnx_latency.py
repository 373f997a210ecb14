"""ONNX Runtime latency of shrunk networks against their MACs reduction.

For ResNet-50 and MobileNetV2 (torchvision, weights=None), half of the removable channel
units of every group are removed (dnnshrink) and, side by side in the same process, the
same networks are pruned to 50% channels by Torch-Pruning (magnitude importance, classifier
kept). Each network is exported to ONNX (dnnshrink's verified exporter), then timed with
onnxruntime on the CPU: 2 intra-op threads, batch 1, median of repeated runs (the minimum
too); the variants take turns in short blocks of consecutive runs, so that drift of the
machine hits them alike.

    efficiency = (baseline latency / shrunk latency) / (baseline MACs / shrunk MACs)

1.0 is the physical limit (the speed-up equals the MACs reduction).

    python bench/bench_onnx_latency.py [--models resnet50 mobilenet_v2] [--runs 8] [--rounds 20] [--no-tp]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn

import dnnshrink_core as ds
from dnnshrink_core.timing import session

from common import imagenet_setup


def half_masks(graph, seed: int = 0):
    """Remove a random half of the removable units of every group."""
    rng = np.random.default_rng(seed)
    masks = {}
    for group in graph:
        mask = np.ones(group.size, dtype=bool)
        removable = np.flatnonzero(group.removable)
        if len(removable) >= 2:
            mask[rng.choice(removable, len(removable) // 2, replace=False)] = False
        masks[group.name] = mask
    return masks


def latencies(paths: dict, x: torch.Tensor, runs: int, rounds: int = 20, warmup: int = 3) -> dict:
    """Median and minimum seconds per run of each ONNX file.

    The files take turns in short blocks (``warmup`` + ``runs`` consecutive runs, caches warm
    within a block), ``rounds`` times, the order rotated every round, so that the machine's
    drift and the cache left by the previous variant hit every variant alike. Returns
    ``{label: (median, minimum)}`` over all timed runs.
    """
    sessions = {label: session(str(path), 2) for label, path in paths.items()}
    feeds = {label: {s.get_inputs()[0].name: x.numpy()} for label, s in sessions.items()}
    times = {label: [] for label in sessions}
    order = list(sessions)
    for r in range(rounds):
        # rotate, so that every variant follows every other one equally often and never itself
        shift = r % len(order)
        for label in order[shift:] + order[:shift]:
            s = sessions[label]
            for i in range(warmup + runs):
                start = time.perf_counter()
                s.run(None, feeds[label])
                if i >= warmup:
                    times[label].append(time.perf_counter() - start)
    return {label: (statistics.median(t), min(t)) for label, t in times.items()}


def torch_pruning_half(model: nn.Module, x: torch.Tensor) -> nn.Module:
    import torch_pruning as tp

    model = copy.deepcopy(model)
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    pruner = tp.pruner.MetaPruner(model, x, importance=tp.importance.MagnitudeImportance(p=1),
                                  pruning_ratio=0.5, ignored_layers=[last])
    pruner.step()
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "mobilenet_v2"])
    parser.add_argument("--runs", type=int, default=8, help="timed runs per block")
    parser.add_argument("--rounds", type=int, default=20, help="blocks per variant")
    parser.add_argument("--no-tp", action="store_true", help="skip Torch-Pruning")
    args = parser.parse_args()
    x = imagenet_setup()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in args.models:
            model = torchvision.models.get_model(name, weights=None).eval()
            variants = {"baseline": model}
            graph = ds.trace(model, x)
            variants["dnnshrink"] = ds.generate(model, x, half_masks(graph))
            if not args.no_tp:
                try:
                    variants["torch-pruning"] = torch_pruning_half(model, x)
                except ImportError:
                    print("torch-pruning is not installed (pip install -e '.[bench]'); skipping it")
            paths, macs = {}, {}
            for label, net in variants.items():
                paths[label] = tmp / f"{name}-{label}.onnx"
                ds.export(net, x, "onnx", paths[label])
                macs[label] = ds.layer_report(net, x).totals["macs_before"]
            timed = latencies(paths, x, args.runs, args.rounds)
            (base_med, base_min), base_macs = timed["baseline"], macs["baseline"]
            for label in variants:
                med, fastest = timed[label]
                speedup, reduction = base_med / med, base_macs / macs[label]
                rows.append((name, label, macs[label] / 1e9, med * 1e3, speedup, reduction, speedup / reduction,
                             base_min / fastest / reduction))
    print(f"{'model':<13}{'variant':<15}{'GMACs':>7}{'ms':>9}{'speed-up':>10}{'MACs cut':>10}{'efficiency':>12}"
          f"{'(by min)':>10}")
    for name, label, gmacs, ms, speedup, reduction, eff, eff_min in rows:
        print(f"{name:<13}{label:<15}{gmacs:>7.3f}{ms:>9.2f}{speedup:>9.2f}x{reduction:>9.2f}x{eff:>12.2f}"
              f"{eff_min:>10.2f}")


if __name__ == "__main__":
    main()
