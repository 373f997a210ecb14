"""A template for your own model: a BatchNorm CNN on scikit-learn's digits (8×8, 10 classes).

Copy this file and replace the model and the data. dnnshrink needs three functions of yours
(the manual's ``necessary_function.py``):

* ``train_one_epoch(model, lr)`` — train one epoch at learning rate ``lr`` (plain SGD works
  best while the structure is learned);
* ``train(model)`` — your full training recipe (optimizer, schedule…);
* ``test(model)`` — a number, larger is better (here the accuracy as a fraction).

Use the model's own device (``next(model.parameters()).device``): dnnshrink moves the model
to CUDA when it is available. Under ``torchrun`` the model you get is wrapped in
DistributedDataParallel; give each rank its own share of the data (``_shard`` below), and
the same number of steps on every rank.
"""
from __future__ import annotations

import functools
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class DigitsNet(nn.Module):
    """Four conv-BN-ReLU layers and a small classifier for 1×8×8 digit images."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(1, width), conv_bn(width, 2 * width), nn.MaxPool2d(2),
            conv_bn(2 * width, 4 * width), nn.MaxPool2d(2), conv_bn(4 * width, 4 * width))
        self.fc = nn.Sequential(nn.Linear(4 * width * 2 * 2, 64, bias=False), nn.BatchNorm1d(64), nn.ReLU(inplace=True))
        self.classifier = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.features(x), 1)
        return self.classifier(self.fc(x))


def build_model() -> nn.Module:
    """The model factory named in the demo config (``dnnshrink_core.demo.digits:build_model``)."""
    torch.manual_seed(0)
    return DigitsNet()


@functools.lru_cache(maxsize=1)
def _data() -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(range(len(y)), test_size=0.25, random_state=0, stratify=digits.target)
    mean, std = x[idx_train].mean(), x[idx_train].std()
    x = (x - mean) / std
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


def example_input() -> torch.Tensor:
    """One batch shaped like the model's input."""
    return torch.zeros(1, 1, 8, 8)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _shard(order: torch.Tensor, batch: int) -> Tuple[torch.Tensor, int]:
    """This rank's share of a shuffled epoch and its batch size (the global batch stays ``batch``).

    Every rank draws the same permutation (same seed) and takes every N-th sample of an
    equal-length prefix, so all ranks run the same number of steps, as DDP requires.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return order, batch
    world, rank = dist.get_world_size(), dist.get_rank()
    return order[: len(order) - len(order) % world][rank::world], max(1, batch // world)


def _epoch(model: nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator, batch: int = 64) -> None:
    x, y, _, _ = _data()
    device = _device(model)
    model.train()
    order, batch = _shard(torch.randperm(len(y), generator=generator), batch)
    for start in range(0, len(order), batch):
        idx = order[start:start + batch]
        if len(idx) < 2:  # BatchNorm needs two samples; the same on every rank
            continue
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x[idx].to(device)), y[idx].to(device))
        loss.backward()
        optimizer.step()


_seed = [0]


def _generator() -> torch.Generator:
    _seed[0] += 1
    return torch.Generator().manual_seed(_seed[0])


def train_one_epoch(model: nn.Module, lr: float) -> None:
    """One epoch of SGD with momentum at a fixed learning rate."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    _epoch(model, optimizer, _generator())


def train(model: nn.Module, epochs: int = 20) -> None:
    """The full recipe: SGD with momentum, cosine schedule, weight decay."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    generator = _generator()
    for _ in range(epochs):
        _epoch(model, optimizer, generator)
        schedule.step()


@torch.no_grad()
def test(model: nn.Module) -> float:
    """Accuracy on the held-out quarter of the digits, as a fraction."""
    _, _, x, y = _data()
    model.eval()
    predictions = model(x.to(_device(model))).argmax(1).cpu()
    return float((predictions == y).float().mean())
