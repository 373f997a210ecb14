"""Timing ONNX models with onnxruntime the way the latency profile was measured (CPU, a
fixed number of intra-op threads, one inter-op thread), and the small op chains the
calibration sweeps."""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import numpy as np

from dnnshrink_core.plugin_api import TENSOR_KINDS, fastest_and_median, interleaved_times, onnx_latency, session

__all__ = ["ACTIVATIONS", "PASSES", "Op", "chain_input_shape", "chain_model", "conv_has_relu", "fastest_and_median",
           "interleaved_times", "onnx_latency", "op_groups", "session"]

# one op of a calibration chain: (kind, in channels, out channels, input size, kernel, stride),
# and for a grouped conv its groups as a seventh field
Op = Tuple[int, ...]


def op_groups(op: Op) -> int:
    """The groups of a chain's op (a grouped conv's seventh field; 1 for the others)."""
    return int(op[6]) if len(op) > 6 else 1


# the chains' activation kinds
# the passes over a tensor that are not activations: a LayerNorm and a softmax, each over the
# last dimension as a transformer runs them on tokens and on attention scores
PASSES = ("norm", "softmax")
ACTIVATIONS = tuple(k for k in TENSOR_KINDS if k not in ("add", "mul", "pool", "concat", "transpose") + PASSES)


def conv_has_relu(ops: Sequence[Op], i: int) -> bool:
    """Whether the conv at ``ops[i]`` is followed by a ReLU of its own: yes (as a
    BatchNorm-folded network has it) unless the next op is another activation or a residual
    add (a block's projection has none)."""
    following = ops[i + 1][0] if i + 1 < len(ops) else None
    return following not in ACTIVATIONS and following != "add"


def chain_input_shape(ops: Sequence[Op], batch: int) -> Tuple[int, ...]:
    """The input of a chain: ``(batch, channels)`` for a linear chain, ``(batch, tokens,
    channels)`` for one over tokens (its size field is the tokens), else a feature map."""
    kind, cin, _, hw = ops[0][:4]
    if kind == "linear":
        return (batch, hw, cin) if hw > 1 else (batch, cin)
    return (batch, cin, hw, hw)


