"""The pipeline on CUDA: skipped where torch sees no GPU (CI), run by ``bench/device_check.sh``
on a machine that has one. Each test compares what the GPU gives with what the CPU gives, or
checks that a file written from a CUDA model loads and runs on the CPU."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import dnnshrink_core as ds
from dnnshrink_core.cost import CostModel
from dnnshrink_core.demo import digits
from dnnshrink_core.demo.recipe import Recipe
from dnnshrink_core.pipeline import shrink

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device")


def run_options(**extra):
    return dict(device="cuda", progress=False, latency_runs=2, tensorboard=False, **extra)


@pytest.mark.parametrize("amp", [False, True])
def test_morphnet_on_cuda_learns_and_generates_what_the_cpu_generates_from_the_same_masks(amp, tmp_path):
    """The digits demo's recipe on the GPU (float16 autocast with a GradScaler with ``amp``):
    the target met, the shrunk model on CUDA, and the generator's network from the run's
    masks equal on CUDA and on the CPU."""
    recipe = Recipe(digits._data, batch=64, amp=amp)
    torch.manual_seed(0)
    model = digits.build_model()
    x = digits.example_input()
    result = shrink(model, x, train_one_epoch=recipe.train_one_epoch, train=recipe.train, test=recipe.test,
                    target_macs=0.5, max_epochs=3, exporters=["onnx", "pytorch"], out_dir=str(tmp_path / "run"),
                    **run_options())
    report = result.report.extra
    assert report["device"].startswith("cuda:")
    assert report["shrunk"]["macs"] <= 0.5 * report["baseline"]["macs"]
    assert next(result.model.parameters()).is_cuda
    assert report["shrunk"]["score"] > 0.5  # it still classifies after fine-tuning on the GPU
    batch = torch.randn(4, 1, 8, 8)
    on_gpu = ds.generate(model.cuda().eval(), x.cuda(), result.masks)(batch.cuda()).cpu()
    on_cpu = ds.generate(model.cpu().eval(), x, result.masks)(batch)
    torch.testing.assert_close(on_gpu, on_cpu, rtol=1e-4, atol=1e-4)
    # the files written from the CUDA model load and run on the CPU
    loaded = ds.load(tmp_path / "run" / "model.dnnshrink")
    assert loaded(batch).shape == (4, 10)
    import onnxruntime

    session = onnxruntime.InferenceSession(str(tmp_path / "run" / "model.onnx"), providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: batch[:1].numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(out), result.model.cpu().eval()(batch[:1]).detach(),
                               rtol=1e-3, atol=1e-3)


def test_magnitude_with_scale_capacity_at_a_latency_target_on_cuda():
    """Structure steps and cost models on a model that lives on the GPU (numpy meets CUDA
    tensors there): the same structure as on the CPU."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(weights=None, num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    options = dict(train_one_epoch=lambda m, lr: None, train=None, test=lambda m: 1.0, algorithm="magnitude",
                   max_epochs=0, target={"resource": "latency", "value": 0.5}, scale="capacity", finetune=False,
                   exporters=(), onnx_latency=False, progress=False, latency_runs=1, tensorboard=False)
    gpu = shrink(model, x, device="cuda", **options)
    cpu = shrink(model, x, device="cpu", **options)
    for group in cpu.masks.graph:
        assert np.array_equal(gpu.masks[group.name], cpu.masks[group.name]), group.name


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_calibrate_on_cuda_writes_a_profile_that_prices_a_network(tmp_path, dtype):
    """``dnnshrink calibrate --runtime torch --device cuda [--dtype float16]``, short: a
    profile of this GPU that loads, says so, and predicts a positive latency for ResNet-18."""
    import torchvision

    from dnnshrink_plugins.costs import calibrate as cal
    from dnnshrink_plugins.costs.latency import load_profile

    lines = []
    cal.calibrate(runtime="torch", device="cuda", out=tmp_path / "cuda.json", check=False, rounds=2, dtype=dtype,
                  log=lines.append)
    profile = load_profile(tmp_path / "cuda.json")
    assert profile.runtime["name"] == "torch" and profile.runtime["device"].startswith("cuda")
    assert profile.runtime["dtype"] == dtype
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(1, 3, 224, 224)
    assert CostModel(ds.trace(model, x), model, "latency", profile=profile).initial > 0
    assert any("wrote" in line for line in lines)
