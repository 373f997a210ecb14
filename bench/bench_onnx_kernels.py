"""Why MobileNetV2's ONNX latency falls less than its MACs: its layers are memory-bound.

Times single convolutions with MobileNetV2's shapes in onnxruntime (CPU, 2 intra-op threads,
batch 1, median), at full width and with half of the input and output channels, and puts
the measured speed-up beside the two limits: the MACs cut (4× for a pointwise conv, 2× for
a depthwise one) and the memory-traffic cut (bytes of input, output and weights read or
written once). When the speed-up follows the traffic rather than the MACs, no channel
pruner can reach a latency/MACs efficiency of 1.0 on that layer.

    python bench/bench_onnx_kernels.py [--runs 300]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

# (in channels, out channels, spatial size, kernel, depthwise) of MobileNetV2's convolutions
LAYERS = [(32, 16, 112, 1, False), (16, 96, 112, 1, False), (24, 144, 56, 1, False), (144, 24, 56, 1, False),
          (32, 192, 28, 1, False), (192, 32, 28, 1, False), (64, 384, 14, 1, False), (384, 64, 14, 1, False),
          (96, 576, 14, 1, False), (576, 96, 14, 1, False), (160, 960, 7, 1, False), (960, 160, 7, 1, False),
          (320, 1280, 7, 1, False), (96, 96, 56, 3, True), (144, 144, 56, 3, True), (192, 192, 28, 3, True),
          (384, 384, 14, 3, True), (576, 576, 14, 3, True), (960, 960, 7, 3, True)]


def conv_model(cin: int, cout: int, k: int, depthwise: bool) -> bytes:
    groups = cin if depthwise else 1
    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal(
        (cout, cin // groups, k, k)).astype(np.float32), "w")
    node = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[k, k], pads=[k // 2] * 4, group=groups)
    graph = helper.make_graph([node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def median_us(model: bytes, cin: int, hw: int, runs: int) -> float:
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 2, 1
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    feed = {"x": np.random.default_rng(1).standard_normal((1, cin, hw, hw)).astype(np.float32)}
    for _ in range(30):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def cost(cin: int, cout: int, hw: int, k: int, depthwise: bool) -> tuple:
    weights = cout * (1 if depthwise else cin) * k * k
    return weights * hw * hw, 4 * (cin * hw * hw + cout * hw * hw + weights)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=300)
    args = parser.parse_args()
    print(f"{'layer':<26}{'full us':>9}{'half us':>9}{'speed-up':>10}{'MACs cut':>10}{'bytes cut':>11}")
    speedups, mac_cuts, byte_cuts = [], [], []
    for cin, cout, hw, k, dw in LAYERS:
        full = median_us(conv_model(cin, cout, k, dw), cin, hw, args.runs)
        half = median_us(conv_model(cin // 2, cout // 2, k, dw), cin // 2, hw, args.runs)
        (macs, traffic), (macs_h, traffic_h) = cost(cin, cout, hw, k, dw), cost(cin // 2, cout // 2, hw, k, dw)
        name = f"{'dw' if dw else 'pw'} {k}x{k} {cin}->{cout} @{hw}"
        speedups.append(full / half)
        mac_cuts.append(macs / macs_h)
        byte_cuts.append(traffic / traffic_h)
        print(f"{name:<26}{full:>9.1f}{half:>9.1f}{full / half:>9.2f}x{macs / macs_h:>9.2f}x"
              f"{traffic / traffic_h:>10.2f}x")
    print(f"geometric means: speed-up {statistics.geometric_mean(speedups):.2f}x, MACs cut "
          f"{statistics.geometric_mean(mac_cuts):.2f}x, bytes cut {statistics.geometric_mean(byte_cuts):.2f}x")


if __name__ == "__main__":
    main()
