"""The ``onnx`` exporter: torch's ONNX exporter, then a check that the file really works.

Every export is verified before it is reported as done: ``onnx.checker``, then
onnxruntime on the example input (and, with a dynamic batch, on a batch of a different
size) compared with PyTorch. A mismatch is an :class:`~dnnshrink_core.errors.ExportError`
giving the measured relative error and the tolerance, unless the network amplifies rounding
so much that PyTorch's own output is further than that from a float64 copy's (deep networks
with random weights): then, where that error is at most 5%, every output of onnxruntime must
be within twice it of the float64 output, and a warning and the result say so.
"""
from __future__ import annotations

import contextlib
import copy
import io
import logging
import re
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from dnnshrink_core.plugin_api import (atomic_path, DnnshrinkWarning, ExportError, flatten_outputs, model_mode,
                                       normalize_inputs)


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
    """Check an ONNX file and compare onnxruntime's outputs with PyTorch's; returns the worst
    error (see :func:`checked_onnx` for the case of a network that amplifies rounding)."""
    return checked_onnx(path, model, inputs, rtol, threads)[0]


def checked_onnx(path: Path, model: nn.Module, inputs: tuple, rtol: float,
                 threads: int = 2) -> Tuple[float, Optional[Dict[str, Any]]]:
    """:func:`verify_onnx`'s check: the worst relative error of onnxruntime's outputs against
    PyTorch's, and None; or, where that is over ``rtol`` because PyTorch cannot reproduce its
    own output in its precision (:func:`_float64_judgement`), the error and that judgement.
    Anything else over ``rtol`` is an :class:`ExportError`."""
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
    try:
        outputs = session.run(None, feeds)
    except Exception as exc:  # onnxruntime's own errors: said as the export's
        raise ExportError(f"onnxruntime could not run the exported model on the example: {exc}") from exc
    worst = max(relative_errors(reference, outputs), default=0.0)
    if worst < rtol:
        return worst, None
    judged, why = _float64_judgement(model, inputs, outputs, rtol)
    if judged is None:
        raise ExportError(f"onnxruntime's output differs from PyTorch's: relative error {worst:.3e} "
                          f"exceeds the tolerance {rtol:.0e}{why}")
    return worst, judged


# PyTorch's own error (its precision against float64) above which an output counts as one
# the network's rounding moves (EfficientNetV2-XL with random weights: 0.73; a trained or
# shallow network: ~1e-7), and the most of it that still leaves a comparison meaningful
# (a relative error of 1 is an output of zeros)
ILL_CONDITIONED, MOST_EXCUSED = 1e-4, 0.05


def _float64_judgement(model: nn.Module, inputs: tuple, outputs: List[np.ndarray],
                       rtol: float) -> Tuple[Optional[Dict[str, Any]], str]:
    """Whether onnxruntime's ``outputs``, over ``rtol`` from PyTorch's, are as exact as the
    network's own rounding allows: per output, PyTorch's error in its own precision against
    a float64 copy's output (``own``); every output must be within ``max(rtol, 2 · own)`` of
    the float64 one, and the excuse holds only where ``own`` is over ``rtol`` and at most
    :data:`MOST_EXCUSED`. Returns the judgement (the worst ``own``, onnxruntime's worst error
    against float64, the precision) or None with what to add to the error; None also where
    the model cannot run in float64 or two runs of it differ (noise is not rounding)."""
    try:
        exact_model = copy.deepcopy(model).cpu().double()
        doubled = tuple(x.detach().cpu().double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x
                        for x in inputs)
        with torch.no_grad(), model_mode(exact_model, training=False), model_mode(model, training=False):
            exact = [t.double() for t in flatten_outputs(exact_model(*doubled))]
            single = [t.detach().cpu() for t in flatten_outputs(model(*inputs))]
            again = [_array(t) for t in flatten_outputs(model(*inputs))]
    except Exception:  # an op without a float64 kernel, a model that pins its dtype: judged strictly
        return None, ""
    if len(exact) != len(outputs) or max(relative_errors(single, again), default=0.0) > 1e-6:
        return None, ""
    own = relative_errors(exact, [_array(t) for t in single])
    against = relative_errors(exact, outputs)
    precision = str(single[0].dtype).replace("torch.", "") if single else "float32"
    if max(own, default=0.0) <= max(rtol, ILL_CONDITIONED):
        return None, ""  # the network reproduces itself: the difference is the export's
    if max(own) > MOST_EXCUSED:
        return None, (f"; this network cannot be checked on the example: PyTorch's own {precision} output is "
                      f"{max(own):.2g} (relative) from its float64 output, too far for a comparison to mean anything "
                      "(deep networks with random weights amplify rounding so; a trained network is checked to the "
                      "tolerance)")
    if any(a > max(rtol, 2 * o) for a, o in zip(against, own)):
        return None, ""
    return {"precision": precision, "own_error": max(own), "error_vs_float64": max(against)}, ""


