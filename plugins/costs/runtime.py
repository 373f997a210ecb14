"""Timing ONNX models with onnxruntime the way the latency profile was measured (CPU, a
fixed number of intra-op threads, one inter-op thread), and the small op chains the
calibration sweeps."""
from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np

from dnnshrink_core.plugin_api import fastest_and_median, interleaved_times, onnx_latency, session

__all__ = ["Op", "chain_model", "fastest_and_median", "interleaved_times", "onnx_latency", "session"]

# one op of a calibration chain: (kind, in channels, out channels, input size, kernel, stride)
Op = Tuple[str, int, int, int, int, int]


def chain_model(ops: Sequence[Op], batch: int) -> Tuple[bytes, Tuple[int, ...]]:
    """An ONNX model running ``ops`` one after the other (each conv with a bias and a ReLU,
    as a BatchNorm-folded network has them; linear ops as Gemm), and its input shape."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits = [], []
    name = "x"
    kind0, cin0, _, hw0, _, _ = ops[0]
    shape = (batch, cin0) if kind0 == "linear" else (batch, cin0, hw0, hw0)
    for i, (kind, cin, cout, hw, k, stride) in enumerate(ops):
        w, b, out = f"w{i}", f"b{i}", f"y{i}"
        if kind == "linear":
            inits += [numpy_helper.from_array((rng.standard_normal((cout, cin)) * 0.05).astype(np.float32), w),
                      numpy_helper.from_array(np.zeros(cout, np.float32), b)]
            nodes.append(helper.make_node("Gemm", [name, w, b], [out], transB=1))
            name = out
            continue
        groups = cin if kind == "depthwise" else 1
        inits += [numpy_helper.from_array((rng.standard_normal((cout, cin // groups, k, k)) * 0.05)
                                          .astype(np.float32), w),
                  numpy_helper.from_array(np.zeros(cout, np.float32), b)]
        nodes.append(helper.make_node("Conv", [name, w, b], [out], kernel_shape=[k, k], pads=[k // 2] * 4,
                                      strides=[stride, stride], group=groups))
        nodes.append(helper.make_node("Relu", [out], [f"r{i}"]))
        name = f"r{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info(name, TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model.SerializeToString(), shape
