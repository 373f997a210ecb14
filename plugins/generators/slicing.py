"""Handlers for ops that join or cut the channel dimension: cat, split, chunk, indexing,
and tuple packing."""
from __future__ import annotations

from typing import Any, List, Optional

import numpy as np
from torch import fx

from dnnshrink_core.plugin_api import Chan, OpHandler, PropagateContext, RebuildContext, TensorSpec

from .shape import moved_dim


class CatHandler(OpHandler):
    """``torch.cat``: along the channel dim the labels are concatenated; along any other dim
    the inputs' channels are tied."""

    name = "cat"

    def propagate(self, ctx: PropagateContext) -> None:
        tensors = ctx.arg(0, "tensors")
        out = ctx.out_spec
        chans = [ctx.chan(t) for t in tensors] if isinstance(tensors, (list, tuple)) else [None]
        if any(c is None for c in chans) or not isinstance(out, TensorSpec):
            ctx.unknown(f"{ctx.describe()} joins tensors it cannot follow", warn=False)
            return
        dim = ctx.arg(1, "dim", None)
        dim = (ctx.arg(1, "axis", 0) if dim is None else dim) % out.ndim  # torch.concatenate names it axis
        if dim == 1:
            ctx.output(Chan(np.concatenate([c.labels for c in chans]), np.concatenate([c.guard for c in chans])))
            return
        first = chans[0]
        for other in chans[1:]:
            ctx.tie(first.labels, other.labels)
        ctx.output(Chan(first.labels, np.logical_and.reduce([c.guard for c in chans])))


class SplitHandler(OpHandler):
    """``split``/``chunk`` along the channel dim.

    ``chunk`` ties position ``p`` of every chunk, so the chunks stay equal and the code
    needs no change. ``split`` with literal sizes has its sizes rewritten for the kept
    channels. Along other dims every piece has the input's channels.
    """

    def __init__(self, name: str, equal_pieces: bool):
        self.name = name
        self.equal_pieces = equal_pieces

    def propagate(self, ctx: PropagateContext) -> None:
        x = ctx.arg(0, "input")
        chan, spec, out = ctx.chan(x), ctx.spec(x), ctx.out_spec
        if chan is None or not isinstance(out, tuple) or not all(isinstance(s, TensorSpec) for s in out):
            ctx.unknown(f"{ctx.describe()} splits a tensor it cannot follow", warn=False)
            return
        dim = ctx.arg(2, "dim", 0)
        if not isinstance(dim, int):
            ctx.unknown(f"{ctx.describe()} has a computed dim", warn=False)
            return
        if dim % spec.ndim != 1:
            ctx.output(tuple(Chan(chan.labels, chan.guard) for _ in out))
            return
        sizes = [s.shape[1] for s in out]
        bounds = np.cumsum(sizes)[:-1]
        pieces = np.split(chan.labels, bounds)
        guards = np.split(chan.guard, bounds)
        for piece in pieces:  # no piece ends up empty: its first channel stays
            ctx.freeze(piece[:1], f"{ctx.describe()} keeps at least one channel per piece")
        if self.equal_pieces:
            if len(set(sizes)) != 1:
                ctx.freeze(chan.labels, f"{ctx.describe()} makes unequal chunks")
            else:
                for piece in pieces[1:]:
                    ctx.tie(pieces[0], piece)
        elif ctx.allow_rewrite and not any(isinstance(n, fx.Node) for n in (ctx.arg(1, "split_size_or_sections"),
                                                                               ctx.node.kwargs.get("split_size"))):
            ctx.info["pieces"] = pieces
        else:
            ctx.freeze(chan.labels, f"{ctx.describe()} has literal split sizes in the code")
        ctx.output(tuple(Chan(p, g) for p, g in zip(pieces, guards)))

    def rebuild(self, ctx: RebuildContext) -> None:
        pieces = ctx.info.get("pieces")
        if pieces is None:
            return
        sizes = [int(ctx.keep(p).sum()) for p in pieces]
        if sizes == [len(p) for p in pieces]:
            return
        args = list(ctx.node.args)
        kwargs = dict(ctx.node.kwargs)
        if len(args) > 1:
            args[1] = sizes
        else:
            key = next(k for k in ("split_size_or_sections", "split_size") if k in kwargs)
            kwargs[key] = sizes
        ctx.set_args(args, kwargs)


def _normalize_index(index: Any, ndim: int) -> Optional[List[Any]]:
    """A per-dimension list of slices/ints, or None for indexing we do not follow."""
    items = list(index) if isinstance(index, tuple) else [index]
    if any(i is None or isinstance(i, fx.Node) for i in items):
        return None
    if any(i is Ellipsis for i in items):
        at = items.index(Ellipsis)
        fill = ndim - (len(items) - 1)
        items = items[:at] + [slice(None)] * fill + items[at + 1:]
    if not all(isinstance(i, (slice, int)) for i in items):
        return None
    if any(isinstance(i, slice) and any(isinstance(v, fx.Node) for v in (i.start, i.stop, i.step)) for i in items):
        return None
    return items + [slice(None)] * (ndim - len(items))


