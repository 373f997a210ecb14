"""Bad targets, options, inputs and masks are refused before any work (issue #15).

One table of bad inputs runs through both the command line (in-process ``cli.main``, whose
return value is the exit status) and ``shrink(...)``: each must give the expected error, a
message naming the key, exit status 1 without a traceback, and no output folder.
"""
from __future__ import annotations

import json
import subprocess
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import dnnshrink_core as ds
from dnnshrink_core import cli
from dnnshrink_core.pipeline import shrink
from dnnshrink_core.target import Target
from dnnshrink_core.validation import check_input_count
from helpers import user_functions

# the setting: a small Conv1d BatchNorm model whose baseline scores 0.97 and any shrunk
# model "breaks" (for the max_score_drop checks)
FUNCTIONS = user_functions(dims=1, test_body="return 0.97 if model.a[0].out_channels == 8 else 0.10")
NS: dict = {}
exec(FUNCTIONS, NS)
X1 = torch.randn(1, 2, 16)
# baseline 2·8·3·16 + 8·8·3·16 + 8·2 = 3856 MACs; smallest: 2·1·48 + 1·1·48 + 1·2 = 146 MACs
BASE = {"max_epochs": 1, "lr": 0.01, "device": "cpu", "exporters": [], "tensorboard": False, "latency_runs": 1}


def write_config(tmp_path, **extra):
    (tmp_path / "funcs.py").write_text(FUNCTIONS)
    config = {"model": "funcs.py:build", "functions": "funcs.py", "input_shape": [1, 2, 16], **BASE, **extra}
    path = tmp_path / "config.yaml"
    path.write_text("\n".join(f"{k}: {_yaml(v)}" for k, v in config.items()))
    return path


def _yaml(value):
    return ".nan" if isinstance(value, float) and value != value else json.dumps(value)


def run_cli(capsys, *args):
    status = cli.main(["run", *map(str, args), "--quiet"])
    return status, capsys.readouterr().err


BAD = [  # (option(s), error class from shrink(), words the message must hold (CLI and Python))
    ({"target_macs": -0.2}, ds.TargetError, ["target_macs", "-0.2", "(0, 1]"]),
    ({"target_macs": 0}, ds.TargetError, ["target_macs", "(0, 1]"]),
    ({"target_macs": 1.5}, ds.TargetError, ["target_macs", "'1.5M'", "(0, 1]"]),
    ({"target_macs": 2e5}, ds.TargetError, ["target_macs", "'200K'"]),
    ({"target_macs": "1.5"}, ds.TargetError, ["target_macs", "'1.5M'"]),
    ({"target_macs": "150%"}, ds.TargetError, ["target_macs", "150%"]),
    ({"target_macs": "lots"}, ds.TargetError, ["target_macs", "'lots'"]),
    ({"target_macs": "100 MACs"}, ds.TargetError, ["target_macs", "below the smallest network", "146 MACs"]),
    ({"target_macs": 0.01}, ds.TargetError, ["target_macs", "below the smallest network", "146 MACs"]),
    ({"target_macs": "5K"}, ds.TargetError, ["target_macs", "above the baseline's 3,856 MACs"]),
    ({"target": {"resource": "macs", "amount": 1e9}}, ds.TargetError, ["target", "above the baseline"]),
    ({"target": {"resource": "energy", "value": 0.5}}, ds.TargetError, ["target", "'energy'", "macs", "latency"]),
    # what YAML makes of {resource:latency,value:0.5}: one key
    ({"target": {"resource:latency,value:0.5": None}}, ds.TargetError,
     ["unknown field(s) resource:latency,value:0.5", "YAML needs a space after each colon"]),
    ({"target": 0.5, "target_macs": 0.5}, ds.TargetError, ["target", "target_macs", "not both"]),
    ({"lr": -1}, ds.ConfigError, ["'lr'", "> 0", "-1"]),
    ({"lr": float("nan")}, ds.ConfigError, ["'lr'", "> 0", "nan"]),
    ({"lr": "fast"}, ds.ConfigError, ["'lr' must be a number, not 'fast'"]),
    ({"max_epochs": 0}, ds.ConfigError, ["'max_epochs'", "at least 1", "0"]),
    ({"max_epochs": 2.5}, ds.ConfigError, ["'max_epochs' must be an integer"]),
    ({"threshold": -1}, ds.ConfigError, ["'threshold'", ">= 0", "-1"]),
    ({"strength": 0}, ds.ConfigError, ["'strength'", "> 0", "0"]),
    ({"strength_scale": -2.0}, ds.ConfigError, ["'strength_scale'", "> 0", "-2.0"]),
    ({"round_to": 0}, ds.ConfigError, ["'round_to'", ">= 1", "0"]),
    ({"trust": 1.5}, ds.ConfigError, ["'trust'", "from 0 to 1", "1.5"]),
    ({"anneal": "yes"}, ds.ConfigError, ["'anneal' must be", "'yes'"]),
    ({"depth": "deep"}, ds.ConfigError, ["'depth'", "true, false or 'auto'", "'deep'"]),
    ({"min_width": 0}, ds.ConfigError, ["'min_width'", ">= 1", "0"]),
    ({"max_score_drop": -0.1}, ds.ConfigError, ["'max_score_drop'", ">= 0", "-0.1"]),
    ({"exporters": ["onnxx"]}, ds.ConfigError, ["'exporters'", "'onnxx'", "Did you mean 'onnx'?"]),
    ({"max_epoch": 3}, ds.UnknownOptionError, ["unknown", "'max_epoch'", "Did you mean 'max_epochs'?"]),
    ({"algorithm": "pruneit"}, ds.PluginError, ["no algorithm called 'pruneit'", "magnitude, morphnet, slimming"]),
]


