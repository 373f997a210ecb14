"""What a pytorch artifact may contain: a closed, reviewed list of ops and layer classes.

A ``.dnnshrink`` file is data from somewhere else. Everything it names is looked up here by
its *exact* name, and anything not listed is refused before a graph or a layer is built:

* :data:`FUNCTIONS` — pure tensor functions of ``torch`` and ``torch.nn.functional``, the
  ``operator``/``math`` functions fx records for arithmetic on values and shapes, and
  ``torchvision.ops.stochastic_depth``. No name has a private (``_``) segment; nothing here
  reads or writes files, loads libraries or code, touches the network, or calls back into
  Python objects it is given.
* :data:`TENSOR_METHODS` — ``Tensor`` methods that compute (no I/O, no ``__dunder__``, no
  storage access, no hooks, nothing that takes a Python callable).
* :data:`TENSOR_ATTRIBUTES` — the only attributes ``getattr`` may read, on a tensor.
* :data:`LAYER_CLASSES` — ``torch.nn`` layers, rebuilt by calling their constructor with
  settings checked against its signature (see :mod:`.artifact`).

The exporter writes only what is listed, so every file it writes loads again. To widen the
list, add an exact name after reviewing what the function can do with any argument.
"""
from __future__ import annotations

import importlib
import keyword
import re
import sys
from typing import Any, Callable, Dict, Optional

import torch
from torch import nn

from dnnshrink_core.plugin_api import ArtifactError

_TORCH = """
abs absolute acos acosh add addcdiv addcmul addmm amax amin all any argmax argmin argsort asin asinh atan atan2
atanh baddbmm batch_norm bmm broadcast_to cat ceil channel_shuffle chunk clamp clamp_max clamp_min clip concat
concatenate conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d cos cosh cumprod cumsum diag
diff div divide dot dropout einsum eq erf erfc exp expm1 flatten flip floor floor_divide fmod gather ge
group_norm gt hardshrink index_select instance_norm isfinite isinf isnan layer_norm le lerp log log10 log1p log2
log_softmax logical_and logical_not logical_or logsumexp lt masked_fill matmul max maximum mean min minimum mm
moveaxis movedim mul multiply narrow ne neg negative norm ones_like outer permute pixel_shuffle pixel_unshuffle
pow prelu prod reciprocal relu remainder repeat_interleave reshape roll round rsqrt select selu sigmoid sign
sin sinh softmax sort split sqrt square squeeze stack std sub subtract sum swapaxes swapdims t tan tanh
tensor_split tile topk transpose tril triu true_divide unbind unflatten unsqueeze var where zeros_like full_like
zeros ones full arange linspace meshgrid
"""
_FUNCTIONAL = """
adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d adaptive_max_pool1d adaptive_max_pool2d
adaptive_max_pool3d affine_grid alpha_dropout avg_pool1d avg_pool2d avg_pool3d batch_norm bilinear celu
conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d cosine_similarity dropout dropout1d
dropout2d dropout3d elu embedding feature_alpha_dropout fold gelu glu grid_sample group_norm hardshrink
hardsigmoid hardswish hardtanh instance_norm interpolate layer_norm leaky_relu linear local_response_norm
log_softmax logsigmoid lp_pool1d lp_pool2d max_pool1d max_pool2d max_pool3d mish normalize one_hot pad
pairwise_distance pixel_shuffle pixel_unshuffle prelu relu relu6 rms_norm scaled_dot_product_attention selu
sigmoid silu softmax softmin softplus softshrink softsign tanh tanhshrink threshold unfold upsample
upsample_bilinear upsample_nearest
"""
_OPERATOR = """
abs add and_ eq floordiv ge getitem gt iadd iand ifloordiv imatmul imod imul invert ior ipow isub itruediv
ixor le lshift lt matmul mod mul ne neg not_ or_ pos pow rshift setitem sub truediv xor
"""
_MATH = "ceil exp fabs floor isqrt log log2 pow sqrt trunc"
_TORCHVISION = "stochastic_depth"

