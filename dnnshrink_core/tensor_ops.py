"""The memory-bound ops around the conv/linear layers that a runtime runs as passes of their
own: activations it does not fuse into the convolution before them, the residual add, the
squeeze-excitation multiply, pooling, concatenation (a copy of every channel it joins), a
transpose of a feature map (ShuffleNet's channel shuffle, a transformer's layout changes: the
exported graph copies the tensor), a normalisation other than BatchNorm (LayerNorm,
GroupNorm: ``norm``) and a softmax (attention's scores).

A latency cost that prices only conv/linear layers under-predicts networks full of them:
onnxruntime's CPU profile of EfficientNet-B0 spends 43% of its time outside its
convolutions (SiLU 19%, layout reorders around them 12%, the excitation multiplies 6.5%,
pooling 3%), MobileNetV3-Large 24%, MobileNetV2 3% and ResNet-18 2%. Each such op is a
:class:`~dnnshrink_core.graph.LayerCost` of kind ``"tensor"`` whose ``op`` names what it is
(:data:`TENSOR_KINDS`); cost models that declare ``prices_tensor_ops = True`` (the
``latency`` one) get them as extra rows of their :class:`~dnnshrink_core.cost.LayerTable`,
the others never see them. Whether an op is really a pass of its own on a runtime is
measured, not assumed: ``dnnshrink calibrate`` asks the runtime which kinds it fuses into the
convolution before them (those cost nothing: the profile leaves them out) and fits the
others to timed chains.

ReLU is not among them: every convolution of the calibration's sweep carries one (as a
BatchNorm-folded network has it), so its cost is part of the layers' own constants.
"""
from __future__ import annotations

import math
import operator
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from .graph import LayerCost
from .handler import node_arg

_JOINS = {torch.cat, torch.concat, torch.concatenate}
_RESHAPES = {"view", "reshape", "flatten", "unflatten", "transpose", "permute", "contiguous", "view_as",
             torch.reshape, torch.flatten, torch.transpose, torch.permute, torch.channel_shuffle}
_SHAPE_READS = {"size", "dim", getattr}  # what reads a tensor's shape, not its data
# the row that follows a concatenation's row for each of its inputs (its channels), so that a
# cost model can tell whether every piece fits a runtime's block; it costs nothing itself
PIECE = "piece"
# what a profile may price; an activation not named here is priced as ``sigmoid`` (one
# unfused pass through memory; see _ACTIVATION_MODULES)
TENSOR_KINDS = ("clip", "hardswish", "hardsigmoid", "sigmoid", "silu", "gelu", "add", "mul", "pool", "concat",
                "transpose", "norm", "softmax")

_ACTIVATION_MODULES = (
    (nn.ReLU, None), (nn.ReLU6, "clip"), (nn.Hardtanh, "clip"), (nn.Hardswish, "hardswish"),
    (nn.Hardsigmoid, "hardsigmoid"), (nn.Sigmoid, "sigmoid"), (nn.SiLU, "silu"), (nn.GELU, "gelu"),
    (nn.Tanh, "sigmoid"), (nn.LeakyReLU, "sigmoid"), (nn.ELU, "sigmoid"), (nn.Mish, "sigmoid"),
    (nn.Softplus, "sigmoid"), (nn.PReLU, "sigmoid"), (nn.SELU, "sigmoid"), (nn.CELU, "sigmoid"),
)
# normalisations a network runs as passes of their own (a BatchNorm is folded into its conv)
_NORM_MODULES = (nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm, nn.LocalResponseNorm) \
    + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
_SOFTMAX_MODULES = (nn.Softmax, nn.LogSoftmax, nn.Softmin)
_POOL_MODULES = (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
                 nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd)
