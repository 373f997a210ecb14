"""MorphNet's structure at small budgets (issue #13): no collapsed layer, the width
multiplier in both directions, ``reinit``, and the widths-against-uniform report."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import dnnshrink_core as ds
from dnnshrink_core.cost import CostModel
from dnnshrink_core.generate import build
from dnnshrink_core.pipeline import reinitialize, shrink
from dnnshrink_core.report import uniform_widths
from dnnshrink_plugins.morphnet.structure import enforce_widths, scale_to_budget, width_floors


class Chain(nn.Module):
    """A Conv1d BatchNorm chain shaped like the MNIST-1D net: widths 16-32-32-64, then a classifier."""

    def __init__(self):
        super().__init__()
        layers, cin = [], 1
        for cout in (16, 32, 32, 64):
            layers += [nn.Conv1d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm1d(cout), nn.ReLU()]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(64, 10)

    def forward(self, x):
        return self.classifier(self.features(x).mean(-1))


X = torch.randn(8, 1, 20)


def degenerate_scales(model: nn.Module) -> None:
    """The scales MorphNet's FLOP penalty leaves when it falls short on a chain: the last
    layer (whose outputs feed only the cheap classifier) untouched and large, the middle
    layers pressed small (the per-epoch widths in docs/benchmarks.md)."""
    rng = np.random.default_rng(0)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    with torch.no_grad():
        for i, bn in enumerate(bns):
            low, high = (0.5, 1.0) if i == len(bns) - 1 else (0.02, 0.3)
            bn.weight.copy_(torch.tensor(rng.uniform(low, high, bn.num_features), dtype=torch.float32))


def one_tiny_step(model: nn.Module, lr: float) -> None:
    """An epoch of one optimizer step that barely moves anything (the penalty needs a step)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-6)
    optimizer.zero_grad()
    (0.0 * model(X).sum()).backward()
    optimizer.step()


def degenerate_chain():
    """The Chain with degenerate scales, traced: (model, graph, cost model, unit gammas)."""
    model = Chain()
    degenerate_scales(model)
    graph = ds.trace(model, X[:1])
    return model, graph, CostModel(graph, model), graph.unit_gammas(model)


def group_widths(graph, keep):
    return {g.name: int(keep[g.units].sum()) for g in graph.groups if graph.unit_removable[g.units].any()}


def test_a_global_smallest_scale_cut_collapses_but_morphnet_keeps_every_layer():
    model, graph, costs, gammas = degenerate_chain()
    budget = 0.03 * costs.initial
    uniform = uniform_widths(graph, costs.cost, budget)
    # the old way to meet the target: cut the smallest scales across the network
    cut = group_widths(graph, costs.cheapest_first(np.ones(graph.num_units, dtype=bool), gammas, budget))
    assert min(cut[name] / uniform[name] for name in cut) < 0.5  # a layer far below the uniform net's

    result = shrink(model, X[:1], train_one_epoch=one_tiny_step, test=lambda m: 0.0, finetune=False, anneal=False,
                    target_macs=0.03, max_epochs=1, device="cpu", progress=False, latency_runs=1, exporters=())
    widths = result.report.extra["widths"]
    for name, w in widths.items():
        assert w["chosen"] >= np.ceil(0.5 * w["uniform"]), (name, w)  # no group below half the uniform width
    assert result.report.extra["shrunk"]["macs"] <= 0.03 * result.report.extra["baseline"]["macs"]
    assert result.report.extra["structure_learning"]["target_reached_by_training"] is False
    assert len(result.report.extra["structure_learning"]["widths_per_epoch"]) == 1


def test_width_floors_are_half_of_the_uniform_widths():
    model = Chain()
    graph = ds.trace(model, X[:1])
    costs = CostModel(graph, model)
    budget = 0.05 * costs.initial
    floors = width_floors(graph, costs.cost, budget, ~graph.unit_frozen, 0.5)
    uniform = uniform_widths(graph, costs.cost, budget)
    for group, floor in zip(graph.groups, floors):
        if graph.unit_removable[group.units].any():
            assert floor == max(int(np.ceil(0.5 * uniform[group.name])), 1)


