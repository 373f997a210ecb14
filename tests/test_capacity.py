"""``scale: capacity``: the structure brought to the budget one block of channels at a time,
cut where the MACs cost the most predicted time: the same steps a full re-pricing greedy
takes, on the runtime's blocks and the floors, meeting the budget, and keeping more MACs
than the width multiplier at equal predicted latency."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import dnnshrink_core as ds
from dnnshrink_core.cost import CostModel, per_group_multiples, resolve_round_to
from dnnshrink_core.pipeline import shrink
from dnnshrink_core.capacity import capacity_to_budget
from dnnshrink_plugins.morphnet.structure import scale_to_budget, uniform_fraction, width_floors
from models import conv_bn

# the profile shipped before the sessions' threads spun within a run: dearer ops per call
SLEEPING_PROFILE = Path(__file__).parent / "profiles" / "onnxruntime-cpu-2t-b1-sleeping-threads.json"

X224 = torch.randn(1, 3, 224, 224)


@pytest.fixture(scope="module")
def mobilenet():
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(weights=None).eval()
    graph = ds.trace(model, X224)
    return model, graph, CostModel(graph, model, "flops"), CostModel(graph, model, "latency")


def full_repricing(graph, keep, scores, cost, budget, time, capacity, multiples):
    """The greedy written plainly: every group's next step priced afresh at every step."""
    widths = np.array([keep[g.units].sum() for g in graph.groups])
    orders = [g.units[np.argsort(-scores[g.units], kind="stable")] for g in graph.groups]  # nothing frozen here

    def build(w):
        out = np.zeros(graph.num_units, dtype=bool)
        for order, n in zip(orders, w):
            out[order[:n]] = True
        return out

    while cost(build(widths)) > budget:
        now = build(widths)
        best = None
        for i, (group, m) in enumerate(zip(graph.groups, multiples)):
            w, frozen = widths[i], int((graph.unit_frozen[group.units] | ~graph.unit_removable[group.units]).sum())
            fewer = (w - 1) // m * m if w % m else w - m
            if group.size <= m or fewer < max(m, frozen, 1):
                continue
            trial = widths.copy()
            trial[i] = fewer
            t = build(trial)
            # steps that lower the cost first; ties (to nine digits): the first group
            key = (cost(t) < cost(now), float(f"{(time(now) - time(t)) / max(capacity(now) - capacity(t), 1e-12):.9g}"))
            if best is None or key > best[0]:
                best = (key, i, fewer)
        if best is None:
            break
        widths[best[1]] = best[2]
    return build(widths)


def test_capacity_steps_are_the_greedy_priced_afresh_at_every_step(mobilenet):
    """Only a step's neighbours are priced again (a cost is a sum over layers): the same
    structure as pricing every group at every step, at a MACs and at a latency budget."""
    model, graph, flops, latency = mobilenet
    auto, _ = resolve_round_to(graph, model, "auto")
    scores = np.random.default_rng(0).random(graph.num_units)
    ones = np.ones(graph.num_units, dtype=bool)
    for cost, budget in ((flops, 0.3 * flops.initial), (latency, 0.4 * latency.initial)):
        fast = capacity_to_budget(graph, ones, scores, cost.cost, budget, latency.cost, flops.cost, 1, auto)
        plain = full_repricing(graph, ones, scores, cost.cost, budget, latency.cost, flops.cost,
                               per_group_multiples(graph, auto))
        assert np.array_equal(fast, plain)
        assert cost.cost(fast) <= budget


