"""Handlers for functional ops that use a module's own parameters (``F.batch_norm``,
``F.conv2d``, ``F.linear``, ``F.layer_norm`` called with ``self.weight``…), for
channels-last layers, and for ops that stack, unbind or shuffle channels.

fx records a module's parameter as a ``get_attr`` node. The core gives a 1-D parameter
the labels of its entries (a :class:`~dnnshrink_core.Chan` at dim 0) and slices every
parameter along the dimensions whose labels a handler asked for
(``ctx.param_labels``), in the module that owns it; so these handlers only say how the
channels couple, and the generated network keeps the user's classes.
"""
from __future__ import annotations

import math
import string
from typing import Any, List, Optional

import numpy as np

from dnnshrink_core.plugin_api import Chan, OpHandler, PropagateContext, RebuildContext, TensorSpec, conv_terms


def _owner(path: str) -> str:
    """The module that owns the parameter at ``path`` ("" for the model itself)."""
    return path.rpartition(".")[0]


def _layer_label(path: str) -> str:
    """The name of a layer whose weight is at ``path``: its module for a ``weight``,
    otherwise the parameter's own path (a module may hold several weights)."""
    owner, _, attr = path.rpartition(".")
    return owner if attr == "weight" and owner else path


def _param_chan(ctx: PropagateContext, arg: Any, size: int) -> Optional[Chan]:
    """The per-channel parameter ``arg`` (a :class:`Chan` at dim 0 of ``size`` entries), or None."""
    chan = ctx.chan(arg)
    if chan is None or chan.dim != 0 or len(chan) != size or not isinstance(ctx.spec(arg), TensorSpec) \
            or ctx.spec(arg).ndim != 1:
        return None
    return chan


def _freeze_params(ctx: PropagateContext, args: List[Any], reason: str) -> None:
    """Freeze the per-channel parameters among ``args`` that the op does not follow."""
    for arg in args:
        chan = ctx.chan(arg)
        if chan is not None and chan.dim != 1:
            ctx.freeze(chan.labels, reason)


class BatchNormFunctionHandler(OpHandler):
    """``F.batch_norm(x, running_mean, running_var, weight, bias, …)`` with per-channel
    tensors of the model (timm's ``BatchNormAct2d`` and every BatchNorm subclass that calls
    it itself): channels pass through, the four tensors are sliced where they live, and a
    ``weight`` read straight from the model makes the op a MorphNet source like
    ``nn.BatchNorm2d``."""

    name = "batch_norm"
    any_channel_dim = True  # it reads its parameters as channels at dim 0

    def propagate(self, ctx: PropagateContext) -> None:
        x = ctx.arg(0, "input")
        chan, spec = ctx.chan(x), ctx.spec(x)
        if chan is None or chan.dim != 1 or not isinstance(spec, TensorSpec) or spec.ndim < 2:
            ctx.unknown(f"{ctx.describe()} normalises a tensor whose channels it cannot follow", warn=False)
            return
        params = {}
        for pos, key in ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias")):
            arg = ctx.arg(pos, key)
            if arg is None:
                continue
            p = _param_chan(ctx, arg, len(chan))
            if p is None:
                ctx.unknown(f"{ctx.describe()} reads a {key} that is not one value per channel", warn=False)
                return
            params[key] = (arg, p)
        for _, p in params.values():
            ctx.tie(p.labels, chan.labels)
        weight, bias = params.get("weight"), params.get("bias")
        weight_path = ctx.param_path(weight[0]) if weight is not None else None
        guard = np.zeros(len(chan), dtype=bool)
        if weight_path is not None:  # a computed scale is not a source
            ctx.store.add_source(chan.labels, _layer_label(weight_path), np.arange(len(chan)))
            # gamma = beta = 0 gives exact zeros, unless the shift is computed from something else
            if bias is None or ctx.param_path(bias[0]) is not None:
                guard = np.ones(len(chan), dtype=bool)
        ctx.output(Chan(chan.labels, guard))


