"""How dnnshrink times ONNX models (dnnshrink_core.timing): the sessions' threads spin within
a run and stop at its end unless a profile says otherwise, the profile records how it was
timed, and the pipeline's measured latency times sessions the profile's way."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import dnnshrink_core.timing as timing
from dnnshrink_core.errors import ConfigError
from dnnshrink_core.pipeline import shrink
from dnnshrink_core.plugin_api import SPINNING, runtime_spinning
from dnnshrink_plugins.costs.calibrate import calibrate
from dnnshrink_plugins.costs.latency import DEFAULT_PROFILE, ProfileError, load_profile, profile_from_dict
from models import conv_bn


def tiny_onnx() -> bytes:
    """y = relu(x @ W), W fixed: a model whose output is known."""
    w = np.arange(12, dtype=np.float32).reshape(4, 3) / 10 - 0.5
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
                              "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def entry(options, key: str):
    """A session's configuration entry, or None where it has none."""
    try:
        return options.get_session_config_entry(key)
    except RuntimeError:  # (onnxruntime raises for a key never set)
        return None


@pytest.mark.parametrize("spinning,stop,allow", [("run", "1", None), ("always", None, None), ("never", None, "0")])
def test_a_sessions_threads_wait_as_asked_and_it_computes_the_same(spinning, stop, allow):
    s = timing.session(tiny_onnx(), 2, spinning)
    options = s.get_session_options()
    assert options.intra_op_num_threads == 2 and options.inter_op_num_threads == 1
    assert entry(options, "session.force_spinning_stop") == stop
    assert entry(options, "session.intra_op.allow_spinning") == allow
    x = np.array([[1, 2, 3, 4], [-1, 0, 2, 0.5]], dtype=np.float32)
    w = np.arange(12, dtype=np.float32).reshape(4, 3) / 10 - 0.5
    np.testing.assert_allclose(s.run(None, {"x": x})[0], np.maximum(x @ w, 0), rtol=1e-6)


def test_the_default_spins_within_a_run_and_a_wrong_mode_is_named():
    options = timing.session(tiny_onnx(), 1).get_session_options()
    assert entry(options, "session.force_spinning_stop") == "1"
    with pytest.raises(ValueError, match="spinning must be one of run, always, never, not 'sometimes'"):
        timing.session(tiny_onnx(), 1, "sometimes")
    assert SPINNING == ("run", "always", "never")


def test_a_profile_says_how_it_was_timed_and_older_ones_read_as_never():
    shipped = load_profile(None)
    assert shipped.spinning == "run" and "spinning" not in shipped.describe()  # (the default is not said)
    data = json.loads(DEFAULT_PROFILE.read_text())
    older = {**data, "runtime": {k: v for k, v in data["runtime"].items() if k != "spinning"}}
    profile = profile_from_dict(older)
    assert profile.spinning == "never" == runtime_spinning(profile.runtime)
    assert profile.describe() == "onnxruntime cpu, 2 threads, batch 1, threads sleeping between ops"
    with pytest.raises(ProfileError, match="runtime.spinning must be one of run, always, never, not 'sometimes'"):
        profile_from_dict({**data, "runtime": {**data["runtime"], "spinning": "sometimes"}})
    with pytest.raises(ProfileError, match="runtime.spinning must be a string"):
        profile_from_dict({**data, "runtime": {**data["runtime"], "spinning": 1}})


def test_a_profiles_runtime_says_how_its_sessions_are_timed():
    assert runtime_spinning({"name": "onnxruntime", "threads": 2}) == "never"  # made before profiles said
    assert runtime_spinning({"name": "torch", "device": "cuda"}) == "run"  # (a plugin's runtime, say)
    assert runtime_spinning({"name": "onnxruntime", "spinning": "always"}) == "always"
    for bad in ("Run", True, None):
        with pytest.raises(ConfigError, match="the latency profile's runtime.spinning must be one of run, always, "
                                              "never, not"):
            runtime_spinning({"name": "onnxruntime", "spinning": bad})