def test_capacity_keeps_more_macs_than_the_multiplier_at_equal_predicted_latency(mobilenet):
    """The capacity a latency budget buys (docs/benchmarks.md: 34% more MACs on MobileNetV2
    at 40% of its predicted latency, measured faster): on the runtime's blocks, no group
    under its floor, the budget met; and at a MACs budget, less predicted time."""
    model, graph, flops, latency = mobilenet
    auto, _ = resolve_round_to(graph, model, "auto")
    scores = np.random.default_rng(1).random(graph.num_units)
    ones, frozen = np.ones(graph.num_units, dtype=bool), ~graph.unit_frozen
    budget = 0.4 * latency.initial
    floors = width_floors(graph, latency.cost, budget, frozen, 0.5)
    capacity = capacity_to_budget(graph, ones, scores, latency.cost, budget, latency.cost, flops.cost, 1, auto, floors)
    uniform = uniform_fraction(graph, scores, latency.cost, budget, frozen)
    multiplier = scale_to_budget(graph, uniform, scores, latency.cost, budget, 1, auto, floors)
    assert latency.cost(capacity) <= budget and latency.cost(multiplier) <= budget
    assert flops.cost(capacity) > 1.15 * flops.cost(multiplier)
    for group, m, floor in zip(graph.groups, per_group_multiples(graph, auto), floors):
        width = int(capacity[group.units].sum())
        assert width >= min(floor, group.size) and (width % m == 0 or width == group.size), group.name
        kept = group.units[capacity[group.units]]  # the group's best units by score
        assert scores[kept].min(initial=np.inf) >= scores[group.units[~capacity[group.units]]].max(initial=-np.inf)
    at_macs = capacity_to_budget(graph, ones, scores, flops.cost, 0.3 * flops.initial, latency.cost, flops.cost, 1,
                                 auto)
    even = scale_to_budget(graph, uniform_fraction(graph, scores, flops.cost, 0.3 * flops.initial, frozen), scores,
                           flops.cost, 0.3 * flops.initial, 1, auto)
    assert flops.cost(at_macs) <= 0.3 * flops.initial
    assert latency.cost(at_macs) < 0.9 * latency.cost(even)


def test_floors_give_way_when_they_stop_the_budget():
    """A budget below what the floors allow is still met, down to one block per group."""
    torch.manual_seed(0)
    model = nn.Sequential(conv_bn(3, 32, 3), conv_bn(32, 64, 3), conv_bn(64, 32, 3), nn.Conv2d(32, 4, 1)).eval()
    x = torch.randn(1, 3, 16, 16)
    graph = ds.trace(model, x)
    flops = CostModel(graph, model, "flops")
    ones = np.ones(graph.num_units, dtype=bool)
    floors = np.array([g.size for g in graph.groups])  # every group whole: nothing could go
    keep = capacity_to_budget(graph, ones, np.zeros(graph.num_units), flops.cost, 0.2 * flops.initial, flops.cost,
                              flops.cost, 1, 8, floors)
    assert flops.cost(keep) <= 0.2 * flops.initial
    assert all(keep[g.units].sum() % 8 == 0 or keep[g.units].all() for g in graph.groups)


def test_magnitude_with_scale_capacity_at_a_latency_target(tmp_path):
    """The pipeline's option: the latency target met as predicted, more MACs kept than with
    the width multiplier, and the generated network is the structure the report counts."""
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(weights=None).eval()
    options = dict(train_one_epoch=lambda m, lr: None, train=None, test=lambda m: 1.0, algorithm="magnitude",
                   max_epochs=0, target={"resource": "latency", "value": 0.4}, finetune=False, device="cpu",
                   progress=False, latency_runs=1, exporters=(), onnx_latency=False, tensorboard=False)
    kept = {}
    for scale in ("multiplier", "capacity", "auto"):
        result = shrink(model, X224, scale=scale, **options)
        # auto, the default, is the capacity step at a latency target
        assert result.report.extra["structure_learning"]["scale"] == ("multiplier" if scale == "multiplier"
                                                                      else "capacity")
        resources = result.report.extra["resources"]
        assert resources["latency_ms"]["after"] <= 0.4 * resources["latency_ms"]["before"] * (1 + 1e-9)
        kept[scale] = resources["macs"]["after"] / resources["macs"]["before"]
        with torch.no_grad():
            assert result.model(X224).shape == (1, 1000)
        assert resources["macs"]["after"] == CostModel(ds.trace(result.model, X224), result.model, "flops").initial
    assert kept["capacity"] > 1.15 * kept["multiplier"]
    assert kept["auto"] == kept["capacity"]


def test_scale_auto_resolves_by_target_and_algorithm():
    """``resolved_scale``: capacity where the user named time and the algorithm offers it;
    auto at the other resources where the algorithm weighs both structures itself
    (``chooses_scale``); the multiplier otherwise; an explicit value stays."""
    from dnnshrink_core.pipeline import get_algorithm
    from dnnshrink_core.target import resolve
    from dnnshrink_core.validation import resolved_scale

    latency, macs = resolve({"resource": "latency", "value": 0.5}, None), resolve(None, 0.5)
    params = resolve({"resource": "params", "value": 0.5}, None)
    morphnet, slimming = get_algorithm("morphnet"), get_algorithm("slimming")
    assert resolved_scale("auto", latency, morphnet) == "capacity"
    assert resolved_scale("auto", macs, morphnet) == "auto"
    assert resolved_scale("auto", params, get_algorithm("magnitude")) == "auto"
    assert resolved_scale("auto", latency, slimming) == "multiplier"
    assert resolved_scale("auto", macs, slimming) == "multiplier"

    class CapacityOnly:  # a plugin's algorithm written before auto weighed structures: never sees "auto"
        scales_by_capacity = True

    assert resolved_scale("auto", latency, CapacityOnly()) == "capacity"
    assert resolved_scale("auto", macs, CapacityOnly()) == "multiplier"
    assert resolved_scale("multiplier", latency, morphnet) == "multiplier"
    assert resolved_scale("capacity", macs, morphnet) == "capacity"


