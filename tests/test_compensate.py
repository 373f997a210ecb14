"""Removed channels whose BatchNorm scale is zero but whose shift is not carry act(beta);
the generator folds that into the next layers' biases, so the output stays the same."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import dnnshrink_core as ds
from helpers import max_relative_error, state_copy, states_equal


def pw_bn(cin, cout, groups=1):
    return nn.Sequential(nn.Conv2d(cin, cout, 1, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class PointwiseNet(nn.Module):
    """1×1 convs (one grouped), a residual add, pooling, and a flatten → linear head."""

    def __init__(self):
        super().__init__()
        self.a = pw_bn(3, 16)
        self.b = pw_bn(16, 16, groups=2)
        self.c = pw_bn(16, 16)
        self.d = pw_bn(16, 8)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(8 * 2 * 2, 5)

    def forward(self, x):
        y = self.a(x)
        y = self.c(self.b(y)) + y
        return self.fc(torch.flatten(self.pool(self.d(y)), 1))


def dead_scales(model, beta_scale, seed=0):
    """Zero the scale of a random half of every BatchNorm; shifts random (or zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight[torch.randperm(n, generator=g)[: n // 2]] = 0.0
                m.bias.copy_(torch.randn(n, generator=g) * beta_scale)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    return model.eval()


X = torch.randn(3, 3, 4, 4)


def test_constant_channels_are_folded_exactly():
    model = dead_scales(PointwiseNet(), beta_scale=1.0)
    before = state_copy(model)
    masks = ds.alive_masks(model, X)
    assert sum(int((~m).sum()) for m in masks.values()) > 0
    with torch.no_grad():
        reference = model(X)
        folded = ds.generate(model, X, masks)(X)
        plain = ds.generate(model, X, masks, compensate=False)(X)
    assert max_relative_error(reference, folded) < 1e-5
    assert max_relative_error(reference, plain) > 1e-2  # without folding the output moves
    assert states_equal(before, state_copy(model))


def test_zero_channels_change_nothing():
    model = dead_scales(PointwiseNet(), beta_scale=0.0)
    masks = ds.alive_masks(model, X)
    folded = ds.generate(model, X, masks)
    plain = ds.generate(model, X, masks, compensate=False)
    # no bias added anywhere, the same parameters, the same values
    assert states_equal(state_copy(folded), state_copy(plain))



@pytest.mark.parametrize("beta_scale, passes", [(0.0, 0), (1.0, 1)])
def test_the_model_runs_only_when_a_removed_channel_carries_something(beta_scale, passes):
    """Channels with gamma = beta = 0 carry exact zeros: nothing to measure, no forward pass
    of the model (the new network, which carries the model's hooks, runs once: the check
    that it runs on the example)."""
    model = dead_scales(PointwiseNet(), beta_scale=beta_scale)
    masks = ds.alive_masks(model, X)
    calls = []
    handle = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        ds.generate(model, X, masks)
    finally:
        handle.remove()
    assert len(calls) == passes + 1


def test_new_bias_is_trainable_and_exported(tmp_path):
    model = dead_scales(PointwiseNet(), beta_scale=1.0)
    small = ds.generate(model, X, ds.alive_masks(model, X))
    assert model.c[0].bias is None  # the user's layer keeps its settings
    assert small.c[0].bias is not None and small.c[0].bias.requires_grad
    assert any(p is small.c[0].bias for p in small.parameters())
    ds.export(small, X, "pytorch", tmp_path / "small.dnnshrink")
    loaded = ds.load(tmp_path / "small.dnnshrink")
    with torch.no_grad():
        assert torch.equal(loaded(X), small(X))


def test_folding_on_torchvision_models():
    torchvision = pytest.importorskip("torchvision")
    x = torch.randn(2, 3, 128, 128)
    errors = {}
    for name in ("mobilenet_v2", "resnet18"):
        torch.manual_seed(0)
        model = dead_scales(torchvision.models.get_model(name, weights=None), beta_scale=0.5)
        masks = ds.alive_masks(model, x)
        with torch.no_grad():
            reference = model(x)
            errors[name] = [max_relative_error(reference, ds.generate(model, x, masks, compensate=c)(x))
                            for c in (True, False)]
    # MobileNetV2's removed channels only reach 1×1 convs: exact again
    assert errors["mobilenet_v2"][0] < 1e-4 < 1e-2 < errors["mobilenet_v2"][1]
    # ResNet's 3×3 convs see zero padding at the borders, where a bias cannot stand in
    folded, plain = errors["resnet18"]
    assert folded < 0.5 * plain


def test_channels_cut_with_live_scales_are_not_folded():
    model = PointwiseNet().eval()  # scales 1: nothing is constant
    graph = ds.trace(model, X)
    masks = {g.name: torch.arange(g.size) % 2 == 0 for g in graph if g.removable.all() and g.size > 1}
    assert masks
    folded = ds.generate(model, X, masks)
    plain = ds.generate(model, X, masks, compensate=False)
    assert states_equal(state_copy(folded), state_copy(plain))
