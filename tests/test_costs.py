"""The cost models (flops, params, activations, latency), the latency profile and its
calibration fit, ``round_to: auto``, and a latency target through the pipeline."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import dnnshrink_core as ds
from dnnshrink_core.cost import CostModel, resolve_round_to
from dnnshrink_core.target import Target, check_reachable, smallest_cost
from dnnshrink_plugins.costs.calibrate import POSITION_KINDS, fit, op_terms, sweep_chains
from dnnshrink_plugins.costs.latency import (KINDS, TENSOR_KINDS, OpConstants, Profile, ProfileError, load_profile,
                                             profile_from_dict, roofline_seconds)
from models import conv_bn


class Mixed(nn.Module):
    """Dense 3×3, strided, pointwise, depthwise and linear layers, with a residual add."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 24, 3, 2)
        self.pw = conv_bn(24, 40, 1)
        self.dw = nn.Sequential(nn.Conv2d(40, 40, 3, 1, 1, groups=40, bias=False), nn.BatchNorm2d(40), nn.ReLU())
        self.proj = conv_bn(40, 24, 1)
        self.fc = nn.Linear(24, 10)

    def forward(self, x):
        y = self.stem(x)
        y = y + self.proj(self.dw(self.pw(y)))
        return self.fc(y.mean((2, 3)))


def synthetic_profile(multiple: int = 1, positions: bool = True) -> Profile:
    # the convolutions share one bandwidth (as the calibration fits it); ``positions``: a cost
    # per output position (ns) for the convolutions
    p = (8.0, 2.0, 1.0) if positions else (0.0, 0.0, 0.0)
    ops = {"conv": OpConstants(80.0, 20.0, 15.0, 3.0, multiple, p[0]),
           "pointwise": OpConstants(60.0, 15.0, 15.0, 2.0, multiple, p[1]),
           "depthwise": OpConstants(10.0, 2.0, 15.0, 4.0, multiple, p[2]), "linear": OpConstants(20.0, 20.0, 10.0, 1.0, 1)}
    # a grouped conv: its own peaks, its block in channels per group
    ops["grouped"] = OpConstants(40.0, 8.0, 15.0, 3.0, multiple, p[0])
    # the tensor ops compute nothing: a bandwidth each, an overhead within the fit's bound, a
    # cost per output position only where the fit has one (pooling's window, a row-wise pass)
    ops.update({kind: OpConstants.tensor_op(8.0 + 3 * i, 0.25 * (i % 5),
                                            0.5 * p[2] * (i % 3) if kind in POSITION_KINDS else 0.0)
                for i, kind in enumerate(TENSOR_KINDS)})
    if multiple > 1:  # a concatenation whose pieces miss the block runs at a third of its bandwidth
        c = ops["concat"]
        ops["concat"] = OpConstants.tensor_op(c.bandwidth_gbs, c.overhead_us, c.position_ns, multiple,
                                              c.bandwidth_gbs / 3)
    return Profile({"name": "onnxruntime", "device": "cpu", "threads": 2, "batch": 1}, 0.05, ops)


def torch_cost(costs: CostModel, alive: torch.Tensor, name: str, profile: Profile) -> torch.Tensor:
    """An independent reimplementation of each resource in torch, differentiated by autograd."""
    t = costs.table
    n = len(t)
    kin = torch.zeros(n, dtype=torch.float64).index_add(0, torch.as_tensor(costs.in_layer),
                                                        alive[torch.as_tensor(costs.in_units)])
    kout = torch.zeros(n, dtype=torch.float64).index_add(0, torch.as_tensor(costs.out_layer),
                                                         alive[torch.as_tensor(costs.out_units)])
    dw = torch.as_tensor(t.depthwise)
    f64 = (lambda a: torch.as_tensor(np.asarray(a, dtype=np.float64)))
    if name == "flops":
        return torch.where(dw, f64(t.coef) * kout, f64(t.coef) * kin * kout).sum()
    if name == "params":
        return torch.where(dw, f64(t.weights_per_pair) * kout, f64(t.weights_per_pair) * kin * kout).sum()
    if name == "activations":
        return (f64(t.out_positions) * kout).sum()
    free = OpConstants.tensor_op(float("inf"), 0.0)  # a concatenation's piece costs nothing
    c = {k: profile.ops.get(str(k), free) for k in set(t.op)}
    peak = f64([c[k].peak_gmacs * 1e9 for k in t.op])
    # a concatenation with a block: the unaligned bandwidth when a piece's kept count misses it
    counts = kout.detach().numpy()
    bandwidths = []
    for i, kind in enumerate(t.op):
        missed, j = False, i + 1
        while j < n and t.op[j] == "piece":
            missed |= counts[j] % c[kind].channel_multiple != 0
            j += 1
        bandwidths.append((c[kind].bandwidth_unaligned if missed else c[kind].bandwidth_gbs) * 1e9)
    bw = f64(bandwidths)
    over = f64([c[k].overhead_us * 1e-6 for k in t.op]) + f64([c[k].position_ns * 1e-9 for k in t.op]) * f64(
        t.out_positions)  # (batch 1) what a layer pays per output position: constant in its widths
    kin = torch.where(dw, kout, kin)
    macs = torch.where(dw, f64(t.coef) * kout, f64(t.coef) * kin * kout)
    weights = torch.where(dw, f64(t.weights_per_pair) * kout, f64(t.weights_per_pair) * kin * kout)
    traffic = 4 * (f64(t.in_positions) * kin + f64(t.out_positions) * kout + weights)
    return 1e3 * (torch.maximum(macs / peak, traffic / bw) + over).sum() + profile.overhead_ms