def test_auto_scaled_gives_the_learned_proportions_up_only_for_enough_time():
    """The rule: the multiplier's structure unless the capacity step's needs at least
    AUTO_CAPACITY_GAIN less predicted time per MAC (decided on the gain as reported, to four
    places); where only one meets the budget, that one; one structure twice is the
    multiplier's. The gain is per MAC, so structures of other sizes compare fairly."""
    from dnnshrink_core.plugin_api import AUTO_CAPACITY_GAIN, auto_scaled, capacity_gain

    multiplier, capacity = np.array([True, False]), np.array([False, True])

    def count(keep):
        return 100.0

    for per_mac, chosen in ((1.0 - AUTO_CAPACITY_GAIN, capacity), (1.0 - AUTO_CAPACITY_GAIN + 4e-5, capacity),
                            (1.0 - AUTO_CAPACITY_GAIN / 2, multiplier), (1.2, multiplier)):
        times = {0: 10.0, 1: 10.0 * per_mac}
        result = auto_scaled(multiplier, capacity, lambda k: times[int(np.argmax(k))], count, count, 100.0)
        assert result.keep is chosen and result.why == "gain"
        assert result.scale == ("capacity" if chosen is capacity else "multiplier")
        assert result.gain == round(1.0 - per_mac, 4)
    # more MACs in the same time is less time per MAC
    assert capacity_gain(multiplier, capacity, lambda k: 10.0, lambda k: 100.0 if k[0] else 125.0) == \
        pytest.approx(0.2)
    # only one within the budget: taken whatever it gains
    for over, chosen in (({0: 120.0, 1: 100.0}, capacity), ({0: 100.0, 1: 120.0}, multiplier)):
        result = auto_scaled(multiplier, capacity, lambda k: 10.0 if k[0] else 5.0, count,
                             lambda k: over[int(np.argmax(k))], 100.0)
        assert result.keep is chosen and result.why == "budget"
    same = auto_scaled(multiplier, multiplier.copy(), lambda k: 10.0, count, count, 100.0)
    assert same.keep is multiplier and (same.scale, same.gain, same.why) == ("multiplier", 0.0, "same")
    assert same.least_gain == AUTO_CAPACITY_GAIN
    # an algorithm with no learned proportions to keep asks for less: any gain at all
    times = {0: 10.0, 1: 9.9}
    for least, chosen in ((0.0, capacity), (0.005, capacity), (0.02, multiplier)):
        result = auto_scaled(multiplier, capacity, lambda k: times[int(np.argmax(k))], count, count, 100.0, least)
        assert result.keep is chosen and (result.gain, result.least_gain) == (0.01, least)
    # held to no gain, a structure that is not denser is not taken, and a gain that rounds to
    # nothing is reported as 0.0, not -0.0
    for slower in (10.0003, 10.0):
        times = {0: 10.0, 1: slower}
        result = auto_scaled(multiplier, capacity, lambda k: times[int(np.argmax(k))], count, count, 100.0, 0.0)
        assert result.keep is multiplier and str(result.gain) == "0.0"


def test_the_run_says_what_decided_scale_auto():
    """The printed line follows what decided: the gain, the budget or one structure twice
    (it never offers a reason that did not decide)."""
    from dnnshrink_core.pipeline import _auto_scale_line

    line = _auto_scale_line({"scale": "multiplier", "capacity_gain": 0.3, "scale_why": "budget"})
    assert line == "scale auto: the width multiplier's structure, the only one of the two within the budget"
    line = _auto_scale_line({"scale": "capacity", "capacity_gain": -0.05, "scale_why": "budget"})
    assert line == "scale auto: the capacity step's structure, the only one of the two within the budget"
    assert "which the capacity step builds too" in _auto_scale_line({"scale": "multiplier", "capacity_gain": 0.0,
                                                                      "scale_why": "same"})
    line = _auto_scale_line({"scale": "multiplier", "capacity_gain": -0.05, "scale_why": "gain"})
    assert "needs 5.0% more predicted time per MAC" in line
    line = _auto_scale_line({"scale": "capacity", "capacity_gain": 0.2, "scale_why": "gain"})
    assert "which needs 20.0% less predicted time per MAC" in line and "auto takes it from 10%" in line
    line = _auto_scale_line({"scale": "capacity", "capacity_gain": 0.02, "scale_why": "gain",
                             "capacity_least_gain": 0.0})
    assert "needs 2.0% less" in line and "keeps no learned proportions" in line and "from 0%" not in line
    line = _auto_scale_line({"scale": "multiplier", "capacity_gain": 0.02, "scale_why": "gain",
                             "capacity_least_gain": 0.005})
    assert "auto gives the proportions up from 0.5%" in line
    line = _auto_scale_line({"scale": "multiplier", "capacity_gain": 0.0, "scale_why": "gain",
                             "capacity_least_gain": 0.0})
    assert "the capacity step's is no denser" in line and "learned proportions" not in line


