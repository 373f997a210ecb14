"""Output shapes of a traced graph's nodes, worked out from the layers' settings.

Tracing needs the shape of every value in the graph, and the generator checks that the
network it built runs. Running the network for real costs a full forward pass (on
ResNet-50 at 224×224, more than half of the generator's time); torch's ``meta`` device
computes shapes without arithmetic but dispatches through Python and was slower still
(MobileNetV2: 114 ms on ``meta`` against 22 ms for real). The rules here cover the
layers and functions that make up most CNNs (convolutions, BatchNorm, pooling, linear,
element-wise activations and arithmetic, cat, flatten/view/reshape, size reads) and
check what the real kernel checks (channel counts against weights, broadcasting,
element counts). :func:`infer_specs` returns ``None`` as soon as it meets anything else,
or anything it is unsure of, and the caller runs the graph for real: this is a shortcut,
never a second opinion.
"""
from __future__ import annotations

import math
import operator
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn

from .handler import TensorSpec


class _Unknown(Exception):
    """No rule for this op, or the input is one the real op would refuse."""


class _Shape:
    """A tensor known by its shape and dtype only; ``plain`` is False once it may not be
    contiguous (after a transpose), where ``view`` would fail for real."""

    __slots__ = ("shape", "dtype", "plain")

    def __init__(self, shape: Sequence[int], dtype: torch.dtype, plain: bool = True):
        self.shape = tuple(int(s) for s in shape)
        self.dtype = dtype
        self.plain = plain

    def spec(self) -> TensorSpec:
        return TensorSpec(self.shape, self.dtype)

    def dim(self) -> int:
        """As ``Tensor.dim``, so rules written for a layer's weight take a weight read through
        ``get_attr`` (``F.conv2d(x, self.weight)``) as it is."""
        return len(self.shape)


def infer_specs(graph: fx.Graph, modules: Mapping[str, nn.Module], inputs: Sequence[Any],
                constants: Optional[Dict[str, Any]] = None) -> Optional[Dict[fx.Node, Any]]:
    """The :class:`~dnnshrink_core.handler.TensorSpec` of every node of ``graph`` (as the
    tracer's real pass records them: a spec for a tensor, a tuple of them for a tuple, None
    otherwise) on ``inputs``; ``None`` when a node has no rule or its inputs would make the
    real op fail (run the graph for real to get the error). ``modules`` maps every module
    path of the graph's root to its module, the root's own path ``""`` included
    (``dict(root.named_modules(remove_duplicate=False))``); ``constants``: tensors fx lifted
    out of ``forward`` that are not on the root."""
    env: Dict[fx.Node, Any] = {}
    specs: Dict[fx.Node, Any] = {}
    positional = list(inputs)
    constants = constants or {}
    try:
        for node in graph.nodes:
            if node.op == "placeholder":
                if not positional or str(node.target).startswith("*"):
                    return None
                value = positional.pop(0)
                if not isinstance(value, (torch.Tensor, int, float, bool, type(None))):
                    return None  # containers of tensors: their items would reach the rules unconverted
                result = _shape_of(value) if isinstance(value, torch.Tensor) else value
            elif node.op == "get_attr":
                owner, _, name = node.target.rpartition(".")
                value = constants[node.target] if node.target in constants else getattr(modules[owner], name)
                if not isinstance(value, torch.Tensor):
                    return None
                result = _shape_of(value)
            elif node.op == "output":
                result = fx.node.map_arg(node.args[0], env.__getitem__)
            else:
                args = fx.node.map_arg(node.args, env.__getitem__)
                kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
                if node.op == "call_module":
                    module = modules[node.target]
                    rule = _MODULES.get(type(module))
                    if rule is None or module.training or kwargs or "forward" in vars(module):
                        return None  # no rule, or a layer whose forward was replaced on the instance
                    result = rule(module, *args)
                else:
                    result = _call(node.op, node.target, args, kwargs)
            env[node] = result
            specs[node] = _spec(result)
    except (_Unknown, KeyError, AttributeError, TypeError, ValueError, IndexError, ZeroDivisionError):
        return None
    return specs


