"""The shrink pipeline, its config and the run/demo commands."""
from __future__ import annotations

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import dnnshrink_core as ds
from dnnshrink_core.pipeline import shrink
from helpers import state_copy, states_equal, user_functions
from models import conv_bn


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(conv_bn(3, 16), conv_bn(16, 32), conv_bn(32, 16))
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(self.body(x).mean((2, 3)))


X = torch.randn(4, 3, 8, 8)


def regularizer_only_epoch(model, lr):
    """An epoch whose data loss has no gradient: only the regularizer moves the scales."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(5):
        optimizer.zero_grad()
        (0.0 * model(X).sum()).backward()
        optimizer.step()


def test_target_loop_stops_at_the_target_and_expands_back():
    model = Tiny()
    before = state_copy(model)
    calls = []
    result = shrink(model, X[:1], train_one_epoch=regularizer_only_epoch, train=lambda m: calls.append("train"),
                    test=lambda m: 0.5, target_macs=0.7, max_epochs=100, strength_scale=20.0, lr=0.01,
                    device="cpu", progress=False, latency_runs=1)
    learn = result.report.extra["structure_learning"]
    assert 1 <= result.epochs < 100
    assert learn["learned_macs"] <= learn["target_macs"]
    shrunk_macs = result.report.extra["shrunk"]["macs"]
    assert learn["learned_macs"] <= shrunk_macs <= learn["target_macs"]  # the expand step grows it back
    assert learn["cost_unit"] == "MACs" and learn["target_cost"] == learn["target_macs"]  # MACs: both names
    assert calls == ["train"]  # fine-tuning only: no baseline training by default
    assert states_equal(before, state_copy(model))
    assert isinstance(result.model, Tiny) and result.model(X).shape == (4, 4)
    assert result.summary()["baseline"]["score"] == 0.5
    for group in result.masks.graph:
        assert result.masks[group.name].sum() >= 1


def test_regularizer_hooks_are_gone_after_the_run():
    model = Tiny()
    seen = {}

    def epoch(m, lr):
        seen["model"] = m
        regularizer_only_epoch(m, lr)

    shrink(model, X[:1], train_one_epoch=epoch, test=lambda m: 1.0, finetune=False, max_epochs=1,
           device="cpu", progress=False, latency_runs=1)
    from torch.optim.optimizer import _global_optimizer_pre_hooks

    assert not _global_optimizer_pre_hooks  # the regularizer's step hook
    for p in seen["model"].parameters():
        assert not p._backward_hooks  # the divergence guard's gradient hook


def test_test_must_return_a_number():
    with pytest.raises(ds.DnnshrinkError, match="must return one finite number"):
        shrink(Tiny(), X[:1], train_one_epoch=regularizer_only_epoch, train=lambda m: None,
               test=lambda m: {"acc": 1.0}, device="cpu", progress=False)


def test_existing_output_folder_is_not_overwritten(tmp_path):
    (tmp_path / "keep.txt").write_text("precious")
    with pytest.raises(ds.OutputExistsError, match="already exists and is not empty.*force=True"):
        shrink(Tiny(), X[:1], train_one_epoch=lambda m, lr: pytest.fail("no work before the check"),
               train=lambda m: None, test=lambda m: 1.0, out_dir=str(tmp_path), device="cpu")
    assert (tmp_path / "keep.txt").read_text() == "precious"


FUNCTIONS = user_functions(dims=2, steps=3)


def write_config(tmp_path, **extra):
    (tmp_path / "funcs.py").write_text(FUNCTIONS)
    config = {"model": "funcs.py:build", "functions": "funcs.py", "input_shape": [1, 3, 8, 8],
              "max_epochs": 60, "strength_scale": 20.0, "lr": 0.01, "exporters": ["pytorch", "onnx"], **extra}
    path = tmp_path / "config.yaml"
    path.write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in config.items()))
    return path


def dnnshrink(*args, cwd=None):
    return subprocess.run(["dnnshrink", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def test_run_a_config_end_to_end(tmp_path):
    config = write_config(tmp_path, device="cpu")
    run = dnnshrink("run", config, "--out", tmp_path / "out", "--quiet")
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["baseline"]["score"] == report["shrunk"]["score"] == 0.75
    assert report["shrunk"]["macs"] < report["baseline"]["macs"]
    assert {"macs", "params", "score"} <= set(report["baseline"]) and {"macs", "params", "score"} <= set(report["shrunk"])
    loaded = ds.load(tmp_path / "out" / "model.dnnshrink")
    assert loaded(torch.randn(2, 3, 8, 8)).shape == (2, 2)
    assert (tmp_path / "out" / "model.onnx").is_file() and (tmp_path / "out" / "report.md").is_file()
    again = dnnshrink("run", config, "--out", tmp_path / "out")
    assert again.returncode == 1 and "--force" in again.stderr


@pytest.mark.parametrize("change, message", [
    ({"max_epoch": 3}, "unknown key 'max_epoch'. Did you mean 'max_epochs'?"),
    ({"lr": "fast"}, "key 'lr' must be a number, not 'fast'"),
    ({"algorithm": "pruneit"}, "no algorithm called 'pruneit' is loaded; choose one of: magnitude, morphnet, slimming"),
    ({"functions": "missing.py"}, "function file"),
    ({"model": "funcs.py:bulid"}, "Did you mean 'build'?"),
])
def test_config_errors_are_clear(tmp_path, change, message):
    config = write_config(tmp_path, **change)
    run = dnnshrink("run", config, "--out", tmp_path / "out")
    assert run.returncode == 1
    assert message in run.stderr and "Traceback" not in run.stderr


def test_broken_and_missing_config_files(tmp_path):
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    run = dnnshrink("run", tmp_path / "bad.yaml", "--out", tmp_path / "o")
    assert run.returncode == 1 and "is not valid YAML" in run.stderr
    run = dnnshrink("run", tmp_path / "nope.yaml", "--out", tmp_path / "o")
    assert run.returncode == 1 and "does not exist" in run.stderr
    run = subprocess.run([sys.executable, "-m", "dnnshrink_core", "run", str(tmp_path / "nope.yaml"), "--debug"],
                         capture_output=True, text=True)
    assert run.returncode != 0 and "Traceback" in run.stderr


@pytest.mark.heavy
def test_demo_meets_its_goals(tmp_path):
    out = tmp_path / "demo"
    run = dnnshrink("demo", "--out", out, "--quiet")
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    base, small = report["baseline"], report["shrunk"]
    assert small["macs"] <= 0.6 * base["macs"]  # at least 40% fewer MACs
    assert small["score"] >= base["score"] - 0.01  # accuracy drops at most 0.01
    for name in ("model.dnnshrink", "model.onnx", "report.md", "layers.png"):
        assert (out / name).is_file()
    # the ONNX timed for the report is the one written: moved into place, not exported twice
    assert report["onnx_latency"]["shrunk_ms"] > 0 and not (out / ".model.timed.onnx").exists()
    assert (out / "graph.svg").is_file() or (out / "graph.dot").is_file()
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    loaded = ds.load(out / "model.dnnshrink")
    assert loaded(torch.zeros(3, 1, 8, 8)).shape == (3, 10)


@pytest.mark.parametrize("algorithm, epochs", [("magnitude", 0), ("slimming", 3)])
def test_other_algorithms_meet_the_target(algorithm, epochs):
    model = Tiny()
    result = shrink(model, X[:1], train_one_epoch=regularizer_only_epoch, train=lambda m: None,
                    test=lambda m: 1.0, algorithm=algorithm, target_macs=0.4, max_epochs=3, device="cpu",
                    progress=False, latency_runs=1)
    assert result.epochs == epochs
    extra = result.report.extra
    assert extra["shrunk"]["macs"] <= 0.4 * extra["baseline"]["macs"]
    assert extra["structure_learning"]["algorithm"] == algorithm
    widths = [m.out_channels for m in result.model.modules() if isinstance(m, nn.Conv2d)]
    assert min(widths) >= 1 and result.model(X).shape == (4, 4)


def test_morphnet_meets_the_target_even_when_training_falls_short():
    options = dict(train_one_epoch=regularizer_only_epoch, train=lambda m: None, test=lambda m: 1.0, target_macs=0.3,
                   max_epochs=1, strength_scale=1e-6, device="cpu", progress=False, latency_runs=1, exporters=[],
                   onnx_latency=False)
    with pytest.warns(ds.DnnshrinkWarning, match="did not reach the target"):
        result = shrink(Tiny(), X[:1], anneal=False, **options)
    assert result.report.extra["shrunk"]["macs"] <= 0.3 * result.report.extra["baseline"]["macs"]
    # annealing: the last epoch's cut is at the target, so nothing fell short
    with warnings.catch_warnings():
        warnings.simplefilter("error", ds.DnnshrinkWarning)
        result = shrink(Tiny(), X[:1], **options)
    assert result.report.extra["structure_learning"]["cuts"][-1]["budget"] == pytest.approx(0.3)
    assert result.report.extra["shrunk"]["macs"] <= 0.3 * result.report.extra["baseline"]["macs"]


def test_cli_algorithm_option(tmp_path):
    config = write_config(tmp_path, device="cpu", exporters=[])
    run = dnnshrink("run", config, "--out", tmp_path / "out", "--algorithm", "magnitude", "--quiet")
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["structure_learning"]["algorithm"] == "magnitude" and report["structure_learning"]["epochs"] == 0


def counted(calls: list):
    """``regularizer_only_epoch`` that appends its learning rate to ``calls``."""
    def epoch(model, lr):
        calls.append(lr)
        regularizer_only_epoch(model, lr)
    return epoch


def test_checkpoints_and_resume(tmp_path):
    calls = []
    epoch = counted(calls)

    options = dict(train_one_epoch=epoch, train=lambda m: None, test=lambda m: 0.5, target_macs=0.01, anneal=False,
                   strength_scale=1e-6, device="cpu", progress=False, latency_runs=1, exporters=[],
                   out_dir=str(tmp_path / "run"), tensorboard=False)
    with pytest.warns(ds.DnnshrinkWarning):
        shrink(Tiny(), X[:1], max_epochs=2, **options)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
        "baseline.pt", "epoch-0001.pt", "epoch-0002.pt", "learned.pt", "run.json"]
    calls.clear()
    with pytest.warns(ds.DnnshrinkWarning):
        result = shrink(Tiny(), X[:1], max_epochs=4, resume=True, **options)
    assert len(calls) == 2 and result.epochs == 4  # epochs 3 and 4 only
    assert (tmp_path / "run" / "checkpoints" / "epoch-0004.pt").is_file()
    with pytest.raises(ds.DnnshrinkError, match="nothing to resume"):
        shrink(Tiny(), X[:1], max_epochs=4, **{**options, "out_dir": str(tmp_path / "empty"), "resume": True})
    # another target (or structure) is another run: refused before any work, naming what changed
    calls.clear()
    before = (tmp_path / "run" / "report.json").read_text()
    with pytest.raises(ds.DnnshrinkError, match=r"asks for another structure \(target \"1% of the baseline's MACs\" "
                                                 r"then, \"30% of the baseline's MACs\" now; round_to 'auto' then, 8 "
                                                 r"now\)"):
        shrink(Tiny(), X[:1], max_epochs=4, resume=True, **{**options, "target_macs": 0.3, "round_to": 8})
    assert calls == [] and (tmp_path / "run" / "report.json").read_text() == before


def test_a_run_stopped_in_its_first_epoch_resumes_from_its_trained_baseline(tmp_path, capsys):
    """The baseline's training can be the longest step: a Ctrl-C before the first epoch's
    checkpoint kept nothing to resume from, so the baseline was trained again."""
    trained, epochs = [], []

    def train(model):
        trained.append(1)
        with torch.no_grad():
            model.body[0][0].weight.mul_(0.5)  # what training changed: the resumed run must start from it

    def stopped_in_epoch_1(model, lr):
        raise KeyboardInterrupt

    options = dict(train=train, test=lambda m: 0.5, target_macs=0.7, train_baseline=True, max_epochs=2,
                   strength_scale=20.0, lr=0.01, device="cpu", progress=False, latency_runs=1, exporters=[],
                   out_dir=str(tmp_path / "run"), tensorboard=False)
    torch.manual_seed(0)
    model = Tiny()
    with pytest.raises(KeyboardInterrupt):
        shrink(model, X[:1], train_one_epoch=stopped_in_epoch_1, **options)
    assert trained == [1]
    assert f"The last checkpoint is {tmp_path / 'run' / 'checkpoints' / 'baseline.pt'}" in capsys.readouterr().out

    def first_epoch(m, lr):
        if not epochs:  # learning starts from the trained baseline, not the user's untrained model
            assert torch.equal(m.body[0][0].weight, 0.5 * model.body[0][0].weight)
        epochs.append(lr)
        regularizer_only_epoch(m, lr)

    result = shrink(model, X[:1], train_one_epoch=first_epoch, resume=True, **options)
    assert trained == [1, 1]  # the fine-tuning only: the baseline was not trained again
    assert len(epochs) == result.epochs >= 1 and "resuming from the baseline" in capsys.readouterr().out


def test_resume_after_structure_learning_goes_straight_to_generation(tmp_path):
    calls = []
    epoch = counted(calls)

    options = dict(train_one_epoch=epoch, train=lambda m: None, test=lambda m: 0.5, target_macs=0.7,
                   strength_scale=20.0, lr=0.01, device="cpu", progress=False, latency_runs=1, exporters=[],
                   out_dir=str(tmp_path / "run"), tensorboard=False, max_epochs=100)
    first = shrink(Tiny(), X[:1], **options)
    assert 0 < first.epochs < 100 and len(calls) == first.epochs  # the target was met before the epochs ran out
    assert (tmp_path / "run" / "checkpoints" / "learned.pt").is_file()
    calls.clear()
    resumed = shrink(Tiny(), X[:1], resume=True, **options)
    assert calls == []  # no structure-learning epoch again
    assert resumed.epochs == first.epochs
    assert all(np.array_equal(resumed.masks[g], first.masks[g]) for g in first.masks)
    assert resumed.report.extra["shrunk"]["macs"] == first.report.extra["shrunk"]["macs"]


def test_tensorboard_shows_the_score_at_every_stage_and_the_widths(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scores = iter([0.9, 0.8, 0.7, 0.6])  # baseline, after learning, after generation, after fine-tuning
    result = shrink(Tiny(), X[:1], train_one_epoch=regularizer_only_epoch, train=lambda m: None,
                    test=lambda m: next(scores), target_macs=0.7, strength_scale=20.0, lr=0.01, max_epochs=100,
                    device="cpu", progress=False, latency_runs=1, exporters=[], out_dir=str(tmp_path / "run"))
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"tensors": 0}).Reload()
    value = {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert value["score/baseline"] == pytest.approx([0.9])
    assert value["score/after_structure_learning"] == pytest.approx([0.8])
    assert value["score/after_generation"] == pytest.approx([0.7])
    assert value["score/after_fine_tuning"] == pytest.approx([0.6]) and result.score == pytest.approx(0.6)
    assert len(value["cost/estimated_macs"]) == result.epochs  # the cost, epoch by epoch
    # the data loss here is 0 * output: the regularizer's is the whole of the scales' gradient
    assert value["regularizer/share_of_scale_gradient"] == pytest.approx([1.0] * result.epochs)
    (text,) = events.Tensors("widths/text_summary")
    table = text.tensor_proto.string_val[0].decode()
    for group in result.masks.graph:
        if group.removable.any():
            assert f"| {group.name} | {int(result.masks[group.name].sum())} | {group.size} |" in table


def test_divergence_names_the_epoch_and_the_last_checkpoint(tmp_path):
    def epoch(model, lr):
        epoch.count = getattr(epoch, "count", 0) + 1
        regularizer_only_epoch(model, lr)
        if epoch.count == 2:
            with torch.no_grad():
                model.body[0][1].weight.fill_(float("nan"))

    with pytest.raises(ds.DnnshrinkError, match=r"diverged in epoch 2.*epoch-0001\.pt"):
        shrink(Tiny(), X[:1], train_one_epoch=epoch, train=lambda m: None, test=lambda m: 1.0, max_epochs=5,
               device="cpu", progress=False, out_dir=str(tmp_path / "run"), exporters=[], tensorboard=False)


def test_truncated_checkpoint_is_refused(tmp_path):
    from dnnshrink_core.checkpoint import Checkpoints

    store = Checkpoints(tmp_path)
    path = store.save_epoch(1, Tiny().state_dict())
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ds.ArtifactError, match="cannot be read safely"):
        store.load(path)


def test_config_reads_exponent_numbers(tmp_path):
    from dnnshrink_core.config import load_config

    path = write_config(tmp_path)
    path.write_text(path.read_text() + "\nthreshold: 1e-3\ntarget_macs: 2E-1")
    data = load_config(path)
    assert data["threshold"] == 1e-3 and data["target_macs"] == 0.2 and data["strength_scale"] == 20.0


def test_an_epoch_without_an_optimizer_step_is_an_error():
    with pytest.raises(ds.DnnshrinkError, match="made no step of a torch.optim optimizer in epoch 1"):
        shrink(Tiny(), X[:1], train_one_epoch=lambda m, lr: m(X).sum().backward(), test=lambda m: 1.0,
               finetune=False, device="cpu", progress=False, latency_runs=1)


def test_options_at_odds_with_the_target_or_the_runtime_are_warned_about(tmp_path):
    """A demo config copied with its MACs regularizer for a latency target; a round_to that
    misses the runtime's block (16 for the shipped profile's convolutions); a profile whose
    block probes disagreed when it was made."""
    from dnnshrink_plugins.costs.latency import Profile, load_profile

    options = dict(train_one_epoch=regularizer_only_epoch, train=lambda m: None, test=lambda m: 0.5,
                   algorithm="magnitude", device="cpu", progress=False, latency_runs=1, exporters=[],
                   onnx_latency=False, tensorboard=False)
    with pytest.warns(ds.DnnshrinkWarning, match=r"regularizer 'morphnet_flops' prices channels by another cost "
                                                  r"than the target's \(latency\).*morphnet_latency"):
        shrink(Tiny(), X[:1], target={"resource": "latency", "value": 0.95}, regularizer="morphnet_flops", **options)
    with pytest.warns(ds.DnnshrinkWarning, match=r"round_to 3 is no multiple of the channel block 16 .*slower"):
        shrink(Tiny(), X[:1], target_macs=0.5, round_to=3, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ds.DnnshrinkWarning)  # the matching ones say nothing
        shrink(Tiny(), X[:1], target={"resource": "latency", "value": 0.97}, round_to=16, **options)
    shipped = load_profile(None)
    shaky = Profile(shipped.runtime, shipped.overhead_ms, shipped.ops, {**shipped.calibration, "blocks_stable": False})
    shaky.save(tmp_path / "shaky.json")
    with pytest.warns(ds.DnnshrinkWarning, match="channel blocks changed between timings"):
        shrink(Tiny(), X[:1], target_macs=0.5, profile=str(tmp_path / "shaky.json"), **options)
    with warnings.catch_warnings():  # an integer round_to does not rely on them: nothing to say
        warnings.simplefilter("error", ds.DnnshrinkWarning)
        shrink(Tiny(), X[:1], target_macs=0.7, round_to=16, profile=str(tmp_path / "shaky.json"), **options)


def test_a_cuda_device_gets_its_index_and_one_this_machine_lacks_is_refused(monkeypatch):
    """torch.cuda.set_device, which a run on CUDA calls, refuses a CUDA device without an
    index: every run on a GPU, the default where there is one, stopped there."""
    from dnnshrink_core.pipeline import pick_device

    assert pick_device("cpu") == torch.device("cpu")
    with pytest.raises(ds.ConfigError, match=r"device 'gpu' is not a device torch knows"):
        pick_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ds.ConfigError, match=r"device 'cuda': torch sees no CUDA device on this machine"):
        pick_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("cuda") == torch.device("cuda", 1) and pick_device(None) == torch.device("cuda", 1)
    assert pick_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(ds.ConfigError, match=r"device 'cuda:2': this machine has 2 CUDA device"):
        pick_device("cuda:2")


def test_the_demo_recipe_trains_in_mixed_precision_and_morphnet_learns_through_it():
    """``dnnshrink demo --amp``: the forward pass under autocast (bfloat16 on the CPU; float16
    with a GradScaler on CUDA), and MorphNet's penalty still moves the scales."""
    from dnnshrink_core.demo import digits
    from dnnshrink_core.demo.recipe import Recipe

    recipe = Recipe(digits._data, batch=64, amp=True)
    torch.manual_seed(0)
    model = digits.build_model()
    seen = []
    hook = model.features[0][0].register_forward_hook(lambda m, i, o: seen.append(o.dtype) if m.training else None)
    result = shrink(model, digits.example_input(), train_one_epoch=recipe.train_one_epoch, train=None,
                    test=recipe.test, target_macs=0.5, max_epochs=2, finetune=False, device="cpu", progress=False,
                    latency_runs=1, exporters=(), onnx_latency=False, tensorboard=False)
    hook.remove()
    assert seen and set(seen) == {torch.bfloat16}
    assert result.report.extra["shrunk"]["macs"] <= 0.5 * result.report.extra["baseline"]["macs"]
    assert result.report.extra["structure_learning"]["epochs"] >= 1
    run = dnnshrink("demo", "--help")
    assert "--amp" in run.stdout and "mixed precision" in run.stdout
    # without amp, a device autocast does not know still trains (autocast refuses it even when off)
    Recipe(digits._data, batch=64).train_one_epoch(digits.build_model().to("meta"), 0.1)