def test_magnitude_takes_the_capacity_step_at_a_macs_target_wherever_it_is_denser(mobilenet, monkeypatch):
    """``magnitude``'s multiplier keeps only the architecture's proportions: at a MACs
    target its default is the capacity step's structure wherever that has more MACs per
    predicted ms (held to no gain, whatever MorphNet's threshold), and the report says what
    it was held to."""
    from dnnshrink_core import capacity

    monkeypatch.setattr(capacity, "AUTO_CAPACITY_GAIN", 1.0)  # out of any algorithm's reach but magnitude's
    model, x = mobilenet[0], X224
    options = dict(train_one_epoch=lambda m, lr: None, train=None, test=lambda m: 1.0, algorithm="magnitude",
                   max_epochs=0, target_macs=0.3, finetune=False, device="cpu", progress=False, latency_runs=1,
                   exporters=(), onnx_latency=False, tensorboard=False)
    runs = {scale: shrink(model, x, scale=scale, **options) for scale in ("auto", "capacity", "multiplier")}
    learning = runs["auto"].report.extra["structure_learning"]
    assert (learning["scale"], learning["scale_why"], learning["capacity_least_gain"]) == ("capacity", "gain", 0.0)
    assert learning["capacity_gain"] > 0
    for group, keep in runs["capacity"].masks.items():
        assert np.array_equal(runs["auto"].masks[group], keep), group
    assert any(not np.array_equal(runs["multiplier"].masks[g], keep) for g, keep in runs["capacity"].masks.items())


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(conv_bn(3, 32, 3), conv_bn(32, 64, 3), conv_bn(64, 32, 3))
        self.fc = nn.Linear(32, 4)

    def forward(self, x):
        return self.fc(self.body(x).mean((2, 3)))


def tiny_task(size: int = 8):
    """A batch of ``size``×``size`` images (for :class:`Tiny` by default) and a
    ``train_one_epoch`` of one SGD step on it."""
    torch.manual_seed(0)
    x = torch.randn(8, 3, size, size)

    def epoch(model, lr):
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()

    return x, epoch


def test_morphnet_with_scale_capacity_meets_its_target_and_records_the_option(tmp_path):
    x, epoch = tiny_task()

    options = dict(train_one_epoch=epoch, train=lambda m: None, test=lambda m: 0.5, target_macs=0.4, max_epochs=3,
                   scale="capacity", device="cpu", progress=False, latency_runs=1, exporters=[], tensorboard=False,
                   out_dir=str(tmp_path / "run"))
    result = shrink(Tiny(), x[:1], **options)
    assert result.report.extra["shrunk"]["macs"] <= 0.4 * result.report.extra["baseline"]["macs"]
    with pytest.raises(ds.DnnshrinkError, match=r"scale 'capacity' then, 'multiplier' now"):
        shrink(Tiny(), x[:1], resume=True, **{**options, "scale": "multiplier"})