def test_width_multiplier_scales_down_evenly_and_up_to_the_budget():
    model = Chain()
    graph = ds.trace(model, X[:1])
    costs = CostModel(graph, model)
    gammas = np.random.default_rng(2).random(graph.num_units)
    learned = gammas > 0.3  # about 70% of every group alive
    before = group_widths(graph, learned)
    for fraction in (0.05, 0.9):
        keep = scale_to_budget(graph, learned, gammas, costs.cost, fraction * costs.initial)
        assert costs.cost(keep) <= fraction * costs.initial
        assert costs.cost(keep) > 0.6 * fraction * costs.initial  # close to the budget
        after = group_widths(graph, keep)
        sizes = {g.name: g.size for g in graph.groups}
        ratios = [after[n] / before[n] for n in before if after[n] < sizes[n]]
        # one multiplier for all: the groups' ratios agree up to the rounding of small widths
        assert max(ratios) - min(ratios) < (0.5 if fraction < 0.5 else 0.15)
    small = scale_to_budget(graph, learned, gammas, costs.cost, 0.05 * costs.initial)
    for g in graph.groups:  # the best scales are the ones kept
        kept, dropped = gammas[g.units][small[g.units]], gammas[g.units][~small[g.units]]
        if len(kept) and len(dropped):
            assert kept.min() >= dropped.max()


def test_the_multiplier_never_cuts_frozen_units_and_the_generator_refuses_a_structure_that_does():
    """Without a floor the multiplier once cut the classifier's outputs (the network's
    output, frozen) to 3 of 10 at a 1.5% budget, and the pipeline built that network."""
    model = Chain()
    graph = ds.trace(model, X[:1])
    costs = CostModel(graph, model)
    gammas = np.random.default_rng(3).random(graph.num_units)
    keep = scale_to_budget(graph, gammas > 0.3, gammas, costs.cost, 0.015 * costs.initial)
    assert keep[graph.unit_frozen].all()
    assert keep[graph["classifier"].units].sum() == 10
    keep[graph["classifier"].units[:7]] = False
    with pytest.raises(ds.MaskError, match=r"removes 7 frozen unit\(s\).*'classifier'.*network output"):
        build(model, graph, keep)


def test_prices_fixed_at_the_target_structure_do_not_follow_the_thinning_network():
    from dnnshrink_plugins.morphnet import morphnet_flops
    from dnnshrink_plugins.morphnet.structure import uniform_fraction

    model = Chain()
    graph = ds.trace(model, X[:1])
    reg = morphnet_flops(graph, model)
    costs = reg.costs
    full = np.ones(graph.num_units, dtype=bool)
    thin = full.copy()
    thin[graph["features.6"].units[:28]] = False  # the third layer has thinned
    # moving prices: the last layer's units get cheaper as the third thins (the feedback loop)
    last = graph["features.9"].units
    assert reg.unit_weights(thin)[last].mean() < reg.unit_weights(full)[last].mean()
    target = uniform_fraction(graph, np.zeros(graph.num_units), costs.cost, 0.02 * costs.initial,
                              ~graph.unit_frozen)
    reg.price_at(target)
    fixed = reg.unit_weights(full)
    assert np.array_equal(fixed, reg.unit_weights(thin))  # they stay put
    removable = graph.unit_removable
    # the target structure's relative prices, scaled to the full-width mean
    expected = costs.unit_weights(target)[removable]
    expected = expected * costs.unit_weights(full)[removable].mean() / expected.mean()
    assert np.allclose(fixed[removable], expected)
    reg.price_at(None)
    assert np.array_equal(reg.unit_weights(thin), costs.unit_weights(thin) * removable)