def _shape_of(tensor: torch.Tensor) -> _Shape:
    return _Shape(tensor.shape, tensor.dtype, tensor.is_contiguous())


def _spec(value: Any) -> Any:
    if isinstance(value, _Shape):
        return value.spec()
    if isinstance(value, (tuple, list)) and not isinstance(value, torch.Size):
        return tuple(_spec(v) for v in value)
    return None


def _tensor(value: Any) -> _Shape:
    if not isinstance(value, _Shape):
        raise _Unknown
    return value


def _optional(value: Any) -> Optional[_Shape]:
    return None if value is None else _tensor(value)


def _shapes(values: Any) -> Sequence[_Shape]:
    """A non-empty list or tuple of tensors (``cat``'s and ``stack``'s first argument)."""
    if not isinstance(values, (tuple, list)) or not values or not all(isinstance(v, _Shape) for v in values):
        raise _Unknown
    return values


def _pieces(x: _Shape, d: int, sizes: Sequence[int]) -> Tuple[_Shape, ...]:
    """``x`` cut along dim ``d`` into ``sizes``; pieces of an outer dim stay contiguous."""
    plain = x.plain and all(s == 1 for s in x.shape[:d])
    return tuple(_Shape(x.shape[:d] + (s,) + x.shape[d + 1:], x.dtype, plain) for s in sizes)


def _floating(x: _Shape) -> _Shape:
    if not x.dtype.is_floating_point:
        raise _Unknown  # integer tensors through float layers: let the real op decide
    return x


# ---- layers ---------------------------------------------------------------------------------

