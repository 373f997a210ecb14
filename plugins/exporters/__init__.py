"""The default exporters: ``pytorch`` (a source-free, pickle-free artifact), ``onnx``
(verified with onnx.checker and onnxruntime) and ``graph`` (a graphviz picture).

Registered through the ``dnnshrink`` entry point ``exporters``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

from torch import nn

from dnnshrink_core.plugin_api import hookimpl


class PytorchExporter:
    """Writes and reads the pytorch artifact (see :mod:`.artifact`)."""

    fmt = "pytorch"
    suffix = ".dnnshrink"

    def export(self, model: nn.Module, example_inputs: Any, path: Path, *, sign_key: Any = None,
               **options: Any) -> Dict[str, Any]:
        from .artifact import save_artifact
        manifest = save_artifact(model, example_inputs, path, sign_key=sign_key)
        return {"path": str(path), "format": manifest["format"], "signed": sign_key is not None}

    def load(self, path: Path, verify_key: Any = None) -> nn.Module:
        from .artifact import load_artifact
        return load_artifact(path, verify_key=verify_key)


class OnnxExporter:
    """torch's ONNX exporter plus verification (see :mod:`.onnx_export`)."""

    fmt = "onnx"
    suffix = ".onnx"

    def export(self, model: nn.Module, example_inputs: Any, path: Path, **options: Any) -> Dict[str, Any]:
        from .onnx_export import export_onnx
        return export_onnx(model, example_inputs, path, **options)


class GraphExporter:
    """The graphviz picture (see :mod:`.picture`)."""

    fmt = "graph"
    suffix = ".svg"
    filename = "graph.svg"  # in an output folder: it is a picture of the network, not the model
    wants_baseline = True  # draws what was removed

    def export(self, model: nn.Module, example_inputs: Any, path: Path, **options: Any) -> Dict[str, Any]:
        from .picture import export_graph
        return export_graph(model, example_inputs, path, **options)


EXPORTERS = {e.fmt: e for e in (PytorchExporter(), OnnxExporter(), GraphExporter())}


@hookimpl(trylast=True)
def dnnshrink_exporter(fmt: str) -> Optional[Any]:
    """The default exporter for ``fmt``."""
    return EXPORTERS.get(fmt)


@hookimpl
def dnnshrink_export_formats() -> List[str]:
    """The formats this plugin writes."""
    return list(EXPORTERS)
