"""Handlers for ops that keep each channel where it is: activations, pooling, dropout,
interpolation, reductions over other dimensions, and the binary ops that tie channels."""
from __future__ import annotations

import numbers
from typing import Any, Sequence

import numpy as np
from torch import fx

from dnnshrink_core.plugin_api import Chan, OpHandler, PropagateContext, TensorSpec


class PassThrough(OpHandler):
    """Channel ``i`` out is channel ``i`` in.

    ``zero_preserving`` says whether a zero channel stays zero (ReLU, pooling: yes;
    sigmoid: no), which decides whether removing a dead channel before it is exact.
    ``elementwise`` ops (activations, dropout, casts) follow channels at any dimension
    (channels-last tensors, per-channel parameters); pooling and interpolation only at dim 1.
    """

    def __init__(self, name: str, zero_preserving: bool = True, elementwise: bool = True):
        self.name = name
        self.zero_preserving = zero_preserving
        self.any_channel_dim = elementwise

    def propagate(self, ctx: PropagateContext) -> None:
        ctx.passthrough(zero_preserving=self.zero_preserving)


class ClampHandler(OpHandler):
    """``clamp``/``hardtanh``: zero-preserving when the range contains zero."""

    name = "clamp"
    any_channel_dim = True

    def __init__(self, low: tuple, high: tuple):
        self.low, self.high = low, high  # (position, keyword, default)

    def propagate(self, ctx: PropagateContext) -> None:
        low, high = ctx.arg(*self.low), ctx.arg(*self.high)
        ok = all(v is None or (isinstance(v, numbers.Number) and s * v >= 0) for v, s in ((low, -1), (high, 1)))
        ctx.passthrough(zero_preserving=ok)


class FrozenPassThrough(OpHandler):
    """An op that keeps the channel layout but whose channels cannot be removed
    (GroupNorm, LayerNorm over channels, softmax over channels…)."""

    def __init__(self, name: str):
        self.name = name

    def propagate(self, ctx: PropagateContext) -> None:
        chan = ctx.chan(ctx.arg(0, "input"))
        if chan is not None:
            ctx.freeze(chan.labels, f"{ctx.describe()} couples all its channels")
        ctx.passthrough(zero_preserving=False)


class FactoryHandler(OpHandler):
    """``x.new_full(size, v)``, ``x.new_zeros(size)``…: a new tensor whose sizes are
    literals; ``x`` gives only its dtype and device, so its channels are not read (and not
    frozen). The new tensor's channels are fresh and kept."""

    name = "factory"

    def propagate(self, ctx: PropagateContext) -> None:
        ctx.fresh_output(f"{ctx.describe()} makes a tensor of literal size")


class LikeHandler(OpHandler):
    """``torch.zeros_like(x)``, ``ones_like``, ``full_like``: a constant tensor shaped like
    ``x``, so it has ``x``'s channels (and follows them when ``x`` shrinks); only zeros stay
    exactly zero."""

    name = "like"

    def __init__(self, zero: bool):
        self.zero = zero

    def propagate(self, ctx: PropagateContext) -> None:
        x = ctx.arg(0, "input")
        chan = ctx.chan(x)
        if chan is None:
            ctx.fresh_output(f"{ctx.describe()} makes a constant tensor")
            return
        ctx.passthrough(x, zero_preserving=self.zero)


def _dim_arg(ctx: PropagateContext, index: int, name: str, default: Any = None) -> Any:
    if ctx.node.op == "call_module":
        return getattr(ctx.module, name, default)
    return ctx.arg(index, name, default)


class SoftmaxHandler(OpHandler):
    """Softmax-like ops: over the channel dim they couple all channels; elsewhere they pass."""

    name = "softmax"

    def propagate(self, ctx: PropagateContext) -> None:
        spec = ctx.spec(ctx.arg(0, "input"))
        dim = _dim_arg(ctx, 1, "dim")
        if not isinstance(spec, TensorSpec) or not isinstance(dim, int) or dim % spec.ndim == 1:
            FrozenPassThrough(self.name).propagate(ctx)
        else:
            ctx.passthrough(zero_preserving=False)