def _array(tensor: torch.Tensor) -> np.ndarray:
    """A CPU tensor as numpy, a floating one through float64 (numpy has no bfloat16)."""
    tensor = tensor.detach().cpu()
    return (tensor.double() if tensor.is_floating_point() else tensor).numpy()


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@contextlib.contextmanager
def _torch_logs_silenced() -> Iterator[None]:
    """No log records while torch's exporter runs: where a dynamic batch fails (two of
    torchvision's ConvNeXt blocks in a row), torch logs each failed guard with its traceback
    at ERROR level, some 150 lines on stderr, before raising the error this module reports
    in one line and falls back from. The level set by ``logging.disable`` before is restored."""
    before = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(before)


def _torch_export(model: nn.Module, inputs: tuple, path: Path, opset: int, dynamic: Any) -> Optional[Exception]:
    """Export a copy of ``model`` with torch's exporter; the exception it raised, or None.

    The exporter runs the forward on symbolic tensors, and a forward that caches what it
    computes on its module (ultralytics' Detect head keeps its anchors and the input shape)
    would keep those symbolic values: every later call of the model then fails. So a copy
    is exported; the model itself is what the export is checked against."""
    exported = copy.deepcopy(model)
    with model_mode(exported, training=False), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            _torch_logs_silenced():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(exported, inputs, str(path), dynamo=True, opset_version=opset, dynamic_shapes=dynamic,
                              external_data=False, verbose=False)
        except Exception as exc:
            return exc
    return None


def _first_line(exc: Exception) -> str:
    """An exception's type and the first line of its message, without terminal colours."""
    text = _ANSI.sub("", str(exc)).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}"


def _data_dependent(exc: Exception) -> bool:
    """Whether torch.export failed on a size set by the values (its guard on a data-dependent
    symbol), which no batch setting changes."""
    text = str(exc)
    return "DataDependent" in type(exc).__name__ or "data-dependent" in text or "data dependent" in text


def _export_failure(exc: Exception) -> str:
    """What to tell the user when torch's exporter fails: its error (colours stripped, the
    first lines), and for sizes set by the values (a detector's post-processing), what to do."""
    lines = [line for line in _ANSI.sub("", str(exc)).strip().splitlines() if line.strip()]
    summary = [i for i, line in enumerate(lines) if line.startswith("## Exception summary")]
    if summary:  # torch's exporter puts its advice first and the error after this heading
        lines = lines[summary[0] + 1:]
    message = f"torch's ONNX exporter failed: {type(exc).__name__}: " + "\n".join(lines[:8])[:2000]
    if _data_dependent(exc):
        message += ("\nThe model's forward has sizes set by its values (non-maximum suppression, scores over a "
                    "threshold), which torch.export cannot follow: export the part of the model before them (a "
                    "detector's backbone and head) and run the post-processing outside the ONNX model.")
    return message


def _fixed_batch(model: Any) -> Any:
    """The batch size an ONNX model's first input is fixed to, or None when it is symbolic."""
    graph = model.graph
    dims = graph.input[0].type.tensor_type.shape.dim if graph.input else ()
    return dims[0].dim_value if dims and not dims[0].dim_param and dims[0].HasField("dim_value") else None


