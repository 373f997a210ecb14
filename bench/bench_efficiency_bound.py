"""The best ONNX efficiency (speed-up / MACs cut) a channel structure can reach, by the
calibrated latency profile.

For each model (torchvision, ``weights=None``) every removable unit is ranked by MACs per
predicted millisecond, the units cheapest in MACs for their time go first down to the
budget's geometric midpoint (or straight to the budget with ``--exponent 1``), then
MorphNet's width multiplier with ``round_to: auto`` meets the MACs budget, with or without
the floor at half the uniform width. The profile's prediction of that structure's latency
gives its efficiency; the predicted latency with every layer one channel wide is printed
beside it: the per-call costs, which no channel cut lowers. Nothing is timed: the profile's predictions agree with measured efficiencies in
``docs/benchmarks.md``.

    python bench/bench_efficiency_bound.py [--macs 0.3] [--models mobilenet_v2 resnet50]
"""
from __future__ import annotations

import argparse

import numpy as np
import torchvision

import dnnshrink_core as ds
from dnnshrink_core.cost import CostModel, resolve_round_to
from dnnshrink_plugins.morphnet.structure import enforce_widths

from bench_latency_cost import macs_per_ms, midpoint_then_multiplier
from common import imagenet_setup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mobilenet_v2", "resnet50"])
    parser.add_argument("--macs", type=float, default=0.3)
    args = parser.parse_args()
    x = imagenet_setup()
    print(f"{'model':<14}{'exponent':>9}{'floor':>7}{'MACs kept':>11}{'pred ms':>9}{'base ms':>9}"
          f"{'1-wide ms':>10}{'pred eff.':>11}")
    for name in args.models:
        model = torchvision.models.get_model(name, weights=None).eval()
        graph = ds.trace(model, x)
        flops, latency = CostModel(graph, model, "flops"), CostModel(graph, model, "latency")
        auto, _ = resolve_round_to(graph, model, "auto")
        # every layer one channel wide (and what must stay, whole): the per-call costs that no
        # channel cut lowers, a floor under any structure's latency
        narrowest = enforce_widths(graph, graph.unit_frozen.copy(), np.zeros(graph.num_units), 1, 1)
        fixed = latency.cost(narrowest)
        ratio = macs_per_ms(graph, flops, latency)  # the units with the most MACs per predicted ms go last
        for exponent in (0.5, 1.0):
            for floor_share in (0.5, 0.0):
                keep = midpoint_then_multiplier(graph, ratio, ratio, flops, args.macs * flops.initial, auto,
                                                exponent, floor_share)
                cut = flops.initial / flops.cost(keep)
                predicted = latency.cost(keep)
                print(f"{name:<14}{exponent:>9}{floor_share:>7}{1 / cut:>11.3f}{predicted:>9.2f}"
                      f"{latency.initial:>9.2f}{fixed:>10.2f}{latency.initial / predicted / cut:>11.2f}")


if __name__ == "__main__":
    main()
