"""What one thin op costs in onnxruntime, measured, against what the latency profile predicts.

Chains of ``n`` identical convolutions (16 channels: the widths of a heavily shrunk network)
are timed at two lengths, interleaved; the difference divided by the ops added is the
measured time of one op, per-call overhead included, free of the per-run cost. The profile's
prediction for the same op (its roofline plus its fitted ``overhead_us``) sits beside it.

    python bench/bench_per_call.py [--profile PATH] [--rounds 10] [--runs 20]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from dnnshrink_core.timing import fastest_and_median, interleaved_times, session
from dnnshrink_plugins.costs.calibrate import op_terms
from dnnshrink_plugins.costs.latency import load_profile, roofline_seconds

# (kind, channels, kernel, spatial size, groups)
OPS = [("pointwise", 16, 1, 7, 1), ("pointwise", 16, 1, 28, 1), ("pointwise", 16, 1, 56, 1),
       ("depthwise", 16, 3, 7, 16), ("depthwise", 16, 3, 56, 16), ("conv", 16, 3, 7, 1), ("conv", 16, 3, 28, 1)]
SHORT, LONG = 10, 60


def chain(n: int, c: int, k: int, hw: int, groups: int):
    model = nn.Sequential(*[nn.Conv2d(c, c, k, padding=k // 2, groups=groups) for _ in range(n)]).eval()
    return model, torch.randn(1, c, hw, hw)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", help="latency profile (default: the shipped one)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    profile = load_profile(args.profile)
    sessions, feeds = {}, {}
    print(f"1-minute load average at the start: {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        for op in OPS:
            for n in (SHORT, LONG):
                model, x = chain(n, *op[1:])
                path = Path(tmp) / f"{len(sessions)}.onnx"
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17)
                sessions[(op, n)] = session(str(path), profile.threads, profile.spinning)
                feeds[(op, n)] = {sessions[(op, n)].get_inputs()[0].name: x.numpy()}
        timed = fastest_and_median(interleaved_times(sessions, feeds, args.rounds, args.runs))
    print(f"{'op':<11}{'ch':>4}{'k':>3}{'hw':>5}{'measured us':>13}{'(median)':>10}{'predicted us':>14}"
          f"{'of which overhead':>19}")
    for op in OPS:
        kind, c, k, hw, _ = op
        fast = (timed[(op, LONG)][0] - timed[(op, SHORT)][0]) / (LONG - SHORT)
        median = (timed[(op, LONG)][1] - timed[(op, SHORT)][1]) / (LONG - SHORT)
        constants = profile.ops[kind]
        macs, traffic = op_terms((kind, c, c, hw, k, 1), profile.batch)
        predicted = float(roofline_seconds(macs, traffic, constants.peak_gmacs * 1e9, constants.bandwidth_gbs * 1e9,
                                           constants.overhead_us * 1e-6))
        print(f"{kind:<11}{c:>4}{k:>3}{hw:>5}{1e6 * fast:>13.1f}{1e6 * median:>10.1f}{1e6 * predicted:>14.1f}"
              f"{constants.overhead_us:>19.1f}")
    print(f"1-minute load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
