"""The public API's contract: errors, caching, masks, and leaving the user's model alone."""
from __future__ import annotations


import numpy as np
import pytest
import torch
from torch import nn

import dnnshrink_core as ds
from dnnshrink_core.recording import SpecializedTraceWarning
from helpers import kill_half, max_relative_error, state_copy, states_equal
from models import HANDWRITTEN, ConcatNet, GenerateGraphNet, LiteralView, conv_bn


def test_trace_is_printable_and_lists_groups():
    model, x = ConcatNet().eval(), torch.randn(1, 3, 12, 12)
    graph = ds.trace(model, x)
    text = str(graph)
    assert "ChannelGraph of ConcatNet" in text and "removable" in text
    for group in graph:
        assert group.name in text
    # the three inception branches and the dense layers are separate groups
    assert {"b1.0", "b2.1.0", "b3.1.0", "dense1.2", "dense2.2"} <= set(graph.group_names)
    assert graph["b1.0"].size == 8
    assert "dense2.0:features" in graph["b1.0"].members  # b1's channels reach dense2's BatchNorm
    assert graph.summary()["units"] == sum(g.size for g in graph)


def test_trace_is_cached_until_the_structure_changes():
    model, x = ConcatNet().eval(), torch.randn(1, 3, 12, 12)
    first = ds.trace(model, x)
    assert ds.trace(model, x) is first
    assert ds.trace(model, torch.randn(1, 3, 16, 16)) is not first
    model.fc = nn.Linear(34, 6)
    assert ds.trace(model, x).fingerprint != first.fingerprint


def test_no_batchnorm_is_a_clear_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3))
    with pytest.raises(ds.NoBatchNormError, match="has no BatchNorm layer") as caught:
        ds.alive_masks(model, torch.randn(1, 3, 8, 8))
    assert "Frozen" not in str(caught.value)
    # a pretrained detection backbone's frozen BatchNorms are named, with the way out
    from torchvision.ops import FrozenBatchNorm2d
    frozen = nn.Sequential(nn.Conv2d(3, 4, 3), FrozenBatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 3))
    with pytest.raises(ds.NoBatchNormError, match=r"Its normalisations are FrozenBatchNorm2d: fixed scales.*"
                                                  r"norm_layer=nn.BatchNorm2d"):
        ds.alive_masks(frozen, torch.randn(1, 3, 8, 8))


def test_wrong_input_shape_is_a_clear_error():
    with pytest.raises(ds.TraceError, match="example_inputs"):
        ds.trace(LiteralView(), torch.randn(1, 1, 32, 32))


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = conv_bn(3, 8)
        self.gate = Gate()
        self.b = conv_bn(8, 4)

    def forward(self, x):
        return self.b(self.gate(self.a(x)))


class Gate(nn.Module):
    def forward(self, x):
        if x.mean() > 0:  # control flow on a tensor value: fx cannot trace it
            return x * 2
        return x


def test_untraceable_module_is_named_recorded_instead_and_leaf_modules_helps():
    model, x = DataDependent().eval(), torch.randn(1, 3, 8, 8)
    # fx cannot follow the branch on a tensor value: the model is recorded by running it, the
    # warning names the module, and the channels the branch's value depends on are kept
    with pytest.warns(SpecializedTraceWarning, match=r"module `gate` \(Gate\).*by running it"):
        graph = ds.trace(model, x)
    assert graph.traces[0].specialized
    assert not graph.group_of("a.0").removable.any()
    assert any("reduces over every dimension" in r for r in graph.group_of("a.0").frozen_reasons)
    with pytest.warns(ds.UnknownOpWarning, match="Gate"):
        graph = ds.trace(model, x, leaf_modules=["gate"])
    assert not graph.group_of("a.0").removable.any()
    assert graph.group_of("b.0") is not None


def test_masks_are_validated():
    model, x = kill_half(LiteralView()).eval(), torch.randn(1, 3, 32, 32)
    masks = ds.alive_masks(model, x)
    with pytest.raises(ds.MaskError, match="unknown group 'conv3'.*Did you mean 'conv"):
        ds.generate(model, x, {"conv3": [True] * 6})
    with pytest.raises(ds.MaskError, match="has shape \\(5,\\); the group has 6 units"):
        ds.generate(model, x, {"conv1": [True] * 5})
    with pytest.raises(ds.MaskError, match="frozen"):
        ds.generate(model, x, {"fc2": [False] + [True] * 9})
    with pytest.warns(ds.DnnshrinkWarning, match="removes every unit"):
        small = ds.generate(model, x, {"conv1": [False] * 6})
    assert small.conv1.out_channels == 1
    assert masks.graph is ds.trace(model, x)


