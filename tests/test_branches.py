"""Residual branches dropped whole when a mask empties their inner group: exact outputs,
the branch's ops gone, costs that count what is removed, and the cases that must refuse."""
from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torchvision
from torch import fx, nn

import dnnshrink_core as ds
from dnnshrink_core import branches
from dnnshrink_core.cost import CostModel
from dnnshrink_core.errors import DnnshrinkWarning
from helpers import kill_half, max_relative_error, state_copy, states_equal, zero_units


def conv_bn(cin: int, cout: int, k: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU6())


class Inverted(nn.Module):
    """A MobileNetV2 block: expand, depthwise, project, added to its input."""

    def __init__(self, c: int, hidden: int):
        super().__init__()
        self.expand, self.dw = conv_bn(c, hidden), conv_bn(hidden, hidden, 3, hidden)
        self.project = nn.Sequential(nn.Conv2d(hidden, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return x + self.project(self.dw(self.expand(x)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 16, 3)
        self.blocks = nn.Sequential(Inverted(16, 48), Inverted(16, 32))
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


class Padded(nn.Module):
    """A branch whose emptied group leaves a constant that a zero-padded average pool then
    makes differ at the borders: its output is not constant."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8, 3)
        self.a = conv_bn(8, 12)
        self.b = nn.Sequential(nn.Conv2d(12, 8, 1, bias=False), nn.BatchNorm2d(8))

    def forward(self, x):
        y = self.stem(x)
        return y + nn.functional.avg_pool2d(self.b(self.a(y)), 3, 1, 1)


def masked_reference(model: nn.Module, graph, keep: np.ndarray) -> nn.Module:
    """A copy of ``model`` whose removed units carry zeros (their BatchNorm scales and shifts
    zeroed): what the generated network must compute."""
    return zero_units(copy.deepcopy(model), graph, np.flatnonzero(~keep))


def emptied(graph, picks) -> dict:
    masks = {g.name: np.ones(g.size, dtype=bool) for g in graph}
    for branch in picks:
        for index in branch.own:
            masks[graph.groups[index].name][:] = False
    return masks


@pytest.mark.parametrize("factory,shape", [(Net, (2, 3, 12, 12)),
                                           (lambda: torchvision.models.resnet18(num_classes=7), (2, 3, 32, 32))])
def test_an_emptied_inner_group_drops_its_branch_exactly(factory, shape):
    torch.manual_seed(0)
    model = kill_half(factory()).eval()
    x = torch.randn(shape)
    graph = ds.trace(model, x)
    assert graph.branches, "every residual block here is a droppable branch"
    assert f"{len(graph.branches)} residual branches a mask can drop whole" in str(graph)
    picks = graph.branches[::2]
    masks = emptied(graph, picks)
    before = state_copy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DnnshrinkWarning)  # no "keeps one unit" fallback
        small = ds.generate(model, x, masks)
    assert states_equal(before, state_copy(model)), "the user's model was modified"
    keep = branches.settle(graph, graph.units_from_masks(masks))
    with torch.no_grad():
        assert max_relative_error(masked_reference(model, graph, keep)(x), small(x)) < 1e-5
    assert isinstance(small, fx.GraphModule)
    called = {n.target for n in small.graph.nodes if n.op == "call_module"}
    for branch in picks:
        assert isinstance(getattr(small, branches.parameter_name(branch)), nn.Parameter)
        assert not called & branch.layers, "a dropped branch's layers still run"
    rows = {row.name: row for row in ds.layer_report(small, x, baseline=model).rows}
    for layer in picks[0].layers:  # the report shows the dropped layers, at zero
        assert rows[layer].out_after == 0 and rows[layer].macs_after == 0 and rows[layer].params_after == 0
    # the constant trains like any bias, and the network runs backwards in training mode
    small.train()
    small(x).sum().backward()
    assert getattr(small, branches.parameter_name(picks[0])).grad is not None


def test_costs_count_what_a_dropped_branch_removes():
    """The cost of the settled keep-set, by the original's graph, is the cost of the generated
    network traced anew: MACs, parameters and the latency profile's per-call costs."""
    torch.manual_seed(0)
    model = kill_half(Net()).eval()
    x = torch.randn(1, 3, 12, 12)
    graph = ds.trace(model, x)
    masks = emptied(graph, graph.branches[:1])
    keep = branches.settle(graph, graph.units_from_masks(masks))
    small = ds.generate(model, x, masks)
    after = ds.trace(small, x)
    for kind in ("flops", "params", "latency"):
        predicted = CostModel(graph, model, kind).cost(keep)
        assert predicted == pytest.approx(CostModel(after, small, kind).initial, rel=1e-9), kind
    latency = CostModel(graph, model, "latency")
    gone = (latency.layer_costs(keep) == 0) & (latency.layer_costs(np.ones(graph.num_units, dtype=bool)) > 0)
    assert gone.sum() >= 3  # the branch's layers (and the ops between them) go whole, with their per-call costs
    per_call = sum(latency.resource.profile.ops[k].overhead_us * 1e-3 for k in latency.table.op[gone])
    assert latency.initial - latency.cost(keep) >= per_call > 0


def test_a_group_that_does_not_cut_its_branch_is_not_emptiable():
    """Emptying a squeeze-excitation's inner group leaves the block's main path: it keeps a
    unit as before (with the warning), and the block is not dropped."""
    model = torchvision.models.mobilenet_v3_small(num_classes=5).eval()
    x = torch.randn(1, 3, 32, 32)
    graph = ds.trace(model, x)
    can_empty = branches.emptiable(graph)
    squeeze = graph.group_of("features.4.block.2.fc1")
    assert squeeze is not None and not can_empty[squeeze.index]
    assert can_empty[graph.group_of("features.5.block.0.0").index]
    masks = {squeeze.name: np.zeros(squeeze.size, dtype=bool)}
    with pytest.warns(DnnshrinkWarning, match="removes every unit"):
        small = ds.generate(model, x, masks)
    assert small.get_submodule("features.4.block.2.fc1").out_channels == 1


def test_a_branch_whose_output_is_not_constant_keeps_a_unit():
    torch.manual_seed(0)
    model = kill_half(Padded()).eval()
    x = torch.randn(2, 3, 10, 10)
    graph = ds.trace(model, x)
    assert len(graph.branches) == 1
    masks = emptied(graph, graph.branches)
    with pytest.warns(DnnshrinkWarning, match="do not reduce to a constant"):
        small = ds.generate(model, x, masks)
    assert small.get_submodule("a.0").out_channels == 1
    assert not isinstance(small, fx.GraphModule)  # nothing dropped: the user's class, resized
    keep = graph.units_from_masks(masks)
    keep[graph.group_of("a.0").units[int(np.argmax(graph.unit_gammas(model)[graph.group_of("a.0").units]))]] = True
    with torch.no_grad():
        assert max_relative_error(masked_reference(model, graph, keep)(x), small(x)) < 1e-5
    # the pipeline counts what is built: settled() gives the flags build() used
    from dnnshrink_core.generate import settled

    with pytest.warns(DnnshrinkWarning, match="do not reduce to a constant"):
        built = settled(model, graph, graph.units_from_masks(masks))
    assert built[graph.group_of("a.0").units].sum() == 1
    flops = CostModel(graph, model, "flops")
    assert flops.cost(built) == CostModel(ds.trace(small, x), small, "flops").initial
    assert flops.cost(built) > flops.cost(graph.units_from_masks(masks))


def test_alive_masks_drop_a_block_whose_channels_all_died():
    """MorphNet's rule: a block whose expanded channels all have gamma = beta = 0 goes whole,
    without the "keeps one unit" warning, and the network's outputs do not change."""
    torch.manual_seed(0)
    model = kill_half(Net()).eval()
    with torch.no_grad():
        for bn in (model.blocks[1].expand[1], model.blocks[1].dw[1]):  # the group's two BatchNorms
            bn.weight.zero_()
            bn.bias.zero_()
    x = torch.randn(2, 3, 12, 12)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DnnshrinkWarning)
        masks = ds.alive_masks(model, x)
        small = ds.generate(model, x, masks)
    assert not masks["blocks.1.expand.0"].any()
    assert "blocks.1.expand.0" not in {n.target for n in small.graph.nodes if n.op == "call_module"}
    with torch.no_grad():
        assert max_relative_error(model(x), small(x)) < 1e-5


def test_compensation_gives_a_dropped_block_what_its_dead_channels_carried():
    """MorphNet's dead channels have gamma near zero but not beta: they carry act(beta). The
    dropped block's constant is then its output with the model's own scales, so the network
    keeps its outputs (without compensation it would not)."""
    torch.manual_seed(0)
    model = kill_half(Net()).eval()
    with torch.no_grad():
        for bn in (model.blocks[1].expand[1], model.blocks[1].dw[1]):
            bn.weight.fill_(1e-4)
            bn.bias.normal_(0, 0.5)
    x = torch.randn(4, 3, 12, 12)
    masks = ds.alive_masks(model, x)
    assert not masks["blocks.1.expand.0"].any()
    with torch.no_grad():
        assert max_relative_error(model(x), ds.generate(model, x, masks)(x)) < 1e-5
        assert max_relative_error(model(x), ds.generate(model, x, masks, compensate=False)(x)) > 1e-2


def test_drop_branches_keeps_more_of_what_is_valued_at_the_budget():
    """The depth step: whole branches go while the score kept at the budget rises (here the
    MACs themselves under a latency budget, whose per-call costs a dropped block frees), and
    the width multiplier never brings a dropped branch back."""
    from dnnshrink_plugins.morphnet.structure import drop_branches, scale_to_budget

    model = Net().eval()
    x = torch.randn(1, 3, 12, 12)
    graph = ds.trace(model, x)
    flops, latency = CostModel(graph, model, "flops"), CostModel(graph, model, "latency")
    budget = 0.8 * latency.initial
    value = flops.unit_weights(np.ones(graph.num_units, dtype=bool))
    ones = np.ones(graph.num_units, dtype=bool)

    def rescale(seed):
        return scale_to_budget(graph, seed, value, latency.cost, budget)

    start = rescale(ones)
    deep = drop_branches(graph, start, value, rescale)
    assert latency.cost(deep) <= budget
    assert branches.dropped(graph, deep), "dropping a block buys more MACs at this latency"
    assert flops.cost(deep) > flops.cost(start)
    for b in branches.dropped(graph, deep):
        assert not any(deep[graph.groups[g].units].any() for g in b.groups)
    small = ds.generate(model, x, {g.name: deep[g.units] for g in graph}, compensate=False)
    assert CostModel(ds.trace(small, x), small, "latency").initial == pytest.approx(latency.cost(deep), rel=1e-9)


class Untraceable(Net):
    """Control flow on a value: fx cannot trace it, so the model is recorded on the example."""

    def forward(self, x):
        y = self.blocks(self.stem(x))
        if float(y.abs().sum()) >= 0:
            y = y * 1.0
        return self.fc(y.mean((2, 3)))


def test_a_recorded_model_drops_branches_and_exports_at_its_example_shape(tmp_path):
    torch.manual_seed(0)
    model = kill_half(Untraceable()).eval()
    x = torch.randn(2, 3, 12, 12)
    with pytest.warns(Warning, match="torch.fx could not trace"):
        graph = ds.trace(model, x)
    assert graph.traces[0].specialized and graph.branches
    masks = emptied(graph, graph.branches[:1])
    small = ds.generate(model, x, masks)
    keep = branches.settle(graph, graph.units_from_masks(masks))
    with torch.no_grad():
        assert max_relative_error(masked_reference(model, graph, keep)(x), small(x)) < 1e-5
    assert small.dnnshrink_specialized_to == [(2, 3, 12, 12)]
    with pytest.raises(ValueError, match="specialised to the example input"):
        small(torch.randn(1, 3, 12, 12))
    result = ds.export(small, x, "onnx", tmp_path / "m.onnx")  # the batch is fixed: it cannot vary
    assert result["dynamic_batch"] is False and result["max_relative_error"] < 1e-4


def test_morphnet_drops_a_dead_block():
    """Through the pipeline: a block whose channels all died (gamma = beta = 0) goes whole
    instead of keeping a unit (the width floors do not bring it back), and the target is met
    without cutting a channel anywhere else."""
    from dnnshrink_core.pipeline import shrink

    torch.manual_seed(0)
    model = Net().eval()
    with torch.no_grad():
        for bn in (model.blocks[1].expand[1], model.blocks[1].dw[1]):
            bn.weight.zero_()
            bn.bias.zero_()
    x = torch.randn(8, 3, 12, 12)

    def one_tiny_step(net, lr):
        optimizer = torch.optim.SGD(net.parameters(), lr=1e-6)
        optimizer.zero_grad()
        (0.0 * net(x).sum()).backward()
        optimizer.step()

    result = shrink(model, x[:1], train_one_epoch=one_tiny_step, test=lambda m: 0.0, finetune=False, anneal=False,
                    target_macs=0.8, max_epochs=1, device="cpu", progress=False, latency_runs=1, exporters=())
    small = result.model
    assert "blocks.1.expand.0" not in {n.target for n in small.graph.nodes if n.op == "call_module"}
    assert result.report.extra["widths"]["blocks.1.expand.0"]["chosen"] == 0
    assert result.report.extra["shrunk"]["macs"] <= 0.8 * result.report.extra["baseline"]["macs"]
    for name, w in result.report.extra["widths"].items():  # the block alone paid for the target
        if not name.startswith("blocks.1."):
            assert w["chosen"] == w["original"], (name, w)
    with torch.no_grad():  # (training moved the BatchNorm statistics: exactness is generate's test above)
        out = small(x)
    assert out.shape == (8, 5) and torch.isfinite(out).all()
