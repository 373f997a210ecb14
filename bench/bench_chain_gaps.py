"""Where the latency profile misses, on chains built to isolate one pattern: small pointwise
convs at low resolution (the late stages of GhostNet-like networks) and GhostNet's ghost
module (a pointwise conv, a cheap depthwise conv, their concatenation) with pieces that fit
onnxruntime's blocked layout (16 + 16 channels) and pieces that do not (12 + 12). Each chain
is timed with onnxruntime (the profile's threads, interleaved) and predicted by the profile.

    python bench/bench_chain_gaps.py [--profile PROFILE] [--json rows.json]
"""
from __future__ import annotations

import argparse

import torch

from dnnshrink_plugins.costs.calibrate import OnnxBackend, predict_network, torch_chain
from dnnshrink_plugins.costs.latency import load_profile
from dnnshrink_plugins.costs.runtime import chain_input_shape

from common import finish

CHAINS = {
    "pointwise 192->16->192 @14, x10": [("pointwise", 192, 16, 14, 1, 1), ("pointwise", 16, 192, 14, 1, 1)] * 10,
    "pointwise 64->240->64 @7, x10": [("pointwise", 64, 240, 7, 1, 1), ("pointwise", 240, 64, 7, 1, 1)] * 10,
    "ghost module 16+16 @56, x5": [("pointwise", 32, 16, 56, 1, 1), ("depthwise", 16, 16, 56, 3, 1),
                                   ("concat", 32, 32, 56, 1, 1)] * 5 + [("pointwise", 32, 32, 56, 1, 1)],
    "ghost module 12+12 @56, x5": [("pointwise", 24, 12, 56, 1, 1), ("depthwise", 12, 12, 56, 3, 1),
                                   ("concat", 24, 24, 56, 1, 1)] * 5 + [("pointwise", 24, 24, 56, 1, 1)],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", help="a latency profile (default: the shipped one)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(2)
    profile = load_profile(args.profile)
    backend = OnnxBackend(profile.threads, profile.batch)
    timed = backend.time({name: backend.prepare(ops) for name, ops in CHAINS.items()}, args.rounds, 3)
    rows = []
    for name, ops in CHAINS.items():
        x = torch.randn(*chain_input_shape(ops, profile.batch))
        predicted, measured = predict_network(torch_chain(ops).eval(), x, profile), 1e3 * timed[name][0]
        rows.append({"chain": name, "predicted_ms": predicted, "measured_ms": measured,
                     "error_pct": 100 * (predicted / measured - 1)})
        print(f"{name:<34} predicted {predicted:7.3f} ms, measured {measured:7.3f} ms: {rows[-1]['error_pct']:+.1f}%")
    finish(rows, args.json)


if __name__ == "__main__":
    main()
