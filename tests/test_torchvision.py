"""The invariant on every torchvision classification model that contains BatchNorm.

A sample runs by default; the whole sweep runs with ``pytest -m slow tests/test_torchvision.py``.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import dnnshrink_core as ds
from helpers import kill_half, max_relative_error, n_params, zero_units

torchvision = pytest.importorskip("torchvision")

SAMPLE = {"resnet18", "mobilenet_v3_small", "densenet121", "efficientnet_b0", "shufflenet_v2_x0_5", "googlenet",
          "regnet_y_400mf", "mnasnet0_5", "resnext50_32x4d", "vgg11_bn"}
INPUT_SIZE = {"inception_v3": 299, "maxvit_t": 224}
MODELS = sorted(torchvision.models.list_models(module=torchvision.models))


def half_dead(name: str) -> tuple:
    """torchvision's ``name`` (weights=None) with half its channels dead, in eval mode, and an
    input batch of 2 (skips a model without BatchNorm)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torchvision.models.get_model(name, weights=None)
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        pytest.skip(f"{name} has no BatchNorm")
    size = INPUT_SIZE.get(name, 64)
    return kill_half(model).eval(), torch.randn(2, 3, size, size)


@pytest.mark.parametrize("name", [n if n in SAMPLE else pytest.param(n, marks=pytest.mark.slow) for n in MODELS])
def test_torchvision_invariant(name, tmp_path):
    model, x = half_dead(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ds.UnknownOpWarning)
        small = ds.generate(model, x, ds.alive_masks(model, x))
    assert n_params(small) < n_params(model)
    with torch.no_grad():
        assert max_relative_error(model(x), small(x)) < 1e-4
    # the shrunk network saves and loads under the artifact's allowlist
    ds.export(small, x, "pytorch", tmp_path / "m.dnnshrink")
    with torch.no_grad():
        assert max_relative_error(small.eval()(x), ds.load(tmp_path / "m.dnnshrink")(x)) < 1e-6
    if name in ("googlenet", "inception_v3"):  # auxiliary classifiers only run in training mode
        # batch statistics of a batch of 2 amplify float32 rounding: compare in float64
        model, small, x = model.double(), small.double(), x.double()
        for net in (model, small):
            net.train()
            for m in net.modules():
                if isinstance(m, nn.modules.dropout._DropoutNd):
                    m.eval()  # keep the comparison deterministic
        with torch.no_grad():
            assert max_relative_error(model(x), small(x)) < 1e-4


@pytest.mark.slow  # the default suite drops blocks of smaller nets (tests/test_branches.py)
@pytest.mark.parametrize("name", MODELS)
def test_torchvision_dead_blocks_go_whole(name, tmp_path):
    """Every other droppable residual block with its cut groups dead (gamma = beta = 0):
    ``alive_masks`` empties them, ``generate`` drops those blocks whole, and the outputs stay
    the model's own; the network exports to ONNX and verifies."""
    from dnnshrink_core import branches

    model, x = half_dead(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = ds.trace(model, x)
    if not graph.branches:
        pytest.skip(f"{name} has no residual branch with channel groups of its own")
    picks = graph.branches[::2]
    zero_units(model, graph, np.concatenate([graph.groups[g].units for b in picks for g in b.own]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ds.UnknownOpWarning)
        masks = ds.alive_masks(model, x)
        small = ds.generate(model, x, masks)
    assert len(branches.dropped(graph, graph.units_from_masks(masks))) == len(picks)
    called = {n.target for n in small.graph.nodes if n.op == "call_module"}
    assert not any(called & b.layers for b in picks)
    with torch.no_grad():
        assert max_relative_error(model(x), small(x)) < 1e-4
    assert ds.export(small, x, "onnx", tmp_path / "m.onnx")["max_relative_error"] < 1e-4