class ConvFunctionHandler(OpHandler):
    """``F.conv1d/2d/3d(x, weight, bias, stride, padding, dilation, groups)`` with the
    model's own weight: coupled like ``nn.Conv2d`` (dense, grouped, depthwise). The weight
    and bias are sliced in their module; a depthwise conv's literal ``groups`` is rewritten
    (the result is then a ``GraphModule``) or, where code may not change, its channels kept."""

    name = "conv-function"
    any_channel_dim = True

    def propagate(self, ctx: PropagateContext) -> None:
        x, w, b = ctx.arg(0, "input"), ctx.arg(1, "weight"), ctx.arg(2, "bias")
        chan, spec, wspec = ctx.chan(x), ctx.spec(x), ctx.spec(w)
        groups = ctx.arg(6, "groups", 1)
        path = ctx.param_path(w)
        if chan is None or chan.dim != 1 or path is None or not isinstance(wspec, TensorSpec) \
                or not isinstance(spec, TensorSpec) or wspec.ndim != spec.ndim or not isinstance(groups, int) \
                or wspec.shape[1] * groups != len(chan) or wspec.shape[0] % groups:
            ctx.unknown(f"{ctx.describe()} convolves with a weight it cannot map to the model's channels", warn=False)
            return
        cin, cout = len(chan), wspec.shape[0]
        bias = None
        if b is not None:
            bias = _param_chan(ctx, b, cout)
            if bias is None:
                ctx.unknown(f"{ctx.describe()} adds a bias that is not one value per channel", warn=False)
                return
        label = _layer_label(path)
        out_l = ctx.param_labels(w, 0, owner=label, role="out")
        if bias is not None:
            ctx.tie(bias.labels, out_l)
        kernel = math.prod(wspec.shape[2:])
        kind, macs = conv_terms(cin, groups, kernel, math.prod(ctx.out_spec.shape[2:]))
        if kind == "depthwise":
            multiplier = cout // groups
            ctx.tie(np.repeat(chan.labels, multiplier), out_l)
            if ctx.allow_rewrite:
                ctx.info.update(depthwise_in=chan.labels, weight_owner=_owner(path), weight_in=wspec.shape[1])
            else:
                ctx.freeze(chan.labels, f"{ctx.describe()} has a literal `groups` in the code")
            guard = np.repeat(chan.guard, multiplier) & (b is None)
            params = kernel
        else:
            w_in = ctx.param_labels(w, 1, owner=label, role="in")
            ctx.tie(np.tile(w_in, groups), chan.labels)
            if groups > 1:
                opg = cout // groups
                ctx.tie(out_l[opg:], np.tile(out_l[:opg], groups - 1))
            ctx.mixes(chan)
            guard = np.zeros(cout, dtype=bool)
            params = kernel / groups
        ctx.declare_layer(kind, chan.labels, out_l, macs, params_coef=params, layer_name=_owner(path), weight=path)
        ctx.output(Chan(out_l, guard))

    def rebuild(self, ctx: RebuildContext) -> None:
        labels = ctx.info.get("depthwise_in")
        if labels is None:
            return
        groups = int(ctx.keep(labels).sum())
        if groups == len(labels):
            return
        ctx.set_arg(6, "groups", groups)
        # the module that owns the weight (a Conv2d subclass that calls F.conv2d itself, such
        # as timm's Conv2dSame) passes its own `groups`: keep it true, so the module's own
        # forward runs with the new width too
        owner = ctx.info.get("weight_owner")
        if owner:
            ctx.update_module(owner, {"groups": groups, "in_channels": groups * int(ctx.info["weight_in"])})


class LinearFunctionHandler(OpHandler):
    """``F.linear(x, weight, bias)`` with the model's own weight, over the last dimension:
    when the channels are there (a 2-D input, or channels-last after a permute) they are
    consumed like ``nn.Linear``'s inputs and the output features are new channels at the
    same dimension; otherwise the channels pass and the weight is kept whole."""

    name = "linear-function"
    any_channel_dim = True

    def propagate(self, ctx: PropagateContext) -> None:
        x, w, b = ctx.arg(0, "input"), ctx.arg(1, "weight"), ctx.arg(2, "bias")
        chan, spec, wspec = ctx.chan(x), ctx.spec(x), ctx.spec(w)
        path = ctx.param_path(w)
        if chan is None or not isinstance(spec, TensorSpec) or spec.ndim < 2:
            ctx.unknown(f"{ctx.describe()} gets an input it cannot follow", warn=False)
            return
        if chan.dim != spec.ndim - 1:  # over another dimension: the channels are untouched
            _freeze_params(ctx, [b], f"{ctx.describe()} works on a dimension that is not the channels")
            if chan.dim == 1:
                ctx.passthrough(x, zero_preserving=b is None)
            else:
                ctx.unknown(f"{ctx.describe()} gets channels at dim {chan.dim}", warn=False)
            return
        if path is None or not isinstance(wspec, TensorSpec) or wspec.ndim != 2 or wspec.shape[1] != len(chan):
            ctx.unknown(f"{ctx.describe()} multiplies by a weight it cannot map to the model's channels", warn=False)
            return
        bias = None
        if b is not None:
            bias = _param_chan(ctx, b, wspec.shape[0])
            if bias is None:
                ctx.unknown(f"{ctx.describe()} adds a bias that is not one value per feature", warn=False)
                return
        out_l = _dense_on_last_dim(ctx, chan, spec, w, path, out_dim=0, layer_name=_owner(path))
        if bias is not None:
            ctx.tie(bias.labels, out_l)
        ctx.output(Chan(out_l, np.zeros(len(out_l), dtype=bool), chan.dim))


