"""The ``depth`` option: algorithms drop whole residual blocks where channels alone cannot
reach the target (``auto``) or wherever that keeps more of their value (``true``); the
reachable figure counts them, and turning depth off says what it would have reached."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import dnnshrink_core as ds
from dnnshrink_core import branches
from dnnshrink_core.cost import CostModel, resolve_round_to
from dnnshrink_core.pipeline import shrink
from dnnshrink_core.target import smallest_cost
from dnnshrink_plugins.morphnet.structure import choose_depth, scale_to_budget, uniform_fraction
from models import conv_bn


class Block(nn.Module):
    """Expand, depthwise, project, added to the input (MobileNetV2's inverted residual)."""

    def __init__(self, c: int, hidden: int):
        super().__init__()
        self.body = nn.Sequential(conv_bn(c, hidden, 1), conv_bn(hidden, hidden, 3, groups=hidden),
                                  nn.Conv2d(hidden, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return x + self.body(x)


class Deep(nn.Module):
    """Four residual blocks on a small input: every layer's fixed per-call time dominates."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 16, 3)
        self.blocks = nn.Sequential(*[Block(16, h) for h in (32, 48, 32, 64)])
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


X = torch.randn(1, 3, 16, 16)


def setup():
    torch.manual_seed(0)
    model = Deep().eval()
    graph = ds.trace(model, X)
    return model, graph, CostModel(graph, model, "latency"), CostModel(graph, model, "flops")


def test_the_smallest_network_with_blocks_dropped_is_what_the_generator_builds():
    model, graph, latency, _ = setup()
    assert len(graph.branches) == 4
    shallow, deep = smallest_cost(graph, latency), smallest_cost(graph, latency, depth=True)
    assert deep < 0.6 * shallow  # the per-call times of 12 layers are gone
    # the same structure, generated and priced again from its own trace
    keep = ~graph.unit_removable.copy()
    for group in graph.groups:
        if not keep[group.units].any():
            keep[group.units[0]] = True
    for b in graph.branches:
        for g in b.own:
            keep[graph.groups[g].units] = False
    small = ds.generate(model, X, {g.name: keep[g.units] for g in graph}, compensate=False)
    assert not any(isinstance(m, nn.Conv2d) and m.groups > 1 for m in small.modules())  # every block went
    assert CostModel(ds.trace(small, X), small, "latency").initial == pytest.approx(deep, rel=1e-9)


def test_choose_depth_auto_drops_only_what_meeting_the_budget_takes():
    _, graph, latency, flops = setup()
    scores = np.random.default_rng(0).random(graph.num_units)
    calls = []

    def rescale_for(cost, budget):
        def rescale(seed):
            calls.append(1)
            return scale_to_budget(graph, seed, scores, cost.cost, budget)
        return rescale

    for cost, fraction in ((flops, 0.5), (latency, 0.95)):  # reachable by channels: "auto" leaves it be
        budget = fraction * cost.initial
        keep = uniform_fraction(graph, scores, cost.cost, budget, ~graph.unit_frozen)
        assert choose_depth(graph, keep, scores, cost.cost, budget, rescale_for(cost, budget)) is keep
        assert not calls
        more = choose_depth(graph, keep, scores, cost.cost, budget, rescale_for(cost, budget), depth=True)
        assert calls and scores[more].sum() >= scores[keep].sum()  # true: looks, and keeps only what helps
        calls.clear()

    # past the budget (below what channels reach): dropped until it fits, then no more
    budget = 0.5 * (smallest_cost(graph, latency) + smallest_cost(graph, latency, depth=True))
    keep = uniform_fraction(graph, scores, latency.cost, budget, ~graph.unit_frozen)
    assert latency.cost(keep) > budget
    assert choose_depth(graph, keep, scores, latency.cost, budget, rescale_for(latency, budget), depth=False) is keep
    deep = choose_depth(graph, keep, scores, latency.cost, budget, rescale_for(latency, budget))
    assert latency.cost(deep) <= budget * (1 + 1e-9)  # (the tolerance choose_depth meets it with)
    gone = branches.dropped(graph, deep)
    assert 0 < len(gone) < 4
    for b in gone:  # a dropped block keeps nothing; the others keep something in every group
        assert not any(deep[graph.groups[g].units].any() for g in b.groups)
    alive = set(range(len(graph.groups))) - {g for b in gone for g in b.groups}
    assert all(deep[graph.groups[g].units].any() for g in alive)
    for b in gone:  # one block fewer gone, rescaled: over the budget, so none went without need
        back = scale_to_budget(graph, branches.settle(graph, deep | _units_of(graph, b)), scores, latency.cost,
                               budget)
        assert len(branches.dropped(graph, back)) == len(gone) - 1 and latency.cost(back) > budget


def _units_of(graph, branch) -> np.ndarray:
    """The units of ``branch``'s groups, as a keep-set."""
    keep = np.zeros(graph.num_units, dtype=bool)
    for g in branch.groups:
        keep[graph.groups[g].units] = True
    return keep


def one_tiny_step(net, lr):
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-5)
    optimizer.zero_grad()
    net(torch.randn(4, 3, 16, 16)).square().mean().backward()
    optimizer.step()


def channel_floor(model, graph, latency) -> float:
    """The smallest predicted latency of channels alone: with widths unrounded, which the
    pipeline falls back to (from ``round_to: auto``) before it refuses a target."""
    multiples, _ = resolve_round_to(graph, model, "auto")
    return min(smallest_cost(graph, latency, round_to=multiples), smallest_cost(graph, latency, round_to=1))


@pytest.mark.parametrize("algorithm", ["magnitude", "morphnet", "slimming"])
def test_a_latency_target_channels_cannot_reach_is_met_by_dropping_blocks(tmp_path, algorithm):
    model, graph, latency, _ = setup()
    shallow = channel_floor(model, graph, latency)
    fraction = round(0.9 * shallow / latency.initial, 3)  # below the smallest network of channels alone
    options = dict(train_one_epoch=one_tiny_step, test=lambda m: 0.0, finetune=False, algorithm=algorithm,
                   max_epochs=0 if algorithm == "magnitude" else 2, target={"resource": "latency", "value": fraction},
                   device="cpu", progress=False, latency_runs=1, exporters=(), onnx_latency=False)
    with pytest.raises(ds.TargetError, match="With depth: auto .* meets this target"):
        shrink(model, X, depth=False, **options)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = shrink(model, X, out_dir=str(tmp_path / "run"), **options)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the user's model untouched
    extra = result.report.extra
    assert extra["resources"]["latency_ms"]["after"] <= fraction * latency.initial * (1 + 1e-9)
    dropped = extra["blocks_dropped"]["blocks"]
    assert dropped and extra["blocks_dropped"]["depth"] == "auto"
    gone = {layer for block in dropped for layer in block["layers"]}
    convs = {n.target for n in result.model.graph.nodes if n.op == "call_module"}
    assert gone and not gone & convs  # the dropped blocks' layers are not in the network
    small = result.model
    assert CostModel(ds.trace(small, X), small, "latency").initial == \
        pytest.approx(extra["resources"]["latency_ms"]["after"], rel=1e-9)
    report = (tmp_path / "run" / "report.json").read_text()
    assert '"blocks_dropped"' in report
    markdown = (tmp_path / "run" / "report.md").read_text()
    assert "## Whole residual blocks dropped (depth: auto)" in markdown
    for block in dropped:
        assert f"joined at `{block['join']}`" in markdown and all(f"`{n}`" in markdown for n in block["layers"])
    out = ds.export(small, X, "onnx", tmp_path / "small.onnx")  # the dropped network exports and verifies
    assert out["max_relative_error"] < 1e-4


def test_a_unit_a_cut_held_and_a_later_cut_keeps_is_revived():
    """Annealing holds cut units' scales at zero; when a later cut keeps one again (a dropped
    block's time bought it back) it gets a live scale and a zero shift, or a ReLU after a
    negative shift would keep it dead through fine-tuning."""
    from dnnshrink_plugins.morphnet.regularizer import HeldScales

    model, graph, _, _ = setup()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.bias.fill_(-1.0)
    held = HeldScales(graph, model)
    stem = graph.groups[1].units  # the residual stream
    cut = np.zeros(graph.num_units, dtype=bool)
    cut[stem[8:]] = True
    held.hold(cut)
    bn = model.stem[1]
    assert (bn.weight[8:] == 0).all() and held.units[stem[8:]].all()
    again = np.zeros(graph.num_units, dtype=bool)
    again[stem[8:12]] = True
    held.hold(cut & ~again)
    held.revive(again, 0.02)
    assert torch.equal(bn.weight[8:12], torch.full((4,), 0.02)) and torch.equal(bn.bias[8:12], torch.zeros(4))
    assert (bn.weight[12:] == 0).all() and (bn.bias[12:] == -1).all()  # still held, untouched
    assert (bn.weight[:8] != 0).all() and (bn.bias[:8] == -1).all()  # never cut


def test_morphnet_below_the_channel_floor_keeps_no_dead_unit():
    """MorphNet annealing to a latency target channels cannot reach: the blocks it drops
    free time that widens the rest again, and no kept unit is left with a zero scale."""
    model, graph, latency, _ = setup()
    fraction = round(0.9 * channel_floor(model, graph, latency) / latency.initial, 3)
    result = shrink(model, X, train_one_epoch=one_tiny_step, test=lambda m: 0.0, finetune=False, max_epochs=6,
                    target={"resource": "latency", "value": fraction}, device="cpu", progress=False, latency_runs=1,
                    exporters=(), onnx_latency=False)
    extra = result.report.extra
    assert extra["blocks_dropped"]["blocks"] and extra["structure_learning"].get("annealed")
    assert extra["resources"]["latency_ms"]["after"] <= fraction * latency.initial * (1 + 1e-9)
    for name, m in result.model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            assert (m.weight != 0).all(), name


def test_depth_true_drops_blocks_at_a_target_channels_can_reach():
    """``depth: true``: blocks go wherever that keeps more of the ranking's value, at a
    target the channels alone meet too (``auto`` keeps every block there)."""
    model, graph, latency, _ = setup()
    options = dict(train_one_epoch=one_tiny_step, test=lambda m: 0.0, finetune=False, algorithm="magnitude",
                   max_epochs=0, target={"resource": "latency", "value": 0.9}, device="cpu", progress=False,
                   latency_runs=1, exporters=(), onnx_latency=False)
    assert channel_floor(model, graph, latency) < 0.9 * latency.initial
    auto = shrink(model, X, **options).report.extra
    true = shrink(model, X, depth=True, **options).report.extra
    assert not auto["blocks_dropped"]["blocks"]
    assert true["blocks_dropped"]["depth"] is True and true["blocks_dropped"]["blocks"]
    for extra in (auto, true):
        assert extra["resources"]["latency_ms"]["after"] <= 0.9 * latency.initial * (1 + 1e-9)


def test_a_target_below_the_rounded_floor_gives_up_the_rounding_and_says_so():
    """Between the smallest network with widths rounded to the runtime's blocks and the
    smallest unrounded one, the target (the user's word) is kept and the rounding given up."""
    model, graph, latency, _ = setup()
    multiples, _ = resolve_round_to(graph, model, "auto")
    rounded, plain = (smallest_cost(graph, latency, round_to=r) for r in (multiples, 1))
    assert plain < rounded
    fraction = round((plain + rounded) / 2 / latency.initial, 4)
    extra = shrink(model, X, train_one_epoch=one_tiny_step, test=lambda m: 0.0, finetune=False, algorithm="magnitude",
                   max_epochs=0, target={"resource": "latency", "value": fraction}, depth=False, device="cpu",
                   progress=False, latency_runs=1, exporters=(), onnx_latency=False).report.extra
    assert extra["round_to"]["multiples"] == 1
    assert any("widths are not rounded" in note for note in extra["round_to"]["notes"])
    assert extra["resources"]["latency_ms"]["after"] <= fraction * latency.initial * (1 + 1e-9)
