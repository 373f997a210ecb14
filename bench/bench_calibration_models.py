"""Latency models compared on the same timings: the calibration's default fit, the fit with
thin chains and a per-position cost (``dnnshrink calibrate --per-position``), each with and
without the tensor ops (activations, adds, multiplies, pooling the runtime does not fuse),
and the shipped profile, each judged on the same timed networks, whole and at a quarter of
their widths, and on the ratio of the two (what a latency target relative to the baseline
rests on).

One sweep is timed once (the default chains and the thin ones, the block sizes taken from
the shipped profile so that noisy block probes do not differ between the fits); each model is
fitted to it; the five unseen torchvision networks and their thin versions are timed once
and predicted by every model. Fitting every model to one set of timings, instead of
comparing separate calibration runs, keeps a busy machine's drift out of the comparison
(though not out of the timings themselves: read the load averages). ``--repeat N`` does it
all N times over (new timings each time) and reports each model's mean and worst error
over the repeats: one timing can flatter or sink any model.

    python bench/bench_calibration_models.py [--rounds 8] [--repeat 3] [--json rows.json]
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch
import torchvision

from dnnshrink_plugins.costs.calibrate import VALIDATION_MODELS, OnnxBackend, fit, sweep_chains
from dnnshrink_plugins.costs.latency import TENSOR_KINDS, Profile, load_profile

from common import judge_profiles, whole_and_thin


def one_timing(shipped: Profile, rounds: int, extra: tuple = ()) -> dict:
    """Time the sweep and the networks once, fit every model, and return each model's errors."""
    print(f"1-minute load average at the start: {os.getloadavg()[0]:.2f}", flush=True)
    multiples = {kind: c.channel_multiple for kind, c in shipped.ops.items()}
    backend = OnnxBackend(shipped.threads, shipped.batch)
    chains = sweep_chains(thin=True)
    plain = len(sweep_chains())  # the default sweep is the first part of the thin one
    prepared = {str(i): backend.prepare(ops) for i, ops in enumerate(chains)}
    timed = backend.time(prepared, rounds, 3)
    samples = [(ops, timed[str(i)][0]) for i, ops in enumerate(chains)]
    models_to_judge = {"shipped profile": shipped}
    fused = [k for k in TENSOR_KINDS if k not in backend.separate_kinds()]
    for label, part, per_position in (("default fit", samples[:plain], False),
                                      ("thin chains + per position", samples, True)):
        for tensor in (False, True):  # without: conv/linear layers only, as before tensor ops were priced
            ops, per_run, stats = fit(part, shipped.batch, multiples, per_position,
                                      fused if tensor else TENSOR_KINDS)
            models_to_judge[label + (" + tensor ops" if tensor else "")] = Profile(
                shipped.runtime, per_run, ops, {"sweep_mean_abs_error_pct": stats["sweep_mean_abs_error_pct"]})
    # every tensor kind with a per-position cost of its own (the fit before the tenth session)
    ops, per_run, stats = fit(samples, shipped.batch, multiples, True, fused, position_kinds=TENSOR_KINDS)
    models_to_judge["thin chains + per position + tensor ops, every kind per position"] = Profile(
        shipped.runtime, per_run, ops, {"sweep_mean_abs_error_pct": stats["sweep_mean_abs_error_pct"]})
    print(f"1-minute load average after the sweep: {os.getloadavg()[0]:.2f}", flush=True)

    torch.manual_seed(0)
    x = torch.randn(shipped.batch, 3, 224, 224)
    models = {name: torchvision.models.get_model(name, weights=None).eval() for name in VALIDATION_MODELS + extra}
    judged = judge_profiles(models_to_judge, whole_and_thin(models, x), x, 6, 3)
    print(f"1-minute load average at the end: {os.getloadavg()[0]:.2f}")
    results = {}
    for label, profile in models_to_judge.items():
        errors = {name: row["error_pct"][label] / 100 for name, row in judged.items()}
        whole = float(np.mean([abs(e) for n, e in errors.items() if " x" not in n]))
        thin = float(np.mean([abs(e) for n, e in errors.items() if " x" in n]))
        ratio = float(np.mean([abs((1 + errors[f"{n} x0.25"]) / (1 + errors[n]) - 1)
                               for n in VALIDATION_MODELS + extra]))
        results[label] = {"whole_mean_abs_error_pct": 100 * whole, "thin_mean_abs_error_pct": 100 * thin,
                          "ratio_mean_abs_error_pct": 100 * ratio,
                          "errors_pct": {n: round(100 * e, 1) for n, e in errors.items()},
                          "overheads_us": {k: round(c.overhead_us, 2) for k, c in profile.ops.items()},
                          "position_ns": {k: round(c.position_ns, 2) for k, c in profile.ops.items()}}
        print(f"{label:<41} whole {100 * whole:5.1f}%  thin {100 * thin:5.1f}%  ratio {100 * ratio:5.1f}%  overheads (us) "
              f"{results[label]['overheads_us']}  per position (ns) {results[label]['position_ns']}")
    results["measured_ms"] = {n: row["fastest_ms"] for n, row in judged.items()}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=1, help="independent timings, each fitted and judged")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--also", nargs="*", default=[], help="more torchvision networks to judge the models on")
    args = parser.parse_args()
    torch.set_num_threads(2)
    shipped = load_profile(None)
    runs = []
    for r in range(args.repeat):
        if args.repeat > 1:
            print(f"--- timing {r + 1} of {args.repeat}")
        runs.append(one_timing(shipped, args.rounds, tuple(args.also)))
    summary = {}
    if args.repeat > 1:
        print(f"--- over {args.repeat} timings: mean (worst) absolute error of the whole networks, the thin ones, "
              "and thin/whole")
        for label in runs[0]:
            if label == "measured_ms":
                continue
            errors = {key: [r[label][f"{key}_mean_abs_error_pct"] for r in runs] for key in ("whole", "thin", "ratio")}
            summary[label] = {f"{key}_{stat}": float(f(v)) for key, v in errors.items()
                              for stat, f in (("mean", np.mean), ("worst", np.max))}
            print(f"{label:<41} " + "  ".join(f"{key} {np.mean(v):5.1f}% ({np.max(v):5.1f}%)" for key, v in errors.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(runs[0] if args.repeat == 1 else {"runs": runs, "summary": summary},
                                              indent=2))


if __name__ == "__main__":
    main()
