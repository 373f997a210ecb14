"""Channels no BatchNorm scales (the MLPs of LayerNorm networks such as ConvNeXt and the
vision transformers, convs without BatchNorm): removable for an algorithm that ranks
channels by their weights (``magnitude``), still not for those that learn from BatchNorm
scales."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

import dnnshrink_core as ds
from dnnshrink_core.cost import CostModel
from dnnshrink_core.pipeline import shrink


class Block(nn.Module):
    """ConvNeXt's block: a depthwise conv, a LayerNorm over the channels (channels last), an
    MLP of two Linear layers and a layer scale, added to the input."""

    def __init__(self, c: int):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.fc1, self.fc2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.scale = nn.Parameter(torch.full((c,), 0.5))

    def forward(self, x):
        y = self.norm(self.dw(x).permute(0, 2, 3, 1))
        y = self.fc2(nn.functional.gelu(self.fc1(y))) * self.scale
        return x + y.permute(0, 3, 1, 2)


class TinyConvNeXt(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 4, stride=4)
        self.blocks = nn.Sequential(Block(32), Block(32))
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


X = torch.randn(2, 3, 32, 32)
RUN = dict(train_one_epoch=lambda m, lr: None, train=None, test=lambda m: 1.0, algorithm="magnitude", max_epochs=0,
           finetune=False, device="cpu", progress=False, latency_runs=1, onnx_latency=False, tensorboard=False)


def hidden_groups(graph):
    return [g for g in graph.groups if any(s.owner.endswith("fc1") for s in g.spaces if s.role == "out")]


def silenced(model: nn.Module, x: torch.Tensor, masks) -> nn.Module:
    """``model`` with every removed unit silenced where it is made (the conv/linear weight
    rows and biases that produce it): what removing it means, since every activation here
    keeps a zero at zero, so the generated network must compute exactly this."""
    graph = ds.trace(model, x).for_weight_ranking()
    keep = np.ones(graph.num_units, dtype=bool)
    for group in graph.groups:
        if group.name in masks:
            keep[group.units] = torch.as_tensor(masks[group.name], dtype=torch.bool).numpy()
    reference = copy.deepcopy(model).eval()
    for layer in graph.layers():
        module = reference.get_submodule(layer.name)
        cut = torch.from_numpy(~keep[layer.out_units])
        with torch.no_grad():
            module.weight[cut] = 0
            if module.bias is not None:
                module.bias[cut] = 0
    return reference


def test_the_weight_ranking_view_frees_the_mlp_and_leaves_the_traced_graph_alone():
    torch.manual_seed(0)
    model = TinyConvNeXt().eval()
    graph = ds.trace(model, X)
    assert not graph.unit_removable.any()  # no BatchNorm: nothing MorphNet could remove exactly
    view = graph.for_weight_ranking()
    hidden = hidden_groups(view)
    assert len(hidden) == 2 and all(g.size == 128 and g.removable.all() for g in hidden)
    # the residual stream is normalised over its channels by the LayerNorms: kept whole
    stream = view.group_of("stem")
    assert not stream.removable.any() and any("normalises over the channels" in r for r in stream.frozen_reasons)
    assert view.unit_removable.sum() == 256
    # the graph traced (and cached for the model) is unchanged
    assert not graph.unit_removable.any() and not ds.trace(model, X).unit_removable.any()
    assert all(not g.removable.any() for g in graph.groups)


def test_magnitude_shrinks_a_layernorm_network_and_the_result_is_the_mlp_cut(tmp_path):
    torch.manual_seed(0)
    model = TinyConvNeXt().eval()
    before = copy.deepcopy(model.state_dict())
    result = shrink(model, X, target_macs=0.6, exporters=("onnx",), out_dir=str(tmp_path / "run"), **RUN)
    macs = result.report.extra["resources"]["macs"]
    assert macs["after"] <= 0.6 * macs["before"]
    assert set(result.masks) >= {"blocks.0.fc1", "blocks.1.fc1"}
    kept = [int(torch.as_tensor(result.masks[f"blocks.{i}.fc1"]).sum()) for i in range(2)]
    assert all(0 < k < 128 for k in kept)
    assert [b.fc1.out_features for b in result.model.blocks] == kept
    # nothing folded into fc2's bias: a live channel's mean on one example is no constant
    with torch.no_grad():
        np.testing.assert_allclose(result.model(X).numpy(), silenced(model, X, result.masks)(X).numpy(),
                                   rtol=1e-5, atol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the user's model untouched
    assert (tmp_path / "run" / "model.onnx").is_file()


def test_learning_from_batchnorm_scales_still_needs_them():
    with pytest.raises(ds.NoBatchNormError, match="has no BatchNorm"):
        shrink(TinyConvNeXt(), X, **{**RUN, "algorithm": "morphnet", "max_epochs": 1}, target_macs=0.6)


def test_only_channels_a_zero_batchnorm_scale_made_constant_are_folded():
    """Removing a channel whose BatchNorm scale is zero folds its constant into the next
    layer's bias; a live channel no BatchNorm scales, removed in the same cut, is not folded
    (its mean on the example inputs is no constant)."""
    from dnnshrink_core.compensate import bias_shifts

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 1), nn.ReLU(),
                          nn.Conv2d(16, 4, 1)).eval()
    with torch.no_grad():
        model[1].weight[0], model[1].bias[0] = 0.0, 1.0  # channel 0 carries relu(1) = 1 everywhere
    graph = ds.trace(model, X).for_weight_ranking()
    bn, hidden = graph["0"], graph["3"]
    assert hidden.removable.all() and not graph.unit_has_source[hidden.units].any()
    keep = np.ones(graph.num_units, dtype=bool)
    keep[bn.units[0]] = False
    keep[hidden.units[:8]] = False
    shifts = bias_shifts(model, graph, keep, (X,))
    assert set(shifts) == {"3"}  # conv 3 reads the constant channel; conv 5 reads live ones only
    expected = model[3].weight.detach().double()[:, 0].flatten(1).sum(1)[torch.from_numpy(keep[hidden.units])]
    torch.testing.assert_close(shifts["3"], expected)


def test_inspect_says_which_algorithm_can_shrink_a_layernorm_network(tmp_path, capsys):
    from dnnshrink_core import cli

    status = cli.main(["inspect", "test_unscaled:TinyConvNeXt", "--input-shape", "1,3,32,32",
                       "--out", str(tmp_path / "g.svg")])
    out = capsys.readouterr().out
    assert status == 0
    assert "no channel a BatchNorm scales: morphnet and slimming cannot shrink this model" in out
    assert "with magnitude, which can also remove 256 channels that morphnet and slimming cannot" in out
    assert "no target below the baseline can be met" not in out


class Residual(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(c, 2 * c, 3, padding=1), nn.Conv2d(2 * c, c, 3, padding=1)

    def forward(self, x):
        return x + self.c2(torch.relu(self.c1(x)))


class PlainResNet(nn.Module):
    """Six residual blocks of two convs and no BatchNorm anywhere."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.blocks = nn.Sequential(*[Residual(16) for _ in range(6)])
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.blocks(torch.relu(self.stem(x))).mean((2, 3)))