def _dense_on_last_dim(ctx: PropagateContext, chan: Chan, spec: TensorSpec, w: Any, path: str, out_dim: int,
                       layer_name: str) -> np.ndarray:
    """A dense layer over the last dimension with the model's 2-D weight ``w`` (its features
    at ``out_dim``, the inputs at the other dim): ties the inputs to ``chan``, declares the
    layer and returns the output channels' labels."""
    label = _layer_label(path)
    out_l = ctx.param_labels(w, out_dim, owner=label, role="out")
    ctx.tie(ctx.param_labels(w, 1 - out_dim, owner=label, role="in"), chan.labels)
    ctx.mixes(chan)
    ctx.declare_layer("dense", chan.labels, out_l, float(math.prod(spec.shape[1:-1])), params_coef=1.0,
                      layer_name=layer_name, weight=path, out_dim=out_dim)
    return out_l


class LayerNormHandler(OpHandler):
    """``nn.LayerNorm`` and ``F.layer_norm``: over the channels (ConvNeXt's channels-last
    norm) it couples every channel, so they are kept; over other dimensions the channels
    pass (not zero-preserving: the shift is added)."""

    name = "layer_norm"
    any_channel_dim = True

    def propagate(self, ctx: PropagateContext) -> None:
        x = ctx.arg(0, "input")
        chan, spec = ctx.chan(x), ctx.spec(x)
        if ctx.module is not None:
            shape = tuple(ctx.module.normalized_shape)
        else:
            shape = ctx.arg(1, "normalized_shape")
            shape = (shape,) if isinstance(shape, int) else shape
        params = [ctx.arg(2, "weight"), ctx.arg(3, "bias")] if ctx.module is None else []
        if chan is None or not isinstance(spec, TensorSpec) or not isinstance(shape, (tuple, list)) \
                or not all(isinstance(s, int) for s in shape):
            ctx.unknown(f"{ctx.describe()} normalises a tensor it cannot follow", warn=False)
            return
        # its weight and bias follow the normalised dims, which are kept whole either way
        _freeze_params(ctx, params, f"{ctx.describe()} normalises over its parameters' dimension")
        if chan.dim >= spec.ndim - len(shape):
            ctx.freeze(chan.labels, f"{ctx.describe()} normalises over the channels, coupling them all")
        ctx.passthrough(x, zero_preserving=False)


class StackHandler(OpHandler):
    """``torch.stack``: the inputs' channels are tied; a new dimension before the channels
    moves them one dimension on (selective-kernel attention stacks its paths at dim 1)."""

    name = "stack"
    any_channel_dim = True

    def propagate(self, ctx: PropagateContext) -> None:
        tensors = ctx.arg(0, "tensors")
        out = ctx.out_spec
        chans = [ctx.chan(t) for t in tensors] if isinstance(tensors, (list, tuple)) else [None]
        dim = ctx.arg(1, "dim", 0)
        if any(c is None for c in chans) or not isinstance(out, TensorSpec) or not isinstance(dim, int) \
                or len({c.dim for c in chans}) != 1 or len({len(c) for c in chans}) != 1:
            ctx.unknown(f"{ctx.describe()} stacks tensors it cannot follow", warn=False)
            return
        first = chans[0]
        for other in chans[1:]:
            ctx.tie(first.labels, other.labels)
        new_dim = first.dim if dim % out.ndim > first.dim else first.dim + 1
        ctx.output(Chan(first.labels, np.logical_and.reduce([c.guard for c in chans]), new_dim))


