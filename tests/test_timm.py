"""A small sample of timm models (random weights): BatchNormAct2d (F.batch_norm on the
module's own parameters) and selective-kernel attention (torch.stack) through the invariant."""
from __future__ import annotations


import pytest
import torch

import dnnshrink_core as ds
from helpers import kill_half, n_params, shrink_checked

timm = pytest.importorskip("timm")


@pytest.mark.parametrize("name", ["mobilenetv3_small_050", "skresnet18"])
def test_timm_dead_channels_are_removed_exactly(name):
    torch.manual_seed(0)
    model = kill_half(timm.create_model(name, pretrained=False)).eval()
    x = torch.randn(1, 3, 64, 64)
    graph, small, caught = shrink_checked(model, x)
    assert not [w for w in caught if issubclass(w.category, ds.UnknownOpWarning)]
    assert graph.summary()["removable"] > 0 and graph.source_modules
    assert n_params(small) < n_params(model)
    if name.startswith("mobilenet"):  # no code constant changes: the user's class, resized
        assert type(small) is type(model)
    # (skresnet18 splits its input with a literal size, which is rewritten: a GraphModule)


def _through_the_invariant(name: str, side: int) -> None:
    torch.manual_seed(0)
    model = kill_half(timm.create_model(name, pretrained=False)).eval()
    _, small, _ = shrink_checked(model, torch.randn(1, 3, side, side))
    assert n_params(small) < 0.9 * n_params(model)


@pytest.mark.parametrize("name", ["tf_mobilenetv3_small_minimal_100"])
def test_timm_same_padding_is_recorded_and_shrunk_exactly(name):
    """TensorFlow-ported models pad from the input size (fx cannot trace them): recorded by
    running on the example input, shrunk exactly, the user's class returned."""
    _through_the_invariant(name, 64)


SWEEP = ["tf_efficientnet_b0", "mobilevit_xxs", "resnet50", "densenet121", "efficientnet_b0", "regnetx_002",
         "rexnet_100", "ghostnet_100", "hrnet_w18_small", "cspdarknet53", "dla34", "dpn68", "mixnet_s",
         "res2net50_26w_4s", "resnest14d", "selecsls42b", "tresnet_m", "vovnet39a", "xception41", "repvgg_a2"]


@pytest.mark.slow
@pytest.mark.parametrize("name", SWEEP)
def test_timm_sweep(name):
    """A wider sample across families (bench/bench_zoo.py measures more, with Torch-Pruning)."""
    _through_the_invariant(name, 96)
