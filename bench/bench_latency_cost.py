"""Structures chosen by the FLOP cost and by the calibrated latency cost, with and without
``round_to: auto``, timed with onnxruntime.

For ResNet-50 and MobileNetV2 (torchvision, weights=None) every variant uses the same
algorithm and the same masks source, so only the cost model and the rounding differ:
magnitude ranking (L1 norm of each unit's filters, normalised per group) divided by the
unit's share of the cost (its per-unit weight under that cost: MACs or predicted latency),
units dropped in that order down to the geometric midpoint of the budget, then MorphNet's
width multiplier scales the structure to the budget (rounded to the profile's channel
blocks with ``auto``), with the floor at half the uniform width as in ``morphnet``.

* equal MACs: every variant at ``--macs`` of the baseline's MACs, and the uniform width
  multiplier (the same share of every group, rounded with ``auto``) as the reference;
* equal latency: the FLOP and latency costs at ``--latency`` of the baseline's predicted
  latency (``round_to: auto``), MACs kept reported, and the capacity bound: the most MACs
  the same procedure keeps at that latency when units are ranked by MACs per predicted
  millisecond alone (:func:`capacity_bound`);
* ``scale: capacity``: the whole network cut one block of channels at a time where the MACs
  cost the most predicted time (floors at half the uniform width), at both budgets: what
  ``magnitude`` builds at a latency target with the defaults (``scale: auto``);
* depth: the latency cost's structure with whole residual branches dropped
  (``drop_branches``) while that keeps more MACs at the budget, at both budgets.

Timing: onnxruntime CPU, the profile's threads (2), batch 1, variants interleaved in
blocks, fastest and median of all timed runs.

    python bench/bench_latency_cost.py [--macs 0.3] [--latency 0.4] [--rounds 15] [--runs 6]
"""
from __future__ import annotations

import argparse

import numpy as np

import dnnshrink_core as ds
from dnnshrink_core.cost import CostModel, resolve_round_to
from dnnshrink_core.capacity import capacity_to_budget
from dnnshrink_plugins.morphnet.structure import drop_branches, scale_to_budget, uniform_fraction, width_floors

from common import (finish, imagenet_setup, latency_row, print_rows, time_networks, timing_options,
                    torchvision_models)


def magnitude(model, costs: CostModel, graph) -> np.ndarray:
    """Per unit, the mean |w| of the filters that make it, normalised by its group's mean."""
    scores = np.zeros(graph.num_units)
    for layer in costs.layers:
        owner, _, attr = layer.weight.rpartition(".")
        w = getattr(model.get_submodule(owner), attr).detach().abs().flatten(1).mean(1).numpy()
        np.add.at(scores, layer.out_units, w[: len(layer.out_units)])
    for group in graph.groups:
        mean = scores[group.units].mean()
        if mean > 0:
            scores[group.units] /= mean
    return scores


def midpoint_then_multiplier(graph, ranking, order, budget_costs: CostModel, budget: float, multiple,
                             exponent: float = 0.5, floor_share: float = 0.5) -> np.ndarray:
    """The procedure every structure here shares (MorphNet's, without training): drop units
    by ``ranking`` (lowest first, in ``budget_costs``) down to the budget's geometric midpoint
    (``exponent`` 1: to the budget itself), then one width multiplier to the budget, keeping
    each group's best units by ``order``, with the floor at ``floor_share`` of the uniform
    width (0: none)."""
    ones = np.ones(graph.num_units, dtype=bool)
    midpoint = budget_costs.initial * (budget / budget_costs.initial) ** exponent
    learned = budget_costs.cheapest_first(ones, ranking, midpoint, graph.unit_removable)
    floors = width_floors(graph, budget_costs.cost, budget, ~graph.unit_frozen, floor_share) if floor_share else None
    return scale_to_budget(graph, learned, order, budget_costs.cost, budget, 1, multiple, floors)


def structure(graph, scores, chooser: CostModel, budget_costs: CostModel, budget: float, multiple) -> np.ndarray:
    """Drop units by magnitude per unit of ``chooser``'s cost down to the budget's geometric
    midpoint (in ``budget_costs``), then one width multiplier to the budget."""
    removable = graph.unit_removable
    weights = chooser.unit_weights(np.ones(graph.num_units, dtype=bool))
    # within a group every unit has the same weight, so each group's best unit by ``ranking``
    # (which cheapest_first keeps) is its best by magnitude
    ranking = scores / np.maximum(weights / weights[removable].mean(), 1e-12)
    return midpoint_then_multiplier(graph, ranking, scores, budget_costs, budget, multiple)