@pytest.mark.parametrize("name", ["flops", "params", "activations", "latency"])
def test_unit_weights_match_autograd_and_costs_match_counts(name):
    model, x = Mixed().eval(), torch.randn(1, 3, 16, 16)
    graph = ds.trace(model, x)
    profile = synthetic_profile(1)  # no block: the cost is smooth in the counts
    costs = CostModel(graph, model, name, profile=profile)
    rng = np.random.default_rng(0)
    for alive in (np.ones(graph.num_units, dtype=bool), rng.random(graph.num_units) < 0.6):
        soft = torch.tensor(alive.astype(np.float64), requires_grad=True)
        total = torch_cost(costs, soft, name, profile)
        total.backward()
        assert costs.cost(alive) == pytest.approx(total.item(), rel=1e-9)
        np.testing.assert_allclose(costs.unit_weights(alive), soft.grad.numpy(), rtol=1e-9, atol=1e-12)
    if name == "params":
        assert costs.initial == sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    if name == "activations":  # every conv/linear output element, from forward hooks
        seen = []
        hooks = [m.register_forward_hook(lambda m, i, o: seen.append(o[0].numel()))
                 for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        model(x)
        for h in hooks:
            h.remove()
        assert costs.initial == sum(seen)


def test_old_spellings_and_flops_default_still_work():
    model, x = Mixed().eval(), torch.randn(1, 3, 16, 16)
    graph = ds.trace(model, x)
    assert CostModel(graph, model).initial == ds.layer_report(model, x).totals["macs_before"]
    assert CostModel(graph, model, "size").initial == CostModel(graph, model, "params").initial
    with pytest.raises(ds.PluginError, match="latency"):
        CostModel(graph, model, "energy")


def layer_multiples(profile: Profile) -> dict:
    """The channel block of every layer kind of ``profile`` (grouped convs too), and of a
    concatenation's pieces."""
    return {k: c.channel_multiple for k, c in profile.ops.items() if k not in TENSOR_KINDS or k == "concat"}


def synthetic_samples(truth: Profile, thin: bool) -> list:
    """The sweep's chains timed by ``truth`` itself (roofline, overheads, per-position costs)."""
    from dnnshrink_plugins.costs.calibrate import concat_pieces, is_aligned, op_positions

    multiples = layer_multiples(truth)
    samples = []
    for ops in sweep_chains(thin=thin):
        t = truth.overhead_ms * 1e-3
        for i, op in enumerate(ops):
            c = truth.ops[op[0]]
            macs, traffic = op_terms(op, 1)
            peak = c.peak_gmacs if is_aligned(op, multiples.get(op[0], 1)) else c.peak_unaligned_gmacs
            bandwidth = c.bandwidth_gbs
            if op[0] == "concat" and any(piece % c.channel_multiple for piece in concat_pieces(ops, i)):
                bandwidth = c.bandwidth_unaligned
            t += float(roofline_seconds(macs, traffic, peak * 1e9, bandwidth * 1e9, c.overhead_us * 1e-6))
            t += op_positions(op, 1) * c.position_ns * 1e-9
        samples.append((ops, t))
    return samples


def test_default_sweep_is_the_first_part_of_the_thin_one():
    # bench/bench_calibration_models.py fits the default model to that part of one timing
    plain, thin = sweep_chains(), sweep_chains(thin=True)
    assert len(thin) > len(plain) and thin[:len(plain)] == plain


def test_calibration_fit_recovers_known_constants():
    truth = synthetic_profile(16, positions=False)
    multiples = layer_multiples(truth)
    # unaligned chains run at the unaligned peak: give the linear kind the aligned one
    samples = synthetic_samples(truth, thin=False)
    ops, per_run_ms, stats = fit(samples, 1, multiples)
    assert stats["sweep_mean_abs_error_pct"] < 0.5
    assert per_run_ms == pytest.approx(truth.overhead_ms, rel=0.1)
    for kind in KINDS + ("grouped",):
        if kind != "linear":  # at batch 1 a linear layer is memory-bound: its peak is not seen
            assert ops[kind].peak_gmacs == pytest.approx(truth.ops[kind].peak_gmacs, rel=0.05), kind
        if kind != "conv":  # 3×3 convs are compute-bound at every swept shape: their bandwidth is not seen
            assert ops[kind].bandwidth_gbs == pytest.approx(truth.ops[kind].bandwidth_gbs, rel=0.05), kind
        if kind != "linear":
            assert ops[kind].peak_unaligned_gmacs == pytest.approx(truth.ops[kind].peak_unaligned_gmacs, rel=0.05)
        assert ops[kind].channel_multiple == multiples[kind]
    for kind in TENSOR_KINDS:  # the ops between the layers: a bandwidth and an overhead each
        assert ops[kind].bandwidth_gbs == pytest.approx(truth.ops[kind].bandwidth_gbs, rel=0.05), kind
        # and a concatenation its bandwidth when the pieces miss its block (the ghost modules')
        assert ops[kind].bandwidth_unaligned == pytest.approx(truth.ops[kind].bandwidth_unaligned, rel=0.05), kind
        assert ops[kind].channel_multiple == truth.ops[kind].channel_multiple
        # a fraction of a microsecond beside the chain's per-run overhead and the other ops of
        # the excitation chains (pooling, gate, multiply): seen only roughly
        assert ops[kind].overhead_us == pytest.approx(truth.ops[kind].overhead_us, abs=0.6), kind


def test_calibration_fit_recovers_a_per_position_cost_and_small_overheads():
    """``--per-position``: with thin chains in the sweep, the fit separates what a layer pays
    per output position from its per-call overhead (which, fitted without the term, absorbs it)."""
    truth = synthetic_profile(16, positions=True)
    multiples = layer_multiples(truth)
    samples = synthetic_samples(truth, thin=True)
    ops, per_run_ms, stats = fit(samples, 1, multiples, per_position=True)
    assert stats["sweep_mean_abs_error_pct"] < 0.5
    for kind in ("conv", "pointwise", "depthwise"):
        assert ops[kind].position_ns == pytest.approx(truth.ops[kind].position_ns, rel=0.05, abs=0.05), kind
        assert ops[kind].overhead_us == pytest.approx(truth.ops[kind].overhead_us, rel=0.1, abs=0.2), kind
        assert ops[kind].peak_gmacs == pytest.approx(truth.ops[kind].peak_gmacs, rel=0.05), kind
    plain, _, plain_stats = fit(samples, 1, multiples)  # the same timings, no per-position term
    assert plain_stats["sweep_mean_abs_error_pct"] > 5 * stats["sweep_mean_abs_error_pct"]
    assert all(o.position_ns == 0 for o in plain.values())


def test_profile_round_trip_and_closed_schema(tmp_path):
    profile = synthetic_profile(16)
    path = profile.save(tmp_path / "p.json")
    again = load_profile(path)
    assert again == profile
    assert load_profile(None).runtime["name"] == "onnxruntime"  # the shipped default loads
    data = json.loads(path.read_text())
    assert data["ops"]["conv"]["position_ns"] == 8.0
    older = {**data, "ops": {k: {f: v for f, v in op.items() if f != "position_ns"} for k, op in data["ops"].items()}}
    assert all(op.position_ns == 0 for op in profile_from_dict(older).ops.values())  # made before the term
    bad = [({**data, "extra": 1}, "unknown key"), ({**data, "version": 99}, "version 99"),
           ({**data, "format": "x"}, "format"),
           ({**data, "ops": {**data["ops"], "conv": {**data["ops"]["conv"], "peak_gmacs": "fast"}}}, "peak_gmacs"),
           ({**data, "ops": {**data["ops"], "conv": {**data["ops"]["conv"], "peak_gmacs": -1.0}}}, "> 0"),
           ({**data, "ops": {k: v for k, v in data["ops"].items() if k != "linear"}}, "missing linear"),
           ({**data, "runtime": {**data["runtime"], "threads": 1.5}}, "threads"),
           ({**data, "ops": {**data["ops"], "conv": {**data["ops"]["conv"], "position_ns": -1.0}}}, "position_ns")]
    for broken, words in bad:
        with pytest.raises(ProfileError, match=words):
            profile_from_dict(broken)
    (tmp_path / "not.json").write_text("{")
    with pytest.raises(ProfileError, match="not readable JSON"):
        load_profile(tmp_path / "not.json")
    with pytest.raises(ProfileError, match="does not exist"):
        load_profile(tmp_path / "missing.json")


def test_round_to_auto_widths_and_alive_masks_keep_exactness():
    torch.manual_seed(0)
    model, x = Mixed().eval(), torch.randn(2, 3, 16, 16)
    graph = ds.trace(model, x)
    profile = synthetic_profile(16)
    multiples, notes = resolve_round_to(graph, model, "auto", profile)
    by_name = dict(zip(graph.group_names, multiples))
    assert by_name[graph.group_of("pw.0").name] == 16  # 40 channels: rounded to 16
    assert by_name[graph.group_of("fc").name] == 1  # the classifier's outputs are frozen, never rounded
    assert all("the runtime's block" in n for n in notes)
    # kill 25 of pw's 40 channels (gamma = beta = 0): 15 alive, rounded up to 16 with the next-best unit
    with torch.no_grad():  # pw's channels run through dw (tied): both BatchNorms are the unit's sources
        for bn in (model.pw[1], model.dw[1]):
            bn.weight[:25] = 0
            bn.bias[:25] = 0
            bn.weight[25:] = torch.linspace(1, 2, 15)
        model.stem[1].weight[:4] = 0  # 20 of 24 alive
        model.stem[1].bias[:4] = 0
        model.proj[1].weight[:4] = 0
        model.proj[1].bias[:4] = 0
    masks = ds.alive_masks(model, x, threshold=1e-2, round_to=16, profile=profile)
    assert int(masks[graph.group_of("pw.0").name].sum()) == 16
    auto = ds.alive_masks(model, x, threshold=1e-2, round_to="auto", profile=profile)
    assert int(auto[graph.group_of("pw.0").name].sum()) == 16
    plain = ds.alive_masks(model, x, threshold=1e-2)
    assert int(plain[graph.group_of("pw.0").name].sum()) == 15
    # stem's group: 24 channels, 20 alive; a multiple of 32 cannot be met, so its count stays
    with pytest.warns(ds.DnnshrinkWarning, match="too small"):
        masks8 = ds.alive_masks(model, x, threshold=1e-2, round_to=32, profile=profile)
    assert int(masks8[graph.group_of("stem.0").name].sum()) == int(plain[graph.group_of("stem.0").name].sum())
    shrunk = ds.generate(model, x, masks)
    torch.testing.assert_close(shrunk(x), model(x), rtol=1e-5, atol=1e-5)  # dead units carry zeros


def test_targets_for_every_resource_and_reachability():
    assert Target.parse({"resource": "latency", "value": 0.5}) == Target("latency", fraction=0.5)
    assert Target.parse({"resource": "latency", "amount": "3ms"}).amount == 3.0
    assert Target.parse({"resource": "flops", "value": "1.5M"}) == Target("macs", amount=1.5e6)
    assert Target.parse({"resource": "params", "value": "1M params"}).amount == 1e6
    assert Target("activations", fraction=0.3).unit == "activations"
    model, x = Mixed().eval(), torch.randn(1, 3, 16, 16)
    graph = ds.trace(model, x)
    for resource in ("macs", "params", "activations", "latency"):
        # the tiny net's predicted latency is mostly the runtime's fixed overhead per run
        target = Target(resource, fraction=0.97 if resource == "latency" else 0.5)
        costs = CostModel(graph, model, target.cost_model, profile=synthetic_profile(1))
        minimum = smallest_cost(graph, costs)
        assert minimum < costs.initial
        assert check_reachable(target, costs.initial, minimum) == pytest.approx(target.fraction * costs.initial)
        with pytest.raises(ds.TargetError, match=costs.unit):
            check_reachable(Target(resource, amount=minimum * 0.5), costs.initial, minimum)
    # what keeps the model from the target is named: channels no cut may remove, when they weigh
    with pytest.raises(ds.TargetError, match=r"; 40% of its channels cannot be removed \(no BatchNorm scales them"):
        check_reachable(Target("macs", fraction=0.1), 100.0, 50.0, kept_share=0.4)
    with pytest.raises(ds.TargetError) as caught:
        check_reachable(Target("macs", fraction=0.1), 100.0, 50.0, kept_share=0.05)
    assert "cannot be removed" not in str(caught.value)


def test_latency_target_on_the_digits_demo_is_met(tmp_path):
    from dnnshrink_core.demo import digits
    from dnnshrink_core.pipeline import shrink

    torch.manual_seed(0)
    model = digits.build_model()  # tiny: the runtime's fixed overheads are most of its predicted latency
    result = shrink(model, digits.example_input(), train_one_epoch=digits.train_one_epoch, train=digits.train,
                    test=lambda m: 1.0, target={"resource": "latency", "value": 0.95}, algorithm="magnitude",
                    finetune=False, device="cpu", progress=False, latency_runs=4, exporters=["onnx"],
                    tensorboard=False, out_dir=str(tmp_path / "run"))
    extra = result.report.extra
    latency = extra["resources"]["latency_ms"]
    assert latency["after"] <= 0.95 * latency["before"] * (1 + 1e-9)  # the predicted latency meets the target
    assert set(extra["resources"]) == {"macs", "params", "activations", "latency_ms"}
    assert extra["resources"]["macs"]["after"] == extra["shrunk"]["macs"]
    onnx = extra["onnx_latency"]
    assert onnx["baseline_ms"] > 0 and onnx["shrunk_ms"] > 0  # measured next to the predicted
    learning = extra["structure_learning"]
    assert learning["target"] == {"resource": "latency", "fraction": 0.95}
    # the target's cost is in its own unit, named as such (it was filed under target_macs)
    assert learning["cost_unit"] == "ms" and not any(key.endswith("_macs") for key in learning)
    assert learning["target_cost"] == pytest.approx(0.95 * latency["before"])
    text = (tmp_path / "run" / "report.md").read_text()
    assert "onnxruntime ms" in text and "predicted ms: the latency profile's estimate" in text
    assert f"target {learning['target_cost']:,.4g} ms" in text
    # the profile's prediction for the baseline against the measured: a note past 1.5x either way
    off = latency["before"] / onnx["baseline_ms"]
    assert ("note: the latency profile predicts the baseline" in text) == (not 1 / 1.5 <= off <= 1.5)
    from dnnshrink_core.report import profile_note
    for measured, said in ((latency["before"], ""), (latency["before"] / 2, "2.0x slower"),
                           (latency["before"] * 2, "2.0x faster")):
        note = profile_note({**extra, "onnx_latency": {**onnx, "baseline_ms": measured}}, "\n")
        assert (said in note and "dnnshrink calibrate --out" in note) if said else note == ""
    # a profile of another runtime (a GPU's) is not judged by onnxruntime on this CPU
    gpu = {**latency, "runtime": {"name": "torch", "device": "cuda:0", "threads": 2, "batch": 1}}
    assert latency["runtime"]["name"] == "onnxruntime"
    assert profile_note({**extra, "resources": {**extra["resources"], "latency_ms": gpu},
                         "onnx_latency": {**onnx, "baseline_ms": latency["before"] / 10}}, "\n") == ""


def test_the_calibration_checks_thin_networks_at_a_quarter_of_their_widths():
    """The check's shrunk networks: every removable group cut to a quarter, rounded up to 16."""
    import torchvision

    from dnnshrink_plugins.costs.calibrate import thin_network

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    graph = ds.trace(model, x)
    thin = thin_network(model, x)
    widths = {name: m.out_channels for name, m in thin.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert widths["conv1"] == 16 and widths["layer2.0.conv1"] == 32 and widths["layer4.1.conv1"] == 128
    assert thin(x).shape == model(x).shape
    flops = CostModel(graph, model, "flops")
    assert 0.05 < CostModel(ds.trace(thin, x), thin, "flops").initial / flops.initial < 0.1


class ProbeTimer:
    """A stand-in backend for the block probes: a chain's time is its channel units times a
    unit cost, ``slowdown`` times more when the width misses the kind's block; ``blocks``
    gives the blocks pass by pass (a busy machine makes them move)."""

    def __init__(self, blocks, slowdown: float = 2.0):
        self.blocks, self.slowdown, self.calls = blocks, slowdown, 0

    def prepare(self, ops):
        return tuple(ops), {}

    def time(self, prepared, rounds, runs):
        block = self.blocks[min(self.calls, len(self.blocks) - 1)]
        self.calls += 1
        out = {}
        for key, (ops, _) in prepared.items():
            kind, width = ops[0][0], ops[0][1]
            units = width if kind == "depthwise" else width * width
            t = 1e-6 * units * len(ops) * (1.0 if width % block[kind] == 0 else self.slowdown)
            out[key] = (t, 1.1 * t)
        return out


def test_block_probes_find_the_block_and_say_when_passes_disagree():
    from dnnshrink_plugins.costs.calibrate import measure_blocks, unstable_blocks

    steady = {"pointwise": 16, "depthwise": 4, "conv": 32}
    blocks = measure_blocks(ProbeTimer([steady]))
    assert {k: v["channel_multiple"] for k, v in blocks.items()} == steady
    assert all(v["per_pass"] == [steady[k]] * 2 for k, v in blocks.items())
    assert unstable_blocks(blocks) is None

    moving = ProbeTimer([steady, {**steady, "pointwise": 64}])
    blocks = measure_blocks(moving)
    assert moving.calls == 2 and blocks["pointwise"]["per_pass"] == [16, 64]
    message = unstable_blocks(blocks)
    assert "pointwise: 16 then 64" in message and "depthwise" not in message and "idle machine" in message
    # no block at all: every width runs alike
    flat = measure_blocks(ProbeTimer([steady], slowdown=1.0))
    assert {v["channel_multiple"] for v in flat.values()} == {1}


class Grouped(nn.Module):
    """A grouped 3×3 conv (4 groups of 16 channels) between two pointwise ones."""

    def __init__(self):
        super().__init__()
        self.a = conv_bn(3, 64, 1)
        self.g = nn.Sequential(nn.Conv2d(64, 64, 3, 1, 1, groups=4, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        self.b = nn.Conv2d(64, 8, 1)

    def forward(self, x):
        return self.b(self.g(self.a(x)))


def test_grouped_convs_are_a_kind_whose_block_is_in_channels_per_group():
    model, x = Grouped().eval(), torch.randn(1, 3, 12, 12)
    graph = ds.trace(model, x)
    profile = synthetic_profile(16)
    costs = CostModel(graph, model, "latency", profile=profile)
    row = [layer.name for layer in costs.rows].index("g.0")
    assert costs.table.op[row] == "grouped" and costs.table.groups[row] == 4
    ones = np.ones(graph.num_units, dtype=bool)
    kept_in, kept_out = costs.counts(ones)
    assert costs.resource.aligned(kept_in, kept_out)[row]  # 16 per group
    half = ones.copy()  # 8 channels per group: 32 in all is a multiple of 16, but no group's width is
    units = graph.group_of("g.0").units
    assert len(units) == 16  # channel p of every group is one unit: each group keeps the same channels
    half[units[:8]] = False
    kept_in, kept_out = costs.counts(half)
    assert kept_out[row] == 32 and not costs.resource.aligned(kept_in, kept_out)[row]
    # the grouped conv's MACs are its groups' (flop counter's count), priced at the grouped kind's peak
    assert CostModel(graph, model, "flops").initial == ds.layer_report(model, x).totals["macs_before"]
    older = Profile(profile.runtime, profile.overhead_ms, {k: v for k, v in profile.ops.items() if k != "grouped"})
    as_conv = Profile(profile.runtime, profile.overhead_ms, {**profile.ops, "grouped": profile.ops["conv"]})
    assert CostModel(graph, model, "latency", profile=older).initial == \
        pytest.approx(CostModel(graph, model, "latency", profile=as_conv).initial, rel=1e-12)  # priced as a conv
    assert costs.initial != pytest.approx(CostModel(graph, model, "latency", profile=as_conv).initial, rel=1e-6)


class FoldedRows(nn.Module):
    """Layers whose leading dimension is not the images: a 2×2 patch grid folded into the
    batch and read by a Linear (MobileViT), a conv over those windows, and tokens read
    sequence-first (``(N, B, C)``, as ``nn.MultiheadAttention`` takes them)."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 16, 3, 1)
        self.mix = nn.Linear(16, 24)
        self.window = nn.Conv2d(24, 24, 3, padding=1)
        self.seq = nn.Linear(24, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        y = self.stem(x)                                               # (B, 16, 8, 8)
        b, c, h, w = y.shape
        p = y.reshape(b, c, 2, h // 2, 2, w // 2).permute(0, 2, 4, 3, 5, 1).reshape(b * 4, (h // 2) * (w // 2), c)
        p = self.mix(p)                                                 # (4B, 16, 24)
        win = self.window(p.transpose(1, 2).reshape(b * 4, 24, h // 2, w // 2))  # (4B, 24, 4, 4)
        tokens = win.reshape(b, 4 * 24, 16).mean(1).reshape(b, 16, 1).expand(b, 16, 24)
        s = self.seq(tokens.transpose(0, 1).contiguous())               # (16, B, 32)
        return self.head(s.mean(0))


@pytest.mark.parametrize("batch", [1, 3])
def test_macs_are_counted_per_image_when_the_leading_dimension_holds_more(batch):
    model = FoldedRows().eval()
    x = torch.randn(batch, 3, 8, 8)
    graph = ds.trace(model, x)
    costs = CostModel(graph, model, "flops")
    counted = ds.layer_report(model, x).totals["macs_before"]  # torch's flop counter, whole batch
    assert costs.initial == pytest.approx(counted / batch)
    by_name = {layer.name: layer.coef for layer in costs.layers}
    assert by_name["mix"] == 4 * 16            # four patches of 16 positions per image
    assert by_name["window"] == 4 * 9 * 16     # four windows of 4×4, 3×3 kernel
    assert by_name["seq"] == 16                # 16 tokens per image, sequence-first
    # the tensor ops count per image too: the patches' transpose moves 4 × 16 positions
    rows = {row.name: row.positions for row in graph.tensor_ops()}
    assert rows["transpose"] == (64.0, 64.0)


class TokenAttention(nn.Module):
    """A conv stem whose positions attend to each other (explicit ``q @ kᵀ`` and
    ``scaled_dot_product_attention``), a prunable residual conv block, and a conv that reads
    the feature map with its rows as channels (no handler follows that: kept whole)."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 32, 3, 2)
        self.qkv = nn.Linear(32, 96)
        self.proj = nn.Linear(32, 32)
        self.inner = nn.Sequential(conv_bn(32, 48, 1), nn.Conv2d(48, 32, 1))
        self.rows = nn.Conv2d(8, 24, 3, padding=1)
        self.head = nn.Linear(24, 10)

    def forward(self, x):
        y = self.stem(x)                                                   # (B, 32, 8, 8)
        b, c, h, w = y.shape
        t = y.flatten(2).transpose(1, 2)
        q, k, v = self.qkv(t).reshape(b, h * w, 3, 2, 16).permute(2, 0, 3, 1, 4).unbind(0)
        a = (q @ k.transpose(-2, -1)).softmax(-1) @ v
        s = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        y = y + self.proj((a + s).transpose(1, 2).reshape(b, h * w, c)).transpose(1, 2).reshape(b, c, h, w)
        y = y + self.inner(y)
        return self.head(self.rows(y.transpose(1, 2)).mean((2, 3)))


@pytest.mark.parametrize("batch", [1, 2])
def test_attention_products_and_layers_kept_whole_are_priced_as_constants(batch):
    model, x = TokenAttention().eval(), torch.randn(batch, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ds.UnknownOpWarning)  # attention is known: its channels are kept quietly
        graph = ds.trace(model, x)
    assert any("attention" in reason for reason in graph.reasons)
    fixed = {row.name: row for row in graph.fixed()}
    assert fixed["rows"].widths == (8, 24) and "rows" not in {layer.name for layer in graph.layers()}
    assert sum(row.kind == "product" for row in fixed.values()) == 3  # two matmuls, one attention
    flops, params = CostModel(graph, model, "flops"), CostModel(graph, model, "params")
    assert flops.initial == pytest.approx(ds.layer_report(model, x).totals["macs_before"] / batch)
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert params.initial == weights
    # the conv over rows (3×3, 8 → 24 channels, 32 × 8 positions), and the attention: 2 heads
    # × 64 × 64 scores of width 16, then the values, twice over
    assert flops.constant == 9 * 8 * 24 * 32 * 8 + 2 * (2 * 64 * 64 * 16 * 2)
    latency = CostModel(graph, model, "latency")
    assert latency.constant > 0 and CostModel(ds.trace(Mixed().eval(), x), Mixed().eval(), "latency").constant == 0
    # cut the inner block's channels: the constants stay, and what is counted follows
    keep = flops.cheapest_first(np.ones(graph.num_units, dtype=bool), np.arange(graph.num_units, dtype=float),
                                0.95 * flops.initial)
    assert keep.sum() < graph.num_units
    small = ds.generate(model, x, {g.name: keep[g.units] for g in graph.groups})
    assert ds.layer_report(small, x).totals["macs_before"] / batch == pytest.approx(flops.cost(keep))
    assert flops.cost(keep) <= 0.95 * flops.initial
    # a target below what the constants alone cost is refused, and says why
    minimum = smallest_cost(graph, flops)
    assert minimum >= flops.constant
    share = f"{flops.constant / flops.initial:.0%} of the baseline is what no channel cut changes"
    with pytest.raises(ds.TargetError, match=share):
        check_reachable(Target("macs", fraction=0.5 * minimum / flops.initial), flops.initial, minimum,
                        constant=flops.constant)


def test_a_latency_target_on_an_attention_network_counts_what_no_cut_changes():
    from dnnshrink_core.pipeline import shrink

    model, x = TokenAttention().eval(), torch.randn(1, 3, 16, 16)
    graph = ds.trace(model, x)
    latency = CostModel(graph, model, "latency")
    floor = min(smallest_cost(graph, latency, round_to=1), smallest_cost(graph, latency, round_to=16)) / latency.initial
    assert latency.constant > 0.01 * latency.initial and floor < 1
    options = dict(train_one_epoch=lambda net, lr: None, test=lambda m: 0.0, finetune=False, algorithm="magnitude",
                   max_epochs=0, device="cpu", progress=False, latency_runs=1, exporters=(), onnx_latency=False)
    with pytest.raises(ds.TargetError, match="of the baseline is what no channel cut changes"):
        shrink(model, x, target={"resource": "latency", "value": round(0.5 * floor, 4)}, **options)
    fraction = round((1 + floor) / 2, 4)
    result = shrink(model, x, target={"resource": "latency", "value": fraction}, **options)
    resources = result.report.extra["resources"]["latency_ms"]
    assert resources["before"] == pytest.approx(latency.initial)
    assert resources["after"] <= fraction * latency.initial * (1 + 1e-9)
    small = result.model
    assert CostModel(ds.trace(small, x), small, "latency").initial == pytest.approx(resources["after"])


def test_inspect_says_how_much_no_channel_cut_changes():
    from dnnshrink_core.cli import _reach

    model, x = TokenAttention().eval(), torch.randn(1, 3, 16, 16)
    graph = ds.trace(model, x)
    text = _reach(model, graph, None)
    share = CostModel(graph, model, "flops").constant / CostModel(graph, model, "flops").initial
    assert f"{share:.1%} no channel cut changes" in text and "attention's matrix products" in text
    plain = Mixed().eval()
    assert "no channel cut changes" not in _reach(plain, ds.trace(plain, x), None)


def test_the_calibration_check_times_the_users_own_networks_too():
    from dnnshrink_plugins.costs.calibrate import OnnxBackend, validate

    model = nn.Sequential(conv_bn(1, 32, 3), conv_bn(32, 32, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4))
    plain = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU())  # no BatchNorm: nothing removable, so no thin version
    rows = validate(OnnxBackend(1, 1), load_profile(None), models=(), rounds=1, runs=1, log=lambda line: None,
                    extra={"mine": model, "plain": plain}, extra_input=(1, 16, 16))
    assert [(r["model"], r["thin"], r["extra"]) for r in rows] == [("mine", False, True), ("mine x0.25", True, True),
                                                                   ("plain", False, True)]
    assert all(r["measured_ms"] > 0 and r["predicted_ms"] > 0 for r in rows)


@pytest.mark.parametrize("flags, words", [
    (["--check-model", "resnet18", "--no-check"], "--no-check skips: drop one of them"),
    (["--check-model", "resnet18", "--check-input-shape", "1,3,32,32"], "must be channels,height,width"),
    (["--check-model", "resnet18", "--check-input-shape", "1,32,32"], "cannot run on one batch of --check-input-shape"),
    (["--check-model", "resnet81"], "resnet81"),
])
def test_calibrate_says_what_is_wrong_with_a_check_model_before_timing_anything(flags, words, capsys, tmp_path):
    from dnnshrink_core import cli

    status = cli.main(["calibrate", "--out", str(tmp_path / "p.json"), *flags])
    err = capsys.readouterr().err
    assert status != 0 and words in err, err
    assert not (tmp_path / "p.json").exists()


def test_the_check_reports_the_error_of_the_thin_share_apart_from_the_machines_speed():
    """A sweep timed on a slower machine than the check predicts every network 20% slow: the
    whole and thin errors say so, the thin/whole share (what a share target rests on) is
    exact; a miss on the thin network alone shows in the share."""
    from dnnshrink_plugins.costs.calibrate import share_errors

    def rows(whole_error, thin_error):
        return [{"model": "net", "thin": False, "predicted_ms": 10 * (1 + whole_error), "measured_ms": 10.0},
                {"model": "net x0.25", "thin": True, "predicted_ms": 2 * (1 + thin_error), "measured_ms": 2.0},
                {"model": "mine", "thin": False, "extra": True, "predicted_ms": 5.0, "measured_ms": 5.0}]

    assert share_errors(rows(0.2, 0.2)) == [pytest.approx(0.0, abs=1e-9)]
    assert share_errors(rows(0.0, -0.25)) == [pytest.approx(25.0)]


def test_the_share_of_channels_no_cut_may_remove_leaves_the_networks_own_input_and_output_out():
    import torchvision

    resnet = torchvision.models.resnet18().eval()
    assert ds.trace(resnet, torch.randn(1, 3, 32, 32)).unremovable_share() == 0.0  # its 1000 classes do not count
    plain = nn.Sequential(conv_bn(3, 8, 3), nn.Conv2d(8, 24, 1), nn.ReLU(), nn.Conv2d(24, 4, 1)).eval()
    assert ds.trace(plain, torch.randn(1, 3, 8, 8)).unremovable_share() == pytest.approx(24 / (8 + 24))


class PaddedTokens(nn.Module):
    """A pad (priced as a concatenation, with no pieces) on a group only linear layers read."""

    def __init__(self):
        super().__init__()
        self.a, self.norm, self.out = nn.Linear(32, 24), nn.BatchNorm1d(24), nn.Linear(24, 10)

    def forward(self, x):
        y = self.norm(self.a(x).transpose(1, 2))
        return self.out(torch.nn.functional.pad(y, (0, 1)).transpose(1, 2))


def test_a_concatenations_block_rounds_only_joins_of_feature_maps():
    model, x = PaddedTokens().eval(), torch.randn(1, 196, 32)
    graph = ds.trace(model, x)
    latency = CostModel(graph, model, "latency")  # the shipped profile: joins of pieces in blocks of 16
    assert latency.resource.profile.ops["concat"].channel_multiple == 16
    assert [row.op for row in latency.rows if row.kind == "tensor"].count("concat") == 1
    multiples, _ = resolve_round_to(graph, model, "auto", latency=latency)
    assert set(np.atleast_1d(multiples).tolist()) == {1}  # no layer here has a block, and a pad is no join


class WindowAttention(nn.Module):
    """Attention over 49-token windows of a conv feature map (MaxViT's shape), its two
    products written with ``einsum`` or with ``@``."""

    def __init__(self, einsum: bool):
        super().__init__()
        self.einsum = einsum
        self.stem = conv_bn(3, 32, 3)
        self.qkv = nn.Linear(32, 96)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        y = self.stem(x)                                                   # (B, 32, 14, 14)
        b = y.shape[0]
        t = y.reshape(b, 32, 2, 7, 2, 7).permute(0, 2, 4, 3, 5, 1).reshape(b, 4, 49, 32)  # 4 windows
        q, k, v = self.qkv(t).reshape(b, 4, 49, 3, 2, 16).permute(3, 0, 1, 4, 2, 5).unbind(0)
        if self.einsum:
            a = torch.einsum("bgid,bgjd->bgij", q.flatten(1, 2), k.flatten(1, 2)).softmax(-1)
            o = torch.einsum("bgij,bgjd->bgid", a, v.flatten(1, 2))
        else:
            o = (q.flatten(1, 2) @ k.flatten(1, 2).transpose(-2, -1)).softmax(-1) @ v.flatten(1, 2)
        return self.head(o.mean((1, 2)))


def test_an_einsum_product_is_priced_as_the_matrix_product_it_runs():
    """The same window attention written with einsum and with ``@``: the same MACs and the
    same predicted time (an einsum was priced as one output column per element it writes:
    MaxViT predicted 456 ms against 133 measured, 367 of them its attention)."""
    x = torch.randn(1, 3, 14, 14)
    costs = {}
    for einsum in (True, False):
        torch.manual_seed(0)
        model = WindowAttention(einsum).eval()
        graph = ds.trace(model, x)
        assert sum(row.kind == "product" for row in graph.fixed()) == 2
        costs[einsum] = CostModel(graph, model, "flops").constant, CostModel(graph, model, "latency").constant
    assert costs[True][0] == costs[False][0] == 2 * (8 * 49 * 49 * 16)
    assert costs[True][1] == pytest.approx(costs[False][1], rel=1e-9) and costs[True][1] > 0
