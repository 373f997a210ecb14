"""Time per training step with MorphNet's regularizer (its optimizer step hook) against without.

The hook adds the penalty's gradient to the BatchNorm scales once per step. Timed on the
digits demo model (real data, the demo's batch of 64) and on ResNet-18 (random 2×3×64×64
batches); the two settings alternate in blocks, and the overhead is the median of the
per-pair ratios, so drift of the machine cancels.

    python bench/bench_overhead.py [--steps 200] [--blocks 5]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
import torchvision

import dnnshrink_core as ds
from dnnshrink_core.demo import digits
from dnnshrink_plugins.morphnet import morphnet_flops


def step_time(model, batch, target, steps: int) -> float:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(batch), target).backward()
        optimizer.step()
    return (time.perf_counter() - start) / steps


def measure(name, model, batch, target, steps: int, blocks: int) -> None:
    model.train()
    reg = morphnet_flops(ds.trace(model, batch[:1]), model)
    step_time(model, batch, target, 10)  # warm-up
    inside = [0.0]
    compute = reg.source_gradients

    def timed():  # the regularizer's own work, measured where it happens
        start = time.perf_counter()
        result = compute()
        inside[0] += time.perf_counter() - start
        return result

    reg.source_gradients = timed
    plain, hooked, ratios = [], [], []
    for _ in range(blocks):
        plain.append(step_time(model, batch, target, steps))
        with reg.attach():
            hooked.append(step_time(model, batch, target, steps))
        ratios.append(hooked[-1] / plain[-1])  # paired blocks: drift of the machine cancels
    p, h = statistics.median(plain), statistics.median(hooked)
    per_step = inside[0] / (blocks * steps)
    print(f"| {name} | {p * 1e3:.3f} | {h * 1e3:.3f} | {100 * (statistics.median(ratios) - 1):+.1f}% | "
          f"{100 * (h / p - 1):+.1f}% | {per_step * 1e3:.3f} ({100 * per_step / p:.1f}%) |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--blocks", type=int, default=21)
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    print("| model | ms/step without | ms/step with hooks | overhead, median of paired blocks | overhead, "
          "medians | regularizer's own ms/step (share) |")
    print("|---|---:|---:|---:|---:|---:|")
    x, y, _, _ = digits._data()
    measure("digits DigitsNet, batch 64", digits.build_model(), x[:64], y[:64], args.steps, args.blocks)
    resnet = torchvision.models.resnet18(weights=None, num_classes=10)
    measure("ResNet-18, batch 2×3×64×64", resnet, torch.randn(2, 3, 64, 64), torch.tensor([1, 2]),
            max(args.steps // 10, 10), args.blocks)


if __name__ == "__main__":
    main()
