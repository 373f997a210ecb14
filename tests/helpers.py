"""Shared test helpers: kill channels, compare outputs."""
from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from dnnshrink_core.plugin_api import flatten_outputs


def kill_half(model: nn.Module, seed: int = 0) -> nn.Module:
    """Zero gamma and beta of a random half of every BatchNorm's channels and randomise the
    running statistics, so those channels carry exact zeros. Returns ``model``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(n, generator=g) * 0.1)
                    dead = torch.randperm(n, generator=g)[: n // 2]
                    m.weight[dead] = 0.0
                    m.bias[dead] = 0.0
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                    m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    return model


def zero_units(model: nn.Module, graph: Any, units: Any) -> nn.Module:
    """Zero the BatchNorm scales and shifts of ``units``' sources in ``model`` (so those
    channel units carry exact zeros). Returns ``model``."""
    from dnnshrink_core.branches import zeroed_sources

    with torch.no_grad():
        for path, value in zeroed_sources(graph, model, units).items():
            owner, _, attr = path.rpartition(".")
            getattr(model.get_submodule(owner), attr).copy_(value)
    return model


def max_relative_error(a: Any, b: Any) -> float:
    """Largest relative error between matching tensors of two nested outputs."""
    fa, fb = flatten_outputs(a), flatten_outputs(b)
    assert len(fa) == len(fb), f"{len(fa)} outputs vs {len(fb)}"
    worst = 0.0
    for x, y in zip(fa, fb):
        assert x.shape == y.shape, f"output shape {tuple(x.shape)} vs {tuple(y.shape)}"
        worst = max(worst, ((x - y).norm() / x.norm().clamp_min(1e-12)).item())
    return worst


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def state_copy(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def shrink_checked(model: nn.Module, x: Any) -> tuple:
    """Trace, find the dead channels and generate, recording the warnings; check that the
    model handed in is left as it was and that the shrunk network gives its outputs (relative
    error < 1e-4). Returns (graph, small, caught warnings)."""
    import dnnshrink_core as ds

    before = state_copy(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graph = ds.trace(model, x)
        small = ds.generate(model, x, ds.alive_masks(model, x))
    assert states_equal(before, state_copy(model)), "the user's model was modified"
    with torch.no_grad():
        assert max_relative_error(model(x), small(x)) < 1e-4
    return graph, small, caught


def shrink_dead_half(name: str, **mode) -> tuple:
    """A hand-written model (``models.HANDWRITTEN``) with half its channels dead, shrunk by
    ``generate`` (see :func:`shrink_checked`). Returns (model, small, x)."""
    from models import HANDWRITTEN

    factory, shape = HANDWRITTEN[name]
    model = kill_half(factory()).eval()
    for attr, value in mode.items():
        setattr(model, attr, value)
    x = torch.randn(shape)
    _, small, _ = shrink_checked(model, x)
    return model, small, x


def user_functions(dims: int = 2, steps: int = 1, test_body: str = "return 0.75") -> str:
    """The source of a user's functions file for the CLI and config tests: ``X``, a two-layer
    Conv{dims}d BatchNorm ``Net`` and ``build()``, ``train_one_epoch`` making ``steps``
    optimizer steps of zero gradient (the penalty alone moves the scales), a ``train`` that
    does nothing and ``test`` with ``test_body``."""
    shape, cin, pool = ("8, 2, 16", 2, "2") if dims == 1 else ("8, 3, 8, 8", 3, "(2, 3)")
    conv, bn = f"nn.Conv{dims}d", f"nn.BatchNorm{dims}d"
    return f"""
import torch
from torch import nn

X = torch.randn({shape})


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential({conv}({cin}, 8, 3, padding=1, bias=False), {bn}(8), nn.ReLU())
        self.b = nn.Sequential({conv}(8, 8, 3, padding=1, bias=False), {bn}(8), nn.ReLU())
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.b(self.a(x)).mean({pool}))


def build():
    torch.manual_seed(0)
    return Net()


def train_one_epoch(model, lr):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range({steps}):
        opt.zero_grad()
        (0.0 * model(X).sum()).backward()
        opt.step()


def train(model):
    pass


def test(model):
    {test_body}
"""
