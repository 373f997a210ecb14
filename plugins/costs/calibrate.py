"""``dnnshrink calibrate``: measure the latency profile of a runtime.

1. **Block.** Each op kind (pointwise, depthwise, 3×3 conv) is timed at widths that are
   multiples of 64, of 32, 16, 8 and 4 only, and unaligned (65); the block
   (``channel_multiple``) is the smallest multiple whose widths run as fast per MAC as the
   fully aligned ones, when the unaligned width is clearly slower (else 1: no block).
   A concatenation's block (the widths its pieces need to be joined in the runtime's
   blocked layout) is read from the graph the runtime optimises, not timed.
2. **Sweep.** Short chains of conv/pointwise/depthwise/linear ops with the shapes of
   ResNets and MobileNets, aligned and unaligned, are timed (fastest of repeated runs, the
   chains taking turns so the machine's drift hits all alike).
3. **Fit.** The roofline of :mod:`.latency` (per kind: aligned and unaligned peak,
   bandwidth, overhead per op; per run: a fixed overhead) is fitted to the chains' times by
   least squares on the log of predicted/measured time.
4. **Check.** Whole networks the fit never saw (torchvision ResNet-18/50, MobileNetV2/V3,
   EfficientNet-B0, ``weights=None``), and each cut to a quarter of its widths (the thin
   layers shrunk networks run), are exported and timed, and their predicted latency (the
   traced channel graph priced by the profile) is compared with the measured one.
"""
from __future__ import annotations

import math
import os
import platform
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from dnnshrink_core.plugin_api import SPINNING, checked_device, ConfigError, DnnshrinkWarning

from .latency import (BYTES_PER_ELEMENT, DTYPES, GROUPED, KINDS, TENSOR_KINDS, OpConstants, Profile, load_profile,
                      roofline_seconds)
from .runtime import (ACTIVATIONS, PASSES, Op, chain_input_shape, chain_model, conv_has_relu, fastest_and_median,
                      interleaved_times, op_groups, session)

VALIDATION_MODELS = ("resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0")
CANDIDATES = (4, 8, 16, 32, 64)
# the most a tensor op's fixed cost may be fitted on onnxruntime: its own cost per call is
# about a microsecond (bench/bench_per_call.py); a chain's noise left free went into tens of
# microseconds per activation, which over-priced every network full of them by half. Eager
# PyTorch pays its dispatch per op (tens of microseconds on a CPU), so it has no such bound.
TENSOR_OVERHEAD_S = 2e-6
POSITION_KINDS = ("pool",) + PASSES  # the tensor kinds whose cost per output position is fitted
# the most a grouped conv's fixed cost may be fitted: onnxruntime runs groups of 2-8 channels
# 4-10x slower per MAC than groups of 16, at a cost that varies little with the shape, and
# left free the fit put it all in a 180 us overhead per call, which priced RegNetX-400MF at
# twice its time; bounded, the unaligned peak and the per-position cost carry it
GROUPED_OVERHEAD_S = 20e-6
# the fit's bounds on rates, far above any device's (a GPU's tensor cores reach about 1e15
# MACs/s, its memory 1e13 bytes/s) so that none is clipped; a rate fitted within a factor of
# two of its bound is no rate the sweep measured (see _rate)
MOST_MACS_PER_S, MOST_BYTES_PER_S = 1e17, 1e14
UNMEASURED_SHARE = 0.5


def _pairs(kind: str, shapes: Sequence[tuple], reps: int = 2) -> List[List[Op]]:
    """Chains ``cin→cout→cin…`` (``2·reps`` ops) of one kind, one chain per shape."""
    chains = []
    for shape in shapes:
        if kind == "depthwise":
            c, hw, k = shape
            chains.append([("depthwise", c, c, hw, k, 1)] * (2 * reps))
        elif kind == "linear":
            cin, cout = shape
            chains.append([("linear", cin, cout, 1, 1, 1), ("linear", cout, cin, 1, 1, 1)] * reps)
        else:
            cin, cout, hw = shape
            k = 3 if kind == "conv" else 1
            chains.append([(kind, cin, cout, hw, k, 1), (kind, cout, cin, hw, k, 1)] * reps)
    return chains