_TENSOR_METHOD_NAMES = """
abs add addmm all amax amin any argmax argmin bfloat16 bmm bool chunk clamp clamp_max clamp_min clip clone
contiguous cos cumsum detach dim div double eq exp expand expand_as flatten flip float floor gather ge gt half
index_select int le log log_softmax long lt masked_fill matmul max mean min mul narrow ne neg new_full
new_ones new_zeros norm numel permute pow prod reciprocal relu repeat repeat_interleave reshape reshape_as
roll round rsqrt select sigmoid sign sin size softmax sort split sqrt square squeeze std sub sum swapaxes t
tanh tile to topk transpose type_as unbind unflatten unsqueeze var view view_as where
add_ clamp_ div_ fill_ masked_fill_ mul_ relu_ sigmoid_ sub_ zero_
"""

#: ``Tensor`` methods an artifact may call, by name.
TENSOR_METHODS = frozenset(_TENSOR_METHOD_NAMES.split())

#: The only attributes ``getattr`` may read (from a value the graph computed).
TENSOR_ATTRIBUTES = frozenset({"shape", "dtype", "device", "ndim", "T", "mT", "layout", "is_cuda"})

_LAYERS = """
AdaptiveAvgPool1d AdaptiveAvgPool2d AdaptiveAvgPool3d AdaptiveMaxPool1d AdaptiveMaxPool2d AdaptiveMaxPool3d
AlphaDropout AvgPool1d AvgPool2d AvgPool3d BatchNorm1d BatchNorm2d BatchNorm3d Bilinear CELU ChannelShuffle
CircularPad1d CircularPad2d CircularPad3d ConstantPad1d ConstantPad2d ConstantPad3d Conv1d Conv2d Conv3d
ConvTranspose1d ConvTranspose2d ConvTranspose3d Dropout Dropout1d Dropout2d Dropout3d ELU Embedding Flatten
GELU GLU GroupNorm Hardshrink Hardsigmoid Hardswish Hardtanh Identity InstanceNorm1d InstanceNorm2d
InstanceNorm3d LayerNorm LeakyReLU Linear LocalResponseNorm LogSigmoid LogSoftmax MaxPool1d MaxPool2d MaxPool3d
Mish MultiheadAttention PixelShuffle PixelUnshuffle PReLU ReflectionPad1d ReflectionPad2d ReflectionPad3d ReLU
ReLU6 ReplicationPad1d ReplicationPad2d ReplicationPad3d RMSNorm SELU SiLU Sigmoid Softmax Softmax2d Softmin
Softplus Softshrink Softsign Tanh Tanhshrink Threshold Unflatten Upsample UpsamplingBilinear2d
UpsamplingNearest2d ZeroPad1d ZeroPad2d ZeroPad3d
"""


def shape_assert(condition: Any, message: str = "") -> None:
    """Stands in for ``torch._assert`` (a private name): raise if a traced shape check fails."""
    if not condition:
        raise AssertionError(message)


#: Exact name -> where to find it. Names this torch lacks are simply unavailable.
_SOURCES: Dict[str, str] = {
    **{f"torch.{n}": "torch" for n in _TORCH.split()},
    **{f"torch.nn.functional.{n}": "torch.nn.functional" for n in _FUNCTIONAL.split()},
    **{f"operator.{n}": "operator" for n in _OPERATOR.split()},
    **{f"math.{n}": "math" for n in _MATH.split()},
    **{f"torchvision.ops.{n}": "torchvision.ops" for n in _TORCHVISION.split()},
}
#: Functions the exporter replaces by a listed stand-in (same behaviour, public name).
_STAND_INS: Dict[str, Callable[..., Any]] = {"dnnshrink.shape_assert": shape_assert}
_REPLACED = {"torch._assert": "dnnshrink.shape_assert"}
GETATTR = "builtins.getattr"

#: Every function name an artifact may call.
FUNCTIONS = frozenset(_SOURCES) | frozenset(_STAND_INS) | {GETATTR}


