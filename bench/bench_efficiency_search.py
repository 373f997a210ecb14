"""How fast can any MobileNetV2 structure at a MACs budget run? A measured search.

The ONNX efficiency goal (speed-up ≥ 0.9× the MACs cut at 30% of the MACs) is a claim about
every structure channel pruning and block dropping can make, so this bench looks for the
fastest one by timing, not by the latency profile's predictions. A structure is what
dnnshrink can cut MobileNetV2 to: the stem's width, every block's hidden width, every
stage's output width (the residual group), the last conv's width, and how many of each
stage's residual blocks stay (the first block of a stage has no residual and stays). Every
width is a multiple of 16 (the runtime's block; unaligned widths are slower, see
"FLOP cost against latency cost"). Networks are built from these shapes with the
BatchNorm folded into the convolutions, as onnxruntime folds it.

The search is evolutionary: per round, eight candidates mutated from the best so far
(log-normal steps on per-stage multipliers for the hidden and output widths, the stem and
the last conv, sometimes one residual block fewer or more), each scaled by one global
multiplier to the largest structure within the budget, timed interleaved with the
baseline (onnxruntime CPU, fastest runs). A round's fastest times carry the machine's
noise, and the best of hundreds of noisy draws is biased upward, so the best ``--top``
structures are timed again at the end, interleaved with the baseline and the uniform
multiplier, many rounds: that final table is the result.

    python bench/bench_efficiency_search.py [--macs 0.3] [--rounds 60] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import math
import random
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import torch
from torch import nn

from common import export, finish, imagenet_setup

# torchvision's MobileNetV2: expansion t, output channels c, blocks n, first stride s
SETTING = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
STEM, LAST, CLASSES, BLOCK = 32, 1280, 1000, 16
Structure = Dict[str, Any]  # {"stem": int, "stages": [[hidden widths], out, stride], "last": int}


def aligned(width: float) -> int:
    """``width`` rounded to the nearest multiple of the block, at least one block."""
    return max(BLOCK, int(round(width / BLOCK)) * BLOCK)


def structure(multipliers: Dict[str, Any], scale: float) -> Structure:
    """The structure of per-stage ``multipliers`` (``stem``, ``last``, ``hidden`` and ``out``
    per stage, ``depth`` per stage) times one global ``scale``."""
    stem = aligned(STEM * scale * multipliers["stem"])
    stages, cin = [], stem
    for i, (t, c, _, s) in enumerate(SETTING):
        out = aligned(c * scale * multipliers["out"][i])
        hidden, base_in = [], (STEM if i == 0 else SETTING[i - 1][1])
        for j in range(multipliers["depth"][i]):
            # the first stage has no expansion: its depthwise runs on the stem's channels
            hidden.append(cin if t == 1 else aligned((base_in if j == 0 else c) * t * scale * multipliers["hidden"][i]))
            cin = out
        stages.append([hidden, out, s])
    return {"stem": stem, "stages": stages, "last": aligned(LAST * scale * multipliers["last"])}


def baseline() -> Structure:
    """torchvision's MobileNetV2 as a structure."""
    stages, cin = [], STEM
    for t, c, n, s in SETTING:
        hidden = []
        for _ in range(n):
            hidden.append(cin * t)
            cin = c
        stages.append([hidden, c, s])
    return {"stem": STEM, "stages": stages, "last": LAST}


class Block(nn.Module):
    """An inverted residual block with its BatchNorms folded (conv + bias + ReLU6)."""

    def __init__(self, cin: int, hidden: int, out: int, stride: int):
        super().__init__()
        layers: List[nn.Module] = [] if hidden == cin else [nn.Conv2d(cin, hidden, 1), nn.ReLU6()]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden), nn.ReLU6(), nn.Conv2d(hidden, out, 1)]
        self.body, self.residual = nn.Sequential(*layers), stride == 1 and cin == out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.residual else self.body(x)