@pytest.mark.parametrize("change, error, words", BAD, ids=[json.dumps(c) for c, _, _ in BAD])
def test_bad_options_are_refused_by_the_cli_and_by_shrink(tmp_path, capsys, change, error, words):
    config = write_config(tmp_path, **change)
    status, err = run_cli(capsys, config, "--out", tmp_path / "out")
    assert status == 1, err
    assert err.startswith("dnnshrink: error: ") and "Traceback" not in err
    for word in words:
        assert word in err
    assert not (tmp_path / "out").exists()

    options = {**BASE, **change}
    options["exporters"] = tuple(options["exporters"])
    with pytest.raises(error) as caught:
        shrink(NS["build"](), X1, train_one_epoch=NS["train_one_epoch"], train=NS["train"], test=NS["test"],
               out_dir=str(tmp_path / "py"), progress=False, **options)
    for word in words:
        assert word in str(caught.value)
    assert isinstance(caught.value, ds.DnnshrinkError)
    assert not (tmp_path / "py").exists()


def test_python_errors_are_also_the_builtin_kinds():
    with pytest.raises(TypeError, match="unknown option 'lrr'"):
        shrink(NS["build"](), X1, train_one_epoch=NS["train_one_epoch"], test=NS["test"], finetune=False, lrr=1)
    with pytest.raises(ValueError, match="'lr'"):
        shrink(NS["build"](), X1, train_one_epoch=NS["train_one_epoch"], test=NS["test"], finetune=False, lr=0)


