"""Handlers for layers with weights: conv (dense, grouped, depthwise, transposed), linear,
the normalisations and PReLU."""
from __future__ import annotations

import math

import numpy as np
import torch

from dnnshrink_core.plugin_api import (Chan, conv_terms, index_of, OpHandler, PropagateContext, RebuildContext,
                                       TensorSpec)


def _all(keep: np.ndarray) -> bool:
    return bool(keep.all())


class ConvHandler(OpHandler):
    """Conv and transposed conv, any dimension.

    Dense: the input channels are consumed (mixed), the output channels are new. Grouped:
    channel position ``p`` of every group is tied across groups, so each group keeps the
    same number of channels. Depthwise (one input channel per group): each output channel
    is tied to its input channel and nothing is mixed.
    """

    name = "conv"

    def propagate(self, ctx: PropagateContext) -> None:
        m = ctx.module
        x = ctx.arg(0, "input")
        chan, spec = ctx.chan(x), ctx.spec(x)
        if chan is None or not isinstance(spec, TensorSpec) or spec.ndim != m.weight.ndim \
                or len(chan) != m.in_channels:
            ctx.unknown(f"{ctx.describe()} gets an input it cannot map to its channels", warn=False)
            return
        cin, cout, groups = m.in_channels, m.out_channels, m.groups
        in_l = ctx.module_labels("in", cin)
        out_l = ctx.module_labels("out", cout)
        ctx.tie(in_l, chan.labels)
        # MACs = coef * in * out (depthwise: coef * out); spatial size from the traced shapes
        spatial = spec.shape[2:] if m.transposed else ctx.out_spec.shape[2:]
        kind, coef = conv_terms(cin, groups, math.prod(m.kernel_size), math.prod(spatial))
        if kind == "depthwise":
            multiplier = cout // groups
            ctx.tie(np.repeat(in_l, multiplier), out_l)
            guard = np.repeat(chan.guard, multiplier) & (m.bias is None)
        else:
            if groups > 1:
                ipg, opg = cin // groups, cout // groups
                ctx.tie(in_l[ipg:], np.tile(in_l[:ipg], groups - 1))
                ctx.tie(out_l[opg:], np.tile(out_l[:opg], groups - 1))
            ctx.mixes(chan)
            guard = np.zeros(cout, dtype=bool)
        ctx.declare_layer(kind, in_l, out_l, coef)
        ctx.output(Chan(out_l, guard))

    def rebuild(self, ctx: RebuildContext) -> None:
        m, info = ctx.module, ctx.info
        if "in_labels" not in info:  # propagation kept the layer whole
            return
        in_keep, out_keep = ctx.keep(info["in_labels"]), ctx.keep(info["out_labels"])
        if _all(in_keep) and _all(out_keep):
            return
        w = m.weight.detach()
        dev = w.device
        groups = m.groups
        in_dim, out_dim = (0, 1) if m.transposed else (1, 0)
        out_idx, in_idx = index_of(out_keep, dev), index_of(in_keep, dev)
        kept_in, kept_out = int(in_keep.sum()), int(out_keep.sum())
        if info["kind"] == "depthwise":
            # one input channel per group: only the group axis shrinks
            w = w.index_select(0, out_idx if not m.transposed else in_idx)
            groups = kept_in
        elif info["kind"] == "grouped":
            ipg, opg = m.in_channels // m.groups, m.out_channels // m.groups
            if m.transposed:
                w = w.index_select(0, in_idx).index_select(1, index_of(out_keep[:opg], dev))
            else:
                w = w.index_select(0, out_idx).index_select(1, index_of(in_keep[:ipg], dev))
        else:
            w = w.index_select(out_dim, out_idx).index_select(in_dim, in_idx)
        tensors = {"weight": w}
        if m.bias is not None:
            tensors["bias"] = m.bias.detach().index_select(0, out_idx)
        ctx.resize(tensors, {"in_channels": kept_in, "out_channels": kept_out, "groups": groups})