def build(s: Structure) -> nn.Module:
    """The network of structure ``s`` (eval mode)."""
    layers: List[nn.Module] = [nn.Conv2d(3, s["stem"], 3, 2, 1), nn.ReLU6()]
    cin = s["stem"]
    for hidden, out, stride in s["stages"]:
        for j, h in enumerate(hidden):
            layers.append(Block(cin, h, out, stride if j == 0 else 1))
            cin = out
    layers += [nn.Conv2d(cin, s["last"], 1), nn.ReLU6(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
               nn.Linear(s["last"], CLASSES)]
    return nn.Sequential(*layers).eval()


def macs(s: Structure) -> int:
    """Multiply-accumulates of structure ``s`` on one 224×224 image."""
    hw = 112
    total, cin = 3 * s["stem"] * 9 * hw * hw, s["stem"]
    for hidden, out, stride in s["stages"]:
        for j, h in enumerate(hidden):
            if h != cin:
                total += cin * h * hw * hw
            hw = hw // stride if j == 0 else hw
            total += h * 9 * hw * hw + h * out * hw * hw
            cin = out
    return total + cin * s["last"] * hw * hw + s["last"] * CLASSES


def at_budget(multipliers: Dict[str, Any], budget: int) -> Structure:
    """The largest structure of ``multipliers`` within ``budget`` MACs (bisection on the scale)."""
    lo, hi = 0.02, 4.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if macs(structure(multipliers, mid)) <= budget else (lo, mid)
    return structure(multipliers, lo)


def uniform() -> Dict[str, Any]:
    return {"stem": 1.0, "last": 1.0, "hidden": [1.0] * 7, "out": [1.0] * 7, "depth": [n for *_, n, _ in SETTING]}


def mutate(rng: random.Random, parent: Dict[str, Any], step: float) -> Dict[str, Any]:
    child = json.loads(json.dumps(parent))
    jitter = lambda v: float(np.clip(v * math.exp(rng.gauss(0, step)), 0.15, 4.0))  # noqa: E731
    child["stem"], child["last"] = jitter(child["stem"]), jitter(child["last"])
    child["hidden"] = [jitter(v) for v in child["hidden"]]
    child["out"] = [jitter(v) for v in child["out"]]
    if rng.random() < 0.5:  # one residual block fewer or more in a stage that has them
        i = rng.choice([i for i, (*_, n, _) in enumerate(SETTING) if n > 1])
        child["depth"][i] = max(1, min(SETTING[i][2], child["depth"][i] + rng.choice([-1, 1])))
    return child


def timed(structures: Dict[str, Structure], x: torch.Tensor, folder: Path, rounds: int,
          runs: int) -> Dict[str, Tuple[float, float]]:
    from dnnshrink_core.timing import fastest_and_median, interleaved_times, session

    sessions, feeds = {}, {}
    for label, s in structures.items():
        path = folder / f"{label}.onnx"
        export(build(s), x, path)
        sessions[label] = session(str(path), 2)
        feeds[label] = {sessions[label].get_inputs()[0].name: x.numpy()}
    return fastest_and_median(interleaved_times(sessions, feeds, rounds, runs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--macs", type=float, default=0.3, help="the budget, a share of the baseline's MACs")
    parser.add_argument("--rounds", type=int, default=60, help="search rounds of eight candidates")
    parser.add_argument("--top", type=int, default=6, help="structures timed again at the end")
    parser.add_argument("--final-rounds", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json")
    args = parser.parse_args()
    x = imagenet_setup()
    rng = random.Random(args.seed)
    base = baseline()
    budget = int(args.macs * macs(base))
    reference = at_budget(uniform(), budget)
    tried: List[Tuple[float, Dict[str, Any]]] = []
    best: Tuple[float, Dict[str, Any]] = (0.0, uniform())
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            parents = [best[1] if tried and rng.random() < 0.7 else uniform() for _ in range(8)]
            children = [mutate(rng, p, 0.3 if tried else 0.45) for p in parents]
            candidates = {f"c{i}": at_budget(m, budget) for i, m in enumerate(children)}
            t = timed({"baseline": base, "uniform": reference, **candidates}, x, Path(tmp), 4, 15)
            for i, m in enumerate(children):
                s = candidates[f"c{i}"]
                efficiency = macs(s) / macs(base) * t["baseline"][0] / t[f"c{i}"][0]
                tried.append((efficiency, m))
                best = max(best, (efficiency, m), key=lambda e: e[0])
            print(f"round {r}: baseline {1e3 * t['baseline'][0]:.2f} ms, uniform's efficiency "
                  f"{macs(reference) / macs(base) * t['baseline'][0] / t['uniform'][0]:.3f}, best so far "
                  f"{best[0]:.3f}", flush=True)
        tried.sort(key=lambda e: -e[0])
        final = {"baseline": base, "uniform": reference,
                 **{f"best{i}": at_budget(m, budget) for i, (_, m) in enumerate(tried[:args.top])}}
        t = timed(final, x, Path(tmp), args.final_rounds, 20)
    rows = []
    print(f"\n{len(tried)} structures searched; timed again ({args.final_rounds} rounds):")
    print(f"{'structure':<10}{'MACs kept':>10}{'fastest ms':>11}{'median ms':>10}{'eff.':>7}{'eff. (median)':>14}"
          f"{'search eff.':>12}")
    for label, s in final.items():
        kept = macs(s) / macs(base)
        fast, med = t[label]
        row = {"structure": label, "macs_kept": kept, "fastest_ms": 1e3 * fast, "median_ms": 1e3 * med,
               "efficiency_fastest": kept * t["baseline"][0] / fast, "efficiency_median": kept * t["baseline"][1] / med,
               "search_efficiency": tried[int(label[4:])][0] if label.startswith("best") else None, "shape": s}
        rows.append(row)
        print(f"{label:<10}{kept:>10.3f}{row['fastest_ms']:>11.2f}{row['median_ms']:>10.2f}"
              f"{row['efficiency_fastest']:>7.2f}{row['efficiency_median']:>14.2f}"
              + (f"{row['search_efficiency']:>12.2f}" if row["search_efficiency"] is not None else ""))
    finish(rows, args.json)


if __name__ == "__main__":
    main()
