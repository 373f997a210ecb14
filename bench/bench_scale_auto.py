"""What ``scale: auto`` builds at a MACs target, against both structures it chooses from.

For each torchvision network (``weights=None``, 224×224) and MACs share, the pipeline's
``magnitude`` algorithm (no training) builds the width multiplier's structure (``scale:
multiplier``), the capacity step's (``scale: capacity``) and the default's (``scale: auto``:
the multiplier's unless the capacity step's needs ``AUTO_CAPACITY_GAIN`` less predicted time
per MAC). The baseline and the two structures are exported to ONNX and timed with
onnxruntime (2 threads, batch 1, interleaved rounds, fastest and median), so each row says
which one the default took, the gain it saw, and the efficiency (speed-up / MACs cut) of
each as measured.

    python bench/bench_scale_auto.py [--networks mobilenet_v2 resnet50 ...] [--macs 0.3 0.5]
        [--rounds 15] [--runs 6] [--json rows.json]
"""
from __future__ import annotations

import argparse

from common import (finish, imagenet_setup, latency_row, print_rows, shrink_untrained, time_networks, timing_options,
                    torchvision_models)

NETWORKS = ["mobilenet_v2", "resnet50", "resnet18", "efficientnet_b0", "mobilenet_v3_large", "regnet_x_400mf",
            "regnet_y_800mf", "resnext50_32x4d", "vgg11_bn"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", nargs="+", default=NETWORKS)
    parser.add_argument("--macs", nargs="+", type=float, default=[0.3, 0.5])
    timing_options(parser)
    args = parser.parse_args()
    x = imagenet_setup()
    rows = []
    for name, model, _, _, _ in torchvision_models(args.networks, x):
        for share in args.macs:
            built = {}
            for scale in ("multiplier", "capacity", "auto"):
                built[scale] = shrink_untrained(model, x, target_macs=share, scale=scale)
            learning = built["auto"].report.extra["structure_learning"]
            chose, gain = learning["scale"], learning["capacity_gain"]
            timed = time_networks({"baseline": model, "multiplier": built["multiplier"].model,
                                   "capacity": built["capacity"].model}, x, args.rounds, args.runs)
            for scale in ("multiplier", "capacity"):
                resources = built[scale].report.extra["resources"]
                rows.append(latency_row(name, f"{share:g} MACs, {scale}" + (" <- auto" if scale == chose else ""),
                                        resources["macs"]["after"] / resources["macs"]["before"],
                                        resources["latency_ms"]["after"], timed[scale], timed["baseline"],
                                        share=share, scale=scale, auto_chose=chose, capacity_gain=gain,
                                        predicted_time=resources["latency_ms"]["after"]
                                        / resources["latency_ms"]["before"]))
            print_rows(rows[-2:], width=30)
    finish(rows, args.json, table_width=30)


if __name__ == "__main__":
    main()
