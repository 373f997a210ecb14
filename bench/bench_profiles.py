"""Latency profiles judged on networks outside the calibration, torchvision's and timm's
(hybrid CNN-attention ones too), all timed once: predicted against measured onnxruntime
latency, whole and at a quarter of their widths, for each profile given; and per network how
far the MACs cost model is from what ``torch.utils.flop_counter`` counts (the report's MACs).

    python bench/bench_profiles.py --profiles shipped /tmp/new.json \\
        --timm efficientvit_b0 levit_128s mobilevit_xxs --tv resnet18 densenet121 \\
        [--yolo yolov8n.yaml] [--json rows.json]

``shipped`` names the profile that ships with dnnshrink. Every profile predicts the same
timed networks, so a busy machine's drift does not favour one (read the load averages).
"""
from __future__ import annotations

import argparse
from typing import List

import torch

import dnnshrink_core as ds
from dnnshrink_core.cost import CostModel
from dnnshrink_core.report import count_macs
from dnnshrink_plugins.costs.latency import load_profile

from common import finish, imagenet_setup, judge_profiles, whole_and_thin


def build(name: str, source: str) -> torch.nn.Module:
    """A network from timm or torchvision, ``weights=None``, eval mode."""
    torch.manual_seed(0)
    if source == "timm":
        import timm

        return timm.create_model(name, pretrained=False).eval()
    if source == "ultralytics":
        import os

        os.environ.setdefault("YOLO_OFFLINE", "1")
        from ultralytics.nn.tasks import DetectionModel

        return DetectionModel(name, verbose=False).eval()
    import torchvision

    return torchvision.models.get_model(name, weights=None).eval()


def mean_abs(values: List[float]) -> float:
    return sum(abs(v) for v in values) / max(1, len(values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profiles", nargs="+", default=["shipped"])
    parser.add_argument("--timm", nargs="*", default=[])
    parser.add_argument("--tv", nargs="*", default=["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large",
                                                     "efficientnet_b0"])
    parser.add_argument("--yolo", nargs="*", default=[], help="ultralytics model yamls (yolov8n.yaml…)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    x = imagenet_setup()
    profiles = {p: load_profile(None if p == "shipped" else p) for p in args.profiles}
    models, info = {}, {}
    for source, names in (("timm", args.timm), ("torchvision", args.tv), ("ultralytics", args.yolo)):
        for name in names:
            model = models[name] = build(name, source)
            gap = 100 * (CostModel(ds.trace(model, x), model, "flops").initial / count_macs(model, x)[""] - 1)
            info[name] = {"source": source, "macs_gap_pct": round(gap, 2)}
    judged = judge_profiles(profiles, whole_and_thin(models, x), x, args.rounds, args.runs)
    rows = []
    print(f"{'network':<32}{'MACs gap':>9}{'fast ms':>9}{'med ms':>9}" + "".join(f"{p[-24:]:>26}" for p in profiles))
    for label, judged_row in judged.items():
        name = label.split(" ")[0]
        row = {"model": label, "thin": label != name, **info[name], **judged_row}
        rows.append(row)
        print(f"{label:<32}{row['macs_gap_pct']:>8.1f}%{row['fastest_ms']:>9.2f}{row['median_ms']:>9.2f}"
              + "".join(f"{row['error_pct'][p]:>+25.1f}%" for p in profiles))
    for p in profiles:
        for source in ("timm", "torchvision", "ultralytics"):
            chosen = [r for r in rows if r["source"] == source]
            if chosen:
                whole = mean_abs([r["error_pct"][p] for r in chosen if not r["thin"]])
                thin = mean_abs([r["error_pct"][p] for r in chosen if r["thin"]])
                print(f"{p}: {source} mean absolute error {whole:.1f}% whole, {thin:.1f}% thin")
    finish(rows, args.json)


if __name__ == "__main__":
    main()