def test_cli_target_flag_is_checked(tmp_path, capsys):
    config = write_config(tmp_path)
    status, err = run_cli(capsys, config, "--out", tmp_path / "out", "--target", "1.5")
    assert status == 1 and "--target = '1.5'" in err and "'1.5M'" in err and "Traceback" not in err
    status, err = run_cli(capsys, config, "--out", tmp_path / "out", "--target", "latency:2")
    assert status == 1 and "--target" in err and "'2 ms'" in err and "Traceback" not in err
    status, err = run_cli(capsys, config, "--out", tmp_path / "out", "--target", "{resource: latency, value: 2}")
    assert status == 1 and "--target.value" in err and "'2 ms'" in err and "Traceback" not in err
    status, err = run_cli(capsys, config, "--out", tmp_path / "out", "--max-score-drop", "-1")
    assert status == 1 and "'max_score_drop'" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value, expected", [
    (0.5, Target("macs", fraction=0.5)), (1, Target("macs", fraction=1.0)), ("50%", Target("macs", fraction=0.5)),
    ("0.25", Target("macs", fraction=0.25)), ("1.5M", Target("macs", amount=1.5e6)),
    ("300K", Target("macs", amount=3e5)), ("2G", Target("macs", amount=2e9)),
    ("1500000 MACs", Target("macs", amount=1.5e6)),
    ({"resource": "macs", "amount": 1.5e6}, Target("macs", amount=1.5e6)),
    ({"value": "1.5M"}, Target("macs", amount=1.5e6)), ({"fraction": 0.3}, Target("macs", fraction=0.3)),
    ("latency:0.5", Target("latency", fraction=0.5)), ("latency:3ms", Target("latency", amount=3.0)),
    ("params:1M", Target("params", amount=1e6)), ("flops:30%", Target("macs", fraction=0.3)),
])
def test_target_forms(value, expected):
    assert Target.parse(value) == expected


def test_targets_in_range_run_and_report(tmp_path):
    result = shrink(NS["build"](), X1, train_one_epoch=NS["train_one_epoch"], test=NS["test"], finetune=False,
                    algorithm="magnitude", target_macs="2K", progress=False, **{**BASE, "exporters": ()})
    learn = result.report.extra["structure_learning"]
    assert learn["target"] == {"resource": "macs", "amount": 2000.0} and learn["target_macs"] == 2000.0
    assert 146 <= result.report.extra["shrunk"]["macs"] <= 2000


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.BatchNorm1d(4))

    def forward(self, x, y, scale=1.0):
        return self.conv(x + y) * scale


class Star(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.BatchNorm1d(4))

    def forward(self, *xs):
        return self.conv(sum(xs))


def test_example_inputs_must_fit_forward(tmp_path):
    x = torch.randn(1, 2, 16)
    with pytest.raises(ds.TraceError, match=r"holds 2 positional input\(s\) but Net.forward\(x\) takes 1"):
        ds.trace(NS["build"](), (x, x))
    with pytest.raises(ds.TraceError, match=r"holds 1 positional input\(s\) .* takes 2 to 3"):
        ds.trace(TwoInputs(), x)
    with pytest.raises(ds.TraceError, match="takes 1"):
        shrink(NS["build"](), (x, x), train_one_epoch=NS["train_one_epoch"], test=NS["test"], finetune=False,
               out_dir=str(tmp_path / "out"), progress=False, **BASE)
    assert not (tmp_path / "out").exists()
    ds.trace(TwoInputs(), (x, x))  # a default may be left out
    check_input_count(Star(), (x, x, x))  # *args takes any number (fx itself cannot trace it)


def test_alive_masks_threshold_is_checked_and_emptied_groups_warn():
    model = NS["build"]()
    with pytest.raises(ds.ConfigError, match=r"threshold must be a number >= 0.*not -1"):
        ds.alive_masks(model, X1, threshold=-1)
    with pytest.warns(ds.DnnshrinkWarning, match=r"removes every unit of group\(s\) 'a.0', 'b.0'; one unit"):
        masks = ds.alive_masks(model, X1, threshold=1e9)
    assert masks.kept()["a.0"] == masks.kept()["b.0"] == 1


def test_masks_take_booleans_or_zero_one_only():
    model = NS["build"]()
    small = ds.generate(model, X1, {"a.0": torch.tensor([1, 0, 1, 0, 1, 0, 1, 0])})  # 0/1 numbers read as flags
    assert small.a[0].out_channels == 4
    assert ds.generate(model, X1, {"a.0": np.array([1.0] * 4 + [0.0] * 4)}).a[0].out_channels == 4
    with pytest.raises(ds.MaskError, match=r"group 'a.0' holds 0.3.*scores > threshold"):
        ds.generate(model, X1, {"a.0": [0.3] * 8})
    with pytest.raises(ds.MaskError, match="group 'a.0' holds -1"):
        ds.Masks({"a.0": [-1, 1]})
    with pytest.raises(ds.MaskError, match="must be booleans"):
        ds.generate(model, X1, {"a.0": ["yes"] * 8})
    with pytest.warns(ds.DnnshrinkWarning, match=r"group 'a.0' removes every unit; one unit .* is kept"):
        assert ds.generate(model, X1, {"a.0": [False] * 8}).a[0].out_channels == 1


