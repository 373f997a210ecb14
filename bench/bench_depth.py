"""The pipeline's ``depth`` option under a latency target: structures with whole residual
blocks dropped against channels only, timed with onnxruntime.

Every variant is a real ``shrink()`` run of one algorithm (``magnitude`` by default: filter
L1 ranking, no training, so the structure is the only difference) at a latency target (a
fraction of the baseline's predicted latency; the shipped profile: onnxruntime CPU, 2
threads, batch 1) with ``round_to: auto``. Per model: a target ``--below`` times the
smallest latency channels alone can reach (met with ``depth: auto``; refused with
``depth: false``, the row says so), channels alone at that floor, and each ``--latency``
target above it with ``depth: auto`` (channels alone there) and ``depth: true`` (blocks
dropped wherever that keeps more of the ranking's value). Timing: onnxruntime CPU, 2 threads, batch
1, baseline and variants interleaved in blocks, fastest and median of all timed runs.

    python bench/bench_depth.py [--models ...] [--latency 0.4 0.6] [--below 0.75] [--size 224] [--json rows.json]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import math

import torch

import dnnshrink_core as ds
from dnnshrink_core.cost import resolve_round_to
from dnnshrink_core.target import smallest_cost
from dnnshrink_core.pipeline import shrink

from common import (finish, imagenet_setup, latency_row, print_rows, time_networks, timing_options,
                    torchvision_models)


def run(model, x, algorithm: str, fraction: float, depth):
    """The shrunk model and its report, or the TargetError's message."""
    def no_training(net, lr):
        return None

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            result = shrink(model, x, train_one_epoch=no_training, test=lambda m: 0.0, finetune=False,
                            algorithm=algorithm, max_epochs=0 if algorithm == "magnitude" else 2,
                            target={"resource": "latency", "value": fraction}, depth=depth, device="cpu",
                            progress=False, latency_runs=1, exporters=(), onnx_latency=False)
    except ds.TargetError as exc:
        return None, str(exc)
    return result.model, result.report.extra


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0",
                                                        "resnet50"])
    parser.add_argument("--latency", nargs="+", type=float, default=[0.4, 0.6])
    parser.add_argument("--below", type=float, default=0.75,
                        help="also a target this share of the smallest latency channels alone can reach")
    parser.add_argument("--algorithm", default="magnitude")
    parser.add_argument("--size", type=int, default=224)
    timing_options(parser)
    args = parser.parse_args()
    imagenet_setup()
    x = torch.randn(1, 3, args.size, args.size)
    rows = []
    for name, model, graph, flops, latency in torchvision_models(args.models, x):
        nets, info = {"baseline": model}, {"baseline": None}
        auto, _ = resolve_round_to(graph, model, "auto")
        floor = smallest_cost(graph, latency, 1, auto) / latency.initial  # channels alone, every width at its block
        below = round(args.below * floor, 3)
        plan = [(below, ("auto", False)), (math.ceil(floor * 1000) / 1000, (False,))]  # the floor of channels alone
        plan += [(fraction, ("auto", True)) for fraction in args.latency if fraction > floor]
        for fraction, depths in plan:
            for depth in depths:
                label = f"latency {fraction:g}, depth {str(depth).lower()}"
                net, extra = run(model, x, args.algorithm, fraction, depth)
                if net is None:
                    rows.append({"model": name, "variant": label, "refused": extra})
                    continue
                nets[label], info[label] = net, extra
        timed = time_networks(nets, x, args.rounds, args.runs)
        for label, net in nets.items():
            extra = info[label]
            macs = extra["resources"]["macs"]["after"] / flops.initial if extra else 1.0
            predicted = extra["resources"]["latency_ms"]["after"] if extra else latency.initial
            rows.append(latency_row(name, label, macs, predicted, timed[label], timed["baseline"],
                                    blocks_dropped=len(extra["blocks_dropped"]["blocks"]) if extra else 0,
                                    of_blocks=len(graph.branches)))
    print_rows(rows, width=28, blocks=True)
    finish(rows, args.json)


if __name__ == "__main__":
    main()