def test_toward_uniform_blends_each_group_geometrically():
    from dnnshrink_plugins.morphnet.structure import toward_uniform, uniform_fraction

    model, graph, costs, gammas = degenerate_chain()
    learned = gammas > 0.2  # the degenerate structure: the last layer whole, the middle ones thin
    budget = 0.05 * costs.initial
    uniform = uniform_fraction(graph, np.zeros(graph.num_units), costs.cost, budget, ~graph.unit_frozen)
    for trust in (0.0, 0.5, 1.0):
        blended = toward_uniform(graph, learned, gammas, uniform, trust)
        for g in graph.groups:
            if not graph.unit_removable[g.units].any():
                continue
            n, u = learned[g.units].sum(), uniform[g.units].sum()
            assert blended[g.units].sum() == min(g.size, max(1, round(n ** trust * u ** (1 - trust))))
            kept = gammas[g.units][blended[g.units]]  # the largest scales first
            dropped = gammas[g.units][~blended[g.units]]
            assert not len(kept) or not len(dropped) or kept.min() >= dropped.max()


def test_the_multiplier_leaves_no_budget_a_next_channel_could_use():
    model = Chain()
    graph = ds.trace(model, X[:1])
    costs = CostModel(graph, model)
    gammas = np.random.default_rng(4).random(graph.num_units)
    learned = gammas > 0.3
    for fraction in (0.015, 0.05, 0.3):
        budget = fraction * costs.initial
        keep = scale_to_budget(graph, learned, gammas, costs.cost, budget)
        assert costs.cost(keep) <= budget
        for g in graph.groups:
            spare = g.units[~keep[g.units] & graph.unit_removable[g.units]]
            if len(spare):  # its best spare unit would not fit
                trial = keep.copy()
                trial[spare[np.argmax(gammas[spare])]] = True
                assert costs.cost(trial) > budget, (fraction, g.name)


def test_reinit_trains_the_learned_structure_from_a_fresh_start():
    torch.manual_seed(0)
    model = Chain()
    with torch.no_grad():  # recognisable trained values
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.weight.fill_(0.7)
                m.running_mean.fill_(3.0)
    seen = {}

    def capture(key):
        def train(m):
            bn = [b for b in m.modules() if isinstance(b, nn.BatchNorm1d)][0]
            seen[key] = (bn.weight.detach().clone(), bn.running_mean.clone(),
                         [p.detach().clone() for p in m.parameters()])
        return train

    options = dict(test=lambda m: 0.0, target_macs=0.5, max_epochs=1, device="cpu", progress=False, latency_runs=1,
                   exporters=(), strength_scale=1e-9)
    shrink(model, X[:1], train_one_epoch=one_tiny_step, train=capture("fine-tune"), **options)
    result = shrink(model, X[:1], train_one_epoch=one_tiny_step, train=capture("reinit"), reinit=True, **options)
    weight, mean, params = seen["fine-tune"]
    assert torch.allclose(weight, torch.full_like(weight, 0.7)) and mean.min() > 2.0  # the trained values, sliced
    weight, mean, fresh = seen["reinit"]
    assert torch.equal(weight, torch.ones_like(weight)) and torch.equal(mean, torch.zeros_like(mean))
    assert [p.shape for p in fresh] == [p.shape for p in params]
    convs = [(a, b) for a, b in zip(params, fresh) if a.dim() == 3]
    assert convs and all(not torch.allclose(a, b) for a, b in convs)
    assert result.report.extra["structure_learning"]["reinit"] is True


def test_reinitialize_resets_every_layer():
    model = Chain()
    before = [p.detach().clone() for p in model.parameters()]
    assert reinitialize(model) == 9  # four convs, four BatchNorms and the classifier
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_reinit_needs_finetuning_and_the_config_checks_its_type(tmp_path):
    with pytest.raises(ds.ConfigError):
        shrink(Chain(), X[:1], train_one_epoch=one_tiny_step, test=lambda m: 0.0, finetune=False, reinit=True,
               device="cpu", progress=False)
    with pytest.raises(ds.ConfigError):
        shrink(Chain(), X[:1], train_one_epoch=one_tiny_step, train=lambda m: None, test=lambda m: 0.0,
               reinit="yes", device="cpu", progress=False)