def test_partial_masks_keep_other_groups_whole():
    model, x = LiteralView().eval(), torch.randn(1, 3, 32, 32)
    small = ds.generate(model, x, {"conv2": np.arange(16) % 2 == 0})
    assert small.conv2.out_channels == 8 and small.fc1.in_features == 200
    assert small.conv1.out_channels == 6 and small.fc1.out_features == 120
    assert small(x).shape == (1, 10)


def test_alive_rule_uses_threshold():
    model, x = LiteralView().eval(), torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        model.bn1.weight.copy_(torch.tensor([1.0, 5e-3, -0.5, 2e-2, -1e-3, 0.3]))
    assert ds.alive_masks(model, x)["conv1"].tolist() == [True, False, True, True, False, True]
    assert ds.alive_masks(model, x, threshold=0.1)["conv1"].tolist() == [True, False, True, False, False, True]
    gap = ds.alive_masks(model, x, threshold=None)
    assert 5e-3 < gap.threshold < 0.3


def test_user_model_is_untouched_and_result_is_independent():
    for name in ("generate_graph", "channel_pad_shortcut", "literal_view"):
        factory, shape = HANDWRITTEN[name]
        model = kill_half(factory()).train()
        x = torch.randn(shape)
        before, attrs = state_copy(model), dict(vars(model))
        flags = [m.training for m in model.modules()]
        small = ds.generate(model, x, ds.alive_masks(model, x))
        assert states_equal(before, state_copy(model))
        assert dict(vars(model)).keys() == attrs.keys()
        assert [m.training for m in model.modules()] == flags
        assert small.training
        with torch.no_grad():
            for p in small.parameters():
                p.add_(1.0)
        assert states_equal(before, state_copy(model))


class CachedBias(nn.Module):
    """Caches a per-channel bias in a dict in eval mode, keyed by device (timm LeViT's and
    EfficientFormerV2's attention-bias caches do this)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(conv_bn(3, 16, 3), conv_bn(16, 8, 1))
        self.bias = nn.Parameter(torch.randn(8))
        self.cache = {}

    def forward(self, x):
        key = str(x.device)
        if not self.training and key not in self.cache:
            self.cache[key] = self.bias[None, :, None, None] * 2
        return self.body(x) + (self.cache[key] if not self.training else 2 * self.bias[None, :, None, None])


def test_a_cache_filled_while_tracing_is_emptied_again():
    model, x = kill_half(CachedBias()).eval(), torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
    model.cache.clear()
    graph = ds.trace(model, x)
    assert model.cache == {}  # no traced Proxy left in the user's model
    small = ds.generate(model, x, ds.alive_masks(model, x))
    assert model.cache == {}
    assert all(isinstance(v, torch.Tensor) for v in small.cache.values())  # its own checks ran it for real
    with torch.no_grad():
        assert max_relative_error(model(x), expected) == 0
        assert max_relative_error(small(x), expected) < 1e-5
    model.cache.clear()
    assert ds.trace(small, x).num_units < graph.num_units  # a shrunk copy traces again


def test_shrunk_model_trains():
    model, x = kill_half(HANDWRITTEN["depthwise"][0]()).eval(), torch.randn(4, 3, 16, 16)
    small = ds.generate(model, x, ds.alive_masks(model, x)).train()
    opt = torch.optim.SGD(small.parameters(), lr=0.01)
    loss = small(x).square().mean()
    loss.backward()
    opt.step()
    assert all(p.grad is not None for p in small.parameters() if p.requires_grad)


def test_generate_graph_attribute_is_honoured():
    model, x = GenerateGraphNet().eval(), torch.randn(1, 3, 8, 8)
    graph = ds.trace(model, x)
    modes = [t.mode for t in graph.traces]
    assert modes[0]["generate_graph"] is True and any(m["generate_graph"] is False for m in modes)
    assert model.generate_graph is False


def test_every_handwritten_model_gets_the_same_result_twice():
    factory, shape = HANDWRITTEN["slice_split_chunk"]
    model, x = kill_half(factory()).eval(), torch.randn(shape)
    a = ds.generate(model, x, ds.alive_masks(model, x))
    b = ds.generate(model, x, ds.alive_masks(model, x))
    with torch.no_grad():
        assert max_relative_error(a(x), b(x)) == 0.0
