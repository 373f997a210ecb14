"""The ``onnx`` exporter: torch's ONNX exporter, then a check that the file really works.

Every export is verified before it is reported as done: ``onnx.checker``, then
onnxruntime on the example input (and, with a dynamic batch, on a batch of a different
size) compared with PyTorch. A mismatch is an :class:`~dnnshrink_core.errors.ExportError`
giving the measured relative error and the tolerance.
"""
from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch
from torch import nn

from dnnshrink_core.plugin_api import atomic_path, ExportError, flatten_outputs, model_mode, normalize_inputs


def relative_errors(reference: List[torch.Tensor], outputs: List[np.ndarray]) -> List[float]:
    """``|a - b| / |a|`` (Frobenius norms) for each output pair."""
    if len(reference) != len(outputs):
        raise ExportError(f"the ONNX model has {len(outputs)} outputs; PyTorch gives {len(reference)}")
    errors = []
    for ref, out in zip(reference, outputs):
        ref = ref.detach().cpu().double()
        out = torch.from_numpy(np.asarray(out)).double()
        if ref.shape != out.shape:
            raise ExportError(f"an ONNX output has shape {tuple(out.shape)}; PyTorch gives {tuple(ref.shape)}")
        errors.append(float((ref - out).norm() / ref.norm().clamp_min(1e-12)))
    return errors


def verify_onnx(path: Path, model: nn.Module, inputs: tuple, rtol: float, threads: int = 2) -> float:
    """Check an ONNX file and compare onnxruntime's outputs with PyTorch's; returns the worst error."""
    import onnx
    import onnxruntime as ort

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise ExportError(f"onnx.checker rejected the exported model: {exc}") from exc
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = {i.name: x.detach().cpu().numpy() for i, x in zip(session.get_inputs(), inputs)}
    with torch.no_grad(), model_mode(model, training=False):
        reference = flatten_outputs(model(*inputs))
    worst = max(relative_errors(reference, session.run(None, feeds)), default=0.0)
    if not worst < rtol:
        raise ExportError(f"onnxruntime's output differs from PyTorch's: relative error {worst:.3e} "
                          f"exceeds the tolerance {rtol:.0e}")
    return worst


def _check_opset(path: Path, opset: int) -> None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    got = next((op.version for op in model.opset_import if op.domain in ("", "ai.onnx")), None)
    if got != opset:
        raise ExportError(f"the ONNX model came out with opset {got}, not the requested {opset} (torch's exporter "
                          "could not convert every op); ask for opset 18 or newer")


def export_onnx(model: nn.Module, example_inputs: Any, path: Path, opset: int = 18, dynamic_batch: bool = True,
                rtol: float = 1e-4, **_: Any) -> Dict[str, Any]:
    """Export ``model`` to ONNX at ``path`` and verify it; returns what was measured."""
    inputs = normalize_inputs(example_inputs)
    tensors = [x for x in inputs if isinstance(x, torch.Tensor)]
    if getattr(model, "dnnshrink_specialized_to", None) is not None:
        dynamic_batch = False  # a network recorded on the example takes that example's shapes only
    dynamic = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1)
        dynamic = tuple({0: batch} if isinstance(x, torch.Tensor) else None for x in inputs)
    with atomic_path(path) as tmp:
        with model_mode(model, training=False), warnings.catch_warnings(), \
                contextlib.redirect_stdout(io.StringIO()) as log:
            warnings.simplefilter("ignore")
            try:
                torch.onnx.export(model, inputs, str(tmp), dynamo=True, opset_version=opset,
                                  dynamic_shapes=dynamic, external_data=False, verbose=False)
            except Exception as exc:
                hint = " Try dynamic_batch=False." if dynamic_batch else ""
                raise ExportError(f"torch's ONNX exporter failed: {type(exc).__name__}: {exc}{hint}\n{log.getvalue()[-2000:]}") from exc
        _check_opset(tmp, opset)
        error = verify_onnx(tmp, model, inputs, rtol)
        if dynamic_batch and tensors and tensors[0].shape[0] >= 1:
            doubled = tuple(torch.cat([x, x]) if isinstance(x, torch.Tensor) else x for x in inputs)
            error = max(error, verify_onnx(tmp, model, doubled, rtol))
    return {"path": str(path), "opset": opset, "dynamic_batch": dynamic_batch, "max_relative_error": error,
            "tolerance": rtol}