@pytest.mark.parametrize("anneal", [True, False])
def test_morphnet_with_scale_auto_at_a_macs_target_builds_the_structure_it_names(anneal, monkeypatch):
    """At a MACs target the default weighs the multiplier's structure against the capacity
    step's once, for the structure itself (annealed: at the last cut; the cuts before it go
    with the multiplier), and names its choice, the gain and what decided in the report.
    With the threshold out of reach the run is the multiplier's own; with any gain enough,
    the capacity step's (without annealing, where both learn alike); with the real threshold
    the one it names."""
    from dnnshrink_core import capacity
    from dnnshrink_plugins.morphnet.algorithm import Capacity
    from models import DepthwiseNet

    x, epoch = tiny_task(64)
    model = DepthwiseNet()  # (shrink leaves it as it is: every run starts from the same weights)
    for module in model.modules():  # scales far apart: no tie for float noise between runs to break
        if isinstance(module, nn.BatchNorm2d):
            module.weight.data.uniform_(0.5, 1.5)
    options = dict(train_one_epoch=epoch, train=lambda m: None, test=lambda m: 0.5, target_macs=0.5, max_epochs=4,
                   anneal=anneal, strength_scale=1e-6, device="cpu", progress=False, latency_runs=1, exporters=[],
                   tensorboard=False, onnx_latency=False)
    runs = {scale: shrink(model, x[:1], scale=scale, **options) for scale in ("multiplier", "capacity")}
    masks = runs["multiplier"].masks
    assert any(not np.array_equal(masks[g], runs["capacity"].masks[g]) for g in masks)
    decisions = []
    weigh = Capacity.auto
    monkeypatch.setattr(Capacity, "auto", lambda self, *a: decisions.append(weigh(self, *a)[1]) or weigh(self, *a))
    for threshold in (2.0, -2.0, capacity.AUTO_CAPACITY_GAIN):
        monkeypatch.setattr(capacity, "AUTO_CAPACITY_GAIN", threshold)
        decisions.clear()
        auto = shrink(model, x[:1], **options)
        learning = auto.report.extra["structure_learning"]
        assert learning.get("annealed", False) == anneal and learning["scale_option"] == "auto"
        assert len(decisions) == 1 and {k: learning[k] for k in decisions[0]} == decisions[0]
        assert learning["scale_why"] == "gain"
        assert learning["scale"] == ("capacity" if learning["capacity_gain"] >= threshold else "multiplier")
        assert auto.report.extra["shrunk"]["macs"] <= 0.5 * auto.report.extra["baseline"]["macs"]
        if anneal and learning["scale"] == "capacity":
            continue  # (its last cut is the capacity step's from the multiplier's cuts: neither run's own)
        named = runs[learning["scale"]]
        assert all(np.array_equal(auto.masks[g], named.masks[g]) for g in named.masks), threshold


def test_a_run_made_with_the_multiplier_resumes_only_with_it_and_says_why(tmp_path):
    """Runs before ``scale: auto`` took the multiplier at every target; resuming one with
    the new default would change its structure: refused, naming the default and the option
    to pass."""
    x, epoch = tiny_task()

    options = dict(train_one_epoch=epoch, train=lambda m: None, test=lambda m: 0.5, max_epochs=2,
                   target={"resource": "latency", "value": 0.8}, device="cpu", progress=False, latency_runs=1,
                   exporters=[], tensorboard=False, onnx_latency=False, out_dir=str(tmp_path / "run"))
    for target, now in (({"resource": "latency", "value": 0.8}, "capacity"), (0.5, "auto")):
        options = {**options, "target": target, "out_dir": str(tmp_path / now)}
        shrink(Tiny(), x[:1], scale="multiplier", **options)
        with pytest.raises(ds.DnnshrinkError, match=rf"scale 'multiplier' then, '{now}' now\) \(the default scale, "
                                                    r"auto, chooses the capacity step at a latency target.*that run "
                                                    r"was made with the multiplier, the default before\).*options it "
                                                    r"had \(scale: multiplier\)"):
            shrink(Tiny(), x[:1], resume=True, **options)
        shrink(Tiny(), x[:1], resume=True, scale="multiplier", **options)  # as it was: continues