def test_score_drop_from_python_raises_after_writing_the_report(tmp_path):
    with pytest.raises(ds.ScoreDropError, match=r"scores 0.1, 0.87 below the baseline's 0.97.*max_score_drop 0.05"
                       ) as caught:
        shrink(NS["build"](), X1, train_one_epoch=NS["train_one_epoch"], test=NS["test"], finetune=False,
               algorithm="magnitude", max_score_drop=0.05, out_dir=str(tmp_path / "out"), progress=False,
               **{**BASE, "exporters": ()})
    assert caught.value.result.score == pytest.approx(0.10)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["score_check"] == {"max_score_drop": 0.05, "drop": pytest.approx(0.87), "passed": False}


def dnnshrink(*args):
    return subprocess.run(["dnnshrink", *map(str, args)], capture_output=True, text=True)


def test_cli_warnings_show_the_message_only_and_score_drop_exits_1(tmp_path):
    # MorphNet falls short in one epoch without annealing (a warning from inside the pipeline), and the shrunk
    # model scores 0.10 against 0.97: the run writes its report, then exits with 1
    config = write_config(tmp_path, strength_scale=1e-6, target_macs=0.3, max_score_drop=0.05, anneal=False)
    run = dnnshrink("run", config, "--out", tmp_path / "out", "--quiet")
    assert run.returncode == 1, run.stderr[-3000:]
    assert "DnnshrinkWarning: MorphNet did not reach the target" in run.stderr
    assert "learned = algorithm.learn" not in run.stderr and "pipeline.py" not in run.stderr
    assert "Traceback" not in run.stderr and "max_score_drop 0.05" in run.stderr
    assert json.loads((tmp_path / "out" / "report.json").read_text())["score_check"]["passed"] is False
    debug = dnnshrink("run", config, "--out", tmp_path / "again", "--quiet", "--debug", "--max-score-drop", "1")
    assert debug.returncode == 0, debug.stderr[-3000:]
    assert "pipeline.py" in debug.stderr and "DnnshrinkWarning" in debug.stderr  # --debug says where


def test_warning_formatter_is_restored():
    before = warnings.showwarning
    assert cli.main(["plugins"]) == 0
    assert warnings.showwarning is before


def test_a_wrong_input_shape_in_a_config_names_the_key_to_fix(tmp_path, capsys):
    config = write_config(tmp_path, input_shape=[2, 16])  # the batch dimension left out
    status, err = run_cli(capsys, config, "--out", tmp_path / "out")
    assert status == 1 and err.startswith("dnnshrink: error: the model cannot run on input_shape [2, 16] from ")
    assert "Give input_shape as one batch of the model's input, batch first" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_functions_file_named_as_a_module_says_how_to_name_it(tmp_path, capsys):
    config = write_config(tmp_path, functions="funcs")  # funcs.py is next to the config
    status, err = run_cli(capsys, config, "--out", tmp_path / "out")
    assert status == 1 and "cannot import module 'funcs'" in err
    assert "the file funcs.py next to the config is given as `functions: funcs.py`" in err


def test_a_model_without_batchnorm_is_told_what_to_add(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv1d(2, 8, 3), torch.nn.ReLU(), torch.nn.Conv1d(8, 2, 3))
    with pytest.raises(ds.NoBatchNormError, match=r"add a BatchNorm after each conv you want shrunk"):
        shrink(model, X1, train_one_epoch=NS["train_one_epoch"], train=NS["train"], test=NS["test"],
               out_dir=str(tmp_path / "out"), progress=False, **BASE)
    assert not (tmp_path / "out").exists()
