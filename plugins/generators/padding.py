"""Handlers for padding on the channel dimension (``F.pad``, ``nn.ConstantPad*``).

Zero-padding channels is how the parameter-free "option A" ResNet shortcut matches
widths. The padded channels get labels of their own, tied by the following add to the
residual branch's channels; when those die, the pad shrinks with them (the literal pad
amounts in the code, or the module's ``padding``, are rewritten).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
from torch import fx

from dnnshrink_core.plugin_api import Chan, OpHandler, PropagateContext, RebuildContext, TensorSpec


def channel_pad(ndim: int, pad: Sequence[int], dim: int = 1) -> Optional[Tuple[int, int]]:
    """The (front, back) padding of dimension ``dim`` (the channels) in a ``F.pad``-style
    tuple, (0, 0) if it is not padded, or None when the batch dim is padded too."""
    pairs = len(pad) // 2
    if pairs > ndim - 1:
        return None
    if dim < ndim - pairs:
        return 0, 0
    i = 2 * (ndim - 1 - dim)
    return pad[i], pad[i + 1]


class _PadBase(OpHandler):
    any_channel_dim = True  # channels-last tensors padded in H and W (TinyViT's patch merging)

    def _propagate(self, ctx: PropagateContext, pad: Sequence[int], constant: bool, value: float,
                   rewritable: bool, persistent: bool) -> None:
        x = ctx.arg(0, "input")
        chan, spec = ctx.chan(x), ctx.spec(x)
        if chan is None or not isinstance(spec, TensorSpec):
            ctx.unknown(f"{ctx.describe()} pads a tensor it cannot follow", warn=False)
            return
        sides = channel_pad(spec.ndim, pad, chan.dim)
        if sides is None or min(sides) < 0 or (sides != (0, 0) and (not constant or chan.dim != 1)):
            ctx.unknown(f"{ctx.describe()} pads or crops the channel dimension in a way not followed", warn=False)
            return
        if sides == (0, 0):
            ctx.passthrough(x, zero_preserving=not constant or value == 0)
            return
        front, back = sides
        make = ctx.module_labels if persistent else ctx.new_labels
        front_l, back_l = make("pad_front", front), make("pad_back", back)
        if not rewritable:
            ctx.freeze(np.concatenate([front_l, back_l]), f"{ctx.describe()} has literal pad amounts in the code")
        ctx.info.update(front=front_l, back=back_l, index=2 * (spec.ndim - 2))
        pad_guard = value == 0
        ctx.output(Chan(np.concatenate([front_l, chan.labels, back_l]),
                        np.concatenate([np.full(front, pad_guard), chan.guard, np.full(back, pad_guard)])))

    def _new_pad(self, ctx: RebuildContext, pad: Sequence[int]) -> Optional[tuple]:
        info = ctx.info
        if "front" not in info:
            return None
        new = list(pad)
        new[info["index"]] = int(ctx.keep(info["front"]).sum())
        new[info["index"] + 1] = int(ctx.keep(info["back"]).sum())
        return None if new == list(pad) else tuple(new)


class PadFunctionHandler(_PadBase):
    """``F.pad(x, pad, mode, value)``."""

    name = "pad"

    def propagate(self, ctx: PropagateContext) -> None:
        pad = ctx.arg(1, "pad")
        mode = ctx.arg(2, "mode", "constant")
        value = ctx.arg(3, "value", None) or 0
        literal = isinstance(pad, (tuple, list)) and all(isinstance(p, int) for p in pad)
        if not literal:
            ctx.unknown(f"{ctx.describe()} has computed pad amounts", warn=False)
            return
        self._propagate(ctx, pad, mode == "constant", value, rewritable=ctx.allow_rewrite, persistent=False)

    def rebuild(self, ctx: RebuildContext) -> None:
        new = self._new_pad(ctx, _pad_arg(ctx.node))
        if new is None:
            return
        ctx.set_arg(1, "pad", new)


def _pad_arg(node: fx.Node) -> Sequence[int]:
    return node.args[1] if len(node.args) > 1 else node.kwargs["pad"]


class PadModuleHandler(_PadBase):
    """``nn.ConstantPad1d/2d/3d`` and ``nn.ZeroPad*``, and the reflection/replication/circular
    pads (which never pad channels of a batched input)."""

    name = "pad-module"

    def propagate(self, ctx: PropagateContext) -> None:
        m = ctx.module
        value = getattr(m, "value", None)
        self._propagate(ctx, tuple(m.padding), value is not None, value or 0, rewritable=True, persistent=True)

    def rebuild(self, ctx: RebuildContext) -> None:
        new = self._new_pad(ctx, tuple(ctx.module.padding))
        if new is not None:
            ctx.resize({}, {"padding": new})


PAD_FUNCTION = PadFunctionHandler()
PAD_MODULE = PadModuleHandler()