class UnbindHandler(OpHandler):
    """``torch.unbind``/``Tensor.unbind`` along a dimension that is not the channels: every
    piece has the input's channels (one dimension earlier when it was before them)."""

    name = "unbind"
    any_channel_dim = True

    def propagate(self, ctx: PropagateContext) -> None:
        x = ctx.arg(0, "input")
        chan, spec, out = ctx.chan(x), ctx.spec(x), ctx.out_spec
        dim = ctx.arg(1, "dim", 0)
        if chan is None or not isinstance(spec, TensorSpec) or not isinstance(out, tuple) or not isinstance(dim, int):
            ctx.unknown(f"{ctx.describe()} unbinds a tensor it cannot follow", warn=False)
            return
        dim %= spec.ndim
        if dim == chan.dim:
            ctx.unknown(f"{ctx.describe()} takes the channels apart one by one", warn=False)
            return
        new_dim = chan.dim - 1 if dim < chan.dim else chan.dim
        ctx.output(tuple(Chan(chan.labels, chan.guard, new_dim) for _ in out))


class PixelShuffleHandler(OpHandler):
    """``nn.PixelShuffle``/``F.pixel_shuffle`` (``shuffle=True``): each output channel is a
    block of ``r²`` input channels, removed together. ``PixelUnshuffle`` the other way:
    each input channel becomes a block of ``r²`` output channels."""

    def __init__(self, shuffle: bool):
        self.shuffle = shuffle
        self.name = "pixel_shuffle" if shuffle else "pixel_unshuffle"

    def propagate(self, ctx: PropagateContext) -> None:
        x = ctx.arg(0, "input")
        chan, out = ctx.chan(x), ctx.out_spec
        attr = "upscale_factor" if self.shuffle else "downscale_factor"
        r = getattr(ctx.module, attr) if ctx.module is not None else ctx.arg(1, attr)
        if chan is None or not isinstance(out, TensorSpec) or not isinstance(r, int) or out.ndim < 3:
            ctx.unknown(f"{ctx.describe()} shuffles channels it cannot follow", warn=False)
            return
        block = r * r
        if self.shuffle:
            if len(chan) != out.shape[1] * block:
                ctx.unknown(f"{ctx.describe()} shuffles channels it cannot follow", warn=False)
                return
            labels, guard = chan.labels.reshape(-1, block), chan.guard.reshape(-1, block)
            for k in range(1, block):
                ctx.tie(labels[:, 0], labels[:, k])
            ctx.output(Chan(labels[:, 0].copy(), guard.all(axis=1)))
        else:
            if len(chan) * block != out.shape[1]:
                ctx.unknown(f"{ctx.describe()} shuffles channels it cannot follow", warn=False)
                return
            ctx.output(Chan(np.repeat(chan.labels, block), np.repeat(chan.guard, block)))


class EinsumHandler(OpHandler):
    """``torch.einsum`` where every operand's channel index appears in the output: channel
    ``c`` of the output reads only channel ``c`` of those operands (they are tied, and a
    zero there gives a zero product). A channel index that is summed over mixes channels
    and freezes them; equations with ``...`` are not followed."""

    name = "einsum"
    any_channel_dim = True

    def propagate(self, ctx: PropagateContext) -> None:
        equation = ctx.node.args[0] if ctx.node.args else None
        operands = list(ctx.node.args[1:])
        if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
            operands = list(operands[0])
        out = ctx.out_spec
        parsed = _parse_einsum(equation, len(operands))
        if parsed is None or not isinstance(out, TensorSpec):
            ctx.unknown(f"{ctx.describe()} has an equation that is not followed", warn=False)
            return
        inputs, output = parsed
        letter, tied = None, []
        for subs, operand in zip(inputs, operands):
            chan = ctx.chan(operand)
            if chan is None:
                continue
            if chan.dim >= len(subs) or (letter is not None and subs[chan.dim] != letter) or subs[chan.dim] not in output:
                ctx.unknown(f"{ctx.describe()} sums over or mixes the channels of its operands", warn=False)
                return
            letter = subs[chan.dim]
            tied.append(chan)
        if not tied or any(letter in subs and ctx.chan(op) is None for subs, op in zip(inputs, operands)):
            ctx.unknown(f"{ctx.describe()} combines channels with untracked operands", warn=False)
            return
        for chan in tied[1:]:
            ctx.tie(tied[0].labels, chan.labels)
        guard = np.logical_or.reduce([c.guard for c in tied])
        ctx.output(Chan(tied[0].labels, guard, output.index(letter)))


