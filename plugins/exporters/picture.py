"""The ``graph`` exporter: a graphviz picture of the network and what was removed.

Every conv/linear layer is a box labelled with its name, its output channels before →
after and the kept share, filled from red (mostly removed) to green (kept). Adds,
multiplications of two tensors and concats are small nodes, so residual and dense
structure stays visible; other ops (activations, pooling, BatchNorm) are folded into the
edges. Rendered by Debian's ``dot``; without it the ``.dot`` source is written and the
exporter says how to install graphviz.
"""
from __future__ import annotations

import operator
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Set

import torch
from torch import fx, nn

from dnnshrink_core.errors import DnnshrinkWarning, ExportError
from dnnshrink_core.fileio import atomic_write
from dnnshrink_core.report import LAYER_TYPES, _width
from dnnshrink_core.tracing import eval_graph_module

JOINS = {operator.add: "add", operator.iadd: "add", torch.add: "add", operator.sub: "sub", torch.sub: "sub",
         operator.mul: "mul", operator.imul: "mul", torch.mul: "mul", torch.cat: "concat", torch.concat: "concat"}
METHOD_JOINS = {"add": "add", "add_": "add", "mul": "mul", "mul_": "mul", "sub": "sub"}


def _colour(kept: float) -> str:
    kept = min(max(kept, 0.0), 1.0)
    return f"{0.33 * kept:.3f} 0.45 1.0"  # HSV: red → yellow → green


def _join(node: fx.Node) -> Optional[str]:
    if node.op == "call_function":
        try:
            kind = JOINS.get(node.target)
        except TypeError:
            return None
        if kind == "concat":
            return kind
        if kind and sum(isinstance(a, fx.Node) for a in node.args[:2]) == 2:
            return kind
    if node.op == "call_method" and node.target in METHOD_JOINS and \
            sum(isinstance(a, fx.Node) for a in node.args[:2]) == 2:
        return METHOD_JOINS[node.target]
    return None


def build_digraph(model: nn.Module, baseline: Optional[nn.Module] = None, fmt: str = "svg") -> Any:
    """The graphviz ``Digraph`` of ``model`` (widths compared with ``baseline`` when given)."""
    import graphviz

    gm = eval_graph_module(model)
    graph = gm.graph
    dot = graphviz.Digraph(type(model).__name__, format=fmt)
    dot.attr(rankdir="TB", fontname="Helvetica", fontsize="10")
    dot.attr("node", fontname="Helvetica", fontsize="9")
    visible: Dict[fx.Node, Set[str]] = {}
    for node in graph.nodes:
        shown: Optional[str] = None
        if node.op == "placeholder":
            shown = node.name
            dot.node(shown, f"input {node.name}", shape="oval", style="filled", fillcolor="#eeeeee")
        elif node.op == "output":
            shown = "output"
            dot.node(shown, "output", shape="oval", style="filled", fillcolor="#eeeeee")
        elif node.op == "call_module" and isinstance(gm.get_submodule(node.target), LAYER_TYPES):
            shown = node.target
            new = gm.get_submodule(node.target)
            after = _width(new)[1]
            before = after
            if baseline is not None:
                try:
                    before = _width(baseline.get_submodule(node.target))[1]
                except AttributeError:
                    pass
            kept = after / before if before else 1.0
            label = f"{node.target}\n{type(new).__name__} {before} → {after} ({kept:.0%})"
            dot.node(shown, label, shape="box", style="filled,rounded", fillcolor=_colour(kept))
        else:
            kind = _join(node)
            if kind is not None:
                shown = node.name
                dot.node(shown, kind, shape="circle" if kind != "concat" else "box", width="0.3",
                         fixedsize="false", style="filled", fillcolor="#ffffff")
        sources: Set[str] = set()
        for arg in node.all_input_nodes:
            sources |= visible.get(arg, set())
        if shown is not None:
            for src in sorted(sources):
                dot.edge(src, shown)
            visible[node] = {shown}
        else:
            visible[node] = sources
    return dot


def export_graph(model: nn.Module, example_inputs: Any, path: Path, baseline: Optional[nn.Module] = None,
                 image_format: Optional[str] = None, **_: Any) -> Dict[str, Any]:
    """Write the picture to ``path`` (SVG by default, PNG for a ``.png`` path or ``image_format="png"``)."""
    path = Path(path)
    fmt = image_format or (path.suffix.lstrip(".").lower() if path.suffix else "svg")
    if fmt not in ("svg", "png", "pdf"):
        raise ExportError(f"the graph exporter writes svg, png or pdf, not {fmt!r}")
    dot = build_digraph(model, baseline, fmt)
    if shutil.which("dot") is None:
        source = path.with_suffix(".dot")
        with atomic_write(source, "w") as f:
            f.write(dot.source)
        warnings.warn(f"graphviz's `dot` is not installed, so {source} holds the picture's source instead of a "
                      f"{fmt.upper()}. Install it with `apt-get install graphviz` (Debian/Ubuntu) or "
                      f"`brew install graphviz`, or render it with `dot -T{fmt} {source} -o {path}`.",
                      DnnshrinkWarning, stacklevel=3)
        return {"path": str(source), "format": "dot", "rendered": False}
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        rendered = dot.render(filename="graph", directory=tmp, format=fmt, cleanup=True)
        os.replace(rendered, path)
    return {"path": str(path), "format": fmt, "rendered": True}