@pytest.mark.parametrize("spinning", ["never", "always"])
def test_calibration_sessions_wait_as_the_profile_will_say(spinning):
    from dnnshrink_plugins.costs.calibrate import OnnxBackend

    backend = OnnxBackend(1, 1, spinning)
    assert backend.runtime["spinning"] == spinning  # what the profile records
    s, feed = backend.prepare([("pointwise", 16, 16, 8, 1, 1)] * 2)
    options = s.get_session_options()
    assert entry(options, "session.intra_op.allow_spinning") == ("0" if spinning == "never" else None)
    assert entry(options, "session.force_spinning_stop") is None
    assert s.run(None, feed)[0].shape == (1, 16, 8, 8)


def test_calibrate_refuses_a_wrong_spinning_before_timing_anything(tmp_path):
    with pytest.raises(ConfigError, match="--spinning must be one of run, always, never"):
        calibrate(spinning="sometimes", out=tmp_path / "p.json", log=lambda _: None)
    with pytest.raises(ConfigError, match="--spinning is for --runtime onnxruntime"):
        calibrate(runtime="torch", spinning="never", out=tmp_path / "p.json", log=lambda _: None)
    assert not (tmp_path / "p.json").exists()


@pytest.mark.parametrize("spinning", ["run", "always", "never"])
def test_the_pipeline_times_its_onnx_the_way_its_profile_was_timed(spinning, tmp_path, monkeypatch):
    """The report's measured latency and measure_target's probes both time sessions the
    profile's way; a resumed run whose measured target was timed another way measures again."""
    data = json.loads(DEFAULT_PROFILE.read_text())
    runtime = {k: v for k, v in data["runtime"].items() if k != "spinning"}  # an older profile: never
    if spinning != "never":
        runtime["spinning"] = spinning
    path = tmp_path / "profile.json"
    path.write_text(json.dumps({**data, "runtime": runtime}))
    seen = []
    real = timing.session

    def recording(model, threads, spinning="run"):
        seen.append(spinning)
        return real(model, threads, spinning)

    monkeypatch.setattr(timing, "session", recording)
    torch.manual_seed(0)
    model = nn.Sequential(conv_bn(3, 16), conv_bn(16, 16), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))
    options = dict(train_one_epoch=lambda m, lr: None, test=lambda m: 1.0, algorithm="magnitude", max_epochs=0,
                   target={"resource": "latency", "value": 0.9}, measure_target=True, profile=str(path),
                   finetune=False, device="cpu", progress=False, latency_runs=4, exporters=["onnx"],
                   tensorboard=False, out_dir=str(tmp_path / "run"))
    model, x = model.eval(), torch.randn(1, 3, 16, 16)
    result = shrink(model, x, **options)
    measured = result.report.extra["onnx_latency"]
    assert measured["spinning"] == spinning and measured["shrunk_ms"] > 0
    assert result.report.extra["structure_learning"]["measured_target"]["spinning"] == spinning
    assert len(seen) >= 4 and set(seen) == {spinning}  # the probes' baseline and probe, the report's two
    if spinning != "run":
        return
    saved = tmp_path / "run" / "measured_target.json"
    record = json.loads(saved.read_text())
    del record["spinning"]  # as a run made before measured targets said how they were timed wrote it
    saved.write_text(json.dumps(record))
    seen.clear()
    again = shrink(model, x, resume=True, **{**options, "exporters": [], "onnx_latency": False})
    assert again.report.extra["structure_learning"]["measured_target"]["spinning"] == "run"
    assert seen and set(seen) == {"run"}  # measured again, the profile's way


def test_a_profile_with_a_bad_spinning_stops_the_run_before_any_work(tmp_path):
    data = json.loads(DEFAULT_PROFILE.read_text())
    path = tmp_path / "profile.json"
    path.write_text(json.dumps({**data, "runtime": {**data["runtime"], "spinning": "Run"}}))
    calls = []
    model = nn.Sequential(conv_bn(3, 8), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    with pytest.raises(ProfileError, match="runtime.spinning must be one of run, always, never, not 'Run'"):
        shrink(model.eval(), torch.randn(1, 3, 8, 8), train_one_epoch=lambda m, lr: calls.append(lr),
               test=lambda m: 1.0, target_macs=0.5, profile=str(path), finetune=False, device="cpu",
               progress=False, exporters=["onnx"], tensorboard=False)
    assert not calls
