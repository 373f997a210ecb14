"""measure_target: a latency target met as measured (dnnshrink_core.feedback): the search
against runtimes whose latency is a known function of the predicted one, the refusal of a
target the smallest network cannot meet, and a pipeline run that times with onnxruntime,
records its probes and reuses them when resumed."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import dnnshrink_core as ds
from dnnshrink_core.cost import CostModel, resolve_round_to
from dnnshrink_core.errors import ConfigError, DnnshrinkError, TargetError
from dnnshrink_core.feedback import MeasuredTarget, measured_budget, next_budget, solve
from dnnshrink_core.pipeline import shrink
from dnnshrink_core.target import Target, smallest_cost
from models import conv_bn


def runtime(floor: float, power: float):
    """A runtime whose measured share is ``floor + (1 - floor) * predicted ** power``."""
    return lambda p: floor + (1 - floor) * p ** power


@pytest.mark.parametrize("floor,power", [(0.0, 1.0), (0.2, 1.5), (0.1, 0.7), (0.35, 1.0)])
def test_the_search_finds_the_predicted_share_a_runtime_measures_at_the_target(floor, power):
    measured = runtime(floor, power)
    share, probes = solve(lambda p: (p, measured(p)), 0.5, low=0.01)
    assert measured(share) == pytest.approx(0.5, rel=0.03)
    assert 1 <= len(probes) <= 3 and probes[0][0] == 0.5  # the profile's word first


def test_the_search_stops_when_rounding_builds_a_structure_it_timed_before():
    measured = runtime(0.3, 1.0)
    asked = []

    def rounded(p):  # structures exist only at multiples of 0.25 of the predicted latency
        asked.append(p)
        q = max(0.25, math.floor(p * 4) / 4)
        return q, measured(q)

    share, probes = solve(rounded, 0.62, low=0.25)
    assert len({p for p, _ in probes}) == len(probes) and len(asked) <= 3
    assert 0.25 <= share <= 1.0


def test_the_next_share_interpolates_between_probes_that_bracket_the_target():
    # measured = predicted ** 2 between (0.4, 0.16) and (0.8, 0.64): 0.25 measured at 0.5 predicted
    assert next_budget([(0.4, 0.16), (0.8, 0.64)], 0.25, 0.01) == pytest.approx(0.5)
    # one probe: proportional; within the bounds
    assert next_budget([(0.5, 0.6)], 0.5, 0.01) == pytest.approx(0.5 * 0.5 / 0.6)
    assert next_budget([(0.5, 0.1)], 0.9, 0.01) == 1.0


class PredictedRuntime:
    """A runtime whose latency is the profile's prediction plus a floor: OnnxRatio's interface."""

    def __init__(self, x, floor: float, base: float):
        self.x, self.floor, self.base, self.baseline_s, self.closed = x, floor, base, 1e-3, False

    def __call__(self, net):
        cost = CostModel(ds.trace(net, self.x), net, "latency").initial
        return self.floor + (1 - self.floor) * cost / self.base

    def close(self):
        self.closed = True


def small_cnn() -> nn.Module:
    return nn.Sequential(conv_bn(3, 32), conv_bn(32, 64, stride=2), conv_bn(64, 64), conv_bn(64, 128, stride=2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10)).eval()


def test_the_budget_follows_the_measured_runtime_and_a_target_below_its_floor_is_refused():
    torch.manual_seed(0)
    model, x = small_cnn(), torch.randn(1, 3, 32, 32)
    graph = ds.trace(model, x)
    costs = CostModel(graph, model, "latency")
    round_to, _ = resolve_round_to(graph, model, "auto", latency=costs)
    minimum = smallest_cost(graph, costs, 1, round_to)
    timer = PredictedRuntime(x, 0.3, costs.initial)
    found = measured_budget(graph, model, (x,), costs, Target("latency", fraction=0.6), round_to, 1, minimum, 2,
                            timer=timer)
    # measured = 0.3 + 0.7 * predicted: 0.6 measured is near 0.43 predicted (rounding moves it a little)
    assert found.budget == pytest.approx(0.3 / 0.7, rel=0.08) and found.target == 0.6
    assert all(0 < p <= 1 and m > 0 for p, m in found.probes) and timer.closed
    assert MeasuredTarget.from_dict(json.loads(json.dumps(found.to_dict()))) == found
    for bad in ({"asked": {"resource": "latency", "fraction": 2}}, {"asked": {"resource": "latency", "code": 1}},
                {"probes": [{"predicted": "0.5", "measured": 0.4}]}, {"budget": 0.5}, {"threads": True}):
        with pytest.raises(ValueError):
            MeasuredTarget.from_dict({**found.to_dict(), **bad})
    # an amount in ms is a share of the baseline's measured latency (1 ms on this runtime)
    by_amount = measured_budget(graph, model, (x,), costs, Target("latency", amount=0.6), round_to, 1, minimum, 2,
                                timer=PredictedRuntime(x, 0.3, costs.initial))
    assert by_amount.target == pytest.approx(0.6) and by_amount.budget == pytest.approx(found.budget)
    with pytest.raises(TargetError, match="at or above the baseline's measured latency"):
        measured_budget(graph, model, (x,), costs, Target("latency", amount=1.5), round_to, 1, minimum, 2,
                        timer=PredictedRuntime(x, 0.3, costs.initial))
    with pytest.raises(TargetError, match="below what the smallest network this model can become runs at"):
        measured_budget(graph, model, (x,), costs, Target("latency", fraction=0.2), round_to, 1, minimum, 2,
                        timer=PredictedRuntime(x, 0.3, costs.initial))


def test_measure_target_with_a_target_counted_exactly_is_refused_before_any_work(tmp_path):
    called = []
    with pytest.raises(ConfigError, match="measure_target' applies to latency targets"):
        shrink(small_cnn(), torch.randn(1, 3, 32, 32), train_one_epoch=lambda m, lr: called.append(1),
               test=lambda m: called.append(1) or 0.0, target=0.5, measure_target=True, algorithm="magnitude",
               out_dir=str(tmp_path / "run"), progress=False)
    assert not called and not (tmp_path / "run").exists()


def test_measure_target_with_a_profile_of_another_runtime_is_refused_before_any_work(tmp_path):
    from dnnshrink_plugins.costs.latency import load_profile

    shipped = load_profile(None)
    path = tmp_path / "gpu.json"
    type(shipped)({**shipped.runtime, "name": "torch", "device": "cuda"}, shipped.overhead_ms, shipped.ops,
                  shipped.calibration).save(path)
    called = []
    with pytest.raises(ConfigError, match="times the network with onnxruntime on the CPU; the latency profile is "
                                          "for torch on cuda"):
        shrink(small_cnn(), torch.randn(1, 3, 32, 32), train_one_epoch=lambda m, lr: called.append(1),
               test=lambda m: called.append(1) or 0.0, target="latency:0.5", measure_target=True,
               profile=str(path), algorithm="magnitude", finetune=False, out_dir=str(tmp_path / "run"),
               progress=False)
    assert not called and not (tmp_path / "run").exists()


def one_step(model, lr):
    """One optimizer step (MorphNet's penalty rides on it)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    optimizer.zero_grad()
    model(torch.randn(4, 3, 32, 32)).square().mean().backward()
    optimizer.step()


def test_a_run_with_measure_target_times_the_network_and_a_resumed_run_reuses_the_budget(tmp_path):
    torch.manual_seed(0)
    out = tmp_path / "run"
    options = dict(train_one_epoch=one_step, test=lambda m: 1.0, max_epochs=1,
                   target={"resource": "latency", "value": 0.6}, measure_target=True, finetune=False,
                   device="cpu", progress=False, latency_runs=2, exporters=["onnx"], tensorboard=False,
                   out_dir=str(out))
    model, x = small_cnn(), torch.randn(1, 3, 32, 32)
    first = shrink(model, x, **options)
    measured = first.report.extra["structure_learning"]["measured_target"]
    assert measured["target"] == 0.6 and 0 < measured["predicted_budget"] <= 1 and measured["baseline_ms"] > 0
    assert 1 <= len(measured["probes"]) <= 3
    assert json.loads((out / "measured_target.json").read_text()) == measured
    latency = first.report.extra["resources"]["latency_ms"]  # the algorithm worked to the measured budget
    assert latency["after"] <= measured["predicted_budget"] * latency["before"] * (1 + 1e-9)
    assert first.report.extra["onnx_latency"]["shrunk_ms"] > 0
    options.update(exporters=[], onnx_latency=False)  # what follows needs no file but the budget's
    again = shrink(model, x, resume=True, **options)  # no second timing: the same budget, the same network
    assert again.report.extra["structure_learning"]["measured_target"] == measured
    assert again.report.extra["resources"]["latency_ms"] == latency
    (out / "measured_target.json").write_text(json.dumps({**measured, "probes": "not a list"}))
    with pytest.raises(DnnshrinkError, match="is not a measured target written by dnnshrink"):
        shrink(model, x, resume=True, **options)


def test_the_command_line_flag_is_checked_with_the_config(tmp_path, capsys):
    from dnnshrink_core import cli
    from test_pipeline import write_config

    config = write_config(tmp_path, target_macs=0.5)
    assert cli.main(["run", str(config), "--out", str(tmp_path / "out"), "--quiet", "--measure-target"]) == 1
    assert "'measure_target' applies to latency targets" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
