"""What an algorithm plugin gets and gives back (see the ``dnnshrink_algorithm`` hook).

The pipeline hands a :class:`LearnContext` to the algorithm's ``learn(ctx)``; the
algorithm trains (or not) and returns a :class:`LearnResult`: one keep flag per channel
unit of ``ctx.graph``. The generator, exporters and report are shared by every algorithm.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional

import numpy as np
from torch import nn

from . import distributed
from .cost import CostModel
from .graph import ChannelGraph


@dataclass
class LearnContext:
    """Everything an algorithm may use.

    ``model`` is the pipeline's working copy (train it in place with
    ``train_one_epoch(model, lr)``: the user's function, which under torchrun gets the
    model's DistributedDataParallel wrapper and stops the run with
    :class:`~dnnshrink_core.DivergenceError` when the loss turns NaN); ``target`` is the
    MACs budget (absolute); ``costs`` computes MACs for any keep-set; ``options`` holds
    every pipeline option (``lr``, ``max_epochs``, ``strength``…); ``writer`` is a
    TensorBoard ``SummaryWriter`` or None (always None on ranks other than 0).
    """

    model: nn.Module
    graph: ChannelGraph
    inputs: tuple
    train_one_epoch: Callable[[nn.Module, float], Any]
    options: Any
    target: float
    costs: CostModel
    writer: Any = None
    progress: bool = True
    start_epoch: int = 1
    on_epoch: Optional[Callable[[int], Any]] = None

    def epoch_done(self, epoch: int) -> None:
        """Tell the pipeline an epoch finished cleanly (it writes a checkpoint)."""
        if self.on_epoch is not None:
            self.last_good = self.on_epoch(epoch)

    @staticmethod
    def agree(decision: bool) -> bool:
        """Rank 0's ``decision`` on every rank (as is, in one process). Under torchrun every rank
        must run the same epochs: a rank that stopped on its own would wait forever for the
        others; if their copies drifted apart, the mask check after learning says so."""
        return bool(distributed.broadcast(bool(decision))) if distributed.active() else bool(decision)

    last_good: Any = None


@dataclass
class LearnResult:
    """The structure an algorithm chose: ``keep[u]`` for every unit ``u`` of the graph."""

    keep: np.ndarray
    epochs: int = 0
    info: Dict[str, Any] = field(default_factory=dict)


def log_epoch(ctx: LearnContext, epoch: int, alive: np.ndarray, gammas: Optional[np.ndarray] = None,
              penalty: Optional[float] = None, gradient_share: Optional[float] = None) -> float:
    """Write one epoch's figures to TensorBoard; returns the estimated MACs. ``gradient_share``
    is the regularizer's share of the scales' gradient over the epoch."""
    cost = ctx.costs.cost(alive)
    if ctx.writer is not None:
        ctx.writer.add_scalar("cost/estimated_macs", cost, epoch)
        ctx.writer.add_scalar("cost/fraction_of_baseline", cost / ctx.costs.initial, epoch)
        if penalty is not None:
            ctx.writer.add_scalar("regularizer/penalty", penalty, epoch)
        if gradient_share is not None:
            ctx.writer.add_scalar("regularizer/share_of_scale_gradient", gradient_share, epoch)
        for group in ctx.graph.groups:
            if group.removable.any():
                ctx.writer.add_scalar(f"alive/{group.name}", int(alive[group.units].sum()), epoch)
        if gammas is not None and ctx.graph.unit_removable.any():
            ctx.writer.add_histogram("gamma/removable_units", gammas[ctx.graph.unit_removable], epoch)
    return cost
