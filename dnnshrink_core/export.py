"""Exporting a shrunk network: :func:`export` by format name, and :func:`load`."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from torch import nn

from .errors import PluginError
from .plugins import lookup, plugin_names


def export_formats() -> List[str]:
    """Every format name the loaded exporter plugins write."""
    return plugin_names("exporter")


def get_exporter(fmt: str) -> Any:
    """The exporter plugin for ``fmt``; a :class:`PluginError` lists the loaded formats."""
    return lookup("exporter", fmt)


def export(model: nn.Module, example_inputs: Any, fmt: str, path: Union[str, os.PathLike],
           **options: Any) -> Dict[str, Any]:
    """Write ``model`` in format ``fmt`` (``"pytorch"``, ``"onnx"``, ``"graph"``…) to ``path``.

    The exporter verifies what it wrote before returning a dict of what it measured.
    Options go to the exporter: ``sign_key`` (bytes or str: an HMAC-SHA256 signature that
    ``load(..., verify_key=...)`` checks) for the pytorch artifact; ``opset``,
    ``dynamic_batch``, ``rtol`` for ONNX; ``baseline`` (the model before shrinking) and
    ``image_format`` for the graph.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, not {type(model).__name__}")
    return get_exporter(fmt).export(model, example_inputs, Path(path), **options)


def load(path: Union[str, os.PathLike], *, verify_key: Optional[Union[bytes, str]] = None) -> nn.Module:
    """Load a ``pytorch`` artifact written by :func:`export`.

    No code from the file runs: it holds a graph of ops from a closed list of safe torch
    functions, the settings of listed ``torch.nn`` layers and tensors read with
    ``weights_only=True``; anything else, and a truncated, oversized or tampered file, is
    refused with an :class:`~dnnshrink_core.errors.ArtifactError` before anything is built.
    With ``verify_key``, the file must carry an HMAC signature made with that key
    (``export(..., sign_key=...)``). See "Security model" in the README.
    """
    exporter = get_exporter("pytorch")
    if not hasattr(exporter, "load"):
        raise PluginError("the `pytorch` exporter that is loaded cannot read artifacts")
    if verify_key is None:
        return exporter.load(Path(path))
    return exporter.load(Path(path), verify_key=verify_key)