def test_report_md_shows_chosen_and_uniform_widths(tmp_path):
    result = shrink(Chain(), X[:1], train_one_epoch=one_tiny_step, train=lambda m: None, test=lambda m: 0.0,
                    target_macs=0.2, max_epochs=1, device="cpu", progress=False, latency_runs=1, exporters=(),
                    out_dir=str(tmp_path / "out"))
    text = (tmp_path / "out" / "report.md").read_text()
    assert "| group | original | chosen | uniform multiplier |" in text
    widths = result.report.extra["widths"]
    assert len(widths) == 4 and all(w["uniform"] <= w["original"] for w in widths.values())
    assert json_widths(tmp_path / "out" / "report.json") == widths


def json_widths(path):
    import json
    return json.loads(path.read_text())["widths"]


def test_a_width_held_at_its_floor_is_rounded_to_the_groups_multiple():
    """A group the floor holds up (half the uniform width) kept an unrounded width, which put
    it back on the runtime's slow kernels; the floor is rounded like any width."""
    model, graph, costs, gammas = degenerate_chain()
    learned = gammas > 0.28  # the middle layers thin, the last whole: the middle floors bind
    budget = 0.1 * costs.initial
    floors = width_floors(graph, costs.cost, budget, ~graph.unit_frozen, 0.5)
    unrounded = scale_to_budget(graph, learned, gammas, costs.cost, budget, 1, 1, floors)
    keep = scale_to_budget(graph, learned, gammas, costs.cost, budget, 1, 4, floors)
    assert costs.cost(keep) <= budget
    held = 0
    for g, floor in zip(graph.groups, floors):
        if not graph.unit_removable[g.units].any():
            continue
        width = int(keep[g.units].sum())
        assert width % 4 == 0 or width == g.size, (g.name, width)
        assert width >= min(floor, g.size)
        held += int(unrounded[g.units].sum()) == floor and floor % 4 != 0
    assert held, "no group sat at an unrounded floor: the test does not exercise the floor"


def test_the_trust_option_moves_morphnet_between_its_learned_widths_and_the_uniform_ones():
    options = dict(train_one_epoch=one_tiny_step, test=lambda m: 0.0, finetune=False, target_macs=0.05,
                   max_epochs=1, device="cpu", progress=False, latency_runs=1, exporters=(), anneal=False)
    chosen = {}
    for trust in (0.0, 1.0):
        model = Chain()
        degenerate_scales(model)
        with torch.no_grad():  # learning "stopped" with the last layer whole and the others thin
            for bn in [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)][:-1]:
                bn.weight[bn.num_features // 4:] = 0.0
        result = shrink(model, X[:1], trust=trust, **options)
        chosen[trust] = result.report.extra["widths"]
        assert result.report.extra["structure_learning"].get("trust", 1.0) == trust
    last = "features.9"
    uniform = chosen[0.0][last]["uniform"]
    # trust 0: the uniform multiplier's widths (what the budget's rounding leaves aside)
    for name, w in chosen[0.0].items():
        assert abs(w["chosen"] - w["uniform"]) <= max(2, 0.25 * w["uniform"]), (name, w)
    # trust 1: the learned proportions, the last layer far wider than the uniform net's
    assert chosen[1.0][last]["chosen"] >= 1.5 * uniform, chosen[1.0]


SIGNALS = torch.randn(64, 1, 20, generator=torch.Generator().manual_seed(0))
LABELS = torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(1))


