"""Behaviour at the edges, where deliberately planted bugs once went unnoticed: the alive
threshold at a value float32 holds exactly, the cost's per-unit weights against finite
differences of the cost itself, and atomic writes that fail part-way."""
from __future__ import annotations

import os
import stat

import numpy as np
import pytest
import torch
from torch import nn

import dnnshrink_core as ds
from dnnshrink_core.cost import CostModel
from dnnshrink_core.fileio import atomic_path, atomic_write
from helpers import max_relative_error, zero_units
from models import HANDWRITTEN, MixedConvNet


def test_a_scale_equal_to_the_threshold_is_dead():
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 3)).eval()
    with torch.no_grad():  # 0.5 is exact in float32: |gamma| > threshold is false for ±0.5
        model[1].weight.copy_(torch.tensor([0.5, -0.5, 0.75, 1.0, -0.5000001, 0.4999999]))
    masks = ds.alive_masks(model, torch.randn(1, 3, 8, 8), threshold=0.5)
    (name,) = [n for n in masks if len(masks[n]) == 6]
    assert np.asarray(masks[name]).tolist() == [False, False, True, True, True, False]


@pytest.mark.parametrize("name", ["concat", "depthwise", "literal_view", "squeeze_excitation"])
def test_unit_weights_are_the_finite_differences_of_the_cost(name):
    factory, shape = HANDWRITTEN[name]
    model = factory().eval()
    graph = ds.trace(model, torch.randn(shape))
    costs = CostModel(graph, model)
    rng = np.random.default_rng(0)
    # a unit read and written by the same layer makes the cost quadratic in it: skip those
    both = {int(u) for layer in range(len(costs.coef)) if not costs.depthwise[layer]
            for u in set(costs.in_units[costs.in_layer == layer]) & set(costs.out_units[costs.out_layer == layer])}
    tested = 0
    for trial in range(3):
        alive = rng.random(graph.num_units) < (0.3, 0.6, 0.9)[trial]
        weights = costs.unit_weights(alive)
        for u in rng.choice(graph.num_units, size=min(60, graph.num_units), replace=False):
            if int(u) in both:
                continue
            with_u, without_u = alive.copy(), alive.copy()
            with_u[u], without_u[u] = True, False
            assert weights[u] == pytest.approx(costs.cost(with_u) - costs.cost(without_u), rel=1e-9, abs=1e-9), u
            tested += 1
    assert tested > 60


def test_a_layer_that_is_only_part_of_its_group_keeps_an_output_channel():
    """A mask that empties one piece of a concatenation joined to a residual would leave a
    conv with no output channel, which cannot be built: its first channel is frozen."""
    model, x = MixedConvNet().eval(), torch.randn(2, 3, 8, 8)
    graph = ds.trace(model, x)
    layers = {layer.name: layer for layer in graph.layers()}
    first, second = layers["pieces.0"].out_units, layers["pieces.1"].out_units
    assert graph.unit_frozen[[first[0], second[0]]].all()
    assert not graph.unit_frozen[np.r_[first[1:], second[1:]]].any()
    (reason,) = {graph.reasons[r] for r in graph.unit_reason[second[:1]]}
    assert "pieces.1 keeps at least one output channel" in reason
    # every other channel of the second piece removed: the network builds, runs and is exact
    removed = second[1:]
    zero_units(model, graph, removed)
    keep = np.ones(graph.num_units, dtype=bool)
    keep[removed] = False
    small = ds.generate(model, x, {g.name: keep[g.units] for g in graph})
    assert small.pieces[1].out_channels == 1 and small.pieces[0].out_channels == 6
    with torch.no_grad():
        assert max_relative_error(model(x), small(x)) < 1e-5


def test_the_shape_check_leaves_a_conv_without_channels_to_a_real_run():
    """Torch refuses a conv with no output (or input) channel; the shape rules that stand in
    for running a generated network must not pass one (the real run then says why)."""
    from torch import fx

    from dnnshrink_core.shapes import infer_specs

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    graph, x = fx.symbolic_trace(model).graph, torch.randn(1, 3, 8, 8)
    assert infer_specs(graph, dict(model.named_modules(remove_duplicate=False)), [x]) is not None
    model[0].weight = nn.Parameter(model[0].weight[:0].detach())
    model[0].bias, model[0].out_channels = None, 0
    assert infer_specs(graph, dict(model.named_modules(remove_duplicate=False)), [x]) is None
    with pytest.raises(RuntimeError, match="expected weight to be at least 1 at dimension 0"):
        model(x)


def test_atomic_write_that_fails_part_way_leaves_the_old_file(tmp_path):
    path = tmp_path / "report.json"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_write(path, "w") as handle:
            handle.write("new, half written")
            raise RuntimeError("disk full")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # no temporary file left
    with pytest.raises(RuntimeError, match="renderer crashed"):
        with atomic_path(tmp_path / "graph.svg") as tmp:
            tmp.write_text("<svg")
            raise RuntimeError("renderer crashed")
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]
    with atomic_write(path, "w") as handle:
        handle.write("new")
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_atomic_files_get_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "a.json", "w") as handle:
            handle.write("{}")
        with atomic_path(tmp_path / "b.png") as tmp:
            tmp.write_bytes(b"png")
        plain = tmp_path / "c.txt"
        plain.write_text("x")
    finally:
        os.umask(umask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == {"a.json": 0o644, "b.png": 0o644, "c.txt": 0o644}