class NormalizeHandler(OpHandler):
    """``F.normalize(x, p, dim)``: divides by the ``p``-norm along ``dim``. Along another
    dimension every channel is scaled on its own (a zero channel stays zero). Along the
    channel dimension a channel that is exactly zero adds nothing to the norm, so it can go;
    a channel that is not zero would change every other channel's value, so it stays."""

    name = "normalize"
    any_channel_dim = True

    def propagate(self, ctx: PropagateContext) -> None:
        x = ctx.arg(0, "input")
        chan, spec = ctx.chan(x), ctx.spec(x)
        p, dim = ctx.arg(1, "p", 2.0), ctx.arg(2, "dim", 1)
        if chan is None or not isinstance(spec, TensorSpec) or not isinstance(dim, int) \
                or not isinstance(p, (int, float)) or p <= 0:
            ctx.unknown(f"{ctx.describe()} normalises a tensor it cannot follow", warn=False)
            return
        if dim % spec.ndim == chan.dim:
            ctx.mixes(chan)
        ctx.passthrough(x)


class MatmulHandler(OpHandler):
    """``x @ W`` with a 2-D parameter of the model (an attention's learned query vector, a
    projection kept as a bare ``nn.Parameter``): when ``x`` has its channels in the last
    dimension it is a linear layer whose weight is stored transposed; the columns of ``W``
    become the new channels. Products of two activations are not followed."""

    name = "matmul"
    any_channel_dim = True

    def propagate(self, ctx: PropagateContext) -> None:
        x, w = ctx.arg(0, "input"), ctx.arg(1, "other")
        chan, spec, wspec = ctx.chan(x), ctx.spec(x), ctx.spec(w)
        path = ctx.param_path(w)
        if chan is None or not isinstance(spec, TensorSpec) or spec.ndim < 2 or chan.dim != spec.ndim - 1 \
                or path is None or not isinstance(wspec, TensorSpec) or wspec.ndim != 2 \
                or wspec.shape[0] != len(chan):
            ctx.unknown(f"{ctx.describe()} multiplies tensors whose channels it cannot follow", warn=False)
            return
        out_l = _dense_on_last_dim(ctx, chan, spec, w, path, out_dim=1, layer_name=_layer_label(path))
        ctx.output(Chan(out_l, np.zeros(len(out_l), dtype=bool), chan.dim))


class AttentionHandler(OpHandler):
    """``F.scaled_dot_product_attention(q, k, v)``: every output channel mixes the scores of
    all query and key channels, so the channels of its operands and of its output are kept
    (a known op, not followed: no warning). Its cost is priced as a constant
    (:mod:`dnnshrink_core.fixed`)."""

    name = "scaled_dot_product_attention"
    any_channel_dim = True

    def propagate(self, ctx: PropagateContext) -> None:
        ctx.unknown(f"{ctx.describe()} mixes the channels of its query and key (attention)", warn=False)


def _parse_einsum(equation: Any, n: int) -> Optional[tuple]:
    """``("bchw,bc->bchw", 2)`` -> (["bchw", "bc"], "bchw"); None for what is not followed."""
    if not isinstance(equation, str) or "..." in equation or "->" not in equation:
        return None
    lhs, output = equation.replace(" ", "").split("->")
    inputs = lhs.split(",")
    letters = set(string.ascii_letters)
    if len(inputs) != n or not all(set(s) <= letters for s in inputs + [output]):
        return None
    return inputs, output


BATCH_NORM_FUNCTION = BatchNormFunctionHandler()
CONV_FUNCTION = ConvFunctionHandler()
LINEAR_FUNCTION = LinearFunctionHandler()
LAYER_NORM = LayerNormHandler()
STACK = StackHandler()
UNBIND = UnbindHandler()
PIXEL_SHUFFLE = PixelShuffleHandler(shuffle=True)
PIXEL_UNSHUFFLE = PixelShuffleHandler(shuffle=False)
EINSUM = EinsumHandler()
ATTENTION = AttentionHandler()
NORMALIZE = NormalizeHandler()
MATMUL = MatmulHandler()