def chain_model(ops: Sequence[Op], batch: int) -> Tuple[bytes, Tuple[int, ...]]:
    """An ONNX model running ``ops`` one after the other, and its input shape: each conv with
    a bias and a ReLU (:func:`conv_has_relu`), linear ops as Gemm (over tokens, size field
    > 1: MatMul and Add, as torch exports them), and the tensor ops as
    torch's exporter writes them (``clip`` a Clip to 0…6, ``silu`` Sigmoid·x, ``gelu`` the
    erf form, ``norm`` a LayerNormalization over rows of the channels' length and ``softmax``
    a Softmax over rows of the positions' length (the feature map reshaped, which costs
    nothing: a transformer's tokens and attention scores; kernel field 0: over the channels,
    many short rows), ``add`` the tensor plus the one the
    op before it read, ``concat`` that one
    joined by the tensor along the channels, ``transpose`` a channel shuffle in two groups,
    ``pool`` kernel 0 a
    global average pool else a max pool, ``mul`` the last global pool's input times the
    current tensor)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits = [], []
    name, before, pooled_from = "x", "x", "x"
    shape = chain_input_shape(ops, batch)

    def const(tag: str, value: float) -> str:
        inits.append(numpy_helper.from_array(np.array(value, dtype=np.float32), tag))
        return tag

    for i, op in enumerate(ops):
        kind, cin, cout, hw, k, stride = op[:6]
        w, b, out = f"w{i}", f"b{i}", f"y{i}"
        if kind == "linear" and hw > 1:  # over tokens, as torch exports a Linear on (B, N, C)
            inits += [numpy_helper.from_array((rng.standard_normal((cin, cout)) * 0.05).astype(np.float32), w),
                      numpy_helper.from_array(np.zeros(cout, np.float32), b)]
            nodes += [helper.make_node("MatMul", [name, w], [f"p{i}"]), helper.make_node("Add", [f"p{i}", b], [out])]
        elif kind == "linear":
            inits += [numpy_helper.from_array((rng.standard_normal((cout, cin)) * 0.05).astype(np.float32), w),
                      numpy_helper.from_array(np.zeros(cout, np.float32), b)]
            nodes.append(helper.make_node("Gemm", [name, w, b], [out], transB=1))
        elif kind == "clip":
            nodes.append(helper.make_node("Clip", [name, const(f"lo{i}", 0.0), const(f"hi{i}", 6.0)], [out]))
        elif kind == "hardswish":
            nodes.append(helper.make_node("HardSwish", [name], [out]))
        elif kind == "hardsigmoid":
            nodes.append(helper.make_node("HardSigmoid", [name], [out], alpha=1.0 / 6))
        elif kind == "sigmoid":
            nodes.append(helper.make_node("Sigmoid", [name], [out]))
        elif kind == "silu":
            nodes += [helper.make_node("Sigmoid", [name], [f"s{i}"]), helper.make_node("Mul", [name, f"s{i}"], [out])]
        elif kind == "gelu":
            nodes += [helper.make_node("Div", [name, const(f"r{i}", math.sqrt(2.0))], [f"d{i}"]),
                      helper.make_node("Erf", [f"d{i}"], [f"e{i}"]),
                      helper.make_node("Add", [f"e{i}", const(f"one{i}", 1.0)], [f"a{i}"]),
                      helper.make_node("Mul", [name, f"a{i}"], [f"m{i}"]),
                      helper.make_node("Mul", [f"m{i}", const(f"half{i}", 0.5)], [out])]
        elif kind == "softmax" and k == 0:  # over the channels, as torch exports softmax(dim=1)
            nodes.append(helper.make_node("Softmax", [name], [out], axis=1))
        elif kind in PASSES:  # over rows of the feature map read as (B, rows, length): free reshapes
            length = cout if kind == "norm" else hw * hw  # a token's channels; the scores of all positions
            inits += [numpy_helper.from_array(np.array([batch, -1, length], dtype=np.int64), f"rows{i}"),
                      numpy_helper.from_array(np.array([batch, cout, hw, hw], dtype=np.int64), f"map{i}")]
            nodes.append(helper.make_node("Reshape", [name, f"rows{i}"], [f"v{i}"]))
            if kind == "norm":
                inits += [numpy_helper.from_array(np.ones(length, np.float32), f"g{i}"),
                          numpy_helper.from_array(np.zeros(length, np.float32), f"n{i}")]
                nodes.append(helper.make_node("LayerNormalization", [f"v{i}", f"g{i}", f"n{i}"], [f"o{i}"], axis=-1))
            else:
                nodes.append(helper.make_node("Softmax", [f"v{i}"], [f"o{i}"], axis=-1))
            nodes.append(helper.make_node("Reshape", [f"o{i}", f"map{i}"], [out]))
        elif kind == "add":
            nodes.append(helper.make_node("Add", [name, before], [out]))
        elif kind == "concat":  # what the op before read, joined by what it wrote (DenseNet's pattern)
            nodes.append(helper.make_node("Concat", [before, name], [out], axis=1))
        elif kind == "transpose":  # ShuffleNet's channel shuffle in two groups, as torch exports it
            split = numpy_helper.from_array(np.array([batch, 2, cout // 2, hw, hw], dtype=np.int64), f"split{i}")
            whole = numpy_helper.from_array(np.array([batch, cout, hw, hw], dtype=np.int64), f"whole{i}")
            inits += [split, whole]
            nodes += [helper.make_node("Reshape", [name, f"split{i}"], [f"g{i}"]),
                      helper.make_node("Transpose", [f"g{i}"], [f"t{i}"], perm=[0, 2, 1, 3, 4]),
                      helper.make_node("Reshape", [f"t{i}", f"whole{i}"], [out])]
        elif kind == "pool":
            if k == 0:
                pooled_from = name
                nodes.append(helper.make_node("GlobalAveragePool", [name], [out]))
            else:
                nodes.append(helper.make_node("MaxPool", [name], [out], kernel_shape=[k, k], pads=[k // 2] * 4,
                                              strides=[stride, stride]))
        elif kind == "mul":
            nodes.append(helper.make_node("Mul", [pooled_from, name], [out]))
        else:
            groups = cin if kind == "depthwise" else op_groups(op)
            inits += [numpy_helper.from_array((rng.standard_normal((cout, cin // groups, k, k)) * 0.05)
                                              .astype(np.float32), w),
                      numpy_helper.from_array(np.zeros(cout, np.float32), b)]
            nodes.append(helper.make_node("Conv", [name, w, b], [out], kernel_shape=[k, k], pads=[k // 2] * 4,
                                          strides=[stride, stride], group=groups))
            if conv_has_relu(ops, i):
                nodes.append(helper.make_node("Relu", [out], [f"r{i}"]))
                out = f"r{i}"
        before, name = name, out
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info(name, TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model.SerializeToString(), shape