def sweep_chains(thin: bool = False) -> List[List[Op]]:
    """The calibration sweep: ResNet and MobileNet shapes, aligned and unaligned widths,
    chains of 4 ops and single ops (which separate the per-run from the per-op overhead), the
    ops between the layers (:func:`_tensor_chains`), grouped convs at 2–32 channels per group
    (RegNet and ResNeXt shapes); with ``thin``, also chains of 16–48 channels (what shrunk
    networks run), which pin the per-op overhead and the per-position cost."""
    chains = []
    chains += _pairs("pointwise", [(16, 96, 112), (32, 192, 56), (64, 256, 56), (128, 512, 28), (96, 576, 14),
                                   (256, 1024, 14), (160, 960, 7), (512, 2048, 7)])
    chains += _pairs("pointwise", [(30, 190, 56), (58, 250, 56), (122, 502, 28), (90, 570, 14), (250, 1002, 14),
                                   (150, 950, 7)])
    chains += _pairs("conv", [(64, 64, 56), (128, 128, 28), (256, 256, 14), (512, 512, 7)], reps=1)
    chains += _pairs("conv", [(62, 62, 56), (122, 122, 28), (250, 250, 14), (502, 502, 7)], reps=1)
    chains += _pairs("depthwise", [(32, 112, 3), (96, 112, 3), (144, 56, 3), (192, 28, 3), (384, 14, 3),
                                   (960, 7, 3), (240, 14, 5), (672, 7, 5)])
    chains += _pairs("depthwise", [(98, 56, 3), (150, 28, 3), (382, 14, 3), (950, 7, 3), (250, 14, 5)])
    chains += _pairs("linear", [(512, 1000), (1280, 1000), (2048, 1000), (576, 1024)])
    # over tokens, as a transformer's MLP and projections run (LeViT, MobileViT, CoaT)
    chains += [[("linear", c, 4 * c, n, 1, 1), ("linear", 4 * c, c, n, 1, 1)] * 2
               for c, n in ((64, 196), (128, 196), (192, 49), (256, 49), (96, 784), (144, 256))]
    chains += [[("conv", 3, 32, 224, 3, 2)], [("conv", 3, 64, 224, 7, 2)], [("pointwise", 64, 64, 14, 1, 1)],
               [("depthwise", 64, 64, 7, 3, 1)], [("linear", 256, 256, 1, 1, 1)]]
    chains += _tensor_chains()
    chains += [[(GROUPED, c, c, hw, 3, 1, c // width)] * 4 for c, hw, width in
               ((64, 56, 8), (64, 56, 16), (224, 28, 8), (224, 28, 16), (448, 14, 8), (448, 14, 32), (224, 28, 2),
                (448, 14, 4), (128, 56, 32))]
    # inverted residual blocks as MobileNets and EfficientNets run them (expand, depthwise,
    # project): the kinds in the order networks run them, not only each kind by itself
    chains += [[("pointwise", c, e, hw, 1, 1), ("depthwise", e, e, hw, 3, 1), ("pointwise", e, c, hw, 1, 1)] * 2
               for c, e, hw in ((24, 144, 56), (32, 192, 28), (64, 384, 14), (96, 576, 14), (160, 960, 7),
                                (16, 64, 56), (32, 96, 14), (48, 144, 7))]
    if thin:  # last, so that the default sweep is the first part of the thin one
        chains += _pairs("pointwise", [(16, 16, 56), (16, 32, 28), (32, 16, 14), (16, 48, 7)], reps=4)
        chains += _pairs("conv", [(16, 16, 56), (16, 32, 28), (32, 32, 14)], reps=2)
        chains += _pairs("depthwise", [(16, 56, 3), (32, 28, 3), (16, 7, 3), (48, 7, 5)], reps=4)
        chains += [[("conv", 3, 16, 224, 3, 2)]]
    return chains


def _tensor_chains() -> List[List[Op]]:
    """Chains that price the tensor ops (:data:`TENSOR_KINDS`) as networks run them: each
    activation, LayerNorm and softmax after a pointwise conv, the residual add after one, squeeze-excitation (global
    pooling, two 1×1 convs, a gate, the multiply), a stem's max pooling, DenseNet's
    concatenations and ShuffleNet's channel shuffles. Each starts and
    ends with a conv, as inside a network: a runtime fuses an op into the conv before it, or
    keeps the conv's blocked layout through it, only between convs (onnxruntime left the
    chain's last activation and an add of the chain's input unfused)."""
    chains = []
    for act in ACTIVATIONS:
        for c, hw in ((32, 112), (144, 28), (672, 7)):
            chains.append([("pointwise", c, c, hw, 1, 1), (act, c, c, hw, 1, 1)] * 3 + [("pointwise", c, c, hw, 1, 1)])
        # over tensors past the caches, as a network's first stages run them (1-5 MB), after
        # depthwise convs, which take less of the chain's time than 1×1 ones
        for c, hw in ((96, 112), (144, 56), (240, 28)):
            chains.append([("depthwise", c, c, hw, 3, 1), (act, c, c, hw, 1, 1)] * 3 + [("depthwise", c, c, hw, 3, 1)])
    for kind in PASSES:  # rows of 64-384 channels (norm) and of 49-784 positions (softmax)
        for c, hw in ((64, 28), (160, 14), (384, 7)):
            chains.append([("pointwise", c, c, hw, 1, 1), (kind, c, c, hw, 1, 1)] * 3 + [("pointwise", c, c, hw, 1, 1)])
    for c, hw in ((16, 56), (32, 28), (96, 14)):  # a softmax over the channels: many short rows (YOLO's boxes)
        chains.append([("pointwise", c, c, hw, 1, 1), ("softmax", c, c, hw, 0, 1)] * 3 + [("pointwise", c, c, hw, 1, 1)])
    for c, hw in ((24, 56), (80, 14), (320, 7)):
        chains.append([("pointwise", c, c, hw, 1, 1)] + [("pointwise", c, c, hw, 1, 1), ("add", c, c, hw, 1, 1)] * 3
                      + [("pointwise", c, c, hw, 1, 1)])
    for c, hw, gate in ((32, 112, "sigmoid"), (144, 28, "hardsigmoid"), (672, 14, "sigmoid"), (960, 7, "hardsigmoid")):
        chains.append([("pointwise", c, c, hw, 1, 1), ("pool", c, c, hw, 0, 1), ("pointwise", c, c // 4, 1, 1, 1),
                       ("pointwise", c // 4, c, 1, 1, 1), (gate, c, c, 1, 1, 1), ("mul", c, c, hw, 1, 1)] * 2
                      + [("pointwise", c, c, hw, 1, 1)])
    for c, hw in ((64, 112), (256, 56)):
        chains.append([("pointwise", c, c, hw, 1, 1), ("pool", c, c, hw, 3, 2), ("pointwise", c, c, hw // 2, 1, 1)])
    for c, k, hw in ((64, 32, 56), (256, 32, 14), (512, 32, 7)):  # DenseNet: each layer's output joins its input
        chain = [("pointwise", c, c, hw, 1, 1)]
        for i in range(3):
            width = c + i * k
            chain += [("pointwise", width, k, hw, 1, 1), ("concat", width + k, width + k, hw, 1, 1)]
        chains.append(chain + [("pointwise", c + 3 * k, c, hw, 1, 1)])
    for c, half, hw in GHOST_MODULES:  # GhostNet: a 1×1 conv's output joined by a depthwise conv of it
        chain = [("pointwise", c, c, hw, 1, 1)]
        for _ in range(3):
            chain += [("pointwise", c, half, hw, 1, 1), ("depthwise", half, half, hw, 3, 1),
                      ("concat", 2 * half, 2 * half, hw, 1, 1), ("pointwise", 2 * half, c, hw, 1, 1)]
        chains.append(chain)
    for c, k, hw in ((36, 12, 56), (120, 20, 14)):  # joins whose pieces miss the block
        chain = [("pointwise", c, c, hw, 1, 1)]
        for _ in range(3):
            chain += [("pointwise", c, k, hw, 1, 1), ("concat", c + k, c + k, hw, 1, 1), ("pointwise", c + k, c, hw, 1, 1)]
        chains.append(chain)
    for c, hw in ((58, 56), (116, 28), (232, 14)):  # ShuffleNet: a shuffle after each unit's 1×1 conv
        chains.append([("pointwise", c, c, hw, 1, 1), ("transpose", c, c, hw, 1, 1)] * 3
                      + [("pointwise", c, c, hw, 1, 1)])
    # each chain's convs alone, at the shapes where the ops between them ran (four c→c
    # convs): without them an op's time can go to the convs it always runs with
    bare = {(op[0],) + op[1:5] for chain in chains for op in chain
            if op[0] in ("pointwise", "depthwise") and op[1] == op[2]}
    chains += [[(kind, c, c, hw, k, 1)] * 4 for kind, c, _, hw, k in sorted(bare)]
    return chains


# (channels, each half, size) of the calibration's ghost modules: halves of 12, 20 and 36
# channels miss any block of 8 or more (GhostNet's own widths), 16 and 32 fit one of 16
GHOST_MODULES = ((32, 12, 56), (48, 20, 28), (96, 36, 14), (32, 16, 56), (64, 32, 28))


def ghost_probe(piece: int) -> List[Op]:
    """A ghost module whose two halves have ``piece`` channels each, between two convs: what
    :meth:`OnnxBackend.concat_block` asks the runtime to lay out."""
    return [("pointwise", 32, piece, 28, 1, 1), ("depthwise", piece, piece, 28, 3, 1),
            ("concat", 2 * piece, 2 * piece, 28, 1, 1), ("pointwise", 2 * piece, 32, 28, 1, 1)]


def concat_pieces(ops: Sequence[Op], i: int) -> Tuple[int, int]:
    """The channels of the two pieces the chain's concatenation at ``ops[i]`` joins: what the
    op before it read and what it wrote (:func:`~.runtime.chain_model`)."""
    return ops[i - 1][1], ops[i - 1][2]


def _out_hw(hw: int, k: int, stride: int) -> int:
    """The output size of a chain's conv or pooling (padding ``k // 2``, as the chains build them)."""
    return (hw + 2 * (k // 2) - k) // stride + 1


def tensor_positions(op: Op) -> Tuple[float, float]:
    """(elements read, elements written) per channel and image by a tensor op of a chain:
    an activation reads and writes its tensor, an add reads two, the excitation multiply
    reads the pooled tensor's one value per channel besides its operand, a pooling (kernel
    0: global) reads its input and writes its output."""
    kind, _, _, hw, k, stride = op[:6]
    if kind == "pool":
        out = 1 if k == 0 else _out_hw(hw, k, stride) ** 2
        return float(hw * hw), float(out)
    reads = {"add": 2.0 * hw * hw, "mul": hw * hw + 1.0}.get(kind, float(hw * hw))
    return reads, float(hw * hw)


def op_terms(op: Op, batch: int) -> Tuple[float, float]:
    """(MACs, bytes moved) of one op at ``batch`` (the same counting as :class:`LatencyCost`)."""
    kind, cin, cout, hw, k, stride = op[:6]
    if kind in TENSOR_KINDS:
        read, written = tensor_positions(op)
        return 0.0, BYTES_PER_ELEMENT * batch * cout * (read + written)
    if kind == "linear":  # over ``hw`` tokens (1: a vector per image)
        return batch * hw * cin * cout, BYTES_PER_ELEMENT * (batch * hw * (cin + cout) + cin * cout)
    out_hw = _out_hw(hw, k, stride)
    per_pair = k * k
    if kind == "depthwise":
        macs = batch * per_pair * out_hw ** 2 * cout
        weights = per_pair * cout
    else:  # a grouped conv mixes each group's channels only
        groups = op_groups(op)
        macs = batch * per_pair * out_hw ** 2 * cin * cout / groups
        weights = per_pair * cin * cout / groups
    return macs, BYTES_PER_ELEMENT * (batch * (cin * hw * hw + cout * out_hw * out_hw) + weights)


def op_positions(op: Op, batch: int) -> float:
    """Output positions of one op at ``batch`` (a linear layer: its tokens, one per image
    for a vector), or the rows a normalisation or softmax normalises one by one: a LayerNorm
    one per position, a softmax one per channel (kernel field 1: over the positions) or one
    per position (kernel field 0: over the channels), as :class:`LatencyCost` counts them."""
    kind, cout, hw, k = op[0], op[2], op[3], op[4]
    stride = op[5]
    if kind == "norm" or kind == "softmax" and k == 0:
        return float(batch * hw * hw)
    if kind == "softmax":
        return float(batch * cout)
    if kind in TENSOR_KINDS:
        return batch * tensor_positions(op)[1]
    if kind == "linear":
        return float(batch * hw)
    return float(batch * _out_hw(hw, k, stride) ** 2)


def is_aligned(op: Op, multiple: int) -> bool:
    """Whether an op's widths fit the block (as :meth:`LatencyCost.aligned` decides)."""
    kind, cin, cout = op[:3]
    if kind == "linear" or kind in TENSOR_KINDS or multiple <= 1:
        return True
    groups = op_groups(op)  # a grouped conv's block is in its channels per group
    cin, cout = cin // groups, cout // groups
    return cout % multiple == 0 and (kind == "depthwise" or cin % multiple == 0 or cin < multiple)


# --- timing backends ---------------------------------------------------------------------
class OnnxBackend:
    """Times op chains and networks with onnxruntime's CPU provider."""

    tensor_overhead_s = TENSOR_OVERHEAD_S  # its cost per call is about a microsecond
    grouped_overhead_s = GROUPED_OVERHEAD_S
    concat_block_source = "read from the runtime's optimised graph"

    def __init__(self, threads: int, batch: int, spinning: str = "run"):
        import onnxruntime

        self.threads, self.batch, self.spinning = threads, batch, spinning
        self.runtime = {"name": "onnxruntime", "device": "cpu", "threads": threads, "batch": batch,
                        "version": onnxruntime.__version__, "spinning": spinning}

    def prepare(self, ops: Sequence[Op]) -> Tuple[Any, dict]:
        model, shape = chain_model(ops, self.batch)
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        return session(model, self.threads, self.spinning), {"x": x}

    def prepare_network(self, model: Any, x: Any, folder: Path, name: str) -> Tuple[Any, dict]:
        import torch

        path = folder / f"{name}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:  # TorchScript export: a few times faster than the dynamo one, the same graph once optimised
                torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17)
            except Exception:
                from dnnshrink_core.plugin_api import export

                export(model, x, "onnx", path)
        s = session(str(path), self.threads, self.spinning)
        return s, {s.get_inputs()[0].name: x.numpy()}

    def time(self, prepared: Dict[str, Tuple[Any, dict]], rounds: int, runs: int,
             budget_s: float = float("inf")) -> Dict[str, Tuple[float, float]]:
        sessions = {k: v[0] for k, v in prepared.items()}
        feeds = {k: v[1] for k, v in prepared.items()}
        return fastest_and_median(interleaved_times(sessions, feeds, rounds, runs, budget_s=budget_s))

    def optimized_ops(self, ops: Sequence[Op]) -> Dict[str, int]:
        """How many nodes of each type onnxruntime runs for the chain ``ops``, read from the
        graph it optimises (its fusions and layout reorders done)."""
        import onnx
        import onnxruntime

        model, _ = chain_model(ops, self.batch)
        with tempfile.TemporaryDirectory() as tmp:
            options = onnxruntime.SessionOptions()
            options.log_severity_level = 3  # its warning that the saved graph is hardware-specific
            options.intra_op_num_threads = self.threads
            options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
            onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])
            counts: Dict[str, int] = {}
            for node in onnx.load(options.optimized_model_filepath).graph.node:
                counts[node.op_type] = counts.get(node.op_type, 0) + 1
        return counts

    def separate_kinds(self) -> List[str]:
        """The tensor ops' kinds onnxruntime runs as ops of their own between two convs, read
        from the graph it optimises (:data:`FUSION_PROBES`); the others it fuses into the conv
        before them (an activation of the conv, an add as its sum input), where they cost
        nothing of their own."""
        return [kind for kind, (ops, ignore) in FUSION_PROBES.items()
                if set(self.optimized_ops(ops)) - ignore - _LAYOUT_OPS]

    def concat_block(self) -> int:
        """The channel block a concatenation's pieces need for onnxruntime to join them in its
        blocked layout, read from the graph it optimises: the smallest candidate whose odd
        multiples (two pieces of 3 blocks each, then 5) join with no more reorders than
        pieces of 64 channels do. 1 when pieces of 12 and 20 channels already do (the runtime
        has no blocked layout, as on CPUs without onnxruntime's NCHWc kernels) or none does."""
        def reorders(piece: int) -> int:
            return self.optimized_ops(ghost_probe(piece)).get("ReorderOutput", 0)

        least = reorders(64)
        for block in CANDIDATES:
            if all(reorders(n * block) <= least for n in (3, 5)):
                return 1 if block == CANDIDATES[0] else block
        return 1


_LAYOUT_OPS = {"Conv", "FusedConv", "ReorderInput", "ReorderOutput", "Identity"}
_SQUEEZE_EXCITE = [("pointwise", 32, 32, 28, 1, 1), ("pool", 32, 32, 28, 0, 1), ("pointwise", 32, 8, 1, 1, 1),
                   ("pointwise", 8, 32, 1, 1, 1), ("sigmoid", 32, 32, 1, 1, 1), ("mul", 32, 32, 28, 1, 1),
                   ("pointwise", 32, 32, 28, 1, 1)]
# per tensor op kind: a chain with it between convs, and the op types besides the layout ones
# that do not count as it
FUSION_PROBES: Dict[str, Tuple[List[Op], set]] = {
    **{act: ([("pointwise", 32, 32, 28, 1, 1), (act, 32, 32, 28, 1, 1), ("pointwise", 32, 32, 28, 1, 1)], set())
       for act in ACTIVATIONS},
    **{kind: ([("pointwise", 32, 32, 28, 1, 1), (kind, 32, 32, 28, 1, 1), ("pointwise", 32, 32, 28, 1, 1)], {"Reshape"})
       for kind in PASSES},
    "add": ([("pointwise", 32, 32, 28, 1, 1), ("pointwise", 32, 32, 28, 1, 1), ("add", 32, 32, 28, 1, 1),
             ("pointwise", 32, 32, 28, 1, 1)], set()),
    "mul": (_SQUEEZE_EXCITE, {"GlobalAveragePool", "Sigmoid"}),
    "pool": ([("pointwise", 32, 32, 28, 1, 1), ("pool", 32, 32, 28, 3, 2), ("pointwise", 32, 32, 14, 1, 1)], set()),
    "concat": ([("pointwise", 32, 32, 28, 1, 1), ("pointwise", 32, 16, 28, 1, 1), ("concat", 48, 48, 28, 1, 1),
                ("pointwise", 48, 32, 28, 1, 1)], set()),
    "transpose": ([("pointwise", 32, 32, 28, 1, 1), ("transpose", 32, 32, 28, 1, 1), ("pointwise", 32, 32, 28, 1, 1)],
                  {"Reshape"}),
}


def torch_chain(ops: Sequence[Op]) -> Any:
    """The chain of :func:`~.runtime.chain_model` as an eager PyTorch module, each conv with
    its BatchNorm (which eager PyTorch runs in eval mode, where an exported graph folds it)."""
    import torch
    from torch import nn

    activations = {"clip": nn.ReLU6, "hardswish": nn.Hardswish, "hardsigmoid": nn.Hardsigmoid,
                   "sigmoid": nn.Sigmoid, "silu": nn.SiLU, "gelu": nn.GELU}

    class Chain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ops = list(ops)
            layers = []
            for i, op in enumerate(ops):
                kind, cin, cout, hw, k, stride = op[:6]
                if kind == "linear":
                    layers.append(nn.Linear(cin, cout))
                elif kind in activations:
                    layers.append(activations[kind]())
                elif kind == "norm":  # over rows of the channels' length, as the onnx chain runs it
                    layers.append(nn.LayerNorm(cout))
                elif kind == "softmax":
                    layers.append(nn.Softmax(dim=-1))
                elif kind == "pool":
                    layers.append(nn.AdaptiveAvgPool2d(1) if k == 0 else nn.MaxPool2d(k, stride, k // 2))
                elif kind in ("add", "mul", "concat", "transpose"):
                    layers.append(nn.Identity())
                else:  # eager PyTorch runs a network's BatchNorm as an op of its own (onnx folds it)
                    groups = cin if kind == "depthwise" else op_groups(op)
                    conv = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
                    layers.append(nn.Sequential(*conv, *([nn.ReLU()] if conv_has_relu(ops, i) else [])))
            self.layers = nn.ModuleList(layers)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            before = pooled_from = x
            for (kind, _, _, _, op_k, *_), layer in zip(self.ops, self.layers):
                if kind == "add":
                    y = x + before
                elif kind == "concat":
                    y = torch.cat([before, x], 1)
                elif kind == "transpose":  # a channel shuffle in two groups
                    n, c, h, w = x.shape
                    y = x.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
                elif kind == "mul":
                    y = pooled_from * x
                elif kind == "softmax" and op_k == 0:  # over the channels
                    y = torch.softmax(x, 1)
                elif kind in PASSES:  # the feature map read as rows (a free reshape)
                    n, c = x.shape[:2]
                    y = layer(x.reshape(n, -1, c) if kind == "norm" else x.reshape(n, c, -1)).reshape(x.shape)
                else:
                    if kind == "pool" and isinstance(layer, nn.AdaptiveAvgPool2d):
                        pooled_from = x
                    y = layer(x)
                before, x = x, y
            return x

    return Chain()


class _TorchRunner:
    def __init__(self, module: Any, x: Any, device: Any):
        self.module, self.x, self.device = module, x, device

    def run(self, *_: Any) -> None:
        import torch

        with torch.no_grad():
            self.module(self.x)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # its own GPU, which need not be the current one


class TorchBackend:
    """Times op chains and networks as eager PyTorch modules (``--runtime torch``)."""

    tensor_overhead_s = grouped_overhead_s = 1e-2  # eager dispatch per op: no tighter bound than the layers'
    concat_block_source = "eager PyTorch keeps no blocked layout"

    def __init__(self, threads: int, batch: int, device: str, dtype: str = "float32"):
        import torch

        if dtype not in DTYPES:
            raise ConfigError(f"--dtype {dtype!r}: give one of {', '.join(DTYPES)}")
        self.device = checked_device(device, "--device", "calibrate on the machine the network will run on, or "
                                     "use --device cpu")
        self.torch, self.batch, self.dtype = torch, batch, getattr(torch, dtype)
        if self.device.type == "cpu":
            torch.set_num_threads(threads)
        # the number format the network is deployed in (model.half() and its inputs): its
        # bytes per element differ, which the fitted bandwidths take in (a profile prices
        # traffic at 4 bytes an element whatever it was timed in)
        self.runtime = {"name": "torch", "device": str(self.device), "threads": threads, "batch": batch,
                        "version": torch.__version__, "dtype": dtype}

    def prepare(self, ops: Sequence[Op]) -> Tuple[Any, dict]:
        kind, cin, _, hw = ops[0][:4]
        shape = chain_input_shape(ops, self.batch)
        module = torch_chain(ops).eval().to(self.device, self.dtype)
        return _TorchRunner(module, self.torch.randn(shape, device=self.device, dtype=self.dtype), self.device), {}

    def prepare_network(self, model: Any, x: Any, folder: Path, name: str) -> Tuple[Any, dict]:
        return _TorchRunner(model.eval().to(self.device, self.dtype), x.to(self.device, self.dtype), self.device), {}

    def separate_kinds(self) -> List[str]:
        """Every tensor op's kind: eager PyTorch runs each op by itself."""
        return list(TENSOR_KINDS)

    def concat_block(self) -> int:
        """1: eager PyTorch keeps no blocked layout that a concatenation could leave."""
        return 1

    def time(self, prepared: Dict[str, Tuple[Any, dict]], rounds: int, runs: int,
             budget_s: float = float("inf")) -> Dict[str, Tuple[float, float]]:
        sessions = {k: v[0] for k, v in prepared.items()}
        return fastest_and_median(interleaved_times(sessions, {k: {} for k in prepared}, rounds, runs,
                                                    budget_s=budget_s))


# --- the steps ----------------------------------------------------------------------------
def _block(ratios: Dict[int, float], ratio: float) -> int:
    """The smallest candidate that fits while the median over it and every larger one fits
    too; 1 when none does."""
    for m in sorted(ratios):
        larger = [ratios[c] for c in ratios if c >= m]
        if ratios[m] >= ratio and float(np.median(larger)) >= ratio:
            return m
    return 1


def measure_blocks(backend: Any, rounds: int = 12, runs: int = 3, ratio: float = 1.2,
                   passes: int = 2) -> Dict[str, Dict[str, Any]]:
    """Per op kind, the measured channel block (see the module's step 1), the ratios it was
    decided from, and the block each of ``passes`` separate timings would have given.

    For each candidate ``m`` a width that is an odd multiple of ``m`` (68, 72, 80, 96, 128 for
    4…64) is timed next to the width one above it (never aligned); ``m`` *fits* when the
    aligned width is at least ``ratio`` times faster per unit. The block is the smallest
    ``m`` that fits while the median over it and every larger candidate fits too (one
    noisy probe does not decide); 1 when none does (the runtime has no block). The
    ``rounds`` are split into ``passes``: the block is decided on the fastest run of all of
    them, and each pass's own decision is kept (``per_pass``), so a machine too busy to
    measure on shows up as passes that disagree.
    """
    probes = {4: 68, 8: 72, 16: 80, 32: 96, 64: 128}
    kinds = {"pointwise": (1, 4), "depthwise": (3, 4), "conv": (3, 2)}
    prepared = {f"{kind}:{w + d}": backend.prepare([(kind, w + d, w + d, 56, k, 1)] * n)
                for kind, (k, n) in kinds.items() for w in probes.values() for d in (0, 1)}
    passes = max(1, min(passes, rounds))
    timings = [backend.time(prepared, max(1, rounds // passes), runs) for _ in range(passes)]
    fastest = {key: min(t[key][0] for t in timings) for key in prepared}

    def ratios(timed: Dict[str, float], kind: str) -> Dict[int, float]:
        def per_unit(w: int) -> float:
            return timed[f"{kind}:{w}"] / (w if kind == "depthwise" else w * w)

        return {m: per_unit(w + 1) / per_unit(w) for m, w in probes.items()}

    result = {}
    for kind in kinds:
        combined = ratios(fastest, kind)
        result[kind] = {"channel_multiple": _block(combined, ratio),
                        "slowdown_one_above": {str(probes[m]): round(r, 2) for m, r in combined.items()},
                        "per_pass": [_block(ratios({k: v[0] for k, v in t.items()}, kind), ratio) for t in timings]}
    return result


def unstable_blocks(blocks: Dict[str, Dict[str, Any]]) -> Optional[str]:
    """What :func:`measure_blocks`' passes disagreed on, in words, or None when they agree."""
    moved = {kind: info["per_pass"] for kind, info in blocks.items() if len(set(info.get("per_pass", ()))) > 1}
    if not moved:
        return None
    return ("the channel blocks changed between timings of the same probes (" +
            ", ".join(f"{kind}: {' then '.join(map(str, passes))}" for kind, passes in moved.items()) +
            "); the machine is too noisy for round_to: auto to rely on them. Calibrate again on an idle machine, "
            "or set round_to to an integer.")


@dataclass(frozen=True)
class Terms:
    """What the roofline needs of every op of a timed chain: its kind, MACs, bytes moved,
    whether its widths fit its kind's block, output positions (all at the profile's batch)."""

    kinds: Tuple[str, ...]
    macs: np.ndarray
    traffic: np.ndarray
    aligned: np.ndarray
    positions: np.ndarray

    def without(self, kinds: Sequence[str]) -> "Terms":
        """These terms with the ops of ``kinds`` left out (they cost nothing)."""
        keep = np.array([k not in kinds for k in self.kinds], dtype=bool)
        return Terms(tuple(k for k, x in zip(self.kinds, keep) if x), self.macs[keep], self.traffic[keep],
                     self.aligned[keep], self.positions[keep])

    @classmethod
    def of_chain(cls, ops: Sequence[Op], batch: int, multiples: Dict[str, int]) -> "Terms":
        """The terms of a calibration chain."""
        terms = [op_terms(op, batch) for op in ops]
        def aligned(i: int, op: Op) -> bool:
            block = multiples.get(op[0], 1)
            if op[0] == "concat":
                return all(piece % block == 0 for piece in concat_pieces(ops, i))
            return is_aligned(op, block)

        return cls(tuple(op[0] for op in ops), np.array([t[0] for t in terms], dtype=np.float64),
                   np.array([t[1] for t in terms], dtype=np.float64),
                   np.array([aligned(i, op) for i, op in enumerate(ops)], dtype=bool),
                   np.array([op_positions(op, batch) for op in ops], dtype=np.float64))


def fit(samples: Sequence[Tuple[Sequence[Op], float]], batch: int, multiples: Dict[str, int],
        per_position: bool = False, fused: Sequence[str] = (), tensor_overhead_s: float = TENSOR_OVERHEAD_S,
        grouped_overhead_s: float = GROUPED_OVERHEAD_S, position_kinds: Sequence[str] = POSITION_KINDS
        ) -> Tuple[Dict[str, OpConstants], float, Dict[str, float]]:
    """Fit the roofline constants to ``(chain, seconds)`` samples; returns the constants per
    kind, the per-run overhead (ms) and fit statistics (relative errors in %). With
    ``per_position``, a cost per output position per op kind is fitted too. Grouped convs,
    where the samples hold them, get a kind of their own (their block is in channels per
    group). The tensor ops' kinds (:data:`TENSOR_KINDS`) that the samples hold get a bandwidth
    and an overhead each (they compute nothing); a kind no sample holds, or one the runtime
    ``fused`` into the conv before it (:meth:`OnnxBackend.separate_kinds`), is left out of the
    profile: it costs nothing.
    ``tensor_overhead_s`` / ``grouped_overhead_s``: the most a tensor op's / a grouped conv's
    overhead may be fitted (the backend's attributes of those names). ``position_kinds``: the
    tensor kinds that get a per-position cost (the layers always do)."""
    from scipy.optimize import least_squares

    terms = [Terms.of_chain(ops, batch, multiples).without(fused) for ops, _ in samples]
    present = {k for t in terms for k in t.kinds}
    layer_kinds = list(KINDS) + ([GROUPED] if GROUPED in present else [])  # the kinds that compute
    kinds = layer_kinds + [k for k in TENSOR_KINDS if k in present]
    n, nc = len(kinds), len(layer_kinds)
    flat_kind = np.array([kinds.index(k) for t in terms for k in t.kinds])
    flat_macs, flat_bytes, flat_aligned, flat_positions = (np.concatenate([getattr(t, a) for t in terms])
                                                           for a in ("macs", "traffic", "aligned", "positions"))
    sample_of = np.concatenate([np.full(len(t.kinds), s) for s, t in enumerate(terms)])
    measured = np.array([t for _, t in samples])
    has_unaligned = {kinds[k] for k in flat_kind[~flat_aligned]}

    # one bandwidth for the convolutions (the same memory system moves their activations;
    # 3×3 convs are compute-bound at every realistic shape, so a bandwidth of their own would
    # be unidentified and could wander), one for linear layers (streaming their weights), one
    # per tensor op kind (whether the runtime fuses it into the conv before it shows there)
    bw_of = np.array([1 if kind == "linear" else 0 for kind in layer_kinds] + list(range(2, 2 + n - nc)))
    # and one more for a tensor kind whose samples have pieces that miss its block (a
    # concatenation the runtime reorders out of its blocked layout and back)
    blocked = [i for i in range(nc, n) if kinds[i] in has_unaligned]
    nb = 2 + n - nc + len(blocked)
    extra = n if per_position else 0  # per-position seconds, at most a microsecond
    # an elementwise pass (activation, multiply, add, concatenation, transpose) costs per
    # element, which its bandwidth prices: a per-position term of its own is not in what it
    # does, and fitted freely it took what a busy machine added (a multiply at 39 ns a
    # position). Pooling (its window) and the row-wise passes (per row) keep theirs.
    no_position = np.array([k in TENSOR_KINDS and k not in position_kinds for k in kinds])

    def unpack(theta: np.ndarray) -> Tuple[np.ndarray, ...]:
        peak = np.r_[np.exp(theta[0:nc]), np.full(n - nc, np.inf)]  # tensor ops compute nothing
        peak_un = np.r_[np.exp(theta[nc:2 * nc]), np.full(n - nc, np.inf)]
        bandwidths = np.exp(theta[2 * nc:2 * nc + nb])
        bw = bandwidths[bw_of]
        bw_un = bw.copy()
        bw_un[blocked] = bandwidths[nb - len(blocked):]
        o = 2 * nc + nb
        overhead, per_run = theta[o:o + n], theta[o + n]
        position = theta[o + n + 1:o + n + 1 + n] if per_position else np.zeros(n)
        return peak, peak_un, bw, bw_un, overhead, per_run, position

    def predict(theta: np.ndarray) -> np.ndarray:
        peak, peak_un, bw, bw_un, overhead, per_run, position = unpack(theta)
        p = np.where(flat_aligned, peak[flat_kind], peak_un[flat_kind])
        b = np.where(flat_aligned, bw[flat_kind], bw_un[flat_kind])
        per_op = roofline_seconds(flat_macs, flat_bytes, p, b, overhead[flat_kind]) \
            + flat_positions * position[flat_kind]
        return per_run + np.bincount(sample_of, weights=per_op, minlength=len(samples))

    def residual(theta: np.ndarray) -> np.ndarray:
        return np.log(np.maximum(predict(theta), 1e-9) / measured)

    best = None
    for peak0, bw0 in ((50e9, 20e9), (20e9, 5e9), (100e9, 50e9)):  # a few starts: the max() has kinks
        theta0 = np.r_[np.full(nc, math.log(peak0)), np.full(nc, math.log(peak0 / 4)), np.full(nb, math.log(bw0)),
                       np.full(nc, 5e-6), np.full(n - nc, min(tensor_overhead_s / 2, 5e-6)), 20e-6,
                       np.full(extra, 1e-9)]
        lower = np.r_[np.full(2 * nc + nb, math.log(1e6)), np.zeros(n + 1 + extra)]
        layer_bounds = [grouped_overhead_s if k == GROUPED else 1e-2 for k in layer_kinds]
        upper = np.r_[np.full(2 * nc, math.log(MOST_MACS_PER_S)), np.full(nb, math.log(MOST_BYTES_PER_S)),
                      layer_bounds, np.full(n - nc, tensor_overhead_s), 1e-2,
                      np.where(no_position, 1e-15, 1e-6)[:extra]]
        theta0[len(theta0) - extra:] = np.minimum(theta0[len(theta0) - extra:], upper[len(upper) - extra:] / 2)
        result = least_squares(residual, theta0, bounds=(lower, upper), x_scale="jac")
        if best is None or result.cost < best.cost:
            best = result
    peak, peak_un, bw, bw_un, overhead, per_run, position = unpack(best.x)
    ops = {}
    for i, kind in enumerate(kinds):
        if kind in TENSOR_KINDS:
            unaligned_bw = float(bw_un[i] / 1e9) if i in blocked else None
            ops[kind] = OpConstants.tensor_op(float(bw[i] / 1e9), float(overhead[i] * 1e6), float(position[i] * 1e9),
                                              int(multiples.get(kind, 1)), unaligned_bw)
            continue
        unaligned = peak_un[i] if kind in has_unaligned else peak[i]
        ops[kind] = OpConstants(peak_gmacs=float(peak[i] / 1e9), peak_unaligned_gmacs=float(unaligned / 1e9),
                                bandwidth_gbs=float(bw[i] / 1e9), overhead_us=float(overhead[i] * 1e6),
                                channel_multiple=int(multiples.get(kind, 1)), position_ns=float(position[i] * 1e9))
    errors = 100 * np.abs(predict(best.x) / measured - 1)
    return ops, float(per_run * 1e3), {"sweep_mean_abs_error_pct": float(errors.mean()),
                                       "sweep_max_abs_error_pct": float(errors.max())}


def _rate(value: float, bound: float, unit: str) -> str:
    """A fitted rate for the log: ``none measured`` where the fit left it near its bound (the
    kind's time is its overhead, or too small for the sweep to see: no real rate is that high)."""
    return f"{value:7.1f} {unit}" if value < UNMEASURED_SHARE * bound else "none measured"


def predict_network(model: Any, x: Any, profile: Profile) -> float:
    """Predicted milliseconds of ``model`` on ``x`` under ``profile`` (its channel graph priced)."""
    import dnnshrink_core as ds
    from dnnshrink_core.plugin_api import CostModel

    return CostModel(ds.trace(model, x), model, "latency", profile=profile).initial


THIN_SHARE = 0.25  # the validation's shrunk networks keep this share of every removable group


def _has_removable(model: Any, x: Any) -> bool:
    """Whether ``model`` has a channel that can be removed (so that a thin version exists)."""
    import dnnshrink_core as ds

    return bool(ds.trace(model, x).unit_removable.any())


def thin_network(model: Any, x: Any, share: float = THIN_SHARE, block: int = 16) -> Any:
    """``model`` with every channel group cut to ``share`` of its removable units (rounded up
    to ``block``): the widths a shrunk network runs at, where per-op costs weigh most."""
    import dnnshrink_core as ds

    graph = ds.trace(model, x)
    masks = {}
    for group in graph.groups:
        removable = graph.unit_removable[group.units]
        keep = ~removable
        free = np.flatnonzero(removable)
        keep[free[:min(len(free), max(block, int(math.ceil(share * len(free) / block)) * block))]] = True
        masks[group.name] = keep
    return ds.generate(model, x, masks, compensate=False)


def validate(backend: Any, profile: Profile, models: Sequence[str] = VALIDATION_MODELS, rounds: int = 10,
             runs: int = 3, log: Callable[[str], None] = print, thin: bool = True,
             extra: Optional[Mapping[str, Any]] = None, extra_input: Sequence[int] = (3, 224, 224)
             ) -> List[Dict[str, Any]]:
    """Predicted against measured latency (fastest and median of interleaved runs) of whole
    torchvision networks (``weights=None``) the fit did not see, and (``thin``) of each cut
    to a quarter of its widths (:func:`thin_network`), named ``<model> x0.25`` (``thin`` in
    its row). ``extra``: the user's own networks by name (``dnnshrink calibrate
    --check-model``), run on one batch of ``extra_input`` (channels, height, width), their
    rows marked ``extra``; a network with no removable channel has no thin version."""
    import torch
    import torchvision

    torch.manual_seed(0)
    x = torch.randn(backend.batch, 3, 224, 224)
    networks = [(name, torchvision.models.get_model(name, weights=None).eval(), x, False) for name in models]
    networks += [(name, model.eval(), torch.randn(backend.batch, *extra_input), True)
                 for name, model in (extra or {}).items()]
    prepared, predicted, names, thin_names, extra_names = {}, {}, [], set(), set()
    with tempfile.TemporaryDirectory() as tmp:
        for name, model, example, is_extra in networks:
            variants = [(name, model)]
            if thin and _has_removable(model, example):
                variants.append((f"{name} x{THIN_SHARE:g}", thin_network(model, example)))
            thin_names.update(label for label, _ in variants[1:])
            for label, net in variants:
                names.append(label)
                if is_extra:
                    extra_names.add(label)
                predicted[label] = predict_network(net, example, profile)
                prepared[label] = backend.prepare_network(net, example, Path(tmp), f"net{len(prepared)}")
        timed = backend.time(prepared, rounds, runs)
    rows = []
    for name in names:
        fastest, median = timed[name]
        rows.append({"model": name, "thin": name in thin_names, "extra": name in extra_names,
                     "predicted_ms": round(predicted[name], 3), "measured_ms": round(1e3 * fastest, 3),
                     "measured_median_ms": round(1e3 * median, 3),
                     "error_pct": round(100 * (predicted[name] / (1e3 * fastest) - 1), 1)})
        log(f"  {name:<25} predicted {predicted[name]:8.2f} ms, measured {1e3 * fastest:8.2f} ms (median "
            f"{1e3 * median:.2f}): {rows[-1]['error_pct']:+.1f}%")
    return rows


def share_errors(rows: Sequence[Mapping[str, Any]]) -> List[float]:
    """Per network of :func:`validate`'s rows with a thin version, the error (%) of the
    predicted thin/whole latency ratio: what a latency target given as a share of the
    baseline rests on. A machine that ran the sweep and the check at different speeds moves
    the whole and thin errors together and leaves this one."""
    errors = {r["model"]: r["predicted_ms"] / r["measured_ms"] for r in rows}
    return [100 * abs(errors[r["model"]] / errors[r["model"].rsplit(" ", 1)[0]] - 1)
            for r in rows if r["thin"] and r["model"].rsplit(" ", 1)[0] in errors]


def calibrate(runtime: str = "onnxruntime", threads: int = 2, batch: int = 1, device: str = "cpu",
              out: Optional[Any] = None, check: bool = True, rounds: int = 12, dtype: str = "float32",
              log: Callable[[str], None] = print, per_position: bool = True,
              blocks_from: Optional[Any] = None, check_models: Optional[Mapping[str, Any]] = None,
              check_input: Sequence[int] = (3, 224, 224), spinning: str = "run") -> Profile:
    """Measure a latency profile (the module's four steps) and write it to ``out``. With
    ``per_position`` (the default), the sweep adds thin chains and the fit a per-output-position
    cost per op kind (see :mod:`.latency`): over three timings it predicted networks at a
    quarter of their widths within 17% against 100% without it (docs/benchmarks.md).
    ``blocks_from``: a profile of the same runtime whose channel blocks are kept instead of
    measured again (they move on a busy machine, and ``round_to: auto`` rounds to them).
    ``check_models``: the user's own networks by name, timed and predicted in the check too
    (on one batch of ``check_input``: channels, height, width). ``spinning``: how onnxruntime's
    threads wait for work (:data:`~dnnshrink_core.plugin_api.SPINNING`; the default, spinning
    within a run only, is how a deployed session runs each call and how the pipeline times)."""
    start = time.perf_counter()
    if runtime == "onnxruntime":
        if dtype != "float32":
            raise ConfigError(f"--dtype {dtype}: the onnxruntime profile times the float32 ONNX dnnshrink exports; "
                              "--dtype is for --runtime torch (a network deployed with model.half(), say)")
        if device != "cpu":
            raise ConfigError("--runtime onnxruntime measures the CPU provider; use --device cpu (or --runtime torch "
                              "for a GPU)")
        if spinning not in SPINNING:
            raise ConfigError(f"--spinning must be one of {', '.join(SPINNING)}, not {spinning!r}")
        backend: Any = OnnxBackend(threads, batch, spinning)
    elif runtime == "torch":
        if spinning != "run":
            raise ConfigError("--spinning is for --runtime onnxruntime (its threads' wait between ops)")
        backend = TorchBackend(threads, batch, device, dtype)
    else:
        raise ConfigError(f"runtime must be 'onnxruntime' or 'torch', not {runtime!r}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    log(f"dnnshrink calibrate: {runtime} {device}, {threads} threads, batch {batch} (1-minute load average "
        f"{load:.2f})")
    cores = os.cpu_count() or 1
    if load > 0.5 * cores:
        log(f"  warning: the machine is busy (load {load:.2f} on {cores} cores): other processes' work will show "
            "in the timings; calibrate on an idle machine for a profile to trust")
    if blocks_from is not None:  # measured before (on a quieter machine): kept, the rest is fitted again
        kept = load_profile(blocks_from)
        if any(kept.runtime.get(key) != backend.runtime[key] for key in ("name", "device")):
            raise ConfigError(f"--blocks-from {blocks_from}: that profile is of {kept.describe()}, not of "
                             f"{backend.runtime['name']} {backend.runtime['device']}")
        blocks = {kind: {"channel_multiple": kept.ops[kind].channel_multiple, "from": str(blocks_from)}
                  for kind in ("pointwise", "depthwise", "conv")}
    else:
        blocks = measure_blocks(backend)
    multiples = {kind: info["channel_multiple"] for kind, info in blocks.items()}
    multiples["linear"] = 1
    multiples[GROUPED] = multiples["conv"]  # in channels per group (the grouped kernels block them alike)
    # read from the optimised graph, not timed: it does not move on a busy machine
    multiples["concat"] = backend.concat_block()
    blocks["concat"] = {"channel_multiple": multiples["concat"], "from": backend.concat_block_source}
    timed_blocks = {k: v for k, v in multiples.items() if k != "concat"}
    log("  channel blocks: " + ", ".join(f"{k} {v}" for k, v in timed_blocks.items())
        + (f" (from {blocks_from})" if blocks_from is not None else "")
        + f"; a concatenation's pieces: {multiples['concat']} ({backend.concat_block_source})")
    unstable = unstable_blocks(blocks)
    if unstable:  # (a warning, not a log line too: the command line prints it once)
        warnings.warn(f"dnnshrink calibrate: {unstable}", DnnshrinkWarning, stacklevel=2)
    separate = backend.separate_kinds()
    fused = [k for k in TENSOR_KINDS if k not in separate]
    log("  ops between the convs that run by themselves: " + (", ".join(separate) or "none")
        + ("; fused into the conv before them: " + ", ".join(fused) if fused else ""))
    chains = sweep_chains(thin=per_position)
    prepared = {str(i): backend.prepare(ops) for i, ops in enumerate(chains)}
    timed = backend.time(prepared, rounds, 3)
    samples = [(ops, timed[str(i)][0]) for i, ops in enumerate(chains)]
    ops, per_run_ms, stats = fit(samples, batch, multiples, per_position, fused, backend.tensor_overhead_s,
                                 backend.grouped_overhead_s)
    sweep_s = time.perf_counter() - start
    log(f"  fitted {len(samples)} chains in {sweep_s:.0f} s: mean error {stats['sweep_mean_abs_error_pct']:.1f}%")
    for kind, c in ops.items():
        peaks = "" if kind in TENSOR_KINDS else \
            (f"peak {_rate(c.peak_gmacs, MOST_MACS_PER_S / 1e9, 'GMAC/s')} (unaligned "
             f"{_rate(c.peak_unaligned_gmacs, MOST_MACS_PER_S / 1e9, 'GMAC/s').strip()}), ")
        unaligned = "" if c.bandwidth_unaligned_gbs is None else \
            f" (pieces off its block of {c.channel_multiple}: " \
            f"{_rate(c.bandwidth_unaligned_gbs, MOST_BYTES_PER_S / 1e9, 'GB/s').strip()})"
        log(f"  {kind:<11} {peaks}bandwidth {_rate(c.bandwidth_gbs, MOST_BYTES_PER_S / 1e9, 'GB/s')}{unaligned}, "
            f"overhead {c.overhead_us:5.1f} us"
            + (f", per position {c.position_ns:5.2f} ns" if per_position else "")
            + ("" if kind in TENSOR_KINDS else f", block {c.channel_multiple}"))
    calibration: Dict[str, Any] = {"created": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": platform.machine(),
                                   "processor": platform.processor() or platform.machine(),
                                   "cpu_count": os.cpu_count(), "load_average_1min": round(load, 2),
                                   "sweep_chains": len(samples), "blocks": blocks, "blocks_stable": unstable is None,
                                   "fused_tensor_ops": fused, **stats}
    profile = Profile(backend.runtime, per_run_ms, ops, calibration)
    if check:
        log("  unseen networks (predicted against measured, fastest of runs):")
        rows = validate(backend, profile, log=log, extra=check_models, extra_input=check_input)
        whole = [abs(r["error_pct"]) for r in rows if not r["thin"] and not r["extra"]]
        thin = [abs(r["error_pct"]) for r in rows if r["thin"] and not r["extra"]]
        calibration["validation"] = rows
        share = share_errors(rows)
        calibration["validation_mean_abs_error_pct"] = round(float(np.mean(whole)), 1)
        calibration["validation_thin_mean_abs_error_pct"] = round(float(np.mean(thin)), 1)
        calibration["validation_share_mean_abs_error_pct"] = round(float(np.mean(share)), 1) if share else None
        log(f"  mean absolute error {np.mean(whole):.1f}% (whole networks), {np.mean(thin):.1f}% (at "
            f"{THIN_SHARE:g} of their widths)" + (f", over the {len(whole)} torchvision networks" if check_models else "")
            + (f"; {np.mean(share):.1f}% on the thin network's share of the whole one's latency (what a target "
               "given as a share of the baseline rests on)" if share else ""))
    calibration["seconds"] = round(time.perf_counter() - start, 1)
    calibration["load_average_1min_end"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    if out is not None:
        profile.save(out)
        log(f"  wrote {out} ({calibration['seconds']:.0f} s)")
    return profile
