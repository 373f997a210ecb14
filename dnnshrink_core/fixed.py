"""What no channel cut changes: products of two activations, and conv/linear layers that no
handler could follow (kept whole).

**Products**: attention's query·key scores and its weighted sum of the values, and any
``a @ b``, ``bmm``, ``baddbmm``, two-operand ``einsum`` or ``scaled_dot_product_attention``
that no handler declared a layer. Their size follows the tokens and the head width, which
channel pruning leaves alone (the handlers keep whole the channels that meet such a
product). **Layers kept whole**: a conv or linear module whose input came through an op the
graph does not follow (a patch embedding after a token reshape, a convolutional position
encoding), so its channels are frozen.

Both are constants that every keep-set pays, so the cost models price them once at their
traced size (:attr:`~dnnshrink_core.cost.CostModel.constant`): a product as a linear layer
over its rows without weights (op ``"matmul"``: ``latency`` prices it with the profile's
``linear`` constants, as onnxruntime runs both as a ``MatMul``), a layer kept whole as the
layer it is, each at its full ``widths``.
Without them a MACs, parameters or latency target on a hybrid CNN-attention network priced
only the layers it could cut, and landed above what was asked (MobileViT-XXS: attention
is 15% of its MACs; CoaT-Lite: its patch embeddings 4%).
"""
from __future__ import annotations

import math
import operator
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from .graph import LayerCost
from .handler import conv_terms, node_arg

_MATMULS = {operator.matmul, torch.matmul, torch.bmm, torch.mm}
_METHODS = {"matmul", "bmm", "mm", "__matmul__", "baddbmm"}


def _shape(trace: Any, value: Any) -> Optional[Tuple[int, ...]]:
    shape = getattr(trace.specs.get(value), "shape", None) if isinstance(value, fx.Node) else None
    return tuple(int(n) for n in shape) if shape is not None else None


Gemm = Tuple[float, float, float, float, float]  # (rows, k, n, elements read, elements written)


def matmul_terms(a: Sequence[int], b: Sequence[int]) -> Optional[Gemm]:
    """``a @ b`` for operand shapes ``a``, ``b`` (``torch.matmul``'s rules: a 1-D operand is
    a row or a column, batch dims broadcast) as one matrix product: its rows (every batch
    item's), inner and output widths, and the elements it reads and writes."""
    if not a or not b:
        return None
    sa, sb = (tuple(a) if len(a) > 1 else (1, a[0])), (tuple(b) if len(b) > 1 else (b[0], 1))
    if sa[-1] != sb[-2]:
        return None
    try:
        items = math.prod(torch.broadcast_shapes(sa[:-2], sb[:-2]))
    except RuntimeError:
        return None
    m, k, n = sa[-2], sa[-1], sb[-1]
    return float(items * m), float(k), float(n), float(math.prod(a) + math.prod(b)), float(items * m * n)


def attention_terms(q: Sequence[int], k: Sequence[int], v: Sequence[int]) -> List[Gemm]:
    """``scaled_dot_product_attention`` as its two matrix products: the scores ``q @ kᵀ``,
    then their weighted sum of ``v``."""
    if len(q) < 2 or len(k) < 2 or len(v) < 2:
        return []
    items = math.prod(q[:-2])
    rows, source, e, ev = items * q[-2], k[-2], q[-1], v[-1]
    scores = rows * source
    return [(float(rows), float(e), float(source), float(math.prod(q) + math.prod(k)), float(scores)),
            (float(rows), float(source), float(ev), float(scores + math.prod(v)), float(rows * ev))]


def einsum_terms(equation: Any, shapes: Sequence[Sequence[int]]) -> Optional[Gemm]:
    """A two-operand ``einsum`` as the batched matrix product it runs: the indices in both
    operands and the output are its batch, those of one operand and the output its rows or
    its columns (the columns: the operand that holds the output's last index, as ``a @ b``
    has them), the summed ones its inner width. Its MACs are the product of every index's
    size either way; the shape matters to a latency profile, which priced each output
    element as a product of its own (one column) 30–50× above what MaxViT's window attention
    ("BGHID,BGHJD->BGHIJ") measures."""
    if not isinstance(equation, str) or "->" not in equation or "..." in equation or len(shapes) != 2:
        return None
    lhs, out = equation.replace(" ", "").split("->")
    inputs = lhs.split(",")
    if len(inputs) != 2 or any(len(s) != len(shape) for s, shape in zip(inputs, shapes)):
        return None
    sizes: dict = {}
    for subs, shape in zip(inputs, shapes):
        for letter, n in zip(subs, shape):
            sizes[letter] = max(sizes.get(letter, 1), int(n))
    a, b = (set(subs) for subs in inputs)
    kept = set(out)
    own_a, own_b = (a - b) & kept, (b - a) & kept
    if out and out[-1] in own_a:
        own_a, own_b = own_b, own_a
    size = lambda letters: math.prod(sizes[letter] for letter in letters)  # noqa: E731
    rows = size((a & b & kept) | own_a)
    written = math.prod(sizes.get(letter, 1) for letter in out)
    return float(rows), float(size(set(sizes) - kept)), float(size(own_b)), \
        float(sum(math.prod(s) for s in shapes)), float(written)


