"""Every kind of dnnshrink extension, registered through the ``dnnshrink`` entry point.

1. a handler for the plugin's own layer (``FusedConvBNAct``), kept whole by the tracer;
2. a regularizer (``example_l2``);
3. a mask extractor (``top_half``);
4. an exporter (``npz``), verified after writing;
5. an override of a default: ``nn.Upsample`` gets this plugin's handler first.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from torch import nn

from dnnshrink_core.plugin_api import atomic_write, Chan, hookimpl, index_of, Masks, OpHandler, resized

from .layers import FusedConvBNAct


class FusedHandler(OpHandler):
    """The fused block: its input channels are mixed by the conv; its output channels are new
    and scaled by its BatchNorm (a MorphNet source), then zero-preserving ReLU."""

    name = "fused-conv-bn-act"

    def propagate(self, ctx):
        m = ctx.module
        chan = ctx.chan(ctx.arg(0, "x"))
        if chan is None or len(chan) != m.conv.in_channels:
            ctx.unknown("FusedConvBNAct got an input it cannot map", warn=False)
            return
        in_l = ctx.module_labels("in", m.conv.in_channels)
        out_l = ctx.module_labels("out", m.conv.out_channels)
        ctx.tie(in_l, chan.labels)
        ctx.mixes(chan)
        ctx.store.add_source(out_l, f"{ctx.module_name}.bn", np.arange(len(out_l)))
        ctx.declare_layer("dense", in_l, out_l, float(np.prod(m.conv.kernel_size) * np.prod(ctx.out_spec.shape[2:])))
        ctx.output(Chan(out_l, np.ones(len(out_l), dtype=bool)))

    def rebuild(self, ctx):
        m, info = ctx.module, ctx.info
        if "in_labels" not in info:
            return
        keep_in, keep_out = ctx.keep(info["in_labels"]), ctx.keep(info["out_labels"])
        dev = m.conv.weight.device
        out_idx, in_idx = index_of(keep_out, dev), index_of(keep_in, dev)
        conv = resized(m.conv, {"weight": m.conv.weight.detach()[out_idx][:, in_idx]},
                       {"in_channels": int(keep_in.sum()), "out_channels": int(keep_out.sum())})
        bn = resized(m.bn, {k: getattr(m.bn, k).detach()[out_idx]
                            for k in ("weight", "bias", "running_mean", "running_var")},
                     {"num_features": int(keep_out.sum())})
        new = FusedConvBNAct.__new__(FusedConvBNAct)
        nn.Module.__init__(new)
        new.conv, new.bn = conv, bn
        ctx.replace_module(new)


class UpsampleHandler(OpHandler):
    """Overrides the default handler of ``nn.Upsample`` (and counts its calls)."""

    name = "example-upsample"
    calls = 0

    def propagate(self, ctx):
        UpsampleHandler.calls += 1
        ctx.passthrough()


@hookimpl
def dnnshrink_leaf_module(module, qualname):
    return True if isinstance(module, FusedConvBNAct) else None


@hookimpl
def dnnshrink_op_handler(node, module):
    if isinstance(module, FusedConvBNAct):
        return FusedHandler()
    if isinstance(module, nn.Upsample):
        return UpsampleHandler()
    return None


class ExampleL2:
    """A regularizer: an L2 pull of every BatchNorm scale towards zero, through a hook."""

    def __init__(self, graph, model, strength=None, strength_scale=1.0, threshold=1e-2):
        self.graph, self.model = graph, model
        self.strength = 1e-3 * strength_scale if strength is None else strength
        self.threshold = threshold
        self.last_penalty = 0.0
        self.initial_cost = 1.0

    def alive(self, gammas):
        return ~self.graph.unit_removable | (gammas > self.threshold)

    def attach(self):
        weights = [self.model.get_submodule(n).weight for n in self.graph.source_modules]
        handles = [w.register_hook(lambda g, w=w: g + self.strength * 2 * w.detach()) for w in weights]
        return _Handles(handles)


class _Handles:
    def __init__(self, handles):
        self.handles = handles

    def remove(self):
        for h in self.handles:
            h.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


@hookimpl
def dnnshrink_regularizer(name):
    return ExampleL2 if name == "example_l2" else None


def top_half(graph, model, **options):
    """A mask extractor: keep the better half (by |gamma|) of every group's removable units."""
    gammas = graph.unit_gammas(model)
    masks = {}
    for group in graph:
        keep = ~group.removable.copy()
        free = np.flatnonzero(group.removable)
        best = free[np.argsort(-gammas[group.units[free]])][: max(1, (len(free) + 1) // 2)] if len(free) else []
        keep[best] = True
        masks[group.name] = keep
    return Masks(masks, graph)


@hookimpl
def dnnshrink_mask_extractor(name):
    return top_half if name == "top_half" else None


class NpzExporter:
    """An exporter: every tensor of the state dict in a NumPy ``.npz``, checked by reading it back."""

    fmt = "npz"
    suffix = ".npz"

    def export(self, model, example_inputs, path, **options):
        state = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
        buffer = io.BytesIO()
        np.savez(buffer, **state)
        with atomic_write(Path(path)) as f:
            f.write(buffer.getvalue())
        with np.load(path) as back:
            bad = [k for k in state if not np.array_equal(back[k], state[k])]
        if bad:
            raise RuntimeError(f"npz export does not read back: {bad[:3]}")
        return {"path": str(path), "tensors": len(state)}


@hookimpl
def dnnshrink_exporter(fmt):
    return NpzExporter() if fmt == "npz" else None


@hookimpl
def dnnshrink_export_formats():
    return ["npz"]