_FUNCTIONS: Dict[Any, Optional[str]] = {
    F.relu: None, torch.relu: None, F.relu6: "clip", F.hardtanh: "clip", torch.clamp: "clip",
    torch.clip: "clip", F.hardswish: "hardswish", F.hardsigmoid: "hardsigmoid", torch.sigmoid: "sigmoid",
    F.sigmoid: "sigmoid", F.silu: "silu", F.gelu: "gelu", torch.tanh: "sigmoid", F.tanh: "sigmoid",
    F.leaky_relu: "sigmoid", F.elu: "sigmoid", F.mish: "sigmoid", F.softplus: "sigmoid",
    operator.add: "add", operator.iadd: "add", torch.add: "add", operator.mul: "mul", operator.imul: "mul",
    torch.mul: "mul", F.max_pool1d: "pool", F.max_pool2d: "pool", F.max_pool3d: "pool",
    F.avg_pool1d: "pool", F.avg_pool2d: "pool", F.avg_pool3d: "pool", F.adaptive_avg_pool1d: "pool",
    F.adaptive_avg_pool2d: "pool", F.adaptive_avg_pool3d: "pool", F.adaptive_max_pool2d: "pool",
    torch.mean: "pool", torch.cat: "concat", torch.concat: "concat", torch.concatenate: "concat",
    torch.transpose: "transpose", torch.permute: "transpose", torch.swapaxes: "transpose",
    torch.swapdims: "transpose", torch.movedim: "transpose", torch.moveaxis: "transpose",
    F.layer_norm: "norm", F.group_norm: "norm", F.instance_norm: "norm", F.normalize: "norm", F.rms_norm: "norm",
    F.softmax: "softmax", torch.softmax: "softmax", F.log_softmax: "softmax", torch.log_softmax: "softmax",
    # other elementwise arithmetic runs as its own pass, like the excitation multiply
    operator.truediv: "mul", operator.itruediv: "mul", torch.div: "mul", torch.true_divide: "mul",
    operator.sub: "mul", operator.isub: "mul", torch.sub: "mul",
    # a pad copies every element into a larger tensor, as a concatenation does
    F.pad: "concat",
}
_METHODS: Dict[str, Optional[str]] = {
    "relu": None, "relu_": None, "clamp": "clip", "clamp_": "clip", "clip": "clip", "sigmoid": "sigmoid",
    "sigmoid_": "sigmoid", "tanh": "sigmoid", "add": "add", "add_": "add", "mul": "mul", "mul_": "mul",
    "mean": "pool", "transpose": "transpose", "permute": "transpose", "swapaxes": "transpose",
    "swapdims": "transpose", "movedim": "transpose", "moveaxis": "transpose", "softmax": "softmax",
    "log_softmax": "softmax", "div": "mul", "div_": "mul", "sub": "mul", "sub_": "mul",
}


def _after_conv(node: fx.Node, modules: Callable[[str], Optional[nn.Module]]) -> bool:
    """Whether ``node``'s input is a convolution's output (which an export folds a
    BatchNorm into)."""
    source = node.args[0] if node.args else None
    if not isinstance(source, fx.Node):
        return False
    if source.op == "call_module":
        return isinstance(modules(str(source.target)), nn.modules.conv._ConvNd)
    return source.op == "call_function" and source.target in (F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d,
                                                              F.conv_transpose2d, F.conv_transpose3d)


def tensor_op_kind(node: fx.Node, module: Optional[nn.Module],
                   modules: Optional[Callable[[str], Optional[nn.Module]]] = None) -> Optional[str]:
    """The :data:`TENSOR_KINDS` entry ``node`` is priced as, or None (not a pass of its own:
    a layer, ReLU, a reshape, a slice…). A BatchNorm is folded into the conv before it; one
    that follows anything else (a linear over tokens, a concatenation in a pre-activation
    block) runs as a per-channel scale and shift, priced as ``mul`` (``modules`` looks up
    the module a node calls, to tell which)."""
    if node.op == "call_module":
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return None if modules is None or _after_conv(node, modules) else "mul"
        if isinstance(module, _POOL_MODULES):
            return "pool"
        if isinstance(module, _NORM_MODULES):
            return "norm"
        if isinstance(module, _SOFTMAX_MODULES):
            return "softmax"
        for cls, kind in _ACTIVATION_MODULES:
            if isinstance(module, cls):
                return kind
        return None
    if node.op == "call_function":
        if node.target is F.batch_norm:
            return None if modules is None or _after_conv(node, modules) else "mul"
        try:
            return _FUNCTIONS.get(node.target)
        except TypeError:  # an unhashable target
            return None
    if node.op == "call_method":
        return _METHODS.get(str(node.target))
    return None


def _positions(spec: Any, dim: int) -> Optional[float]:
    """Elements per channel and row of the leading dimension of a traced tensor with channels
    at ``dim`` (:meth:`~dnnshrink_core.tracing.TracedGraph.per_image` makes it per image)."""
    shape = getattr(spec, "shape", None)
    if shape is None or len(shape) < 2 or dim == 0:
        return None
    per_image = math.prod(shape[1:])
    return per_image / shape[dim] if shape[dim] else None


