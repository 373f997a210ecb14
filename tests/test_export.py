"""Exporters: the pytorch artifact round trip, verified ONNX, the picture, the report."""
from __future__ import annotations

import copy
import html
import json
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import dnnshrink_core as ds
from helpers import max_relative_error, shrink_dead_half
from models import HANDWRITTEN


LOADER = """
import sys, torch
try:
    import models  # the original source must not be importable here
    raise SystemExit("the model source was importable")
except ImportError:
    pass
import dnnshrink_core as ds
model = ds.load(sys.argv[1])
x, expected = torch.load(sys.argv[2], weights_only=True)
with torch.no_grad():
    out = model(x)
flat = lambda o: [o] if torch.is_tensor(o) else [t for v in (o.values() if isinstance(o, dict) else o) for t in flat(v)]
assert len(flat(out)) == len(flat(expected)), (len(flat(out)), len(flat(expected)))
for a, b in zip(flat(out), flat(expected)):
    err = ((a - b).norm() / b.norm()).item()
    assert err < 1e-5, err
print("ok", type(model).__name__, len(flat(out)))
"""


@pytest.mark.parametrize("name", ["literal_view", "channel_pad_shortcut", "concat", "depthwise", "dict_output",
                                  "squeeze_excitation"])
def test_pytorch_artifact_loads_in_a_fresh_process_without_the_source(name, tmp_path):
    _, small, x = shrink_dead_half(name)
    path = tmp_path / f"{name}.dnnshrink"
    result = ds.export(small, x, "pytorch", path)
    assert result["path"] == str(path) and path.is_file()
    with torch.no_grad():
        torch.save((x, small(x)), tmp_path / "io.pt")
    (tmp_path / "load.py").write_text(LOADER)
    run = subprocess.run([sys.executable, "load.py", str(path), "io.pt"], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.startswith("ok")


def test_loaded_artifact_matches_in_process(tmp_path):
    _, small, x = shrink_dead_half("grouped")
    ds.export(small, x, "pytorch", tmp_path / "m.dnnshrink")
    loaded = ds.load(tmp_path / "m.dnnshrink")
    with torch.no_grad():
        assert max_relative_error(small(x), loaded(x)) == 0.0
        assert loaded(torch.randn(5, *x.shape[1:])).shape[0] == 5
    assert loaded.dnnshrink_manifest["inputs"] == [list(x.shape)]


def double_it(x):
    return x * 2


torch.fx.wrap("double_it")


class OutsideOps(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        return double_it(self.bn(self.conv(x)))


def test_artifact_refuses_ops_outside_torch(tmp_path):
    with pytest.raises(ds.ExportError, match=r"test_export\.double_it.*Export to ONNX instead"):
        ds.export(OutsideOps().eval(), torch.randn(1, 3, 4, 4), "pytorch", tmp_path / "n.dnnshrink")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("name", ["literal_view", "channel_pad_shortcut"])
def test_onnx_export_is_verified_and_dynamic(name, tmp_path):
    _, small, x = shrink_dead_half(name)
    path = tmp_path / "m.onnx"
    result = ds.export(small, x, "onnx", path, opset=20)
    assert result["max_relative_error"] < 1e-4 and result["tolerance"] == 1e-4
    model = onnx.load(str(path))
    assert any(op.domain in ("", "ai.onnx") and op.version == 20 for op in model.opset_import)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batch = torch.randn(3, *x.shape[1:])
    (out,) = session.run(None, {session.get_inputs()[0].name: batch.numpy()})
    with torch.no_grad():
        expected = small(batch)
    assert float(np.linalg.norm(out - expected.numpy()) / np.linalg.norm(expected.numpy())) < 1e-4


def test_onnx_mismatch_is_an_error_with_the_measured_error(tmp_path):
    _, small, x = shrink_dead_half("concat")
    with pytest.raises(ds.ExportError, match=r"relative error \d\.\d+e-\d+ exceeds the tolerance 1e-30"):
        ds.export(small, x, "onnx", tmp_path / "m.onnx", rtol=1e-30)
    assert not (tmp_path / "m.onnx").exists()


def _use_renderer(monkeypatch, name):
    """Make the picture exporter see only ``name`` (skip if it is not installed)."""
    import dnnshrink_plugins.exporters.picture as picture
    monkeypatch.setattr(picture, "RENDERERS", (name,))
    if picture.find_renderer("svg") is None:
        pytest.skip(f"{name} is not installed")


def _texts(svg):
    return [html.unescape(t) for t in re.findall(r">([^<>]+)</text>", svg)]


@pytest.mark.parametrize("renderer", ["dot", "graphviz-pure"])
def test_graph_picture_shows_channels_and_macs_kept(renderer, tmp_path, monkeypatch):
    _use_renderer(monkeypatch, renderer)
    model, small, x = shrink_dead_half("channel_pad_shortcut")
    result = ds.export(small, x, "graph", tmp_path / "g.svg", baseline=model)
    svg = (tmp_path / "g.svg").read_text()
    assert result["rendered"] and result["renderer"] == renderer and svg.lstrip().startswith(("<?xml", "<svg"))
    texts = _texts(svg)
    for name in ("stem.0", "layer3.0.conv2", "fc", "add", "flatten"):
        assert name in texts, name
    rows = ds.layer_report(small, x, baseline=model).rows
    for row in rows:
        kept = row.macs_after / row.macs_before
        assert f"Conv2d in {row.in_before} → {row.in_after}, out {row.out_before} → {row.out_after}" in texts or \
            f"Linear in {row.in_before} → {row.in_after}, out {row.out_before} → {row.out_after}" in texts
        assert f"MACs kept {kept:.0%}" in texts
    fc = next(r for r in rows if r.name == "fc")  # lost only input channels: half its MACs, same outputs
    assert fc.out_after == fc.out_before and fc.in_after < fc.in_before and fc.macs_after < fc.macs_before
    ds.export(small, x, "graph", tmp_path / "g.png")
    assert (tmp_path / "g.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("renderer", ["dot", "graphviz-pure"])
def test_inspect_picture_shows_removable_and_frozen_layers(renderer, tmp_path, monkeypatch):
    _use_renderer(monkeypatch, renderer)
    factory, shape = HANDWRITTEN["unknown_op"]
    model, x = factory().eval(), torch.randn(shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ds.UnknownOpWarning)
        graph = ds.trace(model, x)
    ds.export(model, x, "graph", tmp_path / "i.svg", channel_graph=graph)
    svg = (tmp_path / "i.svg").read_text()
    texts = _texts(svg)
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    groups = {n: graph.group_of(n, "out") for n in layers}
    frozen = [n for n, g in groups.items() if not g.removable.any()]
    removable = [n for n, g in groups.items() if g.removable.any()]
    assert frozen and removable
    assert texts.count("frozen") == len(frozen)
    assert sum(t.endswith("units removable") for t in texts) == len(removable)
    tooltips = [html.unescape(t) for t in re.findall(r'xlink:title="([^"]*)"', svg)]
    for name in frozen:
        assert f"frozen: {'; '.join(groups[name].frozen_reasons)}" in tooltips


def test_graph_without_a_renderer_writes_source_and_says_how_to_install(tmp_path, monkeypatch):
    import dnnshrink_plugins.exporters.picture as picture
    monkeypatch.setattr(picture.shutil, "which", lambda name, path=None: None)
    _, small, x = shrink_dead_half("concat")
    with pytest.warns(ds.DnnshrinkWarning, match="pip install graphviz-pure.*apt-get install graphviz"):
        result = ds.export(small, x, "graph", tmp_path / "g.svg")
    assert not result["rendered"] and (tmp_path / "g.dot").read_text().startswith("digraph")


def test_unknown_format_lists_the_known_ones():
    with pytest.raises(ds.PluginError, match="no exporter called 'tflite' is loaded; choose one of: graph, onnx, pytorch"):
        ds.export(nn.Linear(2, 2), torch.randn(1, 2), "tflite", "x.tflite")


def test_layer_report_counts_macs_on_the_real_modules(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 5)).eval()
    x = torch.randn(1, 3, 8, 8)
    report = ds.layer_report(model, x)
    conv, fc = report.rows
    assert conv.macs_before == 8 * 3 * 9 * 36 and fc.macs_before == 8 * 36 * 5
    assert report.totals["macs_before"] == conv.macs_before + fc.macs_before
    small = ds.generate(model, x, {"0": np.arange(8) < 4})
    report = ds.layer_report(small, x, baseline=model)
    assert report.rows[0].out_after == 4 and report.rows[1].in_after == 4 * 36
    assert report.rows[0].macs_after == 4 * 3 * 9 * 36
    assert "0" in str(report) and "total" in str(report)
    paths = report.save(tmp_path)
    assert json.loads(paths["json"].read_text())["totals"]["macs_after"] == report.totals["macs_after"]
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"


def test_cli_inspect(tmp_path):
    out = tmp_path / "r.svg"
    run = subprocess.run(["dnnshrink", "inspect", "resnet18", "--input-shape", "1,3,32,32", "--out", str(out),
                          "--top", "3"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "layer1.0.conv1" in run.stdout and "more groups" in run.stdout
    # what each target resource can get down to, by channels and with the 8 basic blocks gone
    reach = {line.split()[0]: line for line in run.stdout.splitlines() if "of the baseline" in line}
    assert set(reach) == {"MACs", "parameters", "latency"}
    for line in reach.values():
        alone, deep = (float(w.rstrip("%")) for w in re.findall(r"[\d.]+%", line)[:2])
        assert 0 < deep < alone < 100 and "8 droppable residual blocks gone" in line
    assert out.is_file() if shutil.which("dot") else out.with_suffix(".dot").is_file()
    bad = subprocess.run(["dnnshrink", "inspect", "resnet81", "--input-shape", "1,3,32,32"], capture_output=True,
                         text=True)
    assert bad.returncode == 1 and "Did you mean resnet18" in bad.stderr and "Traceback" not in bad.stderr


class WithConstant(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) + torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1, 1)


def test_exports_leave_the_model_untouched(tmp_path):
    model, x = WithConstant().eval(), torch.randn(1, 3, 4, 4)
    names = set(vars(model)) | set(model._buffers)
    ds.export(model, x, "pytorch", tmp_path / "m.dnnshrink")
    ds.export(model, x, "graph", tmp_path / "m.svg")
    assert set(vars(model)) | set(model._buffers) == names  # fx's lifted constants stay off the model
    with torch.no_grad():
        assert torch.allclose(ds.load(tmp_path / "m.dnnshrink")(x), model(x))


class Noisy(nn.Module):
    """A conv whose output carries noise of ``scale`` times its mean magnitude: onnxruntime
    and PyTorch draw different noise, so they differ by about that much."""

    def __init__(self, scale: float):
        super().__init__()
        self.conv, self.scale = nn.Conv2d(3, 8, 3), scale

    def forward(self, x):
        y = self.conv(x)
        return y + self.scale * y.abs().mean() * torch.randn_like(y)


def test_a_network_only_timed_is_checked_loosely_and_a_failed_export_names_its_label():
    """The report's measured latency exports the baseline only to time it: a float32 error
    the exporter's 1e-4 refuses (a deep random-initialised network's) does not stop it, while
    the shrunk network, which becomes model.onnx, keeps the strict check."""
    from dnnshrink_core.errors import ExportError
    from dnnshrink_core.timing import onnx_latency

    torch.manual_seed(0)
    x = torch.randn(1, 3, 16, 16)
    timed = onnx_latency({"baseline": Noisy(1e-3).eval(), "shrunk": Noisy(0.0).eval()}, (x,), 2, rounds=2, runs=2,
                         timed_only=["baseline"])
    assert set(timed) == {"baseline", "shrunk"} and all(0 < f <= m for f, m in timed.values())
    with pytest.raises(ExportError, match=r"^shrunk: onnxruntime's output differs from PyTorch's: relative error "):
        onnx_latency({"baseline": Noisy(0.0).eval(), "shrunk": Noisy(1e-3).eval()}, (x,), 2, rounds=2, runs=2,
                     timed_only=["baseline"])


class CachingHead(nn.Module):
    """A forward that caches what it computes from the input's shape on its module, as
    ultralytics' Detect head keeps its anchors and the shape they were made for."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.shape, self.grid = None, None

    def forward(self, x):
        y = self.conv(x)
        if self.shape != y.shape:
            self.grid, self.shape = torch.arange(y.shape[-1], dtype=y.dtype), y.shape
        return y + self.grid


def test_exporting_a_model_that_caches_on_its_modules_leaves_the_model_working(tmp_path):
    model, x = CachingHead().eval(), torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        before = model(x)
    # the cached shape holds the batch: torch's exporter fixes it, which is said, not a failure
    with pytest.warns(ds.DnnshrinkWarning, match="fixed the batch size of CachingHead to 1"):
        result = ds.export(model, x, "onnx", tmp_path / "m.onnx")
    assert result["dynamic_batch"] is False
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():  # the exporter's symbolic values did not stay on the model
        assert torch.equal(model(x), before) and model(torch.cat([x, x])).shape[0] == 2
    assert type(model.grid) is torch.Tensor and np.allclose(out, before.numpy(), atol=1e-5)


class PairsOrOne(nn.Module):
    """A forward that takes another path for an even batch: an export traced at batch 1
    holds that path only, which a dynamic batch of 2 computes wrongly."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        return y.view(2, -1) if y.shape[0] % 2 == 0 else y.view(1, -1)


def test_a_dynamic_batch_the_export_computes_wrongly_is_exported_for_the_examples_batch(tmp_path):
    model, x = PairsOrOne().eval(), torch.randn(1, 3, 8, 8)
    with pytest.warns(ds.DnnshrinkWarning, match=r"computes another batch size wrongly \(an ONNX output has shape "
                                                  r"\(1, 288\); PyTorch gives \(2, 144\)\): exported for batch 1 only"):
        result = ds.export(model, x, "onnx", tmp_path / "m.onnx")
    assert result["dynamic_batch"] is False and result["max_relative_error"] < 1e-4
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert [d for d in session.get_inputs()[0].shape] == [1, 3, 8, 8]


class CountedByValue(nn.Module):
    """A size read from the values (as a detector keeps the boxes over a threshold)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        return y[:int(y.abs().sum() > 0)]


def test_an_export_torch_cannot_follow_says_why_plainly(tmp_path):
    with pytest.raises(ds.ExportError) as caught:
        ds.export(CountedByValue().eval(), torch.randn(1, 3, 8, 8), "onnx", tmp_path / "m.onnx")
    message = str(caught.value)
    # torch's own error, first, without its advice boilerplate or terminal colours, then what to do
    assert message.startswith("torch's ONNX exporter failed: TorchExportError: <class "
                              "'torch.fx.experimental.symbolic_shapes.GuardOnDataDependentSymNode'>")
    assert "\x1b[" not in message and "Next steps" not in message
    assert "export the part of the model before them" in message and not (tmp_path / "m.onnx").exists()


def test_a_dynamic_batch_torch_cannot_export_falls_back_in_one_warning_not_pages_of_logs(tmp_path, capfd):
    """Two of torchvision's ConvNeXt blocks in a row: torch.export cannot give them a dynamic
    batch, and logs every failed guard with its traceback (some 150 lines) before raising.
    The user gets the fixed-batch file and one warning; the level ``logging.disable`` had
    is restored."""
    import logging

    from torchvision.models.convnext import CNBlock

    torch.manual_seed(0)
    net = nn.Sequential(CNBlock(8, 1e-6, 0.0), CNBlock(8, 1e-6, 0.0)).eval()
    x = torch.randn(1, 8, 8, 8)
    logging.disable(logging.DEBUG)
    try:
        with pytest.warns(ds.DnnshrinkWarning, match="could not give Sequential a dynamic batch"):
            result = ds.export(net, x, "onnx", tmp_path / "m.onnx")
        assert logging.root.manager.disable == logging.DEBUG
    finally:
        logging.disable(logging.NOTSET)
    assert result["dynamic_batch"] is False and result["max_relative_error"] < 1e-4
    err = capfd.readouterr().err
    assert "Error while creating guard" not in err and "Traceback" not in err, err[:2000]


class Amplifier(nn.Module):
    """A deep stack of random convs with no normalisation: float32 rounding grows layer by
    layer (``depth`` 10, ``std`` 1: PyTorch's own float32 output ~3e-3 from its float64 one;
    24 and 2: ~1.4, no better than noise); ``head``: a second, well-conditioned output."""

    def __init__(self, depth: int = 10, std: float = 1.0, head: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(*[nn.Conv2d(16, 16, 3, padding=1) for _ in range(depth)])
        for conv in self.body:
            nn.init.normal_(conv.weight, std=std)
        self.head = nn.Conv2d(16, 4, 1) if head else None

    def forward(self, x):
        y = x
        for conv in self.body:
            y = torch.tanh(conv(y))
        return y if self.head is None else (y, self.head(x))


def _own_error(model, x):
    with torch.no_grad():
        exact = copy.deepcopy(model).double()(x.double())
        return float((model(x).double() - exact).norm() / exact.norm())


def test_a_network_that_amplifies_rounding_is_verified_against_its_float64_output(tmp_path):
    """Where PyTorch's own float32 output is far from its float64 one (deep random networks),
    the ONNX model is judged against the float64 output by that error, said in a warning and
    in the result; too far for a comparison to mean anything, it is an error that says why;
    and a network without that excuse is still held to the tolerance."""
    model, x = Amplifier().eval(), torch.randn(1, 16, 8, 8)
    assert 1e-4 < _own_error(model, x) < 0.05  # the premise: float32 cannot reproduce it to 1e-4
    with pytest.warns(ds.DnnshrinkWarning, match=r"amplifies rounding: PyTorch's own float32 output is"):
        result = ds.export(model, x, "onnx", tmp_path / "m.onnx")
    judged = result["checked_against_float64"]
    assert 1e-4 < judged["own_error"] < 0.05 and judged["error_vs_float64"] <= 2 * judged["own_error"]
    chaos = Amplifier(24, 2.0).eval()
    assert _own_error(chaos, x) > 0.5
    with pytest.raises(ds.ExportError, match=r"cannot be checked on the example: PyTorch's own float32 output is"):
        ds.export(chaos, x, "onnx", tmp_path / "c.onnx")
    _, small, x = shrink_dead_half("concat")
    with pytest.raises(ds.ExportError, match=r"exceeds the tolerance 1e-30$"):
        ds.export(small, x, "onnx", tmp_path / "n.onnx", rtol=1e-30)


def test_one_output_that_amplifies_rounding_excuses_no_other():
    """The excuse is per output: an ONNX model whose well-conditioned second output is wrong
    by 0.2% (its head's weights 1.002x: within twice the first output's own rounding error,
    far over the tolerance) fails the check although its first output amplifies rounding."""
    import tempfile
    from dnnshrink_plugins.exporters.onnx_export import verify_onnx

    model, x = Amplifier(head=True).eval(), torch.randn(1, 16, 8, 8)
    wrong = copy.deepcopy(model)
    with torch.no_grad():
        wrong.head.weight.mul_(1.002)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "wrong.onnx"
        torch.onnx.export(wrong, (x,), str(path), dynamo=False, opset_version=17)
        with pytest.raises(ds.ExportError, match="exceeds the tolerance"):
            verify_onnx(path, model, (x,), 1e-4)