def test_an_algorithm_without_a_capacity_step_refuses_it_before_any_work(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("model: m.py:build\nfunctions: f.py\ninput_shape: [1, 3, 8, 8]\nalgorithm: slimming\n"
                    "scale: capacity\n")
    from dnnshrink_core.config import load_config

    with pytest.raises(ds.ConfigError, match=r"key 'scale': the slimming algorithm has no capacity step"):
        load_config(path)
    with pytest.raises(ds.ConfigError, match=r"option 'scale' must be 'auto' .* 'multiplier' .* or 'capacity'"):
        shrink(Tiny(), torch.randn(1, 3, 8, 8), train_one_epoch=lambda m, lr: None, train=lambda m: None,
               test=lambda m: 1.0, scale="even", device="cpu", progress=False)


def test_measure_target_times_the_capacity_steps_structures_when_the_run_builds_them(tmp_path, capsys):
    """The probes of ``measure_target`` are the structures the run builds: the capacity
    step's (they run at another share of their prediction than the uniform multiplier's)."""
    torch.manual_seed(0)
    model = nn.Sequential(conv_bn(3, 32, 3), conv_bn(32, 64, 3, stride=2), conv_bn(64, 64, 3),
                          conv_bn(64, 128, 3, stride=2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(128, 10)).eval()
    x = torch.randn(1, 3, 32, 32)
    result = shrink(model, x, train_one_epoch=lambda m, lr: None, train=None, test=lambda m: 1.0,
                    algorithm="magnitude", max_epochs=0, target={"resource": "latency", "value": 0.6},
                    scale="capacity", measure_target=True, finetune=False, device="cpu", progress=False,
                    latency_runs=1, exporters=(), onnx_latency=False, tensorboard=False)
    out = capsys.readouterr().out
    assert "measured target: the capacity step at" in out and "the uniform multiplier at" not in out
    measured = result.report.extra["structure_learning"]["measured_target"]
    latency = result.report.extra["resources"]["latency_ms"]
    assert latency["after"] <= measured["predicted_budget"] * latency["before"] * (1 + 1e-9)


def test_a_step_that_does_not_lower_the_cost_is_taken_when_no_step_does():
    """A concatenation whose pieces leave the runtime's block costs more one block down and
    less two blocks down (MixNet-S stopped at 68% of a 50% latency target): the steps go on
    through it instead of stopping above the budget."""
    torch.manual_seed(0)
    model = nn.Sequential(conv_bn(3, 64, 3), conv_bn(64, 64, 3), nn.Conv2d(64, 4, 1)).eval()
    x = torch.randn(1, 3, 8, 8)
    graph = ds.trace(model, x)
    flops = CostModel(graph, model, "flops")
    widths = lambda keep: [int(keep[g.units].sum()) for g in graph.groups if g.size == 64]  # noqa: E731

    def cost(keep):  # a width off a multiple of 32 pays double: every first step down costs more
        return flops.cost(keep) * (2.0 if any(w % 32 for w in widths(keep)) else 1.0)

    ones = np.ones(graph.num_units, dtype=bool)
    for share in (0.6, 0.3):
        keep = capacity_to_budget(graph, ones, np.zeros(graph.num_units), cost, share * cost(ones), cost, flops.cost,
                                  1, 16)
        assert cost(keep) <= share * cost(ones), (share, widths(keep))


@pytest.mark.parametrize("target", [{"resource": "macs", "value": 0.3}, {"resource": "latency", "value": 0.5}])
def test_scale_capacity_never_keeps_less_capacity_per_millisecond_than_the_multiplier(target):
    """Where the steps alone would do worse than an even cut (VGG-11 at 30% of its MACs
    predicted 8% slower), the multiplier's structure is kept: capacity per predicted ms is
    never below the multiplier's, and the target is met."""
    torch.manual_seed(0)
    model = torchvision.models.vgg11_bn(weights=None, num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    options = dict(train_one_epoch=lambda m, lr: None, train=None, test=lambda m: 1.0, algorithm="magnitude",
                   max_epochs=0, target=target, finetune=False, device="cpu", progress=False, latency_runs=1,
                   exporters=(), onnx_latency=False, tensorboard=False)
    density = {}
    for scale in ("multiplier", "capacity"):
        resources = shrink(model, x, scale=scale, **options).report.extra["resources"]
        budget = target["value"] * resources["macs" if target["resource"] == "macs" else "latency_ms"]["before"]
        assert resources["macs" if target["resource"] == "macs" else "latency_ms"]["after"] <= budget * (1 + 1e-9)
        density[scale] = resources["macs"]["after"] / resources["latency_ms"]["after"]
    assert density["capacity"] >= density["multiplier"] * (1 - 1e-9)


def test_measure_target_probes_are_the_structures_magnitude_builds():
    """The probe of ``measure_target`` under ``scale: capacity`` is what ``magnitude`` builds
    at that budget (the same widths; it timed the capacity step without its floors or the
    even structure it may keep instead)."""
    from dnnshrink_plugins.morphnet.algorithm import Magnitude

    torch.manual_seed(0)
    model = nn.Sequential(conv_bn(3, 32, 3), conv_bn(32, 64, 3, stride=2), conv_bn(64, 64, 3),
                          conv_bn(64, 128, 3, stride=2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(128, 10)).eval()
    x = torch.randn(1, 3, 32, 32)
    graph = ds.trace(model, x)
    latency = CostModel(graph, model, "latency")
    round_to, _ = resolve_round_to(graph, model, "auto", latency=latency)
    probe = Magnitude.capacity_probe(graph, model, latency, None, 1, round_to)
    for share in (0.5, 0.7):
        result = shrink(model, x, train_one_epoch=lambda m, lr: None, train=None, test=lambda m: 1.0,
                        algorithm="magnitude", max_epochs=0, target={"resource": "latency", "value": share},
                        scale="capacity", finetune=False, device="cpu", progress=False, latency_runs=1, exporters=(),
                        onnx_latency=False, tensorboard=False)
        timed = probe(share * latency.initial)
        for group in graph.groups:
            assert int(timed[group.units].sum()) == int(result.masks[group.name].sum()), (share, group.name)


def test_where_blocks_must_go_capacity_keeps_no_fewer_macs_per_millisecond_than_the_multiplier():
    """Below what channels alone reach, the blocks dropped after the capacity step rescale
    an already squeezed structure (0.49 against 0.60 MACs per ms on this ResNet at 60% of
    its latency): the even structure with its blocks dropped is kept where it is denser.
    Priced by a profile whose ops cost more per call (the shipped one of 2026-12-01 01:05,
    timed with threads that sleep between ops), where the two structures differ."""
    from models import ChannelPadResNet

    torch.manual_seed(0)
    model = ChannelPadResNet().eval()
    x = torch.randn(1, 3, 32, 32)
    density = {}
    for scale in ("multiplier", "capacity"):
        result = shrink(model, x, train_one_epoch=lambda m, lr: None, train=None, test=lambda m: 1.0,
                        algorithm="magnitude", max_epochs=0, target={"resource": "latency", "value": 0.6},
                        scale=scale, finetune=False, device="cpu", progress=False, latency_runs=1, exporters=(),
                        onnx_latency=False, tensorboard=False, profile=str(SLEEPING_PROFILE))
        resources = result.report.extra["resources"]
        assert resources["latency_ms"]["after"] <= 0.6 * resources["latency_ms"]["before"] * (1 + 1e-9)
        assert result.report.extra["blocks_dropped"]["blocks"]  # the target needs blocks to go
        density[scale] = resources["macs"]["after"] / resources["latency_ms"]["after"]
    assert density["capacity"] >= density["multiplier"] * (1 - 1e-9)


@pytest.mark.parametrize("scale", ["multiplier", "capacity"])
def test_a_profile_that_cannot_be_read_stops_the_run_before_any_work(tmp_path, scale):
    """A params target with an integer round_to read the profile only after training (the
    capacity step, the report's predicted latency): a wrong path must stop the run first."""
    calls = []
    with pytest.raises(ds.ConfigError, match="does not exist"):
        shrink(Tiny(), torch.randn(1, 3, 8, 8), train_one_epoch=lambda m, lr: calls.append(lr),
               train=lambda m: calls.append("train"), test=lambda m: 1.0,
               target={"resource": "params", "value": 0.5}, round_to=16, scale=scale,
               profile=str(tmp_path / "no-such-profile.json"), max_epochs=2, device="cpu", progress=False,
               out_dir=str(tmp_path / "run"), exporters=())
    assert calls == [] and not (tmp_path / "run").exists()


def test_the_command_line_scale_flag(tmp_path, capsys):
    """``--scale`` on ``run`` (and ``demo``): checked with the config before any work, and
    recorded in the run."""
    from dnnshrink_core import cli
    from test_pipeline import write_config

    config = write_config(tmp_path, device="cpu", exporters=[], max_epochs=1, finetune=False,
                          target_macs=0.5)
    assert cli.main(["run", str(config), "--out", str(tmp_path / "a"), "--quiet", "--algorithm", "slimming",
                     "--scale", "capacity"]) == 1
    assert "the slimming algorithm has no capacity step" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    assert cli.main(["run", str(config), "--out", str(tmp_path / "b"), "--quiet", "--algorithm", "magnitude",
                     "--scale", "capacity"]) == 0
    identity = json.loads((tmp_path / "b" / "checkpoints" / "run.json").read_text())
    assert identity["scale"] == "capacity"


def test_a_cut_that_buys_no_time_says_so_and_the_default_does_not_make_it(tmp_path, capsys):
    """RegNetX-400MF cut evenly to half its MACs: its grouped convolutions leave the runtime's
    channel block and the profile predicts it slower than the baseline (measured: no faster).
    The summary and report.md say so and name the capacity step, which builds a faster one;
    the default (``scale: auto``) builds that one, and says why."""
    from dnnshrink_core.report import speed_note

    model = torchvision.models.regnet_x_400mf(weights=None).eval()
    options = dict(train_one_epoch=lambda m, lr: None, train=None, test=lambda m: 1.0, algorithm="magnitude",
                   max_epochs=0, target_macs=0.5, finetune=False, device="cpu", progress=False, latency_runs=1,
                   exporters=(), onnx_latency=False, tensorboard=False)
    result = shrink(model, X224, out_dir=str(tmp_path / "even"), scale="multiplier", **options)
    latency = result.report.extra["resources"]["latency_ms"]
    assert latency["after"] >= 0.95 * latency["before"]
    said = "of its time as the latency profile predicts it"
    assert said in capsys.readouterr().out and said in (tmp_path / "even" / "report.md").read_text()
    assert "`scale: capacity` (`--scale capacity`) builds the structure that runs fastest" in \
        speed_note(result.report.extra, "")
    capacity = shrink(model, X224, scale="capacity", **options)
    latency = capacity.report.extra["resources"]["latency_ms"]
    assert latency["after"] < 0.8 * latency["before"] and speed_note(capacity.report.extra, "") == ""
    default = shrink(model, X224, **options)
    learning = default.report.extra["structure_learning"]
    assert (learning["scale_option"], learning["scale"]) == ("auto", "capacity")
    assert learning["capacity_gain"] > 0.3
    assert "scale auto: the capacity step's structure, which needs" in capsys.readouterr().out
    for group in capacity.masks:
        assert np.array_equal(default.masks[group], capacity.masks[group]), group
    # measured beats predicted where the run timed the ONNX, and a real speed-up says nothing
    extra = {**result.report.extra, "onnx_latency": {"baseline_ms": 3.5, "shrunk_ms": 3.4}}
    assert "of its time as onnxruntime measured it" in speed_note(extra, "")
    assert speed_note({**extra, "onnx_latency": {"baseline_ms": 3.5, "shrunk_ms": 2.0}}, "") == ""


def test_scale_auto_without_a_latency_cost_model_keeps_the_multiplier(monkeypatch, capsys):
    """With no latency cost model loaded the default cannot weigh time: it says so and keeps
    the learned proportions (an explicit ``scale: capacity`` still stops with the error)."""
    from dnnshrink_core import pipeline

    def no_latency(graph, model, kind, **kwargs):
        if kind == "latency":
            raise ds.PluginError("no cost model called 'latency' is loaded")
        return CostModel(graph, model, kind, **kwargs)

    monkeypatch.setattr(pipeline, "CostModel", no_latency)
    x, epoch = tiny_task()
    options = dict(train_one_epoch=epoch, train=lambda m: None, test=lambda m: 0.5, target_macs=0.5,
                   algorithm="magnitude", max_epochs=0, device="cpu", progress=False, latency_runs=1, exporters=[],
                   tensorboard=False, onnx_latency=False, finetune=False)
    result = shrink(Tiny(), x[:1], **options)
    learning = result.report.extra["structure_learning"]
    assert (learning["scale"], learning["scale_option"], learning["scale_why"]) == \
        ("multiplier", "auto", "no latency cost model")
    assert "capacity_gain" not in learning  # nothing was weighed
    assert "scale auto: the width multiplier (no latency cost model is loaded" in capsys.readouterr().out
    with pytest.raises(ds.PluginError, match="no cost model called 'latency'"):
        shrink(Tiny(), x[:1], scale="capacity", **options)


def test_the_speed_note_after_scale_auto_kept_the_multiplier_says_what_the_capacity_step_offered():
    """A cut that bought no time where ``scale: auto`` weighed the capacity step and kept the
    multiplier: the note gives the gain it saw (never a negative "less"), and offers the
    capacity step only where it was faster and within the budget."""
    from dnnshrink_core.report import speed_note

    extra = {"baseline": {"macs": 100}, "shrunk": {"macs": 50},
             "resources": {"latency_ms": {"before": 1.0, "after": 0.99}}}

    def note(**learning):
        return speed_note({**extra, "structure_learning": {"scale": "multiplier", "scale_option": "auto",
                                                           **learning}}, "")

    assert "predicted to need only 7.7% less time per MAC (`scale: capacity` takes it anyway)" in \
        note(capacity_gain=0.0767, scale_why="gain")
    for learning in ({"capacity_gain": -0.05, "scale_why": "gain"}, {"capacity_gain": 0.0, "scale_why": "same"}):
        said = note(**learning)
        assert "would be no faster per MAC" in said and "-5" not in said and "takes it anyway" not in said
    said = note(capacity_gain=0.3, scale_why="budget")
    assert "a latency target with measure_target" in said and "scale: capacity" not in said
