"""Handlers for ops that reshape: view/reshape/flatten/squeeze/unsqueeze, permute/transpose,
expand/repeat."""
from __future__ import annotations

import math
from typing import Any, List, Optional, Tuple

import numpy as np
from torch import fx

from dnnshrink_core.plugin_api import Chan, OpHandler, PropagateContext, RebuildContext, TensorSpec


def _sizes_arg(node: fx.Node) -> Tuple[Optional[int], Optional[List[Any]]]:
    """Where a view/reshape's target sizes are: (argument position, sizes) or (None, None)."""
    if node.op == "call_method" and node.target in ("view", "reshape"):
        rest = list(node.args[1:])
        if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
            return 1, list(rest[0])
        return -1, rest  # spread over the positional arguments
    if node.op == "call_function" and getattr(node.target, "__name__", "") == "reshape":
        shape = node.args[1] if len(node.args) > 1 else node.kwargs.get("shape")
        if isinstance(shape, (tuple, list)):
            return 1, list(shape)
    return None, None


class ReshapeHandler(OpHandler):
    """An order-preserving reshape. If the batch dim stays and the channel dim stays, the
    channels pass through; if the channel dim merges with the dims after it (a flatten
    before a linear layer), each channel becomes a block of features. A literal channel
    count in the code (``x.view(-1, 16 * 5 * 5)``) is rewritten for the kept channels."""

    name = "reshape"
    any_channel_dim = True  # (C,) -> (1, C, 1, 1) of a layer scale; squeezes of channels-last tensors

    def propagate(self, ctx: PropagateContext) -> None:
        x = ctx.arg(0, "input")
        chan, spec, out = ctx.chan(x), ctx.spec(x), ctx.out_spec
        if chan is not None and isinstance(spec, TensorSpec) and isinstance(out, TensorSpec) \
                and (chan.dim != 1 or out.ndim < 2 or out.shape[0] != spec.shape[0]):
            self._only_ones(ctx, chan, spec, out)
            return
        if chan is None or not isinstance(out, TensorSpec) or out.ndim < 2 or out.shape[0] != spec.shape[0]:
            ctx.unknown(f"{ctx.describe()} moves the channel dimension", warn=False)
            return
        c, o = spec.shape[1], out.shape[1]
        if o == c and math.prod(out.shape[2:]) == math.prod(spec.shape[2:]):
            block = 1
        elif c and o % c == 0:
            block = o // c
        else:
            ctx.unknown(f"{ctx.describe()} splits the channel dimension", warn=False)
            return
        pos, sizes = _sizes_arg(ctx.node)
        if sizes is not None and len(sizes) > 1 and isinstance(sizes[1], int) and sizes[1] != -1:
            if ctx.allow_rewrite:
                ctx.info.update(sizes_pos=pos, sizes=sizes, block=block, labels=chan.labels)
            else:
                ctx.freeze(chan.labels, f"{ctx.describe()} has a literal channel count in the code")
        if ctx.node.target in ("view_as", "reshape_as"):
            other = ctx.chan(ctx.arg(1, "other"))
            if other is None or len(other) != o:
                ctx.unknown(f"{ctx.describe()} takes its shape from another tensor", warn=False)
                return
            ctx.tie(np.repeat(chan.labels, block), other.labels)
        ctx.output(Chan(np.repeat(chan.labels, block), np.repeat(chan.guard, block)))

    @staticmethod
    def _only_ones(ctx: PropagateContext, chan: Chan, spec: TensorSpec, out: TensorSpec) -> None:
        """A reshape that only adds or drops dimensions of size 1 moves the channels to
        where their dimension lands; anything else is not followed."""
        new_dim = moved_dim(spec.shape, out.shape, chan.dim)
        if new_dim is None or ctx.node.target in ("view_as", "reshape_as"):
            ctx.unknown(f"{ctx.describe()} moves the channel dimension", warn=False)
            return
        _, sizes = _sizes_arg(ctx.node)
        if sizes is not None and new_dim < len(sizes) and isinstance(sizes[new_dim], int) and sizes[new_dim] != -1:
            ctx.freeze(chan.labels, f"{ctx.describe()} has a literal channel count in the code")
        ctx.output(Chan(chan.labels, chan.guard, new_dim))

    def rebuild(self, ctx: RebuildContext) -> None:
        info = ctx.info
        if "sizes" not in info:
            return
        sizes = list(info["sizes"])
        new = int(ctx.keep(info["labels"]).sum()) * info["block"]
        if new == sizes[1]:
            return
        sizes[1] = new
        args = list(ctx.node.args)
        if info["sizes_pos"] == -1:
            args[1:] = sizes
        else:
            args[info["sizes_pos"]] = type(ctx.node.args[info["sizes_pos"]])(sizes)
        ctx.set_args(args)


