"""Notice a loss that turned NaN or infinite while the user's own code trains.

The pipeline never sees the user's loss, only the gradients it sends into the model.
:class:`FiniteGuard` counts, without stopping the device, the backward passes whose
gradients are not finite, and checks the weights after each training call: training
stops when the weights are no longer finite, or when *every* backward pass of the call
was. Single bad steps are allowed, because mixed-precision training with a
``GradScaler`` produces them on purpose and skips them.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from .errors import DnnshrinkError


class DivergenceError(DnnshrinkError):
    """Training produced NaN or infinite values (loss, gradients, weights or scales)."""


class FiniteGuard:
    """``with FiniteGuard(model) as guard: train(...)``, then ``guard.check(what)``."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._param = next((p for p in model.parameters() if p.requires_grad), None)
        self._bad: Optional[torch.Tensor] = None
        self._steps = 0
        self._handle: Any = None

    def _count(self, grad: torch.Tensor) -> None:
        # stays on the device: no synchronisation per step
        bad = (~torch.isfinite(grad).all()).to(torch.int64)
        self._bad = bad if self._bad is None else self._bad + bad
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
    def bad_steps(self) -> int:
        """Backward passes whose gradients (at the first trainable parameter) were not finite."""
        return int(self._bad.item()) if self._bad is not None else 0

    @property
    def steps(self) -> int:
        """Backward passes seen."""
        return self._steps

    def check(self, what: str, advice: str, last_good: Any = None) -> None:
        """Raise :class:`DivergenceError` (``what``, the cause, ``advice``) when the weights are no
        longer finite or every backward pass had non-finite gradients."""
        broken = [name for name, p in self.model.named_parameters() if not torch.isfinite(p).all()]
        bad = self.bad_steps
        if not broken and not (self._steps and bad == self._steps):
            return
        if broken:
            shown = ", ".join(broken[:3]) + (f" and {len(broken) - 3} more" if len(broken) > 3 else "")
            cause = f"the loss became NaN or infinite: weights {shown} are no longer finite"
        else:
            cause = f"the loss became NaN or infinite: all {bad} backward passes gave non-finite gradients"
        last = f" The last good checkpoint is {last_good}." if last_good else ""
        raise DivergenceError(f"{what}: {cause}. {advice}{last}")
