"""A harder offline task: MNIST-1D (Greydanus & Kobak, "Scaling Down Deep Learning with
MNIST-1D", ICML 2024; arXiv 2011.14439) and a Conv1d BatchNorm CNN for it.

MNIST-1D is generated procedurally by the ``mnist1d`` package (``pip install mnist1d``):
ten 1-D digit templates, padded, scaled, translated, sheared and noised into 40-sample
signals; 4,000 training and 1,000 test examples. Nothing is downloaded: the dataset is
made locally with ``mnist1d.data.make_dataset`` and the package's default arguments
(seed 42), the same recipe as the authors' published pickle. Reference accuracies from the
authors: logistic regression 32%, MLP 68%, CNN 94%, GRU 91%, human 96%; the baseline net
here reaches the CNN's 94% (see docs/benchmarks.md).

The three functions follow the digits template (``dnnshrink_core/demo/digits.py``).
"""
from __future__ import annotations

import functools
from typing import Tuple

import numpy as np
import torch
from torch import nn

from .recipe import Recipe

# the authors' reference test accuracies (README of the mnist1d package and the paper)
REFERENCE = {"logistic regression": 0.32, "MLP": 0.68, "CNN": 0.94, "GRU": 0.91, "human": 0.96}


def conv_bn(cin: int, cout: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv1d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.BatchNorm1d(cout),
                         nn.ReLU(inplace=True))


class Mnist1dNet(nn.Module):
    """Four Conv1d-BN-ReLU layers (widths ``w, 2w, 2w, 4w``), two poolings, a global
    average and a linear classifier, for 1×40 signals."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(1, width, 5), conv_bn(width, 2 * width, 3), nn.MaxPool1d(2),
            conv_bn(2 * width, 2 * width, 3), nn.MaxPool1d(2), conv_bn(2 * width, 4 * width, 3))
        self.classifier = nn.Linear(4 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean(-1))


def build_model() -> nn.Module:
    """The model factory (``dnnshrink_core.demo.mnist1d:build_model``)."""
    torch.manual_seed(0)
    return Mnist1dNet()


@functools.lru_cache(maxsize=1)
def _data() -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as exc:  # said plainly: the task needs the generator, never a download
        raise ImportError("the MNIST-1D task needs the `mnist1d` package (pip install mnist1d); it generates "
                          "the data locally") from exc
    state = np.random.get_state()  # make_dataset seeds numpy's global generator; leave it as it was
    try:
        data = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(state)
    x = torch.tensor(data["x"], dtype=torch.float32).unsqueeze(1)
    xt = torch.tensor(data["x_test"], dtype=torch.float32).unsqueeze(1)
    return x, torch.tensor(data["y"], dtype=torch.long), xt, torch.tensor(data["y_test"], dtype=torch.long)


def example_input() -> torch.Tensor:
    """One batch shaped like the model's input."""
    return torch.zeros(1, 1, 40)


_recipe = Recipe(_data, batch=100)
_seed = _recipe.seed  # where the shuffling seeds start (bench/bench_quality.py sets it per run)


# the three functions dnnshrink asks for (see recipe.py for what they do)
train_one_epoch = _recipe.train_one_epoch
train = _recipe.train
test = _recipe.test