def sgd_epoch(model: nn.Module, lr: float) -> None:
    """A real, deterministic epoch: cross-entropy on fixed signals, SGD with momentum."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for i in range(0, 64, 16):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(SIGNALS[i:i + 16]), LABELS[i:i + 16]).backward()
        optimizer.step()


ANNEAL = dict(train_one_epoch=sgd_epoch, test=lambda m: 0.0, finetune=False, device="cpu", progress=False,
              latency_runs=1, exporters=(), tensorboard=False, lr=0.01)


def test_annealed_learning_cuts_down_to_the_target_over_the_later_epochs():
    torch.manual_seed(0)
    model = Chain()
    # a weak penalty: half of the epochs learn alone, then every epoch's end cuts
    result = shrink(model, X[:1], target_macs=0.03, max_epochs=6, strength_scale=1e-3, **ANNEAL)
    learn = result.report.extra["structure_learning"]
    assert learn["annealed"] is True and result.epochs == 6
    assert [cut["epoch"] for cut in learn["cuts"]] == [4, 5, 6]
    budgets = np.array([cut["budget"] for cut in learn["cuts"]])
    assert budgets[-1] == pytest.approx(0.03)
    # an even share of the way left at each cut: the budgets fall geometrically from the full network
    np.testing.assert_allclose(np.log(budgets), np.log(0.03) * np.array([1, 2, 3]) / 3, rtol=0.05)
    widths = np.array([cut["widths"] for cut in learn["cuts"]])
    assert (np.diff(widths, axis=0) <= 0).all()  # a cut channel never comes back
    assert (widths[-1] < widths[0]).sum() >= 4  # every conv layer thinned along the way, not one of them
    chosen = result.report.extra["widths"]
    assert [w["chosen"] for w in chosen.values()] == [w for w, g in zip(widths[-1], result.masks.graph.groups)
                                                     if g.name in chosen]
    assert result.report.extra["shrunk"]["macs"] <= 0.03 * result.report.extra["baseline"]["macs"]
    for name, w in chosen.items():
        assert w["chosen"] >= np.ceil(0.5 * w["uniform"]), (name, w)
    # off: no cut during learning, one to the target after it
    off = shrink(Chain(), X[:1], target_macs=0.03, max_epochs=6, strength_scale=1e-3, anneal=False, **ANNEAL)
    assert "cuts" not in off.report.extra["structure_learning"]
    assert off.report.extra["structure_learning"]["target_reached_by_training"] is False


def penalty_only_epoch(model: nn.Module, lr: float) -> None:
    """An epoch whose data loss has no gradient: only the penalty moves the scales."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(5):
        optimizer.zero_grad()
        (0.0 * model(SIGNALS[:16]).sum()).backward()
        optimizer.step()


def test_annealing_stops_at_the_midpoint_when_the_penalty_gets_there_first():
    # a fast penalty reaches the midpoint (sqrt(0.5) of the MACs) within the first half of the epochs
    result = shrink(Chain(), X[:1], target_macs=0.5, max_epochs=40, strength_scale=20.0,
                    **{**ANNEAL, "lr": 0.05, "train_one_epoch": penalty_only_epoch})
    learn = result.report.extra["structure_learning"]
    assert result.epochs <= 20 and "cuts" not in learn
    assert learn["learned_macs"] <= 0.5 ** 0.5 * learn["target_macs"] / 0.5
    assert "target_reached_by_training" not in learn
    assert result.report.extra["shrunk"]["macs"] <= learn["target_macs"]


def test_a_resumed_annealed_run_keeps_the_cut_channels_cut(tmp_path):
    # a learning rate that would revive a cut channel's scale past the threshold within an epoch
    options = dict(target_macs=0.05, max_epochs=5, strength_scale=1e-3, out_dir=str(tmp_path / "run"),
                   **{**ANNEAL, "lr": 0.3})
    torch.manual_seed(0)
    whole = shrink(Chain(), X[:1], **{**options, "out_dir": str(tmp_path / "whole")})
    calls = []

    def stopped_in_epoch_5(model, lr):
        calls.append(lr)
        if len(calls) == 5:
            raise KeyboardInterrupt
        sgd_epoch(model, lr)

    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        shrink(Chain(), X[:1], **{**options, "train_one_epoch": stopped_in_epoch_5})
    torch.manual_seed(0)
    resumed = shrink(Chain(), X[:1], resume=True, **options)
    # epoch 5 trains on without what epochs 3 and 4 cut: the same network as the whole run
    for group in whole.masks.graph:
        assert np.array_equal(resumed.masks[group.name], whole.masks[group.name]), group.name


