"""The tensor ops the latency cost prices besides the layers (activations a runtime does not
fuse, the excitation multiply, pooling): found in the graph with the elements they move,
priced only by cost models that ask for them, fitted by the calibration, and probed for
fusion on onnxruntime."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from torch import nn

import dnnshrink_core as ds
from dnnshrink_core.cost import CostModel
from dnnshrink_plugins.costs.calibrate import (CANDIDATES, FUSION_PROBES, OnnxBackend, TorchBackend, fit,
                                               ghost_probe, sweep_chains)
from dnnshrink_plugins.costs.latency import KINDS, TENSOR_KINDS, Profile, ProfileError, load_profile
from test_costs import layer_multiples, synthetic_profile, synthetic_samples, torch_cost


class Excite(nn.Module):
    """A stem with max pooling, an expansion with SiLU and GELU, squeeze-excitation, a residual
    add, ReLU6, and a head: every tensor op kind but the ones ReLU stands for."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        self.expand = nn.Sequential(nn.Conv2d(16, 48, 1, bias=False), nn.BatchNorm2d(48), nn.SiLU())
        self.gelu = nn.GELU()
        self.squeeze = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(48, 12, 1), nn.ReLU(), nn.Conv2d(12, 48, 1),
                                     nn.Sigmoid())
        self.project = nn.Sequential(nn.Conv2d(48, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        y = self.stem(x)
        e = self.gelu(self.expand(y))
        e = e * self.squeeze(e)
        y = y + self.project(e)
        return self.fc(y.mean((2, 3)))


def excite():
    return Excite().eval(), torch.randn(1, 3, 16, 16)


def test_tensor_ops_are_found_with_the_elements_they_read_and_write():
    model, x = excite()
    graph = ds.trace(model, x)
    found = [(op.op, op.positions, len(op.out_units)) for op in graph.tensor_ops()]
    # 16×16 input, max pooled to 8×8 (64 positions); the excitation gate is 1×1
    assert found == [("pool", (256.0, 64.0), 16), ("silu", (64.0, 64.0), 48), ("gelu", (64.0, 64.0), 48),
                     ("pool", (64.0, 1.0), 48), ("sigmoid", (1.0, 1.0), 48), ("mul", (65.0, 64.0), 48),
                     ("clip", (64.0, 64.0), 16), ("add", (128.0, 64.0), 16), ("pool", (64.0, 1.0), 16)]
    assert all(op.kind == "tensor" and (op.in_units == op.out_units).all() for op in graph.tensor_ops())
    # a tensor op's channels are the units of the tensor it writes
    assert set(graph.tensor_ops()[1].out_units) == set(graph.group_of("expand.0").units)


def test_only_cost_models_that_price_tensor_ops_see_them():
    model, x = excite()
    graph = ds.trace(model, x)
    flops = CostModel(graph, model, "flops")
    latency = CostModel(graph, model, "latency", profile=synthetic_profile(1))
    assert len(flops.rows) == len(flops.layers) == len(latency.layers) == 6  # the convs and the linear
    assert len(latency.rows) == 6 + len(graph.tensor_ops())
    assert flops.initial == ds.layer_report(model, x).totals["macs_before"]  # MACs unchanged by them
    assert CostModel(graph, model, "activations").table.op.tolist() == flops.table.op.tolist()


def test_latency_of_tensor_ops_is_their_bytes_over_bandwidth_and_its_gradient_is_autograds():
    model, x = excite()
    graph = ds.trace(model, x)
    profile = synthetic_profile(1)
    without = Profile(profile.runtime, profile.overhead_ms, {k: profile.ops[k] for k in KINDS})
    costs, bare = (CostModel(graph, model, "latency", profile=p) for p in (profile, without))
    ones = np.ones(graph.num_units, dtype=bool)
    expected = 0.0
    for op in graph.tensor_ops():
        c = profile.ops[op.op]
        read, written = op.positions
        seconds = 4 * len(op.out_units) * (read + written) / (c.bandwidth_gbs * 1e9) + c.overhead_us * 1e-6 \
            + written * c.position_ns * 1e-9
        expected += 1e3 * seconds
    assert costs.initial - bare.initial == pytest.approx(expected, rel=1e-9)
    # a profile without the tensor kinds (version 1) prices them at nothing
    assert bare.initial == pytest.approx(CostModel(graph, model, "latency", profile=without).initial)
    rng = np.random.default_rng(1)
    for alive in (ones, rng.random(graph.num_units) < 0.6):
        soft = torch.tensor(alive.astype(np.float64), requires_grad=True)
        total = torch_cost(costs, soft, "latency", profile)
        total.backward()
        assert costs.cost(alive) == pytest.approx(total.item(), rel=1e-9)
        np.testing.assert_allclose(costs.unit_weights(alive), soft.grad.numpy(), rtol=1e-9, atol=1e-12)


def test_profile_with_tensor_kinds_round_trips_and_version_1_still_loads(tmp_path):
    profile = synthetic_profile(16)
    path = profile.save(tmp_path / "p.json")
    data = json.loads(path.read_text())
    assert data["version"] == 3 and set(data["ops"]["silu"]) == {"bandwidth_gbs", "overhead_us", "position_ns"}
    assert set(data["ops"]["concat"]) == {"bandwidth_gbs", "overhead_us", "position_ns", "channel_multiple",
                                          "bandwidth_unaligned_gbs"}
    assert load_profile(path) == profile
    for version, extra, words in ((2, {}, "ops.concat has unknown key"),  # a concatenation's block came in 3
                                  (3, {"bandwidth_unaligned_gbs": None}, "without the other"),
                                  (3, {"channel_multiple": 0}, "channel_multiple must be an integer > 0")):
        bad = json.loads(path.read_text())
        bad["version"] = version
        bad["ops"]["concat"].update(extra)
        bad["ops"]["concat"] = {k: v for k, v in bad["ops"]["concat"].items() if v is not None}
        with pytest.raises(ProfileError, match=words):
            load_profile(bad)
    bad = json.loads(path.read_text())
    bad["ops"]["silu"]["peak_gmacs"] = 1.0
    with pytest.raises(ProfileError, match="ops.silu has unknown key"):
        load_profile(bad)
    old = json.loads(path.read_text())
    old["version"] = 1
    for kind in TENSOR_KINDS + ("grouped",):
        old["ops"].pop(kind, None)
    assert set(load_profile(old).ops) == set(KINDS)
    old["ops"]["silu"] = data["ops"]["silu"]  # version 1 knows no tensor kinds (nor grouped convs)
    with pytest.raises(ProfileError, match="unknown key"):
        load_profile(old)


def test_calibration_fit_leaves_fused_kinds_out():
    # (the tensor kinds' constants are recovered in test_costs' fit test, on the same sweep)
    truth = synthetic_profile(16, positions=False)
    fused = ["clip", "add"]
    left, _, stats = fit(synthetic_samples(truth, thin=False), 1, layer_multiples(truth),
                         fused=fused)
    assert not set(fused) & set(left) and set(TENSOR_KINDS) - set(fused) <= set(left)
    assert stats["sweep_mean_abs_error_pct"] > 1  # the fused kinds' real time is left unexplained


def test_every_chain_runs_on_both_backends_with_the_same_shapes():
    onnx_backend, torch_backend = OnnxBackend(1, 1), TorchBackend(1, 1, "cpu")
    chains = [c for c in sweep_chains() if any(op[0] in TENSOR_KINDS for op in c)]
    chains += [probe for probe, _ in FUSION_PROBES.values()]
    chains += [c for c in sweep_chains() if c[0][0] == "linear" and c[0][3] > 1][:2]  # linear layers over tokens
    assert {op[0] for c in chains for op in c} >= set(TENSOR_KINDS)
    for ops in chains:
        session, feed = onnx_backend.prepare(ops)
        runner, _ = torch_backend.prepare(ops)
        with torch.no_grad():
            assert session.run(None, feed)[0].shape == tuple(runner.module(runner.x).shape), ops
        # eager PyTorch runs each conv's BatchNorm (the exported chain has it folded)
        convs = sum(op[0] in ("conv", "pointwise", "depthwise") for op in ops)
        assert sum(isinstance(m, nn.BatchNorm2d) for m in runner.module.modules()) == convs


def test_onnxruntime_fusion_probe_tells_fused_ops_from_separate_ones():
    """What onnxruntime's optimiser does with each kind between two convs: an activation it
    can fold into the conv (Clip) costs nothing of its own; pooling never folds; SiLU becomes
    an op of its own. Eager PyTorch runs every op by itself."""
    separate = OnnxBackend(1, 1).separate_kinds()
    assert set(separate) <= set(TENSOR_KINDS)
    assert "pool" in separate and "silu" in separate and "clip" not in separate
    assert TorchBackend(1, 1, "cpu").separate_kinds() == list(TENSOR_KINDS)


def test_the_concatenation_block_is_read_from_the_graph_onnxruntime_optimises():
    """A join of pieces that are multiples of the block stays in onnxruntime's blocked
    layout; one whose pieces miss it takes reorders (of each piece, and back)."""
    backend = OnnxBackend(1, 1)
    block = backend.concat_block()
    assert block in (1,) + CANDIDATES and TorchBackend(1, 1, "cpu").concat_block() == 1

    def reorders(piece):
        counts = backend.optimized_ops(ghost_probe(piece))
        return counts.get("ReorderOutput", 0) + counts.get("ReorderInput", 0)

    if block > 1:  # a CPU whose onnxruntime has a blocked layout (every x86-64 one)
        assert reorders(7 * block) < reorders(7 * block + block // 2) and reorders(7 * block) == reorders(128)


class Dense(nn.Module):
    """DenseNet's pattern: each layer's output joins its input along the channels."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.layer = nn.Sequential(nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Conv2d(24, 4, 1)

    def forward(self, x):
        y = self.stem(x)
        return self.head(torch.cat([y, self.layer(y)], 1))


def test_a_concatenation_copies_every_channel_it_joins():
    model, x = Dense().eval(), torch.randn(1, 3, 8, 8)
    graph = ds.trace(model, x)
    (op,) = [op for op in graph.tensor_ops() if op.op == "concat"]
    assert op.positions == (64.0, 64.0) and len(op.out_units) == 24  # each of the 24 channels read and written once
    assert set(op.out_units) == set(graph.group_of("stem.0").units) | set(graph.group_of("layer.0").units)
    # its two inputs follow it as pieces, in order, at no cost of their own
    rows = graph.tensor_ops()
    at = next(i for i, row in enumerate(rows) if row.op == "concat")
    pieces = rows[at + 1:at + 3]
    assert [row.op for row in pieces] == ["piece", "piece"] and all(row.name == op.name for row in pieces)
    assert [list(row.out_units) for row in pieces] == [list(graph.group_of("stem.0").units),
                                                       list(graph.group_of("layer.0").units)]
    assert np.array_equal(np.concatenate([row.out_units for row in pieces]), op.out_units)


class Joins(nn.Module):
    """A ghost module (a 1×1 conv's output joined by a depthwise conv of it: both pieces are
    the same units), a DenseNet join of two groups, and a join along the height (no pieces)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.primary = nn.Sequential(nn.Conv2d(16, 6, 1, bias=False), nn.BatchNorm2d(6), nn.ReLU())
        self.cheap = nn.Sequential(nn.Conv2d(6, 6, 3, 1, 1, groups=6, bias=False), nn.BatchNorm2d(6), nn.ReLU())
        self.layer = nn.Sequential(nn.Conv2d(12, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Conv2d(20, 4, 1)

    def forward(self, x):
        y = self.stem(x)
        p = self.primary(y)
        g = torch.cat([p, self.cheap(p)], 1)
        d = torch.cat([g, self.layer(g)], dim=1)
        return self.head(torch.cat([d, d], 2))


def test_a_concatenation_whose_pieces_miss_the_block_is_priced_at_the_unaligned_bandwidth():
    """onnxruntime joins pieces in its blocked layout only when each fits the block; otherwise
    it reorders them out and the result back, which the profile's unaligned bandwidth prices."""
    model, x = Joins().eval(), torch.randn(1, 3, 8, 8)
    graph = ds.trace(model, x)
    rows = graph.tensor_ops()
    assert [row.op for row in rows if row.op in ("concat", "piece")] == ["concat", "piece", "piece", "concat", "piece",
                                                                         "piece", "concat"]
    base = synthetic_profile(1)  # the layers without a block: smooth, so autograd can check the weights
    c = base.ops["concat"]
    profile = Profile(base.runtime, base.overhead_ms, {**base.ops, "concat": type(c).tensor_op(
        c.bandwidth_gbs, c.overhead_us, c.position_ns, 4, c.bandwidth_gbs / 5)})
    costs, flat = CostModel(graph, model, "latency", profile=profile), CostModel(graph, model, "latency", profile=base)
    primary, layer = graph.group_of("primary.0").units, graph.group_of("layer.0").units
    concats = [i for i, row in enumerate(costs.rows) if row.op == "concat"]

    def concat_ms(keep):
        return costs.layer_costs(keep)[concats] - flat.layer_costs(keep)[concats]

    ones = np.ones(graph.num_units, dtype=bool)
    # 6 + 6 channels miss a block of 4: the ghost join pays the unaligned bandwidth; the
    # DenseNet join's pieces (12 + 8) fit; the join along the height has no pieces
    extra = concat_ms(ones)
    assert extra[1] == extra[2] == 0
    # 4 bytes, 64 positions read and written per channel, at a fifth of the bandwidth
    assert extra[0] == pytest.approx(1e3 * 4 * 12 * 128 * (5 - 1) / (c.bandwidth_gbs * 1e9), rel=1e-9)
    four = ones.copy()
    four[primary[4:]] = False  # 4 + 4 fit: every join is aligned, at its own bandwidth
    np.testing.assert_allclose(concat_ms(four), 0.0, atol=1e-15)
    odd = four.copy()
    odd[layer[7:]] = False  # the DenseNet join's second piece keeps 7 channels: it alone misses
    assert concat_ms(odd)[0] == 0 and concat_ms(odd)[1] == pytest.approx(
        1e3 * 4 * (8 + 7) * 128 * (5 - 1) / (c.bandwidth_gbs * 1e9), rel=1e-9)
    for alive in (ones, four, odd):  # the units' weights are the gradient at the bandwidth that applies
        soft = torch.tensor(alive.astype(np.float64), requires_grad=True)
        total = torch_cost(costs, soft, "latency", profile)
        total.backward()
        assert costs.cost(alive) == pytest.approx(total.item(), rel=1e-9)
        np.testing.assert_allclose(costs.unit_weights(alive), soft.grad.numpy(), rtol=1e-9, atol=1e-12)


def test_calibrate_blocks_from_keeps_a_profiles_blocks_and_refuses_another_runtimes(tmp_path, monkeypatch):
    from dnnshrink_plugins.costs import calibrate as cal

    given = synthetic_profile(8)
    given.save(tmp_path / "given.json")
    monkeypatch.setattr(cal, "measure_blocks", lambda *a, **k: pytest.fail("the blocks were measured again"))
    # the sweep's timings, made up (the fit's quality is not what this checks): a chain's ops at 1 us each
    monkeypatch.setattr(cal.OnnxBackend, "time", lambda self, prepared, *a, **k: {
        key: (1e-6 * (1 + int(key) % 7), 2e-6) for key in prepared})
    lines = []
    profile = cal.calibrate(out=tmp_path / "new.json", check=False, blocks_from=tmp_path / "given.json",
                            log=lines.append)
    logged = {line.split()[0]: line for line in lines if line.startswith("  ") and line.split()[0] in profile.ops}
    assert set(logged) == set(profile.ops)
    unmeasured = cal.UNMEASURED_SHARE * cal.MOST_BYTES_PER_S / 1e9
    for kind, c in profile.ops.items():  # a bandwidth the fit left at its bound is not shown as a number
        shown = "none measured" if c.bandwidth_gbs >= unmeasured else f"{c.bandwidth_gbs:7.1f} GB/s"
        assert f"bandwidth {shown}" in logged[kind]
    assert any(c.bandwidth_gbs >= unmeasured for c in profile.ops.values())  # made-up timings: some are
    assert re.search(r"a concatenation's pieces: \d+ \(read from the runtime's optimised graph\)", "\n".join(lines))
    assert {k: profile.ops[k].channel_multiple for k in ("pointwise", "depthwise", "conv", "grouped")} == \
        {"pointwise": 8, "depthwise": 8, "conv": 8, "grouped": 8}
    assert load_profile(tmp_path / "new.json").calibration["blocks"]["conv"]["channel_multiple"] == 8
    with pytest.raises(ValueError, match="that profile is of onnxruntime cpu, 2 threads, batch 1, threads sleeping "
                                         "between ops, not of torch cpu"):
        cal.calibrate(runtime="torch", out=None, check=False, blocks_from=tmp_path / "given.json",
                      log=lambda line: None)


def test_calibrate_refuses_a_device_torch_cannot_use_before_any_work():
    from dnnshrink_core.errors import ConfigError
    from dnnshrink_plugins.costs import calibrate as cal

    lines = []
    with pytest.raises(ConfigError, match=r"--device 'gpu0' is not a device torch knows .* give cpu, cuda or cuda:N"):
        cal.calibrate(runtime="torch", device="gpu0", out=None, check=False, log=lines.append)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"--device 'cuda': torch sees no CUDA device on this machine"):
            cal.calibrate(runtime="torch", device="cuda", out=None, check=False, log=lines.append)
    else:
        with pytest.raises(ConfigError, match=r"--device 'cuda:99': this machine has \d+ CUDA device"):
            cal.calibrate(runtime="torch", device="cuda:99", out=None, check=False, log=lines.append)
    with pytest.raises(ConfigError, match="measures the CPU provider; use --device cpu"):
        cal.calibrate(runtime="onnxruntime", device="cuda", out=None, check=False, log=lines.append)
    assert lines == []  # nothing was timed


class Shuffle(nn.Module):
    """ShuffleNet's channel shuffle between two convs."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.b = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        y = self.a(x)
        n, c, h, w = y.shape
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        return self.b(y)


def test_a_transpose_of_a_feature_map_is_a_copy_of_it():
    model, x = Shuffle().eval(), torch.randn(1, 3, 6, 6)
    graph = ds.trace(model, x)
    (op,) = [op for op in graph.tensor_ops() if op.op == "transpose"]
    read, written = op.positions
    assert read == written and read * len(op.out_units) == 16 * 36  # the whole tensor, read and written once


class TokenBlock(nn.Module):
    """A conv's positions as tokens through a transformer block (LayerNorm, attention
    scores' softmax, a linear with a BatchNorm over the tokens as LeViT has), then a
    pre-activation BatchNorm after a concatenation (DenseNet)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.norm = nn.LayerNorm(16)
        self.fc = nn.Linear(16, 16)
        self.fc_bn = nn.BatchNorm1d(16)
        self.joined_bn = nn.BatchNorm2d(32)
        self.head = nn.Conv2d(32, 4, 1)

    def forward(self, x):
        y = self.stem(x)                                     # (B, 16, 8, 8)
        b, c, h, w = y.shape
        t = self.norm(y.flatten(2).transpose(1, 2))          # (B, 64, 16)
        scores = (t @ t.transpose(1, 2)).softmax(-1)         # (B, 64, 64)
        t = self.fc(scores @ t)
        t = self.fc_bn(t.flatten(0, 1)).reshape(b, h * w, c)
        z = t.transpose(1, 2).reshape(b, c, h, w)
        return self.head(torch.relu(self.joined_bn(torch.cat([y, z], 1))))


def test_norms_softmax_and_batchnorms_no_conv_folds_are_passes_of_their_own():
    model, x = TokenBlock().eval(), torch.randn(2, 3, 8, 8)
    graph = ds.trace(model, x)
    found = {(op.name, op.op): (op.positions, len(op.out_units)) for op in graph.tensor_ops()}
    assert found[("norm", "norm")] == ((64.0, 64.0), 16)             # 64 tokens of 16 channels
    (softmax,) = [v for k, v in found.items() if k[1] == "softmax"]
    assert softmax[0] == (64.0 * 64 / softmax[1],) * 2               # every score read and written once
    assert found[("fc_bn", "mul")] == ((64.0, 64.0), 16)            # after a linear: not folded
    assert found[("joined_bn", "mul")] == ((64.0, 64.0), 32)        # after a concatenation: not folded
    assert not any(name.startswith("stem") for name, _ in found)    # folded into the stem's conv
    # priced by what the profile measured; a profile without them (an older one) leaves them free
    profile = synthetic_profile(1)
    older = Profile(profile.runtime, profile.overhead_ms,
                    {k: v for k, v in profile.ops.items() if k not in ("norm", "softmax")})
    for p, expect_priced in ((profile, True), (older, False)):
        costs = CostModel(graph, model, "latency", profile=p)
        rows = [i for i, row in enumerate(costs.rows) if row.kind == "tensor" and row.op in ("norm", "softmax")]
        priced = costs.layer_costs(np.ones(graph.num_units, dtype=bool))[rows]
        assert len(rows) == 2 and (priced > 0).all() == expect_priced and (priced > 0).any() == expect_priced


class Arithmetic(nn.Module):
    """Subtraction, division and padding between two convs (EfficientViT's linear attention
    divides, pads its values, subtracts)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Conv2d(8, 4, 3)

    def forward(self, x):
        y = self.stem(x)                                         # (B, 8, 8, 8)
        y = (y - 0.5) / 2
        return self.head(torch.nn.functional.pad(y, (1, 1, 1, 1)))


def test_subtraction_division_and_padding_are_passes_of_their_own():
    model, x = Arithmetic().eval(), torch.randn(1, 3, 8, 8)
    found = [(op.op, op.positions) for op in ds.trace(model, x).tensor_ops()]
    assert found == [("mul", (64.0, 64.0)), ("mul", (64.0, 64.0)), ("concat", (64.0, 100.0))]


class ClassScores(nn.Module):
    """A segmentation head's softmax over the classes (dim 1: one short row per position),
    and a softmax over the positions (one long row per channel)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.classes = nn.Conv2d(8, 5, 1)

    def forward(self, x):
        y = self.stem(x)
        spread = torch.softmax(y.flatten(2), -1).reshape(y.shape).mean(1, keepdim=True)
        return self.classes(y).softmax(1) + spread


def test_a_softmax_costs_per_row_it_normalises():
    model, x = ClassScores().eval(), torch.randn(2, 3, 8, 8)
    graph = ds.trace(model, x)
    found = [(op.name, op.positions, op.rows) for op in graph.tensor_ops() if op.op == "softmax"]
    assert found == [("softmax", (64.0, 64.0), 8.0), ("softmax_1", (64.0, 64.0), 64.0)]  # 8 channels; 64 positions
    costs = CostModel(graph, model, "latency", profile=synthetic_profile(1))
    table_rows = {row.name: costs.table.rows[i] for i, row in enumerate(costs.rows) if row.op == "softmax"}
    assert table_rows == {"softmax": 8.0, "softmax_1": 64.0}
    # what the calibration fits a softmax's per-row cost to: one row per channel, or per position
    from dnnshrink_plugins.costs.calibrate import op_positions
    assert op_positions(("softmax", 16, 16, 28, 1, 1), 1) == 16 and op_positions(("softmax", 16, 16, 28, 0, 1), 1) == 784


def test_a_join_that_a_reshape_reads_gives_no_pieces():
    """ShuffleNet shuffles what it joined: the join's output leaves a blocked layout anyway,
    so its pieces' widths do not matter and the join is priced as one that fits."""
    class ShuffledJoin(Shuffle):
        def forward(self, x):
            y = self.a(x)
            y = torch.cat([y[:, :8], y[:, 8:] * 2], 1)
            n, c, h, w = y.size()
            return self.b(y.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w))

    shuffled, dense = ShuffledJoin().eval(), Dense().eval()  # (a graph holds its model weakly)
    graph = ds.trace(shuffled, torch.randn(1, 3, 6, 6))
    assert [op.op for op in graph.tensor_ops() if op.op in ("concat", "piece")] == ["concat"]
    assert [op.op for op in ds.trace(dense, torch.randn(1, 3, 8, 8)).tensor_ops()].count("piece") == 2


def test_a_torch_profile_can_be_timed_in_half_precision():
    """``dnnshrink calibrate --runtime torch --dtype bfloat16|float16``: chains and networks
    run in that format (model.half() is how a GPU network is often deployed), the profile
    says so, and the onnxruntime profile, which times float32 ONNX, refuses it."""
    from dnnshrink_core.errors import ConfigError
    from dnnshrink_plugins.costs import calibrate as cal

    backend = cal.TorchBackend(1, 1, "cpu", "bfloat16")
    assert backend.runtime["dtype"] == "bfloat16"
    runner, _ = backend.prepare(cal.sweep_chains()[0])
    assert runner.x.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in runner.module.parameters())
    runner.run()
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
    runner, _ = backend.prepare_network(net, torch.randn(1, 3, 16, 16), None, "net")
    assert runner.x.dtype == torch.bfloat16
    runner.run()
    profile = synthetic_profile(8)
    profile.runtime.update(name="torch", dtype="bfloat16")
    again = load_profile(profile.to_dict())
    assert again.runtime["dtype"] == "bfloat16" and again.describe().endswith(", bfloat16")
    with pytest.raises(ValueError, match=r"runtime.dtype must be one of float32, float16, bfloat16, not 'int8'"):
        load_profile({**profile.to_dict(), "runtime": {**profile.runtime, "dtype": "int8"}})
    with pytest.raises(ConfigError, match=r"--dtype 'int8': give one of"):
        cal.TorchBackend(1, 1, "cpu", "int8")
    with pytest.raises(ConfigError, match="--dtype is for --runtime torch"):
        cal.calibrate(runtime="onnxruntime", dtype="float16", out=None, check=False, log=lambda line: None)
