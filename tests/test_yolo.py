"""Ultralytics YOLOv8n, built from its yaml (no download): torch.fx cannot trace its
``forward`` ('Proxy object cannot be iterated'), so it is recorded by running it, and its
dead channels are removed exactly."""
from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch

import dnnshrink_core as ds
from helpers import kill_half, max_relative_error, n_params, shrink_checked

os.environ.setdefault("YOLO_OFFLINE", "1")
tasks = pytest.importorskip("ultralytics.nn.tasks")


def _shrunk(cfg: str, side: int):
    torch.manual_seed(0)
    model = kill_half(tasks.DetectionModel(cfg, verbose=False)).eval()
    graph, small, _ = shrink_checked(model, torch.randn(1, 3, side, side))
    assert graph.traces[0].specialized
    return model, small


def test_yolov8n_dead_channels_are_removed_exactly(tmp_path):
    model, small = _shrunk("yolov8n.yaml", 64)
    assert n_params(small) < 0.6 * n_params(model)
    assert type(small) is type(model)  # its shape code holds no channel count that changed
    # fx cannot trace it for the artifact either: it is recorded on the example, and keeps that shape
    x = torch.randn(1, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.export(small, x, "pytorch", tmp_path / "y.dnnshrink")
    loaded = ds.load(tmp_path / "y.dnnshrink")
    assert loaded.dnnshrink_manifest["specialized"] is True
    with torch.no_grad():
        assert max_relative_error(small(x), loaded(x)) < 1e-6


def test_yolov8n_exports_to_onnx_and_still_runs_after(tmp_path):
    """The Detect head keeps its anchors and the input's shape on the module: exporting the
    model itself once left the exporter's symbolic values there (every later call failed)."""
    model = tasks.DetectionModel("yolov8n.yaml", verbose=False).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():  # a copy's: the head of the model exported has cached nothing yet
        before = copy.deepcopy(model)(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = ds.export(model, x, "onnx", tmp_path / "y.onnx")
    assert result["max_relative_error"] < 1e-4
    with torch.no_grad():
        assert max_relative_error(before, model(x)) < 1e-6 and model(torch.cat([x, x]))[0].shape[0] == 2


@pytest.mark.slow
@pytest.mark.parametrize("cfg", ["yolov8s.yaml", "yolo11n.yaml"])
def test_yolo_sweep(cfg):
    model, small = _shrunk(cfg, 96)
    assert n_params(small) < 0.6 * n_params(model)
