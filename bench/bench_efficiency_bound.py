"""The best ONNX efficiency (speed-up / MACs cut) a channel structure can reach, by the
calibrated latency profile, and (``--time``) as measured.

For each model (torchvision, ``weights=None``) two ways of spending the MACs budget where
they cost the least time:

* **unit ranking** (the first version of this bench): every removable unit ranked by MACs
  per predicted millisecond at full width, the units cheapest in MACs for their time go
  first down to the budget's geometric midpoint (or straight to the budget with exponent
  1), then MorphNet's width multiplier with ``round_to: auto`` meets the budget, with or
  without the floor at half the uniform width;
* **group steps**: from the whole network, one block of channels (the group's
  ``round_to: auto`` multiple, its worst units by magnitude) at a time leaves the group where
  that saves the most predicted time per MAC removed, each step priced exactly by the
  profile at the structure it acts on (a unit's price at full width is not its price once
  its layer is thin: the roofline bends), until the budget is met; with no floor, or with
  no group under ``--floors`` shares of the uniform width.

The same at ``--latency`` of the predicted latency (rows ``@latency``): the MACs each way
keeps at equal predicted latency, against the bench's FLOP and latency costs there.
Beside them the uniform width multiplier and the bench's default (MACs per unit of
magnitude, midpoint, multiplier, floor: what ``bench_latency_cost.py`` calls "flops cost,
round_to auto @MACs"). What this ranks by is capacity (MACs) per time, not accuracy: the
structures show what the runtime allows, not what a trained network would choose.

    python bench/bench_efficiency_bound.py [--macs 0.3] [--models mobilenet_v2 resnet50]
        [--floors 0 0.25 0.5] [--latency 0.4] [--time [--rounds 20 --runs 10 --json PATH]]
"""
from __future__ import annotations

import argparse
from typing import Dict, Optional

import numpy as np

import dnnshrink_core as ds
from dnnshrink_core.capacity import capacity_to_budget
from dnnshrink_core.cost import CostModel, resolve_round_to
from dnnshrink_plugins.morphnet.structure import enforce_widths, scale_to_budget, uniform_fraction, width_floors

from bench_latency_cost import macs_per_ms, magnitude, midpoint_then_multiplier, structure
from common import finish, imagenet_setup, latency_row, print_rows, time_networks, timing_options, \
    torchvision_models


def group_steps(graph, flops: CostModel, latency: CostModel, scores: np.ndarray, budget: float, multiples,
                floors: Optional[np.ndarray] = None, in_latency: bool = False) -> np.ndarray:
    """The whole network brought to ``budget`` in MACs (``in_latency``: in predicted latency)
    by the pipeline's capacity step alone (:func:`~dnnshrink_core.capacity.capacity_to_budget`:
    one multiple of channels at a time, the worst by ``scores``, from the group where that
    saves the most predicted time per MAC removed), with no group under ``floors``."""
    cost = latency if in_latency else flops
    return capacity_to_budget(graph, np.ones(graph.num_units, dtype=bool), scores, cost.cost, budget, latency.cost,
                              flops.cost, 1, multiples, floors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mobilenet_v2", "resnet50"])
    parser.add_argument("--macs", type=float, default=0.3)
    parser.add_argument("--floors", nargs="+", type=float, default=[0.0, 0.25, 0.5],
                        help="group steps: shares of the uniform width no group goes under")
    parser.add_argument("--latency", type=float, default=0.4,
                        help="also at this share of the predicted latency: the MACs each structure keeps there")
    parser.add_argument("--time", action="store_true", help="also generate every structure and time it")
    timing_options(parser)
    args = parser.parse_args()
    x = imagenet_setup()
    rows = []
    print(f"{'model':<14}{'structure':<40}{'MACs kept':>10}{'pred ms':>9}{'base ms':>9}{'1-wide ms':>10}"
          f"{'pred eff.':>10}")
    for name, model, graph, flops, latency in torchvision_models(args.models, x):
        budget = args.macs * flops.initial
        auto, _ = resolve_round_to(graph, model, "auto")
        scores = magnitude(model, flops, graph)
        # every layer one channel wide (and what must stay, whole): the per-call costs that no
        # channel cut lowers, a floor under any structure's latency
        narrowest = enforce_widths(graph, graph.unit_frozen.copy(), np.zeros(graph.num_units), 1, 1)
        fixed = latency.cost(narrowest)
        uniform = uniform_fraction(graph, scores, flops.cost, budget, ~graph.unit_frozen)
        variants: Dict[str, np.ndarray] = {
            "baseline": np.ones(graph.num_units, dtype=bool),
            "uniform multiplier": scale_to_budget(graph, uniform, scores, flops.cost, budget, 1, auto),
            "flops cost (the bench's default)": structure(graph, scores, flops, flops, budget, auto)}
        ratio = macs_per_ms(graph, flops, latency)  # the units with the most MACs per predicted ms go last
        for exponent in (0.5, 1.0):
            for floor_share in (0.5, 0.0):
                variants[f"unit ranking, exponent {exponent:g}, floor {floor_share:g}"] = midpoint_then_multiplier(
                    graph, ratio, ratio, flops, budget, auto, exponent, floor_share)
        for share in args.floors:
            floors = width_floors(graph, flops.cost, budget, ~graph.unit_frozen, share) if share else None
            variants[f"group steps, floor {share:g}"] = group_steps(graph, flops, latency, scores, budget, auto,
                                                                    floors)
        at_latency = args.latency * latency.initial
        variants["flops cost (the bench's default) @latency"] = structure(graph, scores, flops, latency, at_latency,
                                                                          auto)
        variants["latency cost (the bench's) @latency"] = structure(graph, scores, latency, latency, at_latency, auto)
        for share in args.floors:
            floors = width_floors(graph, latency.cost, at_latency, ~graph.unit_frozen, share) if share else None
            variants[f"group steps, floor {share:g} @latency"] = group_steps(graph, flops, latency, scores, at_latency,
                                                                             auto, floors, in_latency=True)
        for label, keep in variants.items():
            kept, predicted = flops.cost(keep) / flops.initial, latency.cost(keep)
            print(f"{name:<14}{label:<40}{kept:>10.3f}{predicted:>9.2f}{latency.initial:>9.2f}{fixed:>10.2f}"
                  f"{kept * latency.initial / predicted:>10.2f}")
        if args.time:
            nets = {label: model if label == "baseline" else ds.generate(model, x, {g.name: keep[g.units]
                                                                                   for g in graph})
                    for label, keep in variants.items()}
            timed = time_networks(nets, x, args.rounds, args.runs)
            for label, keep in variants.items():
                rows.append(latency_row(name, label, flops.cost(keep) / flops.initial, latency.cost(keep),
                                        timed[label], timed["baseline"],
                                        widths={g.name: int(keep[g.units].sum()) for g in graph.groups}))
    if args.time:
        print()
        print_rows(rows, width=40)
        finish(rows, args.json)


if __name__ == "__main__":
    main()
