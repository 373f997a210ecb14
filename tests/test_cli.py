"""The command line speaks in its own words, and the README's generator example runs."""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import dnnshrink_core as ds
from dnnshrink_core import cli
from test_validation import write_config

FX_INTERNALS = ("While executing", "Original traceback", "tlparse", "example_inputs", "Traceback")


@pytest.mark.parametrize("shape, words", [
    ("1,3,x", "--input-shape '1,3,x' must be whole numbers"),
    ("1,3,-2,4", "--input-shape '1,3,-2,4' must be whole numbers"),
    ("1,5,32,32", "cannot run on --input-shape 1,5,32,32: it failed at `conv1`"),
    ("1,3", "cannot run on --input-shape 1,3: it failed at `conv1`"),
])
def test_bad_input_shape_names_the_flag_without_fx_internals(shape, words, capsys, tmp_path):
    status = cli.main(["inspect", "resnet18", "--input-shape", shape, "--out", str(tmp_path / "r.svg")])
    err = capsys.readouterr().err
    assert status == 1 and words in err, err
    assert not any(noise in err for noise in FX_INTERNALS), err
    assert not list(tmp_path.iterdir())


def test_python_trace_errors_hold_no_fx_internals():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(ds.InputRunError) as info:
        ds.trace(model, torch.randn(1, 5, 8, 8))
    message = str(info.value)
    assert "failed at `_0`" in message or "failed at `0`" in message, message
    assert "While executing" not in message and "tlparse" not in message
    assert "expected input[1, 5, 8, 8] to have 3 channels" in info.value.failure


def test_existing_output_folder_suggests_the_flag_then_force_replaces_it(tmp_path, capsys):
    config = write_config(tmp_path, target_macs=0.5)
    out = tmp_path / "out"
    stale = out / "checkpoints" / "epoch-0099.pt"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"an older run's checkpoint")
    (out / "report.json").write_text('{"stale": true}')
    assert cli.main(["run", str(config), "--out", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert f"output folder {out} already exists and is not empty; choose another --out or pass --force" in err
    assert "force=True" not in err
    assert json.loads((out / "report.json").read_text()) == {"stale": True}

    assert cli.main(["run", str(config), "--out", str(out), "--quiet", "--force"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert "stale" not in report and report["shrunk"]["macs"] <= 0.5 * report["baseline"]["macs"]
    assert not stale.exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir())  # this run's own checkpoints


def test_generate_warns_when_the_masks_remove_nothing():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    x = torch.randn(1, 3, 8, 8)
    with pytest.warns(ds.NothingRemovedWarning, match="keep all .* channel units, so Sequential is copied unchanged"):
        ds.generate(model, x, ds.alive_masks(model, x))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ds.NothingRemovedWarning)
        ds.generate(model, x, {"0": np.arange(8) < 4})


def test_the_readme_generator_example_runs_and_shrinks(capsys):
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme[readme.index("## The generator from Python"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error", ds.DnnshrinkWarning)
        exec(compile(code, "README.md", "exec"), namespace)
    out = capsys.readouterr().out
    model, small = namespace["model"], namespace["small"]
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    assert "layer2.0.conv1" in out and "128→64" in out
    assert float(out.strip().splitlines()[-1]) < 1e-4


def test_calibrate_passes_its_options_to_the_latency_cost_model(monkeypatch):
    """`dnnshrink calibrate` hands the runtime, threads, batch, device, output, check and
    `--no-per-position` to the loaded latency cost model's calibrate(); `--per-position`, the
    default now, is still accepted."""
    from dnnshrink_core.cost import get_cost_model

    latency = get_cost_model("latency")
    seen = []
    monkeypatch.setattr(latency, "calibrate", lambda **options: seen.append(options), raising=False)
    assert cli.main(["calibrate", "--threads", "3", "--batch", "4", "--out", "p.json", "--no-check",
                     "--no-per-position"]) == 0
    assert cli.main(["calibrate", "--per-position"]) == 0
    assert seen[0] == {"runtime": "onnxruntime", "threads": 3, "batch": 4, "device": "cpu", "out": "p.json",
                       "check": False, "per_position": False}
    assert "per_position" not in seen[1] and seen[1]["check"] is True
    assert "spinning" not in seen[1]  # the default is calibrate's own
    assert cli.main(["calibrate", "--spinning", "never", "--no-check"]) == 0
    assert seen[2]["spinning"] == "never"


def test_calibrate_refuses_spinning_for_torch_before_building_the_check_models(monkeypatch, capsys):
    from dnnshrink_core.cost import get_cost_model

    monkeypatch.setattr(get_cost_model("latency"), "calibrate", lambda **options: pytest.fail("calibrated"),
                        raising=False)
    status = cli.main(["calibrate", "--runtime", "torch", "--spinning", "never",
                       "--check-model", "no_such_package.nets:build"])
    assert status == 1  # (an error dnnshrink explains)
    err = capsys.readouterr().err
    assert "--spinning is for --runtime onnxruntime" in err and "no_such_package" not in err
