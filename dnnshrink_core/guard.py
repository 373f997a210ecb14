"""Notice a loss that turned NaN or infinite while the user's own code trains.

The pipeline never sees the user's loss, only the gradients it sends into the model.
:class:`FiniteGuard` follows, without stopping the device, whether each backward pass
brought non-finite gradients, and checks the weights after each training call: training
stops when the weights are no longer finite, or when the call ended with a run of
``patience`` such backward passes in a row (or was nothing but). Shorter runs are allowed,
because mixed-precision training with a ``GradScaler`` produces them on purpose (it skips
those steps and lowers its scale). Under torchrun every rank takes the same decision.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from . import distributed
from .errors import DnnshrinkError


class DivergenceError(DnnshrinkError):
    """Training produced NaN or infinite values (loss, gradients, weights or scales)."""


LEARNING_ADVICE = "Lower the learning rate (lr) or the regularizer's strength (strength_scale)."


def divergence(what: str, cause: str, advice: str, last_good: Any = None) -> DivergenceError:
    """The error for training that diverged: what, why, what to do, and the checkpoint to resume from."""
    last = f" The last good checkpoint is {last_good}." if last_good else ""
    return DivergenceError(f"{what}: {cause}. {advice}{last}")


class FiniteGuard:
    """``with FiniteGuard(model) as guard: train(...)``, then ``guard.check(what, advice)``."""

    patience = 20

    def __init__(self, model: nn.Module):
        self.model = model
        self._param = next((p for p in model.parameters() if p.requires_grad), None)
        self._run: Optional[torch.Tensor] = None  # non-finite backward passes in a row, so far
        self._steps = 0
        self._handle: Any = None

    def _count(self, grad: torch.Tensor) -> None:
        # stays on the device: no synchronisation per step
        bad = (~torch.isfinite(grad).all()).to(torch.int64)
        self._run = bad if self._run is None else (self._run + bad) * bad
        self._steps += 1

    def __enter__(self) -> "FiniteGuard":
        if self._param is not None:
            self._handle = self._param.register_hook(self._count)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    @property
    def steps(self) -> int:
        """Backward passes seen (at the first trainable parameter)."""
        return self._steps

    @property
    def trailing_bad_steps(self) -> int:
        """How many of the last backward passes in a row brought non-finite gradients."""
        return int(self._run.item()) if self._run is not None else 0

    def check(self, what: str, advice: str, last_good: Any = None) -> None:
        """Raise :class:`DivergenceError` (``what``, the cause, ``advice``) when the weights are no
        longer finite or the call ended with too many non-finite backward passes in a row."""
        broken = [name for name, p in self.model.named_parameters() if not torch.isfinite(p).all()]
        device = self._param.device if self._param is not None else torch.device("cpu")
        stats = torch.tensor([float(bool(broken)), float(self.trailing_bad_steps), float(self._steps)],
                             dtype=torch.float64, device=device)
        if distributed.active():  # the worst rank decides for all, so that all stop together
            torch.distributed.all_reduce(stats, op=torch.distributed.ReduceOp.MAX)
        any_broken, run, steps = (int(v) for v in stats.tolist())
        if not any_broken and not (steps and run >= min(self.patience, steps)):
            return
        if broken:
            shown = ", ".join(broken[:3]) + (f" and {len(broken) - 3} more" if len(broken) > 3 else "")
            cause = f"the loss became NaN or infinite: weights {shown} are no longer finite"
        elif any_broken:
            cause = "the loss became NaN or infinite: the weights of another rank are no longer finite"
        elif run == steps:
            cause = f"the loss became NaN or infinite: all {steps} backward passes gave non-finite gradients"
        else:
            cause = (f"the loss became NaN or infinite: the last {run} of {steps} backward passes gave "
                     "non-finite gradients")
        raise divergence(what, cause, advice, last_good)