def moved_dim(before: tuple, after: tuple, dim: int) -> Optional[int]:
    """Where dimension ``dim`` of a tensor shaped ``before`` is after a reshape to ``after``
    that only adds or drops dimensions of size 1; None for any other reshape."""
    if not 0 <= dim < len(before) or before[dim] == 1:
        return None
    kept_before = [i for i, s in enumerate(before) if s != 1]
    kept_after = [i for i, s in enumerate(after) if s != 1]
    if [before[i] for i in kept_before] != [after[i] for i in kept_after]:
        return None
    return kept_after[kept_before.index(dim)]


class PermuteHandler(OpHandler):
    """permute/transpose/movedim/swapaxes: the channels go where their dimension goes
    (``x.permute(0, 2, 3, 1)`` makes a channels-last tensor whose channels later ops over
    the last dimension, such as ``nn.Linear``, read)."""

    name = "permute"
    any_channel_dim = True

    def propagate(self, ctx: PropagateContext) -> None:
        x = ctx.arg(0, "input")
        spec, chan, out = ctx.spec(x), ctx.chan(x), ctx.out_spec
        if not isinstance(spec, TensorSpec) or chan is None:
            ctx.unknown(f"{ctx.describe()} has no tensor input it can follow", warn=False)
            return
        order = self._order(ctx.node, spec.ndim)
        if order is None or sorted(order) != list(range(spec.ndim)) or not isinstance(out, TensorSpec):
            ctx.unknown(f"{ctx.describe()} moves the channel dimension in a way not followed", warn=False)
            return
        new_dim = order.index(chan.dim)
        if out.shape[new_dim] != len(chan):
            ctx.unknown(f"{ctx.describe()} moves the channel dimension in a way not followed", warn=False)
            return
        ctx.output(Chan(chan.labels, chan.guard, new_dim))

    @staticmethod
    def _order(node: fx.Node, ndim: int) -> Optional[List[int]]:
        name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
        args = list(node.args[1:])
        try:
            if name == "permute":
                dims = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
                dims = dims or node.kwargs.get("dims")
                return [int(d) % ndim for d in dims]
            order = list(range(ndim))
            if name in ("transpose", "swapaxes", "swapdims"):
                a = args[0] if args else node.kwargs.get("dim0")
                b = args[1] if len(args) > 1 else node.kwargs.get("dim1")
                a, b = int(a) % ndim, int(b) % ndim
                order[a], order[b] = order[b], order[a]
                return order
            if name in ("movedim", "moveaxis"):
                src = args[0] if args else node.kwargs.get("source")
                dst = args[1] if len(args) > 1 else node.kwargs.get("destination")
                src = [src] if isinstance(src, int) else list(src)
                dst = [dst] if isinstance(dst, int) else list(dst)
                src, dst = [s % ndim for s in src], [d % ndim for d in dst]
                rest = [d for d in range(ndim) if d not in src]
                result: List[Optional[int]] = [None] * ndim
                for s, d in zip(src, dst):
                    result[d] = s
                it = iter(rest)
                return [r if r is not None else next(it) for r in result]
        except (TypeError, ValueError):
            return None
        return None


class ExpandHandler(OpHandler):
    """expand/expand_as/broadcast_to/repeat: pass-through when the channel dim keeps its size."""

    name = "expand"

    def propagate(self, ctx: PropagateContext) -> None:
        x = ctx.arg(0, "input")
        spec, out = ctx.spec(x), ctx.out_spec
        if isinstance(spec, TensorSpec) and isinstance(out, TensorSpec) and spec.ndim == out.ndim \
                and spec.shape[:2] == out.shape[:2]:
            ctx.passthrough(x)
        else:
            ctx.unknown(f"{ctx.describe()} copies channels", warn=False)


RESHAPE = ReshapeHandler()
PERMUTE = PermuteHandler()
EXPAND = ExpandHandler()