def find_tensor_ops(graph: Any) -> List[LayerCost]:
    """Every tensor op of ``graph`` (a :class:`~dnnshrink_core.graph.ChannelGraph`) whose
    output's channels the graph follows, as a :class:`LayerCost` of kind ``"tensor"``:
    ``op`` its kind, ``in_units`` = ``out_units`` its channels, ``out_positions`` the
    elements it writes per channel and image, ``in_positions`` the elements it reads per
    channel (every operand with those channels: an add reads two, the excitation multiply
    one whole tensor and one value per channel). A concatenation along the channels is
    followed by one row of op :data:`PIECE` per input (its units; no cost of its own). Only
    the first traced mode counts."""
    from .labels import Chan

    trace = graph.traces[0]
    found = []
    for node in trace.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        module = trace.get_submodule(node.target) if node.op == "call_module" else None
        kind = tensor_op_kind(node, module, trace.get_submodule)
        out = trace.values.get(node)
        if kind is None or not isinstance(out, Chan) or not len(out.labels):
            continue
        spec = trace.specs.get(node)
        written = _positions(spec, out.dim)
        if written is None:
            continue
        written *= trace.per_image(node)
        read = 0.0
        for arg in node.all_input_nodes:
            value = trace.values.get(arg)
            if isinstance(value, Chan) and len(value.labels) == len(out.labels):
                read += (_positions(trace.specs.get(arg), value.dim) or 0.0) * trace.per_image(arg)
        units = graph.unit_of[out.labels]
        name = trace.module_names.get(node, node.name)
        rows = _rows(node, module, kind, spec)
        found.append(LayerCost(name, "tensor", units, units, 0.0, weight="-", op=kind,
                               positions=(read or written, written),
                               rows=None if rows is None else rows * trace.per_image(node)))
        if kind == "concat" and node.target in _JOINS and not _into_reshape(node):
            found += [LayerCost(name, "tensor", piece, piece, 0.0, weight="-", op=PIECE, positions=(0.0, 0.0))
                      for piece in _pieces(node, out, trace, graph)]
    return found


def _into_reshape(node: fx.Node) -> bool:
    """Whether everything that reads a join's output is a reshape or a read of its shape
    (ShuffleNet shuffles what it joined): the output leaves a blocked layout anyway, so the
    pieces' widths do not matter and none are given (priced as a join whose pieces miss the
    block, the quarter-width ShuffleNetV2 went from 21% under to 20% over in one timing)."""
    return bool(node.users) and all(user.op in ("call_function", "call_method")
                                    and (user.target in _RESHAPES or user.target in _SHAPE_READS)
                                    for user in node.users)


def _pieces(node: fx.Node, out: Any, trace: Any, graph: Any) -> List[Any]:
    """The units of each input of a join of feature maps along their channels (dim 1 of a
    tensor of rank 4 or more, where runtimes keep a blocked-channel layout), in order; none
    for a pad, a join of tokens, or when an input's channels are not followed."""
    tensors, dim = node_arg(node, 0, "tensors"), node_arg(node, 1, "dim", None)
    dim = node_arg(node, 1, "axis", 0) if dim is None else dim  # torch.concatenate names it axis
    rank = len(getattr(trace.specs.get(node), "shape", ()))
    if not isinstance(tensors, (list, tuple)) or len(tensors) < 2 or not isinstance(dim, int) or rank < 4 \
            or dim % rank != out.dim or out.dim != 1:
        return []
    pieces = []
    for arg in tensors:
        value = trace.values.get(arg) if isinstance(arg, fx.Node) else None
        if value is None or getattr(value, "dim", None) != out.dim or not len(getattr(value, "labels", ())):
            return []
        pieces.append(graph.unit_of[value.labels])
    return pieces if sum(len(p) for p in pieces) == len(out.labels) else []


def _softmax_dim(node: fx.Node, module: Optional[nn.Module]) -> Any:
    if module is not None:
        return getattr(module, "dim", None)
    return node_arg(node, 1, "dim")  # (input or self, dim)


_RMS = (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()


def _size(shape: Any, dim: Any) -> Optional[int]:
    """``shape[dim]``, or None when ``dim`` is not a dimension of it."""
    return shape[dim] if isinstance(dim, int) and -len(shape) <= dim < len(shape) else None


def _rows(node: fx.Node, module: Optional[nn.Module], kind: str, spec: Any) -> Optional[float]:
    """The rows a normalisation or softmax normalises one by one, per row of the leading
    dimension (None for other ops, or when that cannot be told): a softmax's slices along
    its dim, a LayerNorm's along its normalised shape, a GroupNorm's groups."""
    shape = getattr(spec, "shape", None)
    if kind not in ("norm", "softmax") or shape is None or len(shape) < 2:
        return None
    per_item = math.prod(shape[1:])
    length: Any = None
    if kind == "softmax":
        length = _size(shape, _softmax_dim(node, module))
    elif isinstance(module, (nn.LayerNorm,) + _RMS) or node.target in (F.layer_norm, getattr(F, "rms_norm", None)):
        normalized = module.normalized_shape if module is not None else node_arg(node, 1, "normalized_shape")
        length = math.prod(normalized) if isinstance(normalized, (tuple, list)) else normalized
    elif isinstance(module, nn.GroupNorm) or node.target is F.group_norm:
        groups = module.num_groups if module is not None else node_arg(node, 1, "num_groups")
        return float(groups) if isinstance(groups, int) and groups > 0 else None
    elif node.target is F.normalize:
        length = _size(shape, node_arg(node, 2, "dim", 1))
    else:  # an instance norm: one row per channel
        length = math.prod(shape[2:]) if len(shape) > 2 else None
    return per_item / length if isinstance(length, int) and length > 0 else None
