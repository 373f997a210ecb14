"""The ``graph`` exporter: a graphviz picture of the network and what was (or can be) removed.

Two pictures from one drawing:

* **after shrinking** (``baseline=`` the model before): every conv/linear layer is a box
  labelled ``in a → b, out c → d`` and ``MACs kept p%``, filled from red (most MACs removed)
  to green (all kept) — a layer that lost only input channels still shows what it lost;
* **before training** (``channel_graph=`` from :func:`dnnshrink_core.trace`, what
  ``dnnshrink inspect`` draws): a layer whose output channels can be pruned is blue and says
  how many units are removable; a frozen one is grey and dashed, with the reason in its
  tooltip.

Adds, multiplications of two tensors and concats are small nodes, so residual and dense
structure stays visible; pooling and reshapes are light grey text, so the flow reads; other
ops (activations, BatchNorm) are folded into the edges.

Rendering: Debian's ``dot`` when it is on the PATH, otherwise ``graphviz-pure`` (a
self-contained port of Graphviz's ``dot`` that pip installs with dnnshrink; it writes SVG and
PNG, not PDF). Without either, the ``.dot`` source is written and a warning says how to
render it.
"""
from __future__ import annotations

import operator
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Set, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn

from dnnshrink_core.plugin_api import (atomic_write, count_macs, DnnshrinkWarning, eval_graph_module, ExportError,
    LAYER_TYPES, layer_width)

JOINS = {operator.add: "add", operator.iadd: "add", torch.add: "add", operator.sub: "sub", torch.sub: "sub",
         operator.mul: "mul", operator.imul: "mul", torch.mul: "mul", torch.cat: "concat", torch.concat: "concat"}
METHOD_JOINS = {"add": "add", "add_": "add", "mul": "mul", "mul_": "mul", "sub": "sub"}
LIGHT_MODULES = (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
                 nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd, nn.Flatten,
                 nn.Unflatten, nn.Upsample, nn.PixelShuffle, nn.PixelUnshuffle)
LIGHT_FUNCTIONS = {F.max_pool1d: "max_pool", F.max_pool2d: "max_pool", F.max_pool3d: "max_pool",
                   F.avg_pool1d: "avg_pool", F.avg_pool2d: "avg_pool", F.avg_pool3d: "avg_pool",
                   F.adaptive_avg_pool1d: "avg_pool", F.adaptive_avg_pool2d: "avg_pool",
                   F.adaptive_avg_pool3d: "avg_pool", F.adaptive_max_pool2d: "max_pool",
                   torch.flatten: "flatten", torch.reshape: "reshape", F.interpolate: "interpolate",
                   torch.permute: "permute", torch.transpose: "transpose", F.pixel_shuffle: "pixel_shuffle"}
LIGHT_METHODS = {"view": "view", "reshape": "reshape", "flatten": "flatten", "permute": "permute",
                 "transpose": "transpose", "mean": "mean"}
RENDERERS = ("dot", "graphviz-pure")
FORMATS = {"dot": ("svg", "png", "pdf"), "graphviz-pure": ("svg", "png")}
FROZEN_FILL = "#d9d9d9"
REMOVABLE_FILL = "#9ecae1"


def _colour(kept: float) -> str:
    kept = min(max(kept, 0.0), 1.0)
    return f"{0.33 * kept:.3f} 0.45 1.0"  # HSV: red → yellow → green


def _lookup(table: Dict[Any, str], key: Any) -> Optional[str]:
    try:
        return table.get(key)
    except TypeError:  # unhashable targets
        return None


def _join(node: fx.Node) -> Optional[str]:
    two_tensors = sum(isinstance(a, fx.Node) for a in node.args[:2]) == 2
    if node.op == "call_function":
        kind = _lookup(JOINS, node.target)
        if kind == "concat" or (kind and two_tensors):
            return kind
    if node.op == "call_method" and node.target in METHOD_JOINS and two_tensors:
        return METHOD_JOINS[node.target]
    return None