def _check_opset(model: Any, opset: int) -> None:
    got = next((op.version for op in model.opset_import if op.domain in ("", "ai.onnx")), None)
    if got != opset:
        raise ExportError(f"the ONNX model came out with opset {got}, not the requested {opset} (torch's exporter "
                          "could not convert every op); ask for opset 18 or newer")


def export_onnx(model: nn.Module, example_inputs: Any, path: Path, opset: int = 18, dynamic_batch: bool = True,
                rtol: float = 1e-4, **_: Any) -> Dict[str, Any]:
    """Export ``model`` to ONNX at ``path`` and verify it; returns what was measured."""
    import onnx

    inputs = normalize_inputs(example_inputs)
    tensors = [x for x in inputs if isinstance(x, torch.Tensor)]
    if getattr(model, "dnnshrink_specialized_to", None) is not None:
        dynamic_batch = False  # a network recorded on the example takes that example's shapes only
    dynamic = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1)
        dynamic = tuple({0: batch} if isinstance(x, torch.Tensor) else None for x in inputs)
    with atomic_path(path) as tmp:
        failure = _torch_export(model, inputs, tmp, opset, dynamic)
        also = ""
        if failure is not None and dynamic is not None and not _data_dependent(failure):
            fixed_failure = _torch_export(model, inputs, tmp, opset, None)
            if fixed_failure is None:
                warnings.warn(f"dnnshrink: torch's ONNX exporter could not give {type(model).__name__} a dynamic "
                              f"batch ({_first_line(failure)}): the ONNX model takes batch {tensors[0].shape[0]} only",
                              DnnshrinkWarning, stacklevel=3)
                dynamic_batch = False
            also = f"\n(With a dynamic batch it failed first: {_first_line(failure)})"
            failure = fixed_failure
        if failure is not None:
            raise ExportError(_export_failure(failure) + also) from failure
        written = onnx.load(str(tmp), load_external_data=False)  # read once for both checks
        _check_opset(written, opset)
        fixed = _fixed_batch(written) if dynamic_batch and tensors else None
        if fixed is not None:
            warnings.warn(f"dnnshrink: torch's ONNX exporter fixed the batch size of {type(model).__name__} to "
                          f"{fixed} (its forward depends on the batch size, for example by keeping the input's "
                          "shape): the ONNX model takes that batch size only", DnnshrinkWarning, stacklevel=3)
            dynamic_batch = False
        error, judged = checked_onnx(tmp, model, inputs, rtol)
        if dynamic_batch and tensors and tensors[0].shape[0] >= 1:
            doubled = tuple(torch.cat([x, x]) if isinstance(x, torch.Tensor) else x for x in inputs)
            try:
                error = max(error, verify_onnx(tmp, model, doubled, rtol))
            except ExportError as exc:  # the exporter followed the example's batch: it holds that one only
                if _torch_export(model, inputs, tmp, opset, None) is not None:
                    raise
                warnings.warn(f"dnnshrink: the ONNX model of {type(model).__name__} with a dynamic batch computes "
                              f"another batch size wrongly ({exc}): exported for batch {tensors[0].shape[0]} only",
                              DnnshrinkWarning, stacklevel=3)
                dynamic_batch = False
                error, judged = checked_onnx(tmp, model, inputs, rtol)
    result = {"path": str(path), "opset": opset, "dynamic_batch": dynamic_batch, "max_relative_error": error,
              "tolerance": rtol}
    if judged is not None:  # checked against float64 by the network's own rounding: said, and kept
        result["checked_against_float64"] = judged
        warnings.warn(f"dnnshrink: {type(model).__name__} amplifies rounding: PyTorch's own {judged['precision']} "
                      f"output is {judged['own_error']:.2e} (relative) from its float64 output on the example, so "
                      f"the ONNX model cannot be checked to {rtol:.0e}; every output of onnxruntime is within twice "
                      f"that of the float64 output (worst {judged['error_vs_float64']:.2e}). Deep networks with "
                      "random weights do this; a trained one is checked to the tolerance.", DnnshrinkWarning,
                      stacklevel=4)
    return result
