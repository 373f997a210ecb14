"""Latency targets met as predicted and as measured (``measure_target``): real ``shrink()``
runs (``magnitude``, no training, ``round_to: auto``) at a latency target, once working to the
profile's prediction and once to the budget ``measure_target`` measured; each run's report
times the exported baseline and shrunk networks with onnxruntime (the profile's threads,
interleaved), which is what a target should land on.

    python bench/bench_measured_target.py --timm rexnet_100 ghostnet_100 --tv mobilenet_v2 \\
        [--yolo yolov8n.yaml] [--target 0.5] [--json rows.json]
"""
from __future__ import annotations

import argparse
import tempfile
import time
import warnings

import torch

from dnnshrink_core.errors import TargetError
from dnnshrink_core.pipeline import shrink

from bench_profiles import build
from common import finish, imagenet_setup


def run(model: torch.nn.Module, x: torch.Tensor, target: float, measure: bool, out: str) -> dict:
    """One ``shrink()`` run; what its report measured."""
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = shrink(model, x, train_one_epoch=lambda m, lr: None, test=lambda m: 0.0, algorithm="magnitude",
                        target={"resource": "latency", "value": target}, measure_target=measure, finetune=False,
                        device="cpu", progress=False, exporters=["onnx"], tensorboard=False, out_dir=out,
                        force=True)
    extra = result.report.extra
    onnx, predicted = extra["onnx_latency"], extra["resources"]["latency_ms"]
    if "error" in onnx:  # the shrunk network could not be timed: said, not fatal to the other rows
        raise RuntimeError(onnx["error"])
    return {"predicted": predicted["after"] / predicted["before"],
            "measured_fastest": onnx["shrunk_ms"] / onnx["baseline_ms"],
            "measured_median": onnx["shrunk_median_ms"] / onnx["baseline_median_ms"],
            "probes": extra["structure_learning"].get("measured_target", {}).get("probes"),
            "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timm", nargs="*", default=[])
    parser.add_argument("--tv", nargs="*", default=[])
    parser.add_argument("--yolo", nargs="*", default=[], help="ultralytics model yamls (yolov8n.yaml…)")
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    x = imagenet_setup()
    rows = []
    print(f"{'network':<26}{'mode':>10}{'predicted':>11}{'fastest':>9}{'median':>8}{'probes':>8}{'s':>6}")
    for source, names in (("timm", args.timm), ("torchvision", args.tv), ("ultralytics", args.yolo)):
        for name in names:
            model = build(name, source)
            for measure in (False, True):
                with tempfile.TemporaryDirectory() as out:
                    try:
                        row = {"model": name, "target": args.target, "measure_target": measure,
                               **run(model, x, args.target, measure, out)}
                    except TargetError as exc:  # refused before any work: said, not a row
                        print(f"{name:<26}{'measured' if measure else 'predicted':>10}  refused: {exc}")
                        continue
                rows.append(row)
                print(f"{name:<26}{'measured' if measure else 'predicted':>10}{row['predicted']:>11.3f}"
                      f"{row['measured_fastest']:>9.3f}{row['measured_median']:>8.3f}"
                      f"{len(row['probes'] or []):>8}{row['seconds']:>6.0f}", flush=True)
    for measure in (False, True):
        errors = [abs(r["measured_fastest"] / r["target"] - 1) for r in rows if r["measure_target"] == measure]
        print(f"{'measure_target' if measure else 'the prediction'}: mean distance of the measured latency from "
              f"the target {100 * sum(errors) / max(1, len(errors)):.1f}% (fastest runs)")
    finish(rows, args.json)


if __name__ == "__main__":
    main()