def resolve_function(name: Any) -> Callable[..., Any]:
    """The function an artifact names, if :data:`FUNCTIONS` lists it; otherwise :class:`ArtifactError`."""
    if not isinstance(name, str) or name not in FUNCTIONS:
        raise ArtifactError(f"the artifact calls `{name}`, which is not on dnnshrink's list of safe ops: "
                            "refusing to load it")
    if name == GETATTR:
        return getattr
    if name in _STAND_INS:
        return _STAND_INS[name]
    module = _SOURCES[name]
    try:
        value = getattr(importlib.import_module(module), name[len(module) + 1:])
    except (ImportError, AttributeError) as exc:
        raise ArtifactError(f"the artifact calls `{name}`, which this installation does not have "
                            f"({type(exc).__name__}: {exc})") from exc
    return value


def function_name(target: Any) -> Optional[str]:
    """The listed name of ``target`` (a function fx recorded), or ``None`` if it is not listed."""
    for name, value in _reverse().items():
        if value is target:
            return name
    return None


_REVERSE_CACHE: Dict[bool, Dict[str, Any]] = {}


def _reverse() -> Dict[str, Any]:
    """Listed name -> function, for the modules that are loaded (torchvision only if the model
    imported it: exporting must not import a library the model never used)."""
    with_vision = "torchvision.ops" in sys.modules
    if with_vision not in _REVERSE_CACHE:
        table: Dict[str, Any] = {GETATTR: getattr, _REPLACED["torch._assert"]: getattr(torch, "_assert", None)}
        for name, module in _SOURCES.items():
            if module == "torchvision.ops" and not with_vision:
                continue
            value = getattr(importlib.import_module(module), name[len(module) + 1:], None)
            if value is not None:
                table.setdefault(name, value)
        _REVERSE_CACHE[with_vision] = table
    return _REVERSE_CACHE[with_vision]


def check_method(name: Any) -> str:
    """``name`` if it is a listed ``Tensor`` method; otherwise :class:`ArtifactError`."""
    if not isinstance(name, str) or name not in TENSOR_METHODS:
        raise ArtifactError(f"the artifact calls the method `{name}`, which is not on dnnshrink's list of safe "
                            "Tensor methods: refusing to load it")
    return name


#: Exact stored name (``torch.nn.Conv2d``) -> layer class.
LAYER_CLASSES: Dict[str, type] = {f"torch.nn.{n}": getattr(nn, n) for n in _LAYERS.split() if hasattr(nn, n)}
_LAYER_NAMES = {cls: name for name, cls in LAYER_CLASSES.items()}
_PATH_PART = re.compile(r"[A-Za-z0-9_-]+")


def layer_class(name: Any) -> type:
    """The listed ``torch.nn`` layer class ``name`` names; otherwise :class:`ArtifactError`."""
    if not isinstance(name, str) or name not in LAYER_CLASSES:
        raise ArtifactError(f"the artifact asks for layer class `{name}`, which is not on dnnshrink's list of "
                            "torch.nn layers: refusing to load it")
    return LAYER_CLASSES[name]


def layer_name(cls: type) -> Optional[str]:
    """The stored name of a listed layer class (exactly that class, not a subclass), or ``None``."""
    return _LAYER_NAMES.get(cls)


def is_identifier(name: Any) -> bool:
    """A plain Python name: an identifier, not a keyword, not a ``__dunder__``."""
    return (isinstance(name, str) and name.isascii() and name.isidentifier() and not keyword.iskeyword(name)
            and not (name.startswith("__") and name.endswith("__")))


def is_path(path: Any) -> bool:
    """A dotted layer path (``layer1.0.conv1``, ``block1-0.proj``): parts of letters, digits, ``_``
    and ``-`` only. fx writes a part that is not an identifier into generated code inside
    quotes it does not escape, so nothing else may pass; no part may be a ``__dunder__``."""
    return isinstance(path, str) and all(
        _PATH_PART.fullmatch(p) and not (p.startswith("__") and p.endswith("__")) for p in path.split("."))


__all__ = ["FUNCTIONS", "GETATTR", "LAYER_CLASSES", "TENSOR_ATTRIBUTES", "TENSOR_METHODS", "check_method",
           "function_name", "is_identifier", "is_path", "layer_class", "layer_name", "resolve_function",
           "shape_assert"]
