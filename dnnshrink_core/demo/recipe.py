"""The demos' training recipe on an in-memory data set: the three functions dnnshrink asks
of a user (``train_one_epoch``, ``train``, ``test``), written once for both demo tasks.

What a user's own versions need (see the digits template): train on the model's own device
(dnnshrink moves the model to CUDA when it is available), give each ``torchrun`` rank its
share of the data with the same number of steps on every rank (:func:`shard`), and step a
``torch.optim`` optimizer (the MorphNet penalty is added to the BatchNorm scales' gradients
at each optimizer step).
"""
from __future__ import annotations

import contextlib
from typing import Callable, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

Data = Callable[[], Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]


def device_of(model: nn.Module) -> torch.device:
    """The device the model's parameters live on."""
    return next(model.parameters()).device


def shard(order: torch.Tensor, batch: int) -> Tuple[torch.Tensor, int]:
    """This rank's share of a shuffled epoch and its batch size (the global batch stays ``batch``).

    Every rank draws the same permutation (same seed) and takes every N-th sample of an
    equal-length prefix, so all ranks run the same number of steps, as DDP requires.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return order, batch
    world, rank = dist.get_world_size(), dist.get_rank()
    return order[: len(order) - len(order) % world][rank::world], max(1, batch // world)


def _grad_scaler() -> "torch.amp.GradScaler":
    """A CUDA GradScaler (``torch.amp`` since PyTorch 2.3, ``torch.cuda.amp`` before)."""
    if hasattr(torch, "amp") and hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler("cuda")
    return torch.cuda.amp.GradScaler()


class Recipe:
    """SGD with momentum on ``data()`` (train inputs, train labels, test inputs, test labels)
    in batches of ``batch``; ``seed[0]`` is where the shuffling seeds start (a benchmark sets
    it per run), and each training call draws the next one.

    ``amp``: train in mixed precision, the usual way: the forward pass and the loss under
    ``torch.autocast`` (float16 on CUDA, bfloat16 on the CPU) and, on CUDA, a ``GradScaler``
    that scales the loss and unscales the gradients before ``optimizer.step()``, where the
    MorphNet penalty is added (so it is never scaled; a step the scaler skips for an
    overflow is allowed by the run's divergence check)."""

    def __init__(self, data: Data, batch: int, amp: bool = False):
        self.data, self.batch, self.amp = data, batch, amp
        self.seed: List[int] = [0]

    def _generator(self) -> torch.Generator:
        self.seed[0] += 1
        return torch.Generator().manual_seed(self.seed[0])

    def epoch(self, model: nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator) -> None:
        """One pass over this rank's share of the training set."""
        x, y, _, _ = self.data()
        device = device_of(model)
        model.train()
        half = torch.float16 if device.type == "cuda" else torch.bfloat16  # the CPU's autocast takes bfloat16
        # float16's narrow range needs the loss scaled; bfloat16 has float32's range
        scaler = _grad_scaler() if self.amp and half == torch.float16 else None
        order, batch = shard(torch.randperm(len(y), generator=generator), self.batch)
        for start in range(0, len(order), batch):
            idx = order[start:start + batch]
            if len(idx) < 2:  # BatchNorm needs two samples; the same on every rank
                continue
            optimizer.zero_grad()
            # autocast refuses device types it does not know even when off: entered only with amp
            with torch.autocast(device.type, dtype=half) if self.amp else contextlib.nullcontext():
                loss = F.cross_entropy(model(x[idx].to(device)), y[idx].to(device))
            if scaler is None:
                loss.backward()
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(optimizer)  # unscales first: the penalty added at the step is never scaled
                scaler.update()

    def train_one_epoch(self, model: nn.Module, lr: float) -> None:
        """One epoch of SGD with momentum at a fixed learning rate."""
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        self.epoch(model, optimizer, self._generator())

    def train(self, model: nn.Module, epochs: int = 20) -> None:
        """The full recipe: SGD with momentum, cosine schedule, weight decay."""
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
        generator = self._generator()
        for _ in range(epochs):
            self.epoch(model, optimizer, generator)
            schedule.step()

    @torch.no_grad()
    def test(self, model: nn.Module) -> float:
        """Accuracy on the test set, as a fraction."""
        _, _, x, y = self.data()
        model.eval()
        predictions = model(x.to(device_of(model))).argmax(1).cpu()
        return float((predictions == y).float().mean())