class Narrow(nn.Module):
    """Wide and narrow layers in turn, like DenseNet's 128-wide bottlenecks and 32-wide growth."""

    def __init__(self, widths=(128, 32) * 4):
        super().__init__()
        layers, cin = [], 3
        for cout in widths:
            layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, 10)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def test_floors_that_do_not_fit_once_rounded_give_way_to_the_budget():
    """Half the uniform width, rounded up to a block of 16, costs more than 10% of the MACs
    here (it did on DenseNet-121: 11.3% at a 10% target, silently), though a rounded network
    of 10% exists: the floors shrink until the structure fits, still rounded."""
    model = Narrow()
    graph = ds.trace(model, torch.randn(1, 3, 8, 8))
    costs = CostModel(graph, model)
    gammas = np.random.default_rng(0).random(graph.num_units)
    budget = 0.1 * costs.initial
    floors = width_floors(graph, costs.cost, budget, ~graph.unit_frozen, 0.5)
    at_floors = np.zeros(graph.num_units, dtype=bool)
    for g, floor in zip(graph.groups, floors):
        width = min(g.size, -(-int(floor) // 16) * 16)
        at_floors[g.units[np.argsort(-gammas[g.units])][:width]] = True
    smallest = enforce_widths(graph, np.zeros(graph.num_units, dtype=bool), gammas, 1, 16)
    assert costs.cost(smallest) <= budget < costs.cost(at_floors)  # the premise
    keep = scale_to_budget(graph, gammas > 0.5, gammas, costs.cost, budget, 1, 16, floors)
    assert costs.cost(keep) <= budget
    for g in graph.groups:
        width = int(keep[g.units].sum())
        assert width == g.size or width % 16 == 0 or graph.unit_frozen[g.units].all(), (g.name, width)


def test_a_structure_above_the_target_is_said_and_reported(tmp_path, fresh_manager):
    """Whatever algorithm chose it (a plugin's here), a structure that costs more than the
    target gives a DnnshrinkWarning and ``target_met: false`` in the report."""
    from dnnshrink_core.plugin_api import DnnshrinkWarning, LearnResult, get_plugin_manager, hookimpl

    class KeepsEverything:
        name, learns_over_epochs, needs_batchnorm = "keeps-everything", False, False

        def learn(self, ctx):
            return LearnResult(np.ones(ctx.graph.num_units, dtype=bool), 0, {})

    class Plugin:
        @hookimpl
        def dnnshrink_algorithm(self, name):
            return KeepsEverything() if name == "keeps-everything" else None

        @hookimpl
        def dnnshrink_algorithm_names(self):
            return ["keeps-everything"]

    get_plugin_manager().register(Plugin(), name="keeps-everything")
    with pytest.warns(DnnshrinkWarning, match="above the target of 50.00%"):
        result = shrink(Chain(), X[:2], train_one_epoch=one_tiny_step, test=lambda m: 1.0,
                        algorithm="keeps-everything", max_epochs=0, finetune=False, target=0.5,
                        out_dir=str(tmp_path / "out"), progress=False, tensorboard=False, onnx_latency=False,
                        latency_runs=1, exporters=("pytorch",))
    assert result.report.extra["structure_learning"]["target_met"] is False


def test_magnitude_spends_what_rounding_left_of_the_budget():
    """A uniform fraction with widths in blocks of 16 stops well short of 10% on alternating
    128- and 32-wide layers (DenseNet-121 kept 6.4% of its MACs for a 10% target with
    ``algorithm: magnitude``); the fill spends the rest, a block at a time, in rounded widths."""
    from dnnshrink_plugins.morphnet.structure import fill_to_budget, uniform_fraction

    model = Narrow()
    graph = ds.trace(model, torch.randn(1, 3, 8, 8))
    costs = CostModel(graph, model)
    scores = np.random.default_rng(1).random(graph.num_units)
    budget = 0.1 * costs.initial
    uniform = uniform_fraction(graph, scores, costs.cost, budget, ~graph.unit_frozen, 1, 16)
    filled = fill_to_budget(graph, uniform, scores, costs.cost, budget, 16)
    assert costs.cost(uniform) < costs.cost(filled) <= budget
    assert (filled | ~uniform).all()  # it only grows
    for g in graph.groups:
        width = int(filled[g.units].sum())
        if graph.unit_frozen[g.units].all() or width == g.size:
            continue
        assert width % 16 == 0, (g.name, width)
        trial = filled.copy()  # the group's next block would not fit
        trial[g.units[np.argsort(-np.where(filled[g.units], np.inf, scores[g.units]))][:width + 16]] = True
        assert costs.cost(trial) > budget, g.name
