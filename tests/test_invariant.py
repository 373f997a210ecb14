"""The one invariant: channels whose BatchNorm sources all have gamma = beta = 0 carry exact
zeros, so removing them leaves every output unchanged, with fewer parameters."""
from __future__ import annotations


import warnings

import pytest
import torch
from torch import fx

import dnnshrink_core as ds
from helpers import kill_half, max_relative_error, n_params, shrink_dead_half
from models import HANDWRITTEN

TOLERANCE = 1e-4


@pytest.mark.parametrize("name", sorted(HANDWRITTEN))
def test_dead_channels_are_removed_exactly(name):
    model, small, x = shrink_dead_half(name)
    assert n_params(small) < n_params(model)
    with torch.no_grad():
        assert max_relative_error(model(x), small(x)) < TOLERANCE


def test_literal_view_is_rewritten():
    model, small, x = shrink_dead_half("literal_view")
    assert isinstance(small, fx.GraphModule)
    kept = small.conv2.out_channels
    assert kept < 16
    assert small.fc1.in_features == kept * 25
    assert f"{kept * 25}" in small.code and "400" not in small.code


def test_channel_pad_shortcut_shrinks_the_pad():
    model, small, x = shrink_dead_half("channel_pad_shortcut")
    assert isinstance(small, fx.GraphModule)
    # the padded shortcut is tied to layer3's residual channels: both shrink together
    assert small.get_submodule("layer3.0.conv2").out_channels < 64
    assert small.fc.in_features == small.get_submodule("layer3.0.conv2").out_channels
    pads = [n for n in small.graph.nodes if n.op == "call_function" and n.target is torch.nn.functional.pad]
    assert pads and any(tuple(n.args[1]) != (0, 0, 0, 0, 16, 16) for n in pads)


def test_pad_module_keeps_user_class():
    model, small, x = shrink_dead_half("pad_module")
    assert type(small) is type(model)
    # the pad module itself is rewritten (not only the convs around it): the constant channels
    # it adds shrink with the channels of the add they pad for
    assert small.pad.padding[:4] == model.pad.padding[:4]
    assert sum(small.pad.padding[4:]) < sum(model.pad.padding[4:])
    assert small.a[0].out_channels + sum(small.pad.padding[4:]) == small.b[0].out_channels < 16


def test_depthwise_and_grouped_structure():
    model, small, _ = shrink_dead_half("depthwise")
    depthwise = [(name, m) for name, m in small.named_modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
    assert len(depthwise) == sum(isinstance(m, torch.nn.Conv2d) and m.groups > 1 for m in model.modules()) == 3
    for name, m in depthwise:
        old = model.get_submodule(name)
        assert m.groups == m.in_channels < old.in_channels
        assert m.out_channels == m.in_channels * (old.out_channels // old.in_channels)  # the depth multiplier
    _, small, _ = shrink_dead_half("grouped")
    assert small.grouped[0].groups == 4 and small.grouped[0].in_channels % 4 == 0
    assert small.grouped2[0].groups == 8


def test_backbone_only_keeps_head_and_full_mode_runs():
    model, small, x = shrink_dead_half("backbone_only", back_bone_only=True)
    assert small.backbone[0][0].out_channels < 16
    # the head keeps its widths, in and out, and so do the backbone outputs it reads
    assert small.backbone[1][0].out_channels == 24 and small.backbone[2][0].out_channels == 32
    assert small.up[1][0].in_channels == 32 and small.up[2].out_channels == 3
    assert small.lateral[0].in_channels == 24
    for flag in (True, False):
        model.back_bone_only = small.back_bone_only = flag
        with torch.no_grad():
            assert max_relative_error(model(x), small(x)) < TOLERANCE


def test_generate_graph_every_output_works():
    model, small, x = shrink_dead_half("generate_graph")
    assert type(small) is type(model) and small.generate_graph is False
    assert small.aux[0][0].in_channels == small.body[1][0].out_channels < 32
    for flag in (False, True):
        model.generate_graph = small.generate_graph = flag
        with torch.no_grad():
            assert max_relative_error(model(x), small(x)) < TOLERANCE


def test_train_only_branch_is_kept_consistent():
    model, small, x = shrink_dead_half("shared_and_aux")
    assert small.aux.in_features == small.stem[0].out_channels
    model.train()
    small.train()
    with torch.no_grad():
        assert max_relative_error(model(x), small(x)) < TOLERANCE


def test_unknown_op_warns_and_keeps_its_channels():
    factory, shape = HANDWRITTEN["unknown_op"]
    model = kill_half(factory()).eval()
    x = torch.randn(shape)
    # at the top level of forward: the node alone is named (no empty module)
    with pytest.warns(ds.UnknownOpWarning, match=r"torch\.cumsum` \(at node `cumsum`\);.*dnnshrink_op_handler"):
        graph = ds.trace(model, x)
    assert not graph.group_of("a.0").removable.any()  # feeds the cumsum: frozen
    assert graph.group_of("b.0").removable.all()  # after it: still prunable
    small = ds.generate(model, x, ds.alive_masks(model, x))
    assert small.a[0].out_channels == 16 and small.b[0].out_channels < 16
    with torch.no_grad():
        assert max_relative_error(model(x), small(x)) < TOLERANCE


def test_products_of_two_activations_are_known_ops_that_keep_their_channels():
    """``bmm``/``baddbmm`` of activations (attention over channels) mix every channel: no
    warning, the channels they read are kept, what comes after stays prunable, and the
    products are priced as a constant."""
    from dnnshrink_core.cost import CostModel

    factory, shape = HANDWRITTEN["channel_attention"]
    model = kill_half(factory()).eval()
    x = torch.randn(shape)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ds.UnknownOpWarning)
        graph = ds.trace(model, x)
    assert not graph.group_of("a.0").removable.any() and graph.group_of("b.0").removable.all()
    assert sorted(f.op for f in graph.fixed()) == ["matmul", "matmul"]
    assert CostModel(graph, model, "flops").constant == 2 * 16 * 16 * 36  # two (16×36)·(36×16)-sized products
    small = ds.generate(model, x, ds.alive_masks(model, x))
    assert small.b[0].out_channels < 16
    with torch.no_grad():
        assert max_relative_error(model(x), small(x)) < TOLERANCE


def test_train_mode_outputs_match_too():
    model, small, x = shrink_dead_half("squeeze_excitation")
    model.train()
    small.train()
    with torch.no_grad():
        assert max_relative_error(model(x), small(x)) < TOLERANCE
