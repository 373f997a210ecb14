"""A template for your own model: a BatchNorm CNN on scikit-learn's digits (8×8, 10 classes).

Copy this file (it imports the training loop, ``recipe.py``, from dnnshrink; copy that too to
change it), and replace the model and the data.
dnnshrink needs three functions of yours (the manual's ``necessary_function.py``):

* ``train_one_epoch(model, lr)`` — train one epoch at learning rate ``lr`` (plain SGD works
  best while the structure is learned);
* ``train(model)`` — your full training recipe (optimizer, schedule…);
* ``test(model)`` — a number, larger is better (here the accuracy as a fraction).

Use the model's own device (``next(model.parameters()).device``): dnnshrink moves the model
to CUDA when it is available. Under ``torchrun`` the model you get is wrapped in
DistributedDataParallel; give each rank its own share of the data (``recipe.shard``), and
the same number of steps on every rank.
"""
from __future__ import annotations

import functools
from typing import Tuple

import torch
from torch import nn

# absolute, so that a copy of this file outside the package works as it is (recipe.py stays here)
from dnnshrink_core.demo.recipe import Recipe


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


_recipe = Recipe(_data, batch=64)
_seed = _recipe.seed  # where the shuffling seeds start (bench/bench_quality.py sets it per run)


def mixed_precision(on: bool = True) -> None:
    """Train (``train_one_epoch`` and ``train``) in mixed precision from now on: autocast,
    and a GradScaler on CUDA (``dnnshrink demo --amp``; see :class:`Recipe`)."""
    _recipe.amp = on


# the three functions dnnshrink asks for (see recipe.py for what they do)
train_one_epoch = _recipe.train_one_epoch
train = _recipe.train
test = _recipe.test