class LinearHandler(OpHandler):
    """Linear: on a 2-D input the features are channels (possibly a C·H·W block per channel
    after a flatten); on a higher-rank input dim 1 passes through and the layer keeps its
    width."""

    name = "linear"
    any_channel_dim = True  # channels-last: the channels are the last dimension it reads

    def propagate(self, ctx: PropagateContext) -> None:
        m = ctx.module
        x = ctx.arg(0, "input")
        chan, spec = ctx.chan(x), ctx.spec(x)
        in_l = ctx.module_labels("in", m.in_features)
        out_l = ctx.module_labels("out", m.out_features)
        if chan is not None and isinstance(spec, TensorSpec) and spec.ndim >= 2 and chan.dim == spec.ndim - 1 \
                and len(chan) == m.in_features:
            ctx.tie(in_l, chan.labels)
            ctx.mixes(chan)
            # every position before the last dimension (but the batch) is one more product
            ctx.declare_layer("dense", in_l, out_l, float(math.prod(spec.shape[1:-1])))
            ctx.output(Chan(out_l, dim=chan.dim))
            return
        if chan is not None and isinstance(spec, TensorSpec) and spec.ndim >= 3 and chan.dim != spec.ndim - 1 \
                and spec.shape[-1] == m.in_features and ctx.is_frozen(chan):
            # tokens (N, L, C) out of an op that was not followed: the labelled dim is kept
            # whole anyway; the layer's own outputs are new channels at the last dimension
            ctx.freeze(in_l, f"{ctx.describe()} reads features that come from an op that is not followed")
            ctx.declare_layer("dense", in_l, out_l, float(math.prod(spec.shape[1:-1])))
            ctx.output(Chan(out_l, dim=spec.ndim - 1))
            return
        if chan is not None and chan.dim != 1:
            ctx.unknown(f"{ctx.describe()} gets channels at dim {chan.dim}, not its last", warn=False)
            return
        ctx.store.make_opaque(ctx.module_name, f"{ctx.describe()} works on the last dimension of a "
                                               f"{spec.ndim if spec else '?'}-D input")
        if chan is not None and isinstance(spec, TensorSpec) and spec.ndim > 2:
            ctx.passthrough(x, zero_preserving=m.bias is None)
        else:
            ctx.unknown(f"{ctx.describe()} gets an input it cannot map to its features", warn=False)

    def rebuild(self, ctx: RebuildContext) -> None:
        m, info = ctx.module, ctx.info
        if "in_labels" not in info:  # propagation kept the layer whole
            return
        in_keep, out_keep = ctx.keep(info["in_labels"]), ctx.keep(info["out_labels"])
        if _all(in_keep) and _all(out_keep):
            return
        dev = m.weight.device
        out_idx = index_of(out_keep, dev)
        tensors = {"weight": m.weight.detach().index_select(0, out_idx).index_select(1, index_of(in_keep, dev))}
        if m.bias is not None:
            tensors["bias"] = m.bias.detach().index_select(0, out_idx)
        ctx.resize(tensors, {"in_features": int(in_keep.sum()), "out_features": int(out_keep.sum())})


class ChannelwiseHandler(OpHandler):
    """A layer with one weight entry per channel: BatchNorm (a MorphNet *source*),
    InstanceNorm, PReLU. Channels pass through; the per-channel tensors are sliced."""

    def __init__(self, name: str, source: bool, size_attr: str, tensors: tuple, zero_preserving: str):
        self.name = name
        self.source = source
        self.size_attr = size_attr
        self.tensors = tensors
        # "source": zero out when its own scale is zero; "affine": unless it has a bias; "yes"
        self.zero_preserving = zero_preserving

    def propagate(self, ctx: PropagateContext) -> None:
        m = ctx.module
        x = ctx.arg(0, "input")
        chan = ctx.chan(x)
        size = getattr(m, self.size_attr)
        if chan is None or len(chan) != size:
            ctx.unknown(f"{ctx.describe()} gets an input it cannot map to its channels", warn=False)
            return
        labels = ctx.module_labels("features", size)
        ctx.tie(labels, chan.labels)
        has_scale = getattr(m, "weight", None) is not None
        if self.source and has_scale:
            ctx.add_source(chan.labels)
            guard = np.ones(size, dtype=bool)
        elif self.zero_preserving == "yes" or not has_scale:
            guard = chan.guard
        else:
            guard = np.zeros(size, dtype=bool)
        ctx.info["labels"] = labels
        ctx.output(Chan(chan.labels, guard))

    def rebuild(self, ctx: RebuildContext) -> None:
        m = ctx.module
        if "labels" not in ctx.info:
            return
        keep = ctx.keep(ctx.info["labels"])
        if _all(keep):
            return
        tensors = {}
        for name in self.tensors:
            t = getattr(m, name, None)
            if isinstance(t, torch.Tensor) and t.ndim >= 1 and t.shape[0] == len(keep):
                tensors[name] = t.detach().index_select(0, index_of(keep, t.device))
        ctx.resize(tensors, {self.size_attr: int(keep.sum())})


class PReLUHandler(ChannelwiseHandler):
    """PReLU: one slope per channel, or one shared slope (then a plain pass-through)."""

    def __init__(self) -> None:
        super().__init__("prelu", source=False, size_attr="num_parameters", tensors=("weight",), zero_preserving="yes")

    def propagate(self, ctx: PropagateContext) -> None:
        if ctx.module.num_parameters == 1:
            ctx.passthrough()
        else:
            super().propagate(ctx)


BATCHNORM = ChannelwiseHandler("batchnorm", source=True, size_attr="num_features",
                               tensors=("weight", "bias", "running_mean", "running_var"), zero_preserving="source")
INSTANCENORM = ChannelwiseHandler("instancenorm", source=False, size_attr="num_features",
                                  tensors=("weight", "bias", "running_mean", "running_var"), zero_preserving="affine")
PRELU = PReLUHandler()
CONV = ConvHandler()
LINEAR = LinearHandler()