def _window(size: int, kernel: int, stride: int, pad: int, dilation: int, ceil: bool = False) -> int:
    span = size + 2 * pad - dilation * (kernel - 1) - 1
    if span < 0:
        raise _Unknown
    out = (-(-span // stride) if ceil else span // stride) + 1
    if ceil and (out - 1) * stride >= size + pad:
        out -= 1  # the last window must start inside the input or its left padding
    return out


def _tuple(value: Any, n: int) -> Tuple[int, ...]:
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,) * n
    if len(values) != n or not all(isinstance(v, int) for v in values):
        raise _Unknown
    return values


def _conv_shape(x: _Shape, weight: torch.Tensor, bias: Any, stride: Any, padding: Any, dilation: Any,
                groups: int, n: int) -> _Shape:
    _floating(x)
    if len(x.shape) not in (n + 1, n + 2) or weight.dim() != n + 2 or groups < 1:
        raise _Unknown
    batched = len(x.shape) == n + 2
    channels, spatial = x.shape[-n - 1], x.shape[-n:]
    out_channels = weight.shape[0]
    if channels != weight.shape[1] * groups or out_channels % groups or x.dtype != weight.dtype:
        raise _Unknown
    if out_channels < 1 or weight.shape[1] < 1:  # torch refuses a conv without channels: run it for its error
        raise _Unknown
    if bias is not None and tuple(bias.shape) != (out_channels,):
        raise _Unknown
    kernel, stride, dilation = weight.shape[2:], _tuple(stride, n), _tuple(dilation, n)
    if padding == "same" and any(s != 1 for s in stride):
        raise _Unknown
    if padding == "same":
        sizes = spatial
    else:
        pads = (0,) * n if padding == "valid" else _tuple(padding, n)
        sizes = tuple(_window(s, k, st, p, d) for s, k, st, p, d in zip(spatial, kernel, stride, pads, dilation))
    if min(sizes, default=1) <= 0:
        raise _Unknown
    return _Shape(((x.shape[0],) if batched else ()) + (out_channels,) + tuple(sizes), x.dtype, x.plain)


def _conv(module: nn.modules.conv._ConvNd, x: Any) -> _Shape:
    if module.padding_mode != "zeros":
        raise _Unknown  # reflect/replicate padding has limits of its own
    return _conv_shape(_tensor(x), module.weight, module.bias, module.stride, module.padding, module.dilation,
                       module.groups, len(module.kernel_size))


def _batch_norm(module: nn.modules.batchnorm._BatchNorm, x: Any) -> _Shape:
    x = _floating(_tensor(x))
    ndims = {nn.BatchNorm1d: (2, 3), nn.BatchNorm2d: (4,), nn.BatchNorm3d: (5,)}[type(module)]
    if module.running_mean is None or len(x.shape) not in ndims:
        raise _Unknown  # without running statistics it normalises by the batch's, which has its own limits
    if any(t is not None and tuple(t.shape) != (x.shape[1],)
           for t in (module.weight, module.bias, module.running_mean, module.running_var)):
        raise _Unknown
    return x


def _linear(module: nn.Linear, x: Any) -> _Shape:
    return _linear_shape(_tensor(x), module.weight, module.bias)


def _linear_shape(x: _Shape, weight: torch.Tensor, bias: Any) -> _Shape:
    _floating(x)
    if not x.shape or weight.dim() != 2 or x.shape[-1] != weight.shape[1] or x.dtype != weight.dtype:
        raise _Unknown
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise _Unknown
    return _Shape(x.shape[:-1] + (weight.shape[0],), x.dtype, x.plain)


def _same(module: nn.Module, x: Any) -> _Shape:
    return _floating(_tensor(x))


def _pool(module: nn.Module, x: Any) -> _Shape:
    if getattr(module, "return_indices", False):
        raise _Unknown
    return _pool_shape(_tensor(x), int(type(module).__name__[-2]), module.kernel_size, module.stride,
                       module.padding, getattr(module, "dilation", 1), module.ceil_mode)


def _pool_shape(x: _Shape, n: int, kernel_size: Any, stride: Any, padding: Any, dilation: Any,
                ceil_mode: Any) -> _Shape:
    _floating(x)
    if len(x.shape) not in (n + 1, n + 2) or not isinstance(ceil_mode, bool):
        raise _Unknown
    kernel = _tuple(kernel_size, n)
    stride = _tuple(stride if stride not in (None, [], ()) else kernel_size, n)
    pads, dilation = _tuple(padding, n), _tuple(dilation, n)
    if any(p > k // 2 for p, k in zip(pads, kernel)) or min(stride + kernel + dilation) < 1 or min(pads) < 0:
        raise _Unknown  # torch refuses padding over half the kernel
    sizes = tuple(_window(s, k, st, p, d, ceil_mode)
                  for s, k, st, p, d in zip(x.shape[-n:], kernel, stride, pads, dilation))
    if min(sizes) <= 0:
        raise _Unknown
    return _Shape(x.shape[:-n] + sizes, x.dtype, x.plain)


def _adaptive(module: nn.Module, x: Any) -> _Shape:
    if getattr(module, "return_indices", False):
        raise _Unknown
    return _adaptive_shape(_tensor(x), module.output_size, int(type(module).__name__[-2]))


def _adaptive_shape(x: _Shape, output_size: Any, n: int) -> _Shape:
    _floating(x)
    if len(x.shape) not in (n + 1, n + 2) or 0 in x.shape[-n:]:
        raise _Unknown
    sizes = tuple(s if o is None else o for s, o in zip(x.shape[-n:], _tuple_or_none(output_size, n)))
    return _Shape(x.shape[:-n] + sizes, x.dtype, x.plain)


def _tuple_or_none(value: Any, n: int) -> Tuple[Any, ...]:
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,) * n
    if len(values) != n or not all(v is None or (isinstance(v, int) and v > 0) for v in values):
        raise _Unknown
    return values


def _flatten_module(module: nn.Flatten, x: Any) -> _Shape:
    return _flatten(_tensor(x), module.start_dim, module.end_dim)


# ---- functions and methods ------------------------------------------------------------------

def _dim(d: Any, ndim: int) -> int:
    if not isinstance(d, int) or not -max(ndim, 1) <= d < max(ndim, 1):
        raise _Unknown
    return d % max(ndim, 1)


def _flatten(x: _Shape, start_dim: int = 0, end_dim: int = -1) -> _Shape:
    if not x.shape:
        return _Shape((1,), x.dtype, x.plain)
    start, end = _dim(start_dim, len(x.shape)), _dim(end_dim, len(x.shape))
    if start > end:
        raise _Unknown
    return _Shape(x.shape[:start] + (math.prod(x.shape[start:end + 1]),) + x.shape[end + 1:], x.dtype, x.plain)


def _view(x: _Shape, *shape: Any) -> _Shape:
    if not x.plain:
        raise _Unknown  # a view of a transposed tensor fails unless its strides happen to fit
    return _reshape(x, *shape)


def _reshape(x: _Shape, *shape: Any) -> _Shape:
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    if not all(isinstance(s, int) for s in shape) or sum(s == -1 for s in shape) > 1 or any(s < -1 for s in shape):
        raise _Unknown
    total, known = math.prod(x.shape), math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if known == 0 or total % known:
            raise _Unknown
        shape = tuple(total // known if s == -1 else s for s in shape)
    elif known != total:
        raise _Unknown
    return _Shape(shape, x.dtype, x.plain)


def _broadcast(*values: Any) -> _Shape:
    tensors = [v for v in values if isinstance(v, _Shape)]
    others = [v for v in values if not isinstance(v, _Shape)]
    if not tensors or any(type(v) not in (int, float, bool) for v in others):
        raise _Unknown
    dtype = tensors[0].dtype
    if any(t.dtype != dtype for t in tensors) or not dtype.is_floating_point:
        raise _Unknown  # type promotion between tensors: let the real op decide
    ndim = max(len(t.shape) for t in tensors)
    shape = []
    for sizes in zip(*[(1,) * (ndim - len(t.shape)) + t.shape for t in tensors]):
        grown = {s for s in sizes if s != 1}
        if len(grown) > 1:
            raise _Unknown
        shape.append(grown.pop() if grown else 1)
    return _Shape(shape, dtype, all(t.plain for t in tensors))


def _binary(a: Any, b: Any, *, alpha: Any = 1) -> Any:
    return _broadcast(a, b)


def _inplace(a: Any, b: Any, *, alpha: Any = 1) -> Any:
    result = _broadcast(a, b)
    if not isinstance(a, _Shape) or result.shape != a.shape:
        raise _Unknown  # an in-place op cannot grow its left side
    return result


def _cat(tensors: Any, dim: int = 0) -> _Shape:
    tensors = _shapes(tensors)
    first = tensors[0]
    ndim = len(first.shape)
    d = _dim(dim, ndim)
    if ndim == 0 or any(len(t.shape) != ndim or t.dtype != first.dtype or
                        t.shape[:d] + t.shape[d + 1:] != first.shape[:d] + first.shape[d + 1:] for t in tensors):
        raise _Unknown
    return _Shape(first.shape[:d] + (sum(t.shape[d] for t in tensors),) + first.shape[d + 1:], first.dtype,
                  all(t.plain for t in tensors))


def _size(x: _Shape, dim: Any = None) -> Any:
    return torch.Size(x.shape) if dim is None else x.shape[_dim(dim, len(x.shape))]


def _reduce(x: _Shape, dim: Any = None, keepdim: bool = False, *, dtype: Any = None) -> _Shape:
    _floating(x)
    if dtype is not None:
        raise _Unknown
    if dim is None:
        return _Shape((1,) * len(x.shape) if keepdim else (), x.dtype)
    dims = {_dim(d, len(x.shape)) for d in (dim if isinstance(dim, (tuple, list)) else (dim,))}
    if not dims:
        raise _Unknown  # dim=() means every dim for some reductions and none for others
    return _Shape(tuple(1 if i in dims else s for i, s in enumerate(x.shape) if keepdim or i not in dims),
                  x.dtype, x.plain)


def _unary(x: Any, *args: Any, **kwargs: Any) -> _Shape:
    if args or any(k != "inplace" for k in kwargs):
        raise _Unknown
    return _floating(_tensor(x))


def _dropout(x: Any, p: Any = 0.5, training: Any = False, inplace: Any = False) -> _Shape:
    if training is not False:
        raise _Unknown
    return _floating(_tensor(x))


def _transpose(x: _Shape, a: int, b: int) -> _Shape:
    shape = list(x.shape)
    a, b = _dim(a, len(shape)), _dim(b, len(shape))
    shape[a], shape[b] = shape[b], shape[a]
    return _Shape(shape, x.dtype, x.plain and a == b)


def _permute(x: _Shape, *dims: Any) -> _Shape:
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = tuple(dims[0])
    order = [_dim(d, len(x.shape)) for d in dims]
    if sorted(order) != list(range(len(x.shape))):
        raise _Unknown
    return _Shape([x.shape[d] for d in order], x.dtype, x.plain and order == sorted(order))


def _chunk(x: _Shape, chunks: int, dim: int = 0) -> Tuple[_Shape, ...]:
    d = _dim(dim, len(x.shape))
    if not isinstance(chunks, int) or chunks < 1 or not x.shape:
        raise _Unknown
    return _split(x, -(-x.shape[d] // chunks), d)  # torch.chunk is a split into pieces of ceil(n / chunks)


def _getitem(value: Any, index: Any) -> Any:
    if isinstance(value, _Shape) or isinstance(index, _Shape):
        raise _Unknown  # tensor indexing: too many forms to mirror
    return operator.getitem(value, index)


def _contiguous(x: Any, memory_format: Any = None) -> _Shape:
    if memory_format not in (None, torch.contiguous_format):
        raise _Unknown
    return _Shape(_tensor(x).shape, x.dtype)


def _functional_pool(n: int, average: bool) -> Callable[..., _Shape]:
    if average:
        def rule(x: Any, kernel_size: Any, stride: Any = None, padding: Any = 0, ceil_mode: bool = False,
                 count_include_pad: bool = True, divisor_override: Any = None) -> _Shape:
            return _pool_shape(_tensor(x), n, kernel_size, stride, padding, 1, ceil_mode)
    else:
        def rule(x: Any, kernel_size: Any, stride: Any = None, padding: Any = 0, dilation: Any = 1,
                 ceil_mode: bool = False, return_indices: bool = False) -> _Shape:
            if return_indices is not False:
                raise _Unknown
            return _pool_shape(_tensor(x), n, kernel_size, stride, padding, dilation, ceil_mode)
    return rule


def _norm_shape(x: _Shape, normalized_shape: Any, weight: Any, bias: Any) -> _Shape:
    _floating(x)
    trailing = tuple(normalized_shape) if isinstance(normalized_shape, (tuple, list, torch.Size)) \
        else (normalized_shape,)
    if not trailing or x.shape[len(x.shape) - len(trailing):] != trailing:
        raise _Unknown
    for value in (weight, bias):
        if value is not None and tuple(value.shape) != trailing:
            raise _Unknown
    return x


def _layer_norm(module: nn.LayerNorm, x: Any) -> _Shape:
    return _norm_shape(_tensor(x), module.normalized_shape, module.weight, module.bias)


def _functional_layer_norm(x: Any, normalized_shape: Any, weight: Any = None, bias: Any = None,
                           eps: Any = 1e-5) -> _Shape:
    return _norm_shape(_tensor(x), normalized_shape, _optional(weight), _optional(bias))


def _group_norm(module: nn.GroupNorm, x: Any) -> _Shape:
    x = _floating(_tensor(x))
    if len(x.shape) < 2 or x.shape[1] != module.num_channels or x.shape[1] % module.num_groups:
        raise _Unknown
    for value in (module.weight, module.bias):
        if value is not None and tuple(value.shape) != (x.shape[1],):
            raise _Unknown
    return x


def _assert(condition: Any, message: Any = None) -> None:
    if condition is not True:
        raise _Unknown  # a failing (or tensor-valued) check: the real run raises the model's own message


def _split(x: _Shape, sizes: Any, dim: int = 0) -> Tuple[_Shape, ...]:
    d = _dim(dim, len(x.shape))
    total = x.shape[d]
    if isinstance(sizes, int) and not isinstance(sizes, bool):
        if sizes < 1 or not total:
            raise _Unknown
        sizes = [min(sizes, total - i) for i in range(0, total, sizes)]
    elif not isinstance(sizes, (list, tuple)) or not all(isinstance(s, int) and s >= 0 for s in sizes) \
            or sum(sizes) != total:
        raise _Unknown
    return _pieces(x, d, sizes)


def _unsqueeze(x: _Shape, dim: int) -> _Shape:
    d = _dim(dim, len(x.shape) + 1)
    return _Shape(x.shape[:d] + (1,) + x.shape[d:], x.dtype, x.plain)


def _expand_as(x: _Shape, other: Any) -> _Shape:
    other = _tensor(other)
    if len(x.shape) > len(other.shape):
        raise _Unknown
    padded = (1,) * (len(other.shape) - len(x.shape)) + x.shape
    if any(a != b and a != 1 for a, b in zip(padded, other.shape)):
        raise _Unknown
    return _Shape(other.shape, x.dtype, False)  # a broadcast view: strides of 0


def _softmax(x: Any, dim: Any = None, *args: Any, dtype: Any = None, **kwargs: Any) -> _Shape:
    x = _floating(_tensor(x))
    if dim is None or dtype is not None or args or kwargs.keys() - {"_stacklevel"}:
        raise _Unknown
    _dim(dim, len(x.shape))
    return x


def _normalize(x: Any, p: Any = 2.0, dim: int = 1, eps: Any = 1e-12, out: Any = None) -> _Shape:
    x = _floating(_tensor(x))
    if out is not None:
        raise _Unknown
    _dim(dim, len(x.shape))
    return x


def _pad(x: Any, pad: Any, mode: str = "constant", value: Any = None) -> _Shape:
    x = _tensor(x)
    if mode != "constant" or not isinstance(pad, (list, tuple)) or len(pad) % 2 or len(pad) // 2 > len(x.shape) \
            or not all(isinstance(p, int) and not isinstance(p, bool) for p in pad):
        raise _Unknown
    shape = list(x.shape)
    for i in range(len(pad) // 2):
        d = len(shape) - 1 - i
        shape[d] += pad[2 * i] + pad[2 * i + 1]
        if shape[d] < 0:
            raise _Unknown
    return _Shape(shape, x.dtype)


def _matmul(a: Any, b: Any) -> _Shape:
    a, b = _floating(_tensor(a)), _tensor(b)
    if len(a.shape) < 2 or len(b.shape) < 2 or a.dtype != b.dtype or a.shape[-1] != b.shape[-2]:
        raise _Unknown  # vectors have rules of their own
    batch = _broadcast(_Shape(a.shape[:-2], a.dtype), _Shape(b.shape[:-2], b.dtype)).shape
    return _Shape(batch + (a.shape[-2], b.shape[-1]), a.dtype)


def _stack(tensors: Any, dim: int = 0) -> _Shape:
    tensors = _shapes(tensors)
    first = tensors[0]
    if any(t.shape != first.shape or t.dtype != first.dtype for t in tensors):
        raise _Unknown
    d = _dim(dim, len(first.shape) + 1)
    return _Shape(first.shape[:d] + (len(tensors),) + first.shape[d:], first.dtype)


def _unbind(x: _Shape, dim: int = 0) -> Tuple[_Shape, ...]:
    d = _dim(dim, len(x.shape))
    return tuple(_Shape(piece.shape[:d] + piece.shape[d + 1:], x.dtype, piece.plain)
                 for piece in _pieces(x, d, [1] * x.shape[d]))


def _stochastic_depth(x: Any, p: Any, mode: Any, training: Any = True) -> _Shape:
    if training is not False:
        raise _Unknown
    return _tensor(x)  # the identity outside training


def _adaptive_avg_pool(n: int) -> Callable[..., _Shape]:
    return lambda x, output_size: _adaptive_shape(_tensor(x), output_size, n)


def _functional_linear(x: Any, weight: Any, bias: Any = None) -> _Shape:
    return _linear_shape(_tensor(x), _tensor(weight), _optional(bias))


def _functional_conv(n: int) -> Callable[..., _Shape]:
    def rule(x: Any, weight: Any, bias: Any = None, stride: Any = 1, padding: Any = 0, dilation: Any = 1,
             groups: int = 1) -> _Shape:
        return _conv_shape(_tensor(x), _tensor(weight), _optional(bias), stride, padding,
                           dilation, groups, n)
    return rule


def _functional_batch_norm(x: Any, running_mean: Any, running_var: Any, weight: Any = None, bias: Any = None,
                           training: bool = False, momentum: Any = 0.1, eps: Any = 1e-5) -> _Shape:
    x = _floating(_tensor(x))
    if training or len(x.shape) < 2:
        raise _Unknown
    for value in (running_mean, running_var, weight, bias):
        if value is not None and _tensor(value).shape != (x.shape[1],):
            raise _Unknown
    return x


_ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.GELU, nn.Sigmoid, nn.Tanh,
                nn.LeakyReLU, nn.ELU, nn.Mish, nn.Hardtanh, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
                nn.Dropout3d, nn.AlphaDropout)
_MODULES: Dict[type, Callable[..., _Shape]] = {
    **{t: _same for t in _ELEMENTWISE},
    nn.Conv1d: _conv, nn.Conv2d: _conv, nn.Conv3d: _conv,
    nn.BatchNorm1d: _batch_norm, nn.BatchNorm2d: _batch_norm, nn.BatchNorm3d: _batch_norm,
    nn.Linear: _linear,
    nn.MaxPool1d: _pool, nn.MaxPool2d: _pool, nn.MaxPool3d: _pool,
    nn.AvgPool1d: _pool, nn.AvgPool2d: _pool, nn.AvgPool3d: _pool,
    nn.AdaptiveAvgPool1d: _adaptive, nn.AdaptiveAvgPool2d: _adaptive, nn.AdaptiveAvgPool3d: _adaptive,
    nn.AdaptiveMaxPool1d: _adaptive, nn.AdaptiveMaxPool2d: _adaptive, nn.AdaptiveMaxPool3d: _adaptive,
    nn.Flatten: _flatten_module, nn.LayerNorm: _layer_norm, nn.GroupNorm: _group_norm,
}

_ARITHMETIC = {operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.mod,
               operator.neg, operator.pow, operator.eq, operator.ne, operator.lt, operator.le, operator.gt,
               operator.ge, operator.not_, math.ceil, math.floor, math.sqrt}
_UNARY_FUNCTIONS = {torch.relu, F.relu, F.relu6, F.silu, F.hardswish, F.hardsigmoid, F.gelu, torch.sigmoid,
                    F.sigmoid, torch.tanh, F.tanh, F.leaky_relu, F.mish, F.elu}
_FUNCTIONS: Dict[Any, Callable[..., Any]] = {
    **{f: _unary for f in _UNARY_FUNCTIONS},
    operator.add: _binary, operator.sub: _binary, operator.mul: _binary, operator.truediv: _binary,
    operator.iadd: _inplace, operator.imul: _inplace, torch.add: _binary, torch.sub: _binary, torch.mul: _binary,
    torch.cat: _cat, torch.concat: _cat, torch.flatten: _flatten, torch.reshape: _reshape, torch.transpose: _transpose,
    torch.permute: _permute, torch.chunk: _chunk, torch.mean: _reduce, torch.sum: _reduce,
    operator.getitem: _getitem, getattr: None, F.dropout: _dropout, F.dropout2d: _dropout,
    F.adaptive_avg_pool1d: _adaptive_avg_pool(1), F.adaptive_avg_pool2d: _adaptive_avg_pool(2),
    F.adaptive_avg_pool3d: _adaptive_avg_pool(3), F.linear: _functional_linear, F.conv1d: _functional_conv(1),
    F.conv2d: _functional_conv(2), F.conv3d: _functional_conv(3), F.batch_norm: _functional_batch_norm,
    F.layer_norm: _functional_layer_norm, torch._assert: _assert, torch.split: _split, F.softmax: _softmax,
    torch.softmax: _softmax, F.normalize: _normalize, F.pad: _pad, torch.unsqueeze: _unsqueeze,
    torch.matmul: _matmul, operator.matmul: _matmul, torch.stack: _stack, torch.unbind: _unbind,
    **{f: _functional_pool(n, True) for n, f in ((1, F.avg_pool1d), (2, F.avg_pool2d), (3, F.avg_pool3d))},
    **{f: _functional_pool(n, False) for n, f in ((1, F.max_pool1d), (2, F.max_pool2d), (3, F.max_pool3d))},
}
_METHODS: Dict[str, Callable[..., Any]] = {
    "size": _size, "view": _view, "reshape": _reshape, "flatten": _flatten, "mean": _reduce, "sum": _reduce,
    "transpose": _transpose, "permute": _permute, "chunk": _chunk, "contiguous": _contiguous,
    "add": _binary, "sub": _binary, "mul": _binary, "div": _binary, "add_": _inplace, "mul_": _inplace,
    "relu": _unary, "relu_": _unary, "sigmoid": _unary, "sigmoid_": _unary, "tanh": _unary,
    "split": _split, "unsqueeze": _unsqueeze, "expand_as": _expand_as, "softmax": _softmax,
    "matmul": _matmul, "unbind": _unbind, "dim": lambda x: len(x.shape),
}
_SHAPE_ATTRIBUTES = {"shape": lambda x: torch.Size(x.shape), "ndim": lambda x: len(x.shape),
                     "dtype": lambda x: x.dtype}


def _call(op: str, target: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
    if op == "call_method":
        rule = _METHODS.get(target)
        if rule is None or not args or not isinstance(args[0], _Shape):
            raise _Unknown
        return rule(*args, **kwargs)
    if op != "call_function":
        raise _Unknown
    if target is getattr:
        if len(args) != 2 or not isinstance(args[0], _Shape) or args[1] not in _SHAPE_ATTRIBUTES:
            raise _Unknown
        return _SHAPE_ATTRIBUTES[args[1]](args[0])
    if target in _ARITHMETIC and not any(isinstance(a, _Shape) for a in args) and not kwargs:
        if not all(type(a) in (int, float, bool) for a in args):
            raise _Unknown
        return target(*args)  # Python arithmetic on sizes read from shapes
    try:
        rule = _FUNCTIONS.get(target)
    except TypeError:  # an unhashable target
        raise _Unknown from None
    if rule is None and getattr(target, "__module__", None) == "torchvision.ops.stochastic_depth" \
            and getattr(target, "__name__", None) == "stochastic_depth":
        rule = _stochastic_depth  # torchvision's, looked up by name so the core does not import it
    if rule is None:
        raise _Unknown
    return rule(*args, **kwargs)


def has_hooks(model: nn.Module) -> bool:
    """Whether running ``model`` would call forward hooks, which a graph does not show (they
    may change what a layer returns), so its shapes must come from a real run."""
    return bool(_global_hooks()) or any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def _global_hooks() -> Any:
    from torch.nn.modules import module as torch_module

    return (getattr(torch_module, "_global_forward_hooks", None) or
            getattr(torch_module, "_global_forward_pre_hooks", None))
