"""How onnxruntime's threads wait for work moves the measured speed-up of a shrunk network.

For each torchvision network (``weights=None``, 224×224), the pipeline's defaults
(``magnitude``, no training, ``scale: auto``) build it at a share of its MACs; the baseline
and the shrunk network are exported and timed with onnxruntime (2 threads, batch 1) with
their threads (``dnnshrink_core.timing.session``): spinning within each run and stopping at
its end (``run``, what dnnshrink times by default), sleeping between ops (``never``, what it
timed before 2026-12-01 14:40) and spinning on between runs (``always``, onnxruntime's own
default), all six sessions interleaved; then the ``always`` pair again by itself (one
session serving back-to-back calls, with nothing else to take its cores). Each row gives
the fastest and median ms and the efficiency (speed-up / MACs cut).

    python bench/bench_spinning.py [--networks mobilenet_v2 resnet50 ...] [--macs 0.3]
        [--rounds 15] [--runs 6] [--json rows.json]
"""
from __future__ import annotations

import argparse

from common import (finish, imagenet_setup, latency_row, print_rows, shrink_untrained, time_networks, timing_options,
                    torchvision_models)

NETWORKS = ["mobilenet_v2", "resnet50", "mobilenet_v3_large", "efficientnet_b0"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", nargs="+", default=NETWORKS)
    parser.add_argument("--macs", type=float, default=0.3)
    timing_options(parser)
    args = parser.parse_args()
    x = imagenet_setup()
    rows = []
    for name, model, _, _, _ in torchvision_models(args.networks, x):
        built = shrink_untrained(model, x, target_macs=args.macs)
        macs = built.report.extra["resources"]["macs"]
        kept, predicted = macs["after"] / macs["before"], built.report.extra["resources"]["latency_ms"]["after"]
        modes = ("run", "never", "always")
        nets = {f"{label} {mode}": net for mode in modes for label, net in (("baseline", model), ("shrunk", built.model))}
        timed = time_networks(nets, x, args.rounds, args.runs, spinning={k: k.split()[-1] for k in nets})
        timed.update({f"{label} always, alone": t for label, t in
                      time_networks({"baseline": model, "shrunk": built.model}, x, args.rounds, args.runs,
                                    spinning="always").items()})
        for mode in ("run", "never", "always", "always, alone"):
            rows.append(latency_row(name, f"{args.macs:g} MACs, threads {mode}", kept, predicted,
                                    timed[f"shrunk {mode}"], timed[f"baseline {mode}"], spinning=mode,
                                    baseline_fastest_ms=1e3 * timed[f"baseline {mode}"][0],
                                    scale=built.report.extra["structure_learning"]["scale"]))
        print_rows(rows[-4:], width=30)
    finish(rows, args.json, table_width=30)


if __name__ == "__main__":
    main()