def test_residual_blocks_without_batchnorm_are_dropped_whole_as_the_report_says(recwarn):
    """Below what channels alone reach, whole blocks go: a block whose hidden channels no
    BatchNorm scales reduces to its constant once the conv rows that make them are zeroed,
    so the blocks the report lists are gone from the network, its figures are the built
    network's, and it computes the model with every removed channel silenced."""
    torch.manual_seed(0)
    model, x = PlainResNet().eval(), torch.randn(1, 3, 16, 16)
    result = shrink(model, x, target={"resource": "latency", "value": 0.3}, exporters=(), **RUN)
    assert not [w for w in recwarn if "do not reduce to a constant" in str(w.message)]
    gone = result.report.extra["blocks_dropped"]["blocks"]
    assert len(gone) >= 2
    names = {name for name, _ in result.model.named_modules()}
    assert not any(layer in names for block in gone for layer in block["layers"])
    resources = result.report.extra["resources"]
    graph = ds.trace(result.model, x)
    assert resources["macs"]["after"] == pytest.approx(CostModel(graph, result.model, "flops").initial)
    assert resources["latency_ms"]["after"] == pytest.approx(CostModel(graph, result.model, "latency").initial)
    assert resources["latency_ms"]["after"] <= 0.3 * resources["latency_ms"]["before"] * (1 + 1e-9)
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), silenced(model, x, result.masks)(x), rtol=1e-5, atol=1e-5)


class ReadBeforeItsBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.c3 = nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.c1(x)
        return self.c2(torch.relu(self.bn(y))) + self.c3(y)  # c3 reads c1's channels before the BatchNorm


def test_a_channel_read_before_its_batchnorm_is_not_folded():
    """A zero BatchNorm scale makes a channel constant only after the BatchNorm: a layer that
    reads it before (removable only to a weight ranking) reads it live, so nothing is folded."""
    from dnnshrink_core.compensate import bias_shifts

    torch.manual_seed(0)
    model = ReadBeforeItsBatchNorm().eval()
    with torch.no_grad():
        model.bn.weight[0], model.bn.bias[0] = 0.0, 1.0
    graph = ds.trace(model, X)
    view = graph.for_weight_ranking()
    unit = view["c1"].units[0]
    assert not graph.unit_removable[unit] and view.unit_removable[unit] and graph.unit_unguarded[unit]
    keep = np.ones(view.num_units, dtype=bool)
    keep[unit] = False
    assert bias_shifts(model, view, keep, (X,)) == {}