def _gemms(trace: Any, node: fx.Node) -> List[Gemm]:
    """The matrix products ``node`` runs, if it is a product this module knows."""
    target = node.target
    args = list(node.args)
    if node.op == "call_function" and target is F.scaled_dot_product_attention:
        shapes = [_shape(trace, node_arg(node, i, name)) for i, name in enumerate(("query", "key", "value"))]
        return attention_terms(*shapes) if all(shapes) else []
    if node.op == "call_function" and target is torch.einsum:
        operands = args[1:]
        if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
            operands = list(operands[0])
        shapes = [_shape(trace, x) for x in operands]
        terms = einsum_terms(args[0] if args else None, shapes) if all(shapes) else None
        return [terms] if terms else []
    extra = 0.0
    if node.op == "call_function" and target is torch.baddbmm or node.op == "call_method" and target == "baddbmm":
        base = _shape(trace, args[0]) if args else None
        extra, args = float(math.prod(base)) if base else 0.0, args[1:]
    elif not (node.op == "call_function" and target in _MATMULS or node.op == "call_method" and target in _METHODS):
        return []
    if len(args) < 2:
        return []
    a, b = _shape(trace, args[0]), _shape(trace, args[1])
    terms = matmul_terms(a, b) if a is not None and b is not None else None
    if terms is None:
        return []
    rows, k, n, read, written = terms
    return [(rows, k, n, read + extra, written)]


def find_products(graph: Any) -> List[LayerCost]:
    """Every product in ``graph`` (a :class:`~dnnshrink_core.graph.ChannelGraph`) that no
    handler declared a layer (two activations, or a weight its handler kept whole), as
    :class:`LayerCost` rows of kind ``"product"``, one per matrix product (attention runs
    two): ``coef`` its rows per image, ``widths`` its inner and output widths (so MACs =
    rows · inner · output), ``positions`` the elements it reads per inner column and its
    rows. Only the first traced mode counts."""
    trace = graph.traces[0]
    batch = float(trace.batch or 1)
    found = []
    for node in trace.graph.nodes:
        if node.op not in ("call_function", "call_method") or (trace.infos.get(node) or {}).get("layer"):
            continue
        name = trace.module_names.get(node) or _scope(node) or node.name
        for rows, k, n, read, written in _gemms(trace, node):
            if rows * k * n:  # a row per output row: in_positions · k reads, out_positions · n writes
                found.append(LayerCost(name, "product", _NONE, _NONE, rows / batch, weight="-", op=PRODUCT,
                                       positions=(read / k / batch, rows / batch), widths=(int(k), int(n))))
    return found


def find_whole_layers(graph: Any) -> List[LayerCost]:
    """Every call of a conv or linear module that no handler declared a layer (its channels
    could not be followed, so they are all kept), as the :class:`LayerCost` it would have
    been, with no units and its full ``widths``. Only the first traced mode counts."""
    trace = graph.traces[0]
    found = []
    for node in trace.graph.nodes:
        if node.op != "call_module" or (trace.infos.get(node) or {}).get("layer"):
            continue
        module = trace.get_submodule(node.target)
        out = getattr(trace.specs.get(node), "shape", None)
        if out is None or len(out) < 2:
            continue
        rows = trace.per_image(node)
        name = trace.module_names.get(node, str(node.target))
        if isinstance(module, nn.Linear):
            found.append(LayerCost(name, "dense", _NONE, _NONE, float(math.prod(out[1:-1])) * rows,
                                   widths=(module.in_features, module.out_features)))
        elif isinstance(module, nn.modules.conv._ConvNd):
            source = trace.specs.get(node.args[0]) if node.args else None
            spatial = (getattr(source, "shape", None) or out)[2:] if module.transposed else out[2:]
            kind, coef = conv_terms(module.in_channels, module.groups, math.prod(module.kernel_size),
                                    math.prod(spatial) * rows)
            found.append(LayerCost(name, kind, _NONE, _NONE, coef, widths=(module.in_channels, module.out_channels)))
    return found


PRODUCT = "matmul"  # the op a product's row has in a LayerTable
_NONE = np.zeros(0, dtype=np.int64)


def _scope(node: fx.Node) -> str:
    """The module a traced call ran in (fx's ``nn_module_stack``), for naming it."""
    stack = node.meta.get("nn_module_stack")
    return f"{list(stack)[-1]}:{node.name}" if stack else ""