class ReductionHandler(OpHandler):
    """``mean``/``sum``/``amax``/``amin`` over dims other than the channel dim pass channels
    through (a spatial mean of a zero channel is zero; the channels move down by the dims
    removed before them); over the channel dim they mix."""

    any_channel_dim = True  # the sum over the paths stacked before the channels (selective kernel)

    def __init__(self, name: str):
        self.name = name

    def propagate(self, ctx: PropagateContext) -> None:
        x = ctx.arg(0, "input")
        spec, chan, out = ctx.spec(x), ctx.chan(x), ctx.out_spec
        dims = ctx.arg(1, "dim")
        if not isinstance(spec, TensorSpec) or chan is None or dims is None or not isinstance(out, TensorSpec):
            ctx.unknown(f"{ctx.describe()} reduces over every dimension", warn=False)
            return
        dims = [dims] if isinstance(dims, int) else list(dims)
        if not all(isinstance(d, int) for d in dims) or {d % spec.ndim for d in dims} & {0, chan.dim}:
            ctx.unknown(f"{ctx.describe()} reduces over the channel or batch dimension", warn=False)
            return
        keepdim = ctx.arg(2, "keepdim", False)
        new_dim = chan.dim if keepdim or spec.ndim == out.ndim else \
            chan.dim - sum(1 for d in dims if d % spec.ndim < chan.dim)
        if out.ndim <= new_dim or out.shape[new_dim] != len(chan):
            ctx.unknown(f"{ctx.describe()} reduces in a way not followed", warn=False)
            return
        ctx.output(Chan(chan.labels, chan.guard, new_dim))


class BinaryHandler(OpHandler):
    """``a + b``, ``a - b``, ``a * b``, ``a / b`` (and in-place forms) with broadcasting.

    Operands whose channel dim has the output's size are tied channel by channel (a
    residual add; squeeze-and-excitation's ``x * gate``); operands broadcast along it
    (size 1, scalars) are not.
    """

    any_channel_dim = True  # channels-last tensors times a layer scale (``gamma * x``)

    def __init__(self, name: str, kind: str):
        self.name = name
        self.kind = kind  # "add" (add/sub), "mul", "div"

    def propagate(self, ctx: PropagateContext) -> None:
        out = ctx.out_spec
        if not isinstance(out, TensorSpec):
            ctx.output(None)
            return
        operands = [ctx.arg(0, "input"), ctx.arg(1, "other")]
        pos = _channel_position(ctx, operands, out)
        if (out.ndim < 2 and pos != 0) or out.ndim <= pos:
            ctx.unknown(f"{ctx.describe()} makes a tensor without a channel dimension", warn=False)
            return
        tied, tied_pos, broadcast_nonzero = [], [], False
        for i, operand in enumerate(operands):
            if isinstance(operand, fx.Node) and isinstance(ctx.spec(operand), TensorSpec):
                spec, chan = ctx.spec(operand), ctx.chan(operand)
                aligned = pos - (out.ndim - spec.ndim)  # the operand's dim facing the output's channels
                if chan is not None and aligned == chan.dim and spec.shape[aligned] == out.shape[pos]:
                    tied.append(chan)
                    tied_pos.append(i)
                elif aligned < 0 or spec.shape[aligned] == 1:
                    broadcast_nonzero = True
                    if chan is not None and chan.dim != aligned:
                        # its labels describe a dimension that is not the output's channels
                        ctx.freeze(chan.labels, f"{ctx.describe()} broadcasts it along another dimension")
                else:
                    ctx.unknown(f"{ctx.describe()} combines tensors whose channels it cannot align", warn=False)
                    return
            elif not (isinstance(operand, numbers.Number) and operand == 0):
                broadcast_nonzero = True
        if not tied:
            if pos != 1:
                ctx.unknown(f"{ctx.describe()} makes channels from broadcast values", warn=False)
            else:
                ctx.fresh_output(f"{ctx.describe()} makes channels from broadcast values")
            return
        first = tied[0]
        for other in tied[1:]:
            ctx.tie(first.labels, other.labels)
        if self.kind == "add":
            guard = np.logical_and.reduce([c.guard for c in tied]) & (not broadcast_nonzero)
        elif self.kind == "mul":
            guard = np.logical_or.reduce([c.guard for c in tied])
        else:  # div: zero when the numerator is
            guard = tied[0].guard if tied_pos[0] == 0 else np.zeros(len(first), dtype=bool)
        ctx.output(Chan(first.labels, guard, pos))


def _channel_position(ctx: PropagateContext, operands: Sequence[Any], out: TensorSpec) -> int:
    """Where the channels are in a binary op's output: at the first operand's labelled
    dimension that is not broadcast, else dim 1."""
    for operand in operands:
        spec, chan = ctx.spec(operand), ctx.chan(operand)
        if chan is not None and isinstance(spec, TensorSpec):
            q = chan.dim + out.ndim - spec.ndim
            if 0 <= q < out.ndim and spec.shape[chan.dim] == out.shape[q]:
                return q
    return 1


def table(names: Sequence[str], handler: OpHandler) -> dict:
    """Map every name in ``names`` to ``handler``."""
    return {name: handler for name in names}
