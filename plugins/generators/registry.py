"""Which handler serves which op: lookup tables by module class, function and method name."""
from __future__ import annotations

import operator
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from dnnshrink_core.plugin_api import OpHandler

from .elementwise import (BinaryHandler, ClampHandler, FactoryHandler, FrozenPassThrough, LikeHandler, PassThrough,
                          ReductionHandler, SoftmaxHandler, table)
from .functional import (ATTENTION, BATCH_NORM_FUNCTION, CONV_FUNCTION, EINSUM, LAYER_NORM, LINEAR_FUNCTION, MATMUL,
                         NORMALIZE, PIXEL_SHUFFLE, PIXEL_UNSHUFFLE, STACK, UNBIND)
from .layers import BATCHNORM, CONV, INSTANCENORM, LINEAR, PRELU
from .padding import PAD_FUNCTION, PAD_MODULE
from .shape import EXPAND, PERMUTE, RESHAPE
from .slicing import CAT, CHUNK, GETITEM, SPLIT, TUPLE

ZERO = PassThrough("zero-preserving")
NONZERO = PassThrough("elementwise", zero_preserving=False)
SPATIAL = PassThrough("spatial", elementwise=False)  # pooling, interpolation: channels at dim 1 only
FROZEN = FrozenPassThrough("channel-coupling")
SOFTMAX = SoftmaxHandler()
ADD, MUL, DIV = BinaryHandler("add", "add"), BinaryHandler("mul", "mul"), BinaryHandler("div", "div")
CLAMP = ClampHandler((1, "min"), (2, "max"))
HARDTANH = ClampHandler((1, "min_val", -1.0), (2, "max_val", 1.0))
REDUCE = ReductionHandler("reduction")
FACTORY = FactoryHandler()
ZEROS_LIKE, CONST_LIKE = LikeHandler(zero=True), LikeHandler(zero=False)

MODULES: Dict[type, OpHandler] = {
    nn.modules.conv._ConvNd: CONV,
    nn.Linear: LINEAR,
    nn.modules.batchnorm._BatchNorm: BATCHNORM,
    nn.modules.instancenorm._InstanceNorm: INSTANCENORM,
    nn.PReLU: PRELU,
    nn.modules.padding._ConstantPadNd: PAD_MODULE,
    nn.modules.padding._ReflectionPadNd: PAD_MODULE,
    nn.modules.padding._ReplicationPadNd: PAD_MODULE,
    nn.Flatten: RESHAPE,
    nn.Unflatten: RESHAPE,
    nn.Softmax: SOFTMAX, nn.LogSoftmax: SOFTMAX, nn.Softmin: SOFTMAX,
    nn.Hardtanh: ZERO,  # ReLU6 derives from it; its range always holds zero
    **table([nn.ReLU, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish,
             nn.Tanh, nn.Softsign, nn.Tanhshrink, nn.Softshrink, nn.Hardshrink, nn.Identity,
             nn.modules.dropout._DropoutNd], ZERO),
    **table([nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
             nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
             nn.modules.pooling._LPPoolNd, nn.Upsample], SPATIAL),
    **table([nn.Sigmoid, nn.Hardsigmoid, nn.Softplus, nn.LogSigmoid, nn.Threshold], NONZERO),
    **table([nn.GroupNorm, nn.LocalResponseNorm, nn.Softmax2d, nn.ChannelShuffle], FROZEN),
    nn.LayerNorm: LAYER_NORM,
    nn.PixelShuffle: PIXEL_SHUFFLE,
    nn.PixelUnshuffle: PIXEL_UNSHUFFLE,
}