def _light(node: fx.Node, gm: fx.GraphModule) -> Optional[str]:
    """A short name for pooling and reshaping ops, drawn lightly."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return type(module).__name__ if isinstance(module, LIGHT_MODULES) else None
    if node.op == "call_function":
        return _lookup(LIGHT_FUNCTIONS, node.target)
    if node.op == "call_method":
        return LIGHT_METHODS.get(node.target)
    return None


def _shrunk_box(name: str, new: nn.Module, old: nn.Module, macs: Tuple[int, int]) -> Dict[str, str]:
    (ib, ob), (ia, oa) = layer_width(old), layer_width(new)
    before, after = macs
    kept = after / before if before else 1.0
    label = (f"{name}\n{type(new).__name__} in {ib} → {ia}, out {ob} → {oa}\n"
             f"MACs kept {kept:.0%}")
    return {"label": label, "fillcolor": _colour(kept), "style": "filled,rounded",
            "tooltip": f"{name}: MACs {before:,} → {after:,}"}


def _inspect_box(name: str, module: nn.Module, channel_graph: Any) -> Dict[str, str]:
    cin, cout = layer_width(module)
    head = f"{name}\n{type(module).__name__} {cin} → {cout}"
    group = channel_graph.group_of(name, "out")
    removable = 0 if group is None else int(group.removable.sum())
    if removable:
        return {"label": f"{head}\n{removable} of {group.size} units removable", "fillcolor": REMOVABLE_FILL,
                "style": "filled,rounded", "tooltip": f"{name}: output channels in group {group.name}"}
    reasons = list(group.frozen_reasons) if group is not None else []
    why = "; ".join(reasons) or "no BatchNorm scale decides these channels"
    return {"label": f"{head}\nfrozen", "fillcolor": FROZEN_FILL, "style": "filled,rounded,dashed",
            "tooltip": f"frozen: {why}"}


def build_digraph(model: nn.Module, baseline: Optional[nn.Module] = None, fmt: str = "svg",
                  example_inputs: Any = None, channel_graph: Any = None) -> Any:
    """The graphviz ``Digraph`` of ``model``.

    With ``baseline`` (and ``example_inputs`` to count MACs), layers show channels and MACs
    kept against it; with ``channel_graph``, what can be pruned and what is frozen.
    """
    import graphviz

    gm = eval_graph_module(model, example_inputs)
    macs_after: Dict[str, int] = {}
    macs_before: Dict[str, int] = {}
    if example_inputs is not None and channel_graph is None:
        macs_after = count_macs(model, example_inputs)
        macs_before = macs_after if baseline is None else count_macs(baseline, example_inputs)
    dot = graphviz.Digraph(type(model).__name__, format=fmt)
    dot.attr(rankdir="TB", fontname="Helvetica", fontsize="10")
    dot.attr("node", fontname="Helvetica", fontsize="9")
    visible: Dict[fx.Node, Set[str]] = {}
    for node in gm.graph.nodes:
        shown: Optional[str] = None
        if node.op in ("placeholder", "output"):
            shown = node.name
            dot.node(shown, "output" if node.op == "output" else f"input {node.name}", shape="oval",
                     style="filled", fillcolor="#eeeeee")
        elif node.op == "call_module" and isinstance(gm.get_submodule(node.target), LAYER_TYPES):
            shown = node.target
            new = gm.get_submodule(node.target)
            if channel_graph is not None:
                box = _inspect_box(node.target, new, channel_graph)
            else:
                old = _same_layer(baseline, node.target, new)
                macs = (macs_before.get(node.target, 0), macs_after.get(node.target, 0))
                box = _shrunk_box(node.target, new, old, macs)
            dot.node(shown, shape="box", **box)
        elif _join(node) is not None:
            kind = _join(node)
            shown = node.name
            dot.node(shown, kind, shape="circle" if kind != "concat" else "box", width="0.3",
                     fixedsize="false", style="filled", fillcolor="#ffffff")
        elif _light(node, gm) is not None:
            shown = node.name
            dot.node(shown, _light(node, gm), shape="plaintext", fontcolor="#888888", fontsize="8",
                     height="0.2")
        sources: Set[str] = set()
        for arg in node.all_input_nodes:
            sources |= visible.get(arg, set())
        if shown is not None:
            for src in sorted(sources):
                dot.edge(src, shown, color="#555555")
            visible[node] = {shown}
        else:
            visible[node] = sources
    return dot


def _same_layer(baseline: Optional[nn.Module], name: str, new: nn.Module) -> nn.Module:
    if baseline is None:
        return new
    try:
        old = baseline.get_submodule(name)
    except AttributeError:
        return new
    return old if isinstance(old, LAYER_TYPES) else new


def find_renderer(fmt: str) -> Optional[str]:
    """The program that renders ``fmt``: ``dot`` if installed, else pip's ``graphviz-pure``."""
    for name in RENDERERS:
        if fmt not in FORMATS[name]:
            continue
        found = shutil.which(name) or shutil.which(name, path=sysconfig.get_path("scripts")) or \
            shutil.which(name, path=os.path.dirname(sys.executable))
        if found:
            return found
    return None


def export_graph(model: nn.Module, example_inputs: Any, path: Path, baseline: Optional[nn.Module] = None,
                 image_format: Optional[str] = None, channel_graph: Any = None, **_: Any) -> Dict[str, Any]:
    """Write the picture to ``path`` (SVG by default, PNG or PDF by suffix or ``image_format``)."""
    path = Path(path)
    fmt = image_format or (path.suffix.lstrip(".").lower() if path.suffix else "svg")
    if fmt not in ("svg", "png", "pdf"):
        raise ExportError(f"the graph exporter writes svg, png or pdf, not {fmt!r}")
    dot = build_digraph(model, baseline, fmt, example_inputs, channel_graph)
    renderer = find_renderer(fmt)
    if renderer is None:
        source = path.with_suffix(".dot")
        with atomic_write(source, "w") as f:
            f.write(dot.source)
        hint = ("graphviz-pure writes svg and png only; for PDF install Graphviz" if fmt == "pdf" else
                "neither graphviz's `dot` nor `graphviz-pure` is installed (`pip install graphviz-pure`, or "
                "`apt-get install graphviz` / `brew install graphviz`)")
        warnings.warn(f"{hint}, so {source} holds the picture's source instead of a {fmt.upper()}; render it "
                      f"with `dot -T{fmt} {source} -o {path}`.", DnnshrinkWarning, stacklevel=3)
        return {"path": str(source), "format": "dot", "rendered": False}
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        source, out = Path(tmp) / "graph.gv", Path(tmp) / f"graph.{fmt}"
        source.write_text(dot.source, encoding="utf-8")
        run = subprocess.run([renderer, f"-T{fmt}", str(source), "-o", str(out)], capture_output=True, text=True)
        if run.returncode != 0 or not out.is_file():
            raise ExportError(f"{Path(renderer).name} could not render the picture: {run.stderr.strip()[-500:]}")
        os.replace(out, path)
    return {"path": str(path), "format": fmt, "rendered": True, "renderer": Path(renderer).name}


__all__ = ["build_digraph", "export_graph", "find_renderer"]
