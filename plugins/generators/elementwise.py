"""Handlers for ops that keep each channel where it is: activations, pooling, dropout,
interpolation, reductions over other dimensions, and the binary ops that tie channels."""
from __future__ import annotations

import numbers
from typing import Any, Sequence

import numpy as np
from torch import fx

from dnnshrink_core import Chan, OpHandler, PropagateContext
from dnnshrink_core.handler import TensorSpec


class PassThrough(OpHandler):
    """Channel ``i`` out is channel ``i`` in.

    ``zero_preserving`` says whether a zero channel stays zero (ReLU, pooling: yes;
    sigmoid: no), which decides whether removing a dead channel before it is exact.
    """

    def __init__(self, name: str, zero_preserving: bool = True):
        self.name = name
        self.zero_preserving = zero_preserving

    def propagate(self, ctx: PropagateContext) -> None:
        ctx.passthrough(zero_preserving=self.zero_preserving)


class ClampHandler(OpHandler):
    """``clamp``/``hardtanh``: zero-preserving when the range contains zero."""

    name = "clamp"

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
    through (a spatial mean of a zero channel is zero); over the channel dim they mix."""

    def __init__(self, name: str):
        self.name = name

    def propagate(self, ctx: PropagateContext) -> None:
        x = ctx.arg(0, "input")
        spec = ctx.spec(x)
        dims = ctx.arg(1, "dim")
        if not isinstance(spec, TensorSpec) or ctx.chan(x) is None or dims is None:
            ctx.unknown(f"{ctx.describe()} reduces over every dimension", warn=False)
            return
        dims = [dims] if isinstance(dims, int) else list(dims)
        if not all(isinstance(d, int) for d in dims) or {d % spec.ndim for d in dims} & {0, 1}:
            ctx.unknown(f"{ctx.describe()} reduces over the channel or batch dimension", warn=False)
            return
        ctx.passthrough(x)


class BinaryHandler(OpHandler):
    """``a + b``, ``a - b``, ``a * b``, ``a / b`` (and in-place forms) with broadcasting.

    Operands whose channel dim has the output's size are tied channel by channel (a
    residual add; squeeze-and-excitation's ``x * gate``); operands broadcast along it
    (size 1, scalars) are not.
    """

    def __init__(self, name: str, kind: str):
        self.name = name
        self.kind = kind  # "add" (add/sub), "mul", "div"

    def propagate(self, ctx: PropagateContext) -> None:
        out = ctx.out_spec
        if not isinstance(out, TensorSpec):
            ctx.output(None)
            return
        if out.ndim < 2:
            ctx.unknown(f"{ctx.describe()} makes a tensor without a channel dimension", warn=False)
            return
        operands = [ctx.arg(0, "input"), ctx.arg(1, "other")]
        tied, tied_pos, broadcast_nonzero = [], [], False
        for pos, operand in enumerate(operands):
            if isinstance(operand, fx.Node) and isinstance(ctx.spec(operand), TensorSpec):
                spec = ctx.spec(operand)
                aligned = spec.ndim - out.ndim + 1
                if aligned == 1 and spec.shape[1] == out.shape[1] and ctx.chan(operand) is not None:
                    tied.append(ctx.chan(operand))
                    tied_pos.append(pos)
                elif aligned < 0 or spec.shape[aligned] == 1:
                    broadcast_nonzero = True
                else:
                    ctx.unknown(f"{ctx.describe()} combines tensors whose channels it cannot align", warn=False)
                    return
            elif not (isinstance(operand, numbers.Number) and operand == 0):
                broadcast_nonzero = True
        if not tied:
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
        ctx.output(Chan(first.labels, guard))


def table(names: Sequence[str], handler: OpHandler) -> dict:
    """Map every name in ``names`` to ``handler``."""
    return {name: handler for name in names}
