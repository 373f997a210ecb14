"""A third party's plugin package, really installed and loaded through its entry point.

The package (tests/example_plugin) is the worked example of docs/plugins.md: a handler for
its own fused layer, a regularizer, a mask extractor, an exporter and an override of a
default handler.
"""
from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dnnshrink_core import hookspecs

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "tests" / "example_plugin"
DOC = ROOT / "docs" / "plugins.md"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    target = tmp_path_factory.mktemp("site-packages")
    build = tmp_path_factory.mktemp("build")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(EXAMPLE)], check=True, cwd=build,
                   env=dict(os.environ, PIP_NO_INPUT="1"))
    assert list(target.glob("dnnshrink_example_plugin-*.dist-info"))
    return target


def run(site, *args, env=None, script=None):
    environment = dict(os.environ, PYTHONPATH=str(site), **(env or {}))
    command = [sys.executable, "-c", script] if script else ["dnnshrink", *args]
    return subprocess.run(command, capture_output=True, text=True, env=environment, cwd=site)


def test_plugins_command_shows_the_distribution(site):
    out = run(site, "plugins")
    assert out.returncode == 0, out.stderr
    line = next(l for l in out.stdout.splitlines() if l.startswith("example "))
    assert "dnnshrink-example-plugin 0.1.0" in line
    for hook in ("dnnshrink_exporter", "dnnshrink_leaf_module", "dnnshrink_mask_extractor",
                 "dnnshrink_op_handler", "dnnshrink_regularizer"):
        assert hook in line
    assert "dnnshrink 0.1.0" in out.stdout  # the defaults, from dnnshrink's own distribution


USE_EVERY_EXTENSION = r"""
import warnings, numpy as np, torch
import dnnshrink_core as ds
from dnnshrink_core.pipeline import shrink
from dnnshrink_example.layers import Net, FusedConvBNAct
from dnnshrink_example.plugin import UpsampleHandler

torch.manual_seed(0)
model = Net().eval()
with torch.no_grad():
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight[::2] = 0; m.bias[::2] = 0
x = torch.randn(2, 3, 8, 8)
with warnings.catch_warnings():
    warnings.simplefilter("error", ds.UnknownOpWarning)
    graph = ds.trace(model, x)
assert "a" in graph and graph["a"].removable.all(), graph          # the fused block is one layer
assert UpsampleHandler.calls > 0                                     # the override was used first
small = ds.generate(model, x, ds.alive_masks(model, x))
assert isinstance(small.a, FusedConvBNAct) and small.a.conv.out_channels == 8 and small.b.bn.num_features == 16
with torch.no_grad():
    err = ((model(x) - small(x)).norm() / model(x).norm()).item()
assert err < 1e-5, err
half = ds.alive_masks(model, x, extractor="top_half")               # the mask extractor
assert half["b"].sum() == 16
assert "npz" in ds.export_formats()
done = ds.export(small, x, "npz", "small.npz")                      # the exporter
assert done["tensors"] == len(small.state_dict())
result = shrink(Net(), x[:1], train_one_epoch=lambda m, lr: None, test=lambda m: 1.0, finetune=False,
                regularizer="example_l2", max_epochs=1, target_macs=0.6, device="cpu", progress=False,
                latency_runs=1)                                     # the regularizer
assert result.report.extra["structure_learning"]["regularizer"] == "example_l2"
print("every extension works")
"""


def test_every_kind_of_extension_works(site):
    out = run(site, script=USE_EVERY_EXTENSION)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "every extension works" in out.stdout


def test_a_third_party_plugin_can_be_blocked(site):
    out = run(site, "plugins", env={"DNNSHRINK_BLOCK_PLUGINS": "example"})
    assert "blocked: example" in out.stdout and "dnnshrink-example-plugin" not in out.stdout
    script = "import dnnshrink_core as ds, torch\ntry:\n    ds.export(torch.nn.Linear(2, 2), torch.zeros(1, 2), 'npz', 'a.npz')\n" \
             "except ds.PluginError as e:\n    print('refused:', e)\n"
    out = run(site, script=script, env={"DNNSHRINK_BLOCK_PLUGINS": "example"})
    assert "refused: no exporter called 'npz' is loaded" in out.stdout, out.stderr


def test_docs_hook_reference_matches_the_specs():
    text = DOC.read_text()
    specs = [f for name, f in vars(hookspecs).items() if name.startswith("dnnshrink_") and callable(f)]
    assert len(specs) >= 8
    for spec in specs:
        assert f"### `{spec.__name__}{inspect.signature(spec)}`" in text, spec.__name__
        first_paragraph = inspect.getdoc(spec).split("\n\n")[0]
        assert " ".join(first_paragraph.split()) in " ".join(text.split()), spec.__name__


def test_docs_examples_are_the_tested_code():
    text = DOC.read_text()
    blocks = re.findall(r"<!-- from (\S+) -->\n```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 5
    for path, code in blocks:
        source = (ROOT / path).read_text()
        assert code.strip() in source, f"the docs' example from {path} is not in that file"