def _only_new_axes(index: Any) -> bool:
    """Whether ``x[index]`` only adds axes (``x[:, None, None]``, ``x[None, ...]``)."""
    items = list(index) if isinstance(index, tuple) else [index]
    return any(i is None for i in items) and all(
        i is None or i is Ellipsis or (isinstance(i, slice) and (i.start, i.stop, i.step) == (None, None, None))
        for i in items)


class GetItemHandler(OpHandler):
    """``x[...]``: picks from tuples (split results), or slices a tensor. A literal slice
    of the channel dim (``x[:, :16]``) is rewritten for the kept channels."""

    name = "getitem"
    any_channel_dim = True  # picking from a tuple keeps any layout; ``gamma[:, None, None]``

    def propagate(self, ctx: PropagateContext) -> None:
        src, index = ctx.node.args[0], ctx.node.args[1]
        value = ctx.value(src)
        if isinstance(value, tuple):
            if isinstance(index, int):
                ctx.output(value[index])
            elif isinstance(index, slice):
                ctx.output(value[index])
            else:
                ctx.unknown(f"{ctx.describe()} indexes with a computed index", warn=False)
            return
        if not isinstance(value, Chan):
            ctx.fresh_output(f"{ctx.describe()} takes a tensor out of a container the tracer does not follow")
            return
        spec, out = ctx.spec(src), ctx.out_spec
        if _only_new_axes(index) and isinstance(spec, TensorSpec) and isinstance(out, TensorSpec):
            new_dim = moved_dim(spec.shape, out.shape, value.dim)
            if new_dim is None:
                ctx.unknown(f"{ctx.describe()} adds dimensions in a way not followed", warn=False)
            else:
                ctx.output(Chan(value.labels, value.guard, new_dim))
            return
        if value.dim != 1:
            ctx.unknown(f"{ctx.describe()} indexes channels at dim {value.dim}", warn=False)
            return
        items = _normalize_index(index, spec.ndim)
        if items is None or isinstance(items[0], int) or not isinstance(out, TensorSpec) or out.ndim < 2:
            ctx.unknown(f"{ctx.describe()} indexes the batch or channel dimension in a way not followed", warn=False)
            return
        channel = items[1]
        if isinstance(channel, int):
            ctx.unknown(f"{ctx.describe()} picks a single channel", warn=False)
            return
        start, stop, step = channel.indices(spec.shape[1])
        if step != 1:
            ctx.unknown(f"{ctx.describe()} takes every {step}th channel", warn=False)
            return
        if (start, stop) != (0, spec.shape[1]):
            if stop > start:  # a slice never ends up empty: its first channel stays
                ctx.freeze(value.labels[start:start + 1], f"{ctx.describe()} keeps at least one channel")
            if ctx.allow_rewrite:
                ctx.info.update(labels=value.labels, items=items, start=start, stop=stop)
            else:
                to_end = channel.stop is None or channel.stop >= spec.shape[1]
                ctx.freeze(value.labels[:start if to_end else stop], f"{ctx.describe()} slices channels with literal bounds")
        ctx.output(Chan(value.labels[start:stop], value.guard[start:stop]))

    def rebuild(self, ctx: RebuildContext) -> None:
        info = ctx.info
        if "items" not in info:
            return
        keep = ctx.keep(info["labels"])
        start = int(keep[:info["start"]].sum())
        stop = start + int(keep[info["start"]:info["stop"]].sum())
        if (start, stop) == (info["start"], info["stop"]):
            return
        items = list(info["items"])
        old = items[1]
        items[1] = slice(None if old.start is None and start == 0 else start,
                         None if old.stop is None and stop == int(keep.sum()) else stop)
        ctx.set_args((ctx.node.args[0], tuple(items)))


class TupleHandler(OpHandler):
    """Constructing a tuple or namedtuple (a model's structured output): carries its items."""

    name = "tuple"
    any_channel_dim = True

    def propagate(self, ctx: PropagateContext) -> None:
        items = list(ctx.node.args)
        fields = getattr(ctx.node.target, "_fields", ())
        items += [ctx.node.kwargs[f] for f in fields if f in ctx.node.kwargs]
        ctx.output(tuple(ctx.value(i) for i in items))


CAT = CatHandler()
SPLIT = SplitHandler("split", equal_pieces=False)
CHUNK = SplitHandler("chunk", equal_pieces=True)
GETITEM = GetItemHandler()
TUPLE = TupleHandler()