FUNCTIONS: Dict[Any, OpHandler] = {
    **table([F.relu, torch.relu, F.relu_, torch.relu_, F.relu6, F.leaky_relu, F.leaky_relu_, F.elu, F.selu,
             F.celu, F.gelu, F.silu, F.mish, F.hardswish, torch.tanh, F.tanh, F.softsign, F.tanhshrink,
             F.hardshrink, F.softshrink, torch.abs, torch.neg,
             F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout], ZERO),
    **table([F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
             F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
             F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
             F.lp_pool1d, F.lp_pool2d, F.interpolate, F.upsample, F.upsample_nearest, F.upsample_bilinear], SPATIAL),
    **table([torch.sigmoid, F.sigmoid, F.hardsigmoid, F.softplus, F.logsigmoid, torch.exp], NONZERO),
    **table([torch.clamp, torch.clip], CLAMP),
    F.hardtanh: HARDTANH,
    **table([F.softmax, F.log_softmax, F.softmin, torch.softmax, torch.log_softmax], SOFTMAX),
    **table([torch.mean, torch.sum, torch.amax, torch.amin], REDUCE),
    **table([torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze], RESHAPE),
    **table([torch.transpose, torch.permute, torch.swapaxes, torch.swapdims, torch.movedim, torch.moveaxis], PERMUTE),
    **table([torch.broadcast_to], EXPAND),
    **table([torch.cat, torch.concat, torch.concatenate], CAT),
    torch.split: SPLIT,
    torch.chunk: CHUNK,
    operator.getitem: GETITEM,
    **table([operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub, torch.subtract], ADD),
    **table([operator.mul, operator.imul, torch.mul, torch.multiply], MUL),
    **table([operator.truediv, operator.itruediv, torch.div, torch.divide, torch.true_divide], DIV),
    F.pad: PAD_FUNCTION,
    F.batch_norm: BATCH_NORM_FUNCTION,
    **table([F.conv1d, F.conv2d, F.conv3d], CONV_FUNCTION),
    F.linear: LINEAR_FUNCTION,
    F.layer_norm: LAYER_NORM,
    F.group_norm: FROZEN,
    torch.stack: STACK,
    torch.unbind: UNBIND,
    **table([F.pixel_shuffle, torch.pixel_shuffle], PIXEL_SHUFFLE),
    **table([F.pixel_unshuffle, torch.pixel_unshuffle], PIXEL_UNSHUFFLE),
    torch.einsum: EINSUM,
    F.normalize: NORMALIZE,
    **table([operator.matmul, torch.matmul, torch.mm, torch.bmm, torch.baddbmm], MATMUL),
    F.scaled_dot_product_attention: ATTENTION,
    **table([torch.zeros_like, torch.empty_like], ZEROS_LIKE),
    **table([torch.ones_like, torch.full_like, torch.rand_like, torch.randn_like], CONST_LIKE),
}

METHODS: Dict[str, OpHandler] = {
    **table(["relu", "relu_", "tanh", "tanh_", "abs", "abs_", "neg", "neg_", "sqrt", "contiguous", "clone",
             "detach", "float", "double", "half", "bfloat16", "to", "type", "type_as", "cpu", "cuda",
             "requires_grad_"], ZERO),
    **table(["sigmoid", "sigmoid_", "exp", "exp_"], NONZERO),
    **table(["clamp", "clamp_", "clip", "clip_"], CLAMP),
    **table(["softmax", "log_softmax"], SOFTMAX),
    **table(["mean", "sum", "amax", "amin"], REDUCE),
    **table(["view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as"], RESHAPE),
    **table(["permute", "transpose", "movedim", "moveaxis", "swapaxes", "swapdims"], PERMUTE),
    **table(["expand", "expand_as", "repeat", "broadcast_to"], EXPAND),
    **table(["new_full", "new_zeros", "new_ones", "new_empty", "new_tensor"], FACTORY),
    "split": SPLIT,
    "chunk": CHUNK,
    "unbind": UNBIND,
    **table(["matmul", "mm", "bmm", "baddbmm"], MATMUL),
    **table(["add", "add_", "sub", "sub_"], ADD),
    **table(["mul", "mul_"], MUL),
    **table(["div", "div_"], DIV),
}

# functions of optional packages, by (module, name), so that nothing is imported for them
NAMED_FUNCTIONS: Dict[tuple, OpHandler] = {
    ("torchvision.ops.stochastic_depth", "stochastic_depth"): ZERO,
}


def handler_for(node: fx.Node, module: Optional[nn.Module]) -> Optional[OpHandler]:
    """The default handler for ``node``, or None."""
    if node.op == "call_module":
        for cls in type(module).__mro__:
            handler = MODULES.get(cls)
            if handler is not None:
                return handler
        return None
    if node.op == "call_method":
        return METHODS.get(node.target)
    if node.op == "call_function":
        target = node.target
        try:
            handler = FUNCTIONS.get(target)
        except TypeError:  # unhashable callables
            handler = None
        if handler is not None:
            return handler
        if isinstance(target, type) and issubclass(target, tuple):
            return TUPLE
        return NAMED_FUNCTIONS.get((getattr(target, "__module__", None), getattr(target, "__name__", None)))
    return None
