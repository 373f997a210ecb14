"""A loss that turns NaN or infinite stops the run with the epoch and the last good checkpoint;
single skipped steps (mixed precision with a GradScaler) do not."""
from __future__ import annotations

import pytest
import torch

import dnnshrink_core as ds
from dnnshrink_core.guard import FiniteGuard
from dnnshrink_core.pipeline import shrink
from test_pipeline import Tiny, X

OPTIONS = dict(test=lambda m: 1.0, max_epochs=4, device="cpu", progress=False, latency_runs=1, exporters=[],
               tensorboard=False)


def scaled_epoch(bad_steps):
    """Three steps with a real GradScaler; the losses of ``bad_steps`` are infinite."""
    def epoch(model, lr):
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        scaler = torch.amp.GradScaler("cpu")
        for step in range(3):
            optimizer.zero_grad()
            loss = model(X).square().mean()
            if step in bad_steps:
                loss = loss * float("inf")
            scaler.scale(loss).backward()
            scaler.step(optimizer)  # skipped when the gradients are not finite
            scaler.update()
    return epoch


def nan_loss_from_epoch(first_bad):
    def epoch(model, lr):
        epoch.count = getattr(epoch, "count", 0) + 1
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        for _ in range(3):
            optimizer.zero_grad()
            loss = model(X).square().mean()
            if epoch.count >= first_bad:
                loss = loss * float("nan")
            loss.backward()
            optimizer.step()
    return epoch


def test_nan_loss_stops_with_the_epoch_and_the_last_good_checkpoint(tmp_path):
    with pytest.raises(ds.DivergenceError, match=r"diverged in epoch 2: the loss became NaN or infinite: "
                                                 r"weights .* are no longer finite.*epoch-0001\.pt"):
        shrink(Tiny(), X[:1], train_one_epoch=nan_loss_from_epoch(2), train=lambda m: None,
               out_dir=str(tmp_path / "run"), strength_scale=1e-6, **OPTIONS)
    # the diverged epoch left no checkpoint behind: --resume continues from the good one
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("*.pt")) == ["baseline.pt", "epoch-0001.pt"]


def test_skipped_mixed_precision_steps_are_allowed():
    with pytest.warns(ds.DnnshrinkWarning, match="did not reach the target"):
        result = shrink(Tiny(), X[:1], train_one_epoch=scaled_epoch({0}), train=lambda m: None, target_macs=0.9,
                        strength_scale=1e-6, anneal=False, **OPTIONS)
    assert result.epochs == 4


def test_an_epoch_of_only_non_finite_gradients_stops_the_run():
    with pytest.raises(ds.DivergenceError, match="diverged in epoch 1: .*all 3 backward passes gave non-finite"):
        shrink(Tiny(), X[:1], train_one_epoch=scaled_epoch({0, 1, 2}), train=lambda m: None, **OPTIONS)


def test_fine_tuning_that_diverges_is_named():
    def train(model):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        optimizer.zero_grad()
        (model(X).sum() * float("nan")).backward()
        optimizer.step()

    with pytest.raises(ds.DivergenceError, match=r"fine-tuning the shrunk model with train\(model\) diverged"):
        shrink(Tiny(), X[:1], train_one_epoch=scaled_epoch(set()), train=train, algorithm="magnitude", **OPTIONS)


def test_guard_counts_without_stopping_and_leaves_no_hook():
    model = Tiny()
    first = next(model.parameters())
    with FiniteGuard(model) as guard:
        for bad in (False, True, False):
            loss = model(X).sum() * (float("nan") if bad else 1.0)
            loss.backward()
    assert (guard.steps, guard.trailing_bad_steps) == (3, 0)
    guard.check("x", "y")  # finite weights, one bad step of three: no error
    assert not first._backward_hooks