def macs_per_ms(graph, flops: CostModel, latency: CostModel) -> np.ndarray:
    """Per unit, its MACs per unit of predicted latency (the profile's roofline)."""
    ones = np.ones(graph.num_units, dtype=bool)
    return flops.unit_weights(ones) / np.maximum(latency.unit_weights(ones), 1e-18)


def capacity_bound(graph, flops: CostModel, latency: CostModel, budget: float, multiple) -> np.ndarray:
    """The structure with the most MACs this procedure can keep at a predicted latency: units
    ranked by MACs per unit of predicted latency alone (no magnitude), cut to the budget's
    midpoint, then the width multiplier with the floor. What a latency cost could buy in
    capacity if nothing but capacity mattered."""
    ratio = macs_per_ms(graph, flops, latency)
    return midpoint_then_multiplier(graph, ratio, ratio, latency, budget, multiple)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "mobilenet_v2"])
    parser.add_argument("--macs", type=float, default=0.3)
    parser.add_argument("--latency", type=float, default=0.4)
    timing_options(parser)
    args = parser.parse_args()
    x = imagenet_setup()
    rows = []
    for name, model, graph, flops, latency in torchvision_models(args.models, x):
        scores = magnitude(model, flops, graph)
        auto, _ = resolve_round_to(graph, model, "auto")
        variants = {"baseline": np.ones(graph.num_units, dtype=bool)}
        # the reference without a structure: the uniform width multiplier, rounded the same way
        uniform = uniform_fraction(graph, scores, flops.cost, args.macs * flops.initial, ~graph.unit_frozen)
        variants["uniform multiplier, round_to auto @MACs"] = scale_to_budget(
            graph, uniform, scores, flops.cost, args.macs * flops.initial, 1, auto)
        for chooser_name, chooser in (("flops", flops), ("latency", latency)):
            for rounding, multiple in (("1", 1), ("auto", auto)):
                variants[f"{chooser_name} cost, round_to {rounding} @MACs"] = structure(
                    graph, scores, chooser, flops, args.macs * flops.initial, multiple)
            variants[f"{chooser_name} cost, round_to auto @latency"] = structure(
                graph, scores, chooser, latency, args.latency * latency.initial, auto)
        variants["capacity bound, round_to auto @latency"] = capacity_bound(
            graph, flops, latency, args.latency * latency.initial, auto)
        # the pipeline's scale: capacity (as the magnitude algorithm takes it): the whole network
        # cut one block at a time where MACs cost the most predicted time, floors at half the
        # uniform width
        for budget_name, budget_costs, budget in (("MACs", flops, args.macs * flops.initial),
                                                  ("latency", latency, args.latency * latency.initial)):
            floors = width_floors(graph, budget_costs.cost, budget, ~graph.unit_frozen, 0.5)
            variants[f"scale: capacity, round_to auto @{budget_name}"] = capacity_to_budget(
                graph, np.ones(graph.num_units, dtype=bool), scores, budget_costs.cost, budget, latency.cost,
                flops.cost, 1, auto, floors, grow=True)
        # depth: whole residual branches dropped where that keeps more MACs at the budget
        macs_value = flops.unit_weights(np.ones(graph.num_units, dtype=bool))
        for budget_name, budget_costs, budget in (("MACs", flops, args.macs * flops.initial),
                                                  ("latency", latency, args.latency * latency.initial)):
            floors = width_floors(graph, budget_costs.cost, budget, ~graph.unit_frozen, 0.5)
            variants[f"latency cost + branches dropped @{budget_name}"] = drop_branches(
                graph, structure(graph, scores, latency, budget_costs, budget, auto), macs_value,
                lambda seed: scale_to_budget(graph, seed, scores, budget_costs.cost, budget, 1, auto, floors))
        nets = {label: model if label == "baseline" else ds.generate(model, x, {g.name: keep[g.units] for g in graph})
                for label, keep in variants.items()}
        timed = time_networks(nets, x, args.rounds, args.runs)
        for label, keep in variants.items():
            rows.append(latency_row(name, label, flops.cost(keep) / flops.initial, latency.cost(keep), timed[label],
                                    timed["baseline"]))
    print_rows(rows)
    finish(rows, args.json)


if __name__ == "__main__":
    main()