class AllCoupled(nn.Module):
    """Every inner channel normalised over by a LayerNorm: nothing any algorithm may remove."""

    def __init__(self):
        super().__init__()
        self.stem, self.norm, self.head = nn.Conv2d(3, 16, 3), nn.LayerNorm(16), nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.norm(self.stem(x).mean((2, 3))))


def test_a_model_with_nothing_removable_says_what_keeps_it_and_no_batchnorm_advice_for_magnitude():
    with pytest.raises(ds.TargetError) as info:
        shrink(AllCoupled().eval(), X, target_macs=0.5, exporters=(), **RUN)
    message = str(info.value)
    assert "no removable channel" in message
    assert "most of its channels are kept because" in message and "normalises over the channels" in message
    assert "a BatchNorm after each conv" not in message and "`dnnshrink inspect` shows each group" in message


class ProjectionNet(nn.Module):
    """A conv without BatchNorm, then channels-last tokens times a bare ``(in, out)``
    parameter whose even output columns are large and odd ones small."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        scale = torch.tensor([1.0 if j % 2 == 0 else 0.01 for j in range(12)])
        self.proj = nn.Parameter(torch.randn(16, 12) * scale)
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        tokens = torch.relu(self.stem(x)).flatten(2).transpose(1, 2)  # (B, HW, 16)
        return self.head(torch.relu(tokens @ self.proj).mean(1))


def test_magnitude_ranks_a_bare_projection_by_its_output_columns():
    """``x @ W`` keeps its outputs in W's columns: magnitude ranks them there (it stopped
    with "`proj` is not an nn.Module" before) and keeps the large ones."""
    torch.manual_seed(0)
    model, x = ProjectionNet().eval(), torch.randn(2, 3, 8, 8)
    result = shrink(model, x, train_one_epoch=lambda m, lr: None, test=lambda m: 0.0, algorithm="magnitude",
                    max_epochs=0, target_macs=0.5, finetune=False, device="cpu", progress=False, exporters=(),
                    onnx_latency=False, tensorboard=False, round_to=1, scale="multiplier")
    kept = np.flatnonzero(result.masks["proj"])
    large = set(range(0, 12, 2))
    assert 0 < len(kept) < 12 and result.model.proj.shape[1] == len(kept)
    # the large columns first: all of them kept before any small one, or only large ones
    assert large <= set(kept) if len(kept) >= len(large) else set(kept) <= large


def test_weight_rows_is_one_row_per_output_channel():
    """A conv's filters, a transposed conv's regrouped columns and a bare projection's
    columns, each in the order of the layer's output units."""
    from dnnshrink_core.graph import LayerCost
    from dnnshrink_core.plugin_api import weight_rows

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(16, 16, 3, padding=1)
            self.up = nn.ConvTranspose2d(16, 8, 2, stride=2, groups=2)

        def forward(self, x):
            return self.up(self.conv(x))

    bare = nn.ConvTranspose2d(16, 4, 2)  # the model is the layer: its weight's path is "weight"
    rows = weight_rows(bare, LayerCost("", "dense", np.arange(16), np.arange(4), 1.0, "weight"))
    assert rows.shape == (4, 64) and torch.equal(rows[1], bare.weight.detach()[:, 1].flatten())
    for model, x in ((ProjectionNet(), torch.randn(1, 3, 8, 8)), (Net(), torch.randn(1, 16, 4, 4))):
        graph = ds.trace(model, x)
        for layer in CostModel(graph, model).layers:
            rows = weight_rows(model, layer)
            assert rows.shape[0] == len(layer.out_units), layer.name
            if layer.name == "proj":
                assert torch.equal(rows, model.proj.detach().t())
            elif layer.name == "conv":
                assert torch.equal(rows, model.conv.weight.detach().flatten(1))
            elif layer.name == "up":  # (in, out/g, k, k): output o of group g is column o of that group's rows
                w = model.up.weight.detach()
                assert torch.equal(rows[5], w[8:, 1].flatten())


def test_magnitude_ranks_a_unit_it_cannot_read_as_average_not_weakest():
    """A layer whose weight cannot be read (a path the model does not hold) leaves its units
    at the average score, so they are not the first a cut takes."""
    from types import SimpleNamespace

    from dnnshrink_core.graph import LayerCost
    from dnnshrink_plugins.morphnet.algorithm import filter_l1

    model = nn.Sequential(nn.Conv2d(3, 4, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]).view(4, 1, 1, 1).expand(4, 3, 1, 1))
    layers = [LayerCost("0", "dense", np.arange(3), np.arange(4), 1.0),
              LayerCost("gone", "dense", np.arange(3), np.arange(4, 6), 1.0)]
    ctx = SimpleNamespace(graph=SimpleNamespace(num_units=6), costs=SimpleNamespace(layers=layers))
    scores = filter_l1(model, ctx)
    assert scores[:4].tolist() == [1.0, 2.0, 3.0, 4.0] and scores[4:].tolist() == [2.5, 2.5]
