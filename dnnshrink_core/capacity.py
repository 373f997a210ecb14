"""Widths per channel group, and the ``scale: capacity`` step: the width arithmetic that
structure steps share (how a group's units are ordered, how a width is rounded, which groups
a dropped residual branch empties), kept in the core so that the pipeline's own steps (the
probes of ``measure_target``) and the algorithms' build the same structures."""
from __future__ import annotations

import math
from typing import Callable, List, NamedTuple, Optional, Tuple, Union

import numpy as np

from .branches import emptiable as emptiable_groups, settle as settle_branches
from .cost import per_group_multiples
from .graph import ChannelGraph

Multiple = Union[int, np.ndarray]


def group_orders(graph: ChannelGraph, keep: np.ndarray, gammas: np.ndarray) -> List[np.ndarray]:
    """Per group, its units in the order they are worth keeping: frozen units, units that
    cannot be removed exactly, then alive units, then the rest, each by falling ``|gamma|``."""
    orders = []
    for group in graph.groups:
        units = group.units
        rank = np.lexsort((-gammas[units], ~keep[units], graph.unit_removable[units], ~graph.unit_frozen[units]))
        orders.append(units[rank])
    return orders


def dropped_groups(graph: ChannelGraph, counts: np.ndarray) -> np.ndarray:
    """Per group, whether it keeps no unit and may stay so (a dropped residual branch's own
    group); the graph's branches are looked for only when some group is empty."""
    empty = counts == 0
    return empty & emptiable_groups(graph) if empty.any() else empty


def rounded_width(n: float, size: int, min_width: int, multiple: int) -> int:
    """A group's width for ``n`` wanted units: at least ``min_width`` and one, rounded up to
    ``multiple``, at most the group's ``size`` (a group no wider than its block keeps its
    width)."""
    t = max(int(math.ceil(n - 1e-9)), min_width, 1)
    if multiple > 1:
        t = int(math.ceil(t / multiple) * multiple)
    return min(t, size)


#: ``scale: auto`` at a target that is not latency takes the capacity step's structure only
#: when it needs at least this share less predicted time per MAC than the width multiplier's
#: (the default of :func:`auto_scaled`'s ``least_gain``, MorphNet's): the multiplier keeps the
#: learned proportions. Timed with onnxruntime (docs/benchmarks.md, "Timing as a deployed
#: session runs"), the capacity step's structure ran faster than the multiplier's in all 18
#: cells of nine torchvision networks at 30% and 50% of their MACs (by the fastest runs), by
#: 14-37% wherever the profile predicted 5% or more (MobileNetV2 at 30%: predicted 9.6%,
#: measured 21%); but the
#: demo's learned structure, at a predicted 10.0%, scored 0.9889 with the capacity step in one
#: run and 0.9667 in another (one torch thread), against 0.9822 and 0.9867 with the multiplier.
#: ``magnitude`` keeps no learned proportions (only the architecture's) and asks for 0.
AUTO_CAPACITY_GAIN = 0.10


class AutoScale(NamedTuple):
    """What :func:`auto_scaled` chose: the structure, ``scale`` (``"multiplier"`` or
    ``"capacity"``), the capacity step's ``gain`` (:func:`capacity_gain`, to four places, as
    decided), ``why``: ``"gain"`` (the gain against ``least_gain``), ``"budget"`` (only the
    structure taken meets the budget) or ``"same"`` (both are one structure), and the
    ``least_gain`` it was held to."""

    keep: np.ndarray
    scale: str
    gain: float
    why: str
    least_gain: float = AUTO_CAPACITY_GAIN


def capacity_gain(multiplier: np.ndarray, capacity: np.ndarray, time: Callable[[np.ndarray], float],
                  macs: Callable[[np.ndarray], float]) -> float:
    """The share less predicted ``time`` per MAC that the ``capacity`` structure needs than
    the ``multiplier`` one (0.1: a tenth less; negative where it needs more)."""
    per_mac = [time(keep) / max(macs(keep), 1e-18) for keep in (multiplier, capacity)]
    return 1.0 - per_mac[1] / max(per_mac[0], 1e-30)


def auto_scaled(multiplier: np.ndarray, capacity: np.ndarray, time: Callable[[np.ndarray], float],
                macs: Callable[[np.ndarray], float], cost: Callable[[np.ndarray], float],
                budget: float, least_gain: Optional[float] = None) -> AutoScale:
    """What ``scale: auto`` builds at a target that is not latency, from the two structures
    at ``budget`` (by ``cost``): the width ``multiplier``'s (the learned proportions) unless
    the ``capacity`` step's needs at least ``least_gain`` less predicted time per MAC (an
    algorithm whose multiplier keeps no learned proportions may ask for 0: then any less at
    all; by default :data:`AUTO_CAPACITY_GAIN`); where only one of them meets the budget, that
    one."""
    least_gain = AUTO_CAPACITY_GAIN if least_gain is None else least_gain
    if np.array_equal(multiplier, capacity):  # (the capacity step's best may be the multiplier's own)
        return AutoScale(multiplier, "multiplier", 0.0, "same", least_gain)
    raw = capacity_gain(multiplier, capacity, time, macs)
    gain = round(raw, 4) + 0.0  # decided as reported (+ 0.0: never a -0.0)
    within = [cost(keep) <= budget * (1 + 1e-9) for keep in (multiplier, capacity)]
    if within[0] != within[1]:
        return AutoScale(capacity, "capacity", gain, "budget", least_gain) if within[1] else \
            AutoScale(multiplier, "multiplier", gain, "budget", least_gain)
    if (gain >= least_gain) if least_gain > 0 else (raw > 0):  # (no least gain: strictly denser)
        return AutoScale(capacity, "capacity", gain, "gain", least_gain)
    return AutoScale(multiplier, "multiplier", gain, "gain", least_gain)


def _neighbours(graph: ChannelGraph) -> List[np.ndarray]:
    """Per group, the groups (itself included) that share a layer or a tensor op with it:
    the only groups whose next step's price a step in it can change (a cost is a sum over
    the rows of what each keeps on its input and output)."""
    group_of = np.full(graph.num_units, -1, dtype=np.int64)
    for i, group in enumerate(graph.groups):
        group_of[group.units] = i
    near = [{i} for i in range(len(graph.groups))]
    for row in list(graph.layers()) + list(graph.tensor_ops()):
        touched = {int(g) for g in group_of[np.r_[row.in_units, row.out_units].astype(np.int64)] if g >= 0}
        for g in touched:
            near[g] |= touched
    return [np.array(sorted(n), dtype=np.int64) for n in near]


def _tie(gain: float, loss: float) -> float:
    """``gain / loss`` to nine significant digits: identical layers (MobileNetV2's repeated
    blocks) price alike, and the rounding of the totals their prices are taken from must not
    decide between them (the group that comes first does)."""
    return float(f"{gain / max(loss, 1e-12):.9g}")


def capacity_to_budget(graph: ChannelGraph, keep: np.ndarray, gammas: np.ndarray,
                       cost: Callable[[np.ndarray], float], budget: float, time: Callable[[np.ndarray], float],
                       capacity: Callable[[np.ndarray], float], min_width: int = 1, multiple: Multiple = 1,
                       floors: Optional[np.ndarray] = None, grow: bool = False) -> np.ndarray:
    """``keep`` brought to ``budget`` (by ``cost``) one block of channels at a time, where the
    capacity is dearest in time: the ``scale: capacity`` option.

    Every group is first rounded (:func:`rounded_width`) and raised to its floor. While
    the structure costs more than the budget, one multiple of a group's channels (its
    smallest ``|gamma|`` first) goes from the group whose step saves the most ``time`` per
    unit of ``capacity`` lost (predicted ms per MAC), among the steps that lower the cost (any
    step where none does: a width only falls, so this ends);
    with ``grow``, the budget left is then spent the other way, one block at a time where it
    buys the most capacity per unit of time. Every step is priced at the structure it acts
    on, so a layer that stops getting faster as it thins (a per-call cost, a memory-bound
    pass) stops being cut. A width multiplier (MorphNet's, the ``multiplier`` option) keeps
    the learned proportions instead; on MobileNetV2 at 40% of its predicted latency this keeps 34% more
    MACs and runs faster when measured (docs/benchmarks.md, "The efficiency goal is a
    question of structure"). Floors that stop the budget from being met are let go, down to
    ``min_width``."""
    orders = group_orders(graph, keep, gammas)
    multiples = per_group_multiples(graph, multiple)
    sizes = np.array([g.size for g in graph.groups], dtype=np.int64)
    counts = np.array([keep[g.units].sum() for g in graph.groups], dtype=np.int64)
    gone = dropped_groups(graph, counts)  # a residual branch the structure drops stays dropped
    frozen = np.array([int((graph.unit_frozen[g.units] | ~graph.unit_removable[g.units]).sum())
                       for g in graph.groups], dtype=np.int64)

    def lowest(floor: np.ndarray) -> np.ndarray:
        return np.array([rounded_width(max(int(f), int(fz)), int(size), min_width, int(m))
                         for f, fz, size, m in zip(floor, frozen, sizes, multiples)], dtype=np.int64)

    low = lowest(np.ones(len(sizes), dtype=np.int64) if floors is None else floors)
    widths = np.where(gone, 0, np.maximum([rounded_width(int(c), int(size), min_width, int(m))
                                           for c, size, m in zip(counts, sizes, multiples)], low))

    def build(w: np.ndarray) -> np.ndarray:
        out = np.zeros_like(keep)
        for order, n in zip(orders, w):
            out[order[:n]] = True
        return out

    def step(i: int, down: bool) -> int:
        """Group ``i``'s next width down (or up) on its multiple; its own width if none."""
        w, m, size = int(widths[i]), int(multiples[i]), int(sizes[i])
        if gone[i] or size <= m:  # a group no wider than its block keeps its width
            return w
        if down:
            fewer = (w - 1) // m * m if w % m else w - m
            return fewer if fewer >= low[i] and fewer >= 1 else w
        return min(size, (w // m + 1) * m)

    near = _neighbours(graph)
    now = build(widths)
    state = [cost(now), time(now), capacity(now)]

    def price(i: int, down: bool) -> Optional[Tuple[Tuple[bool, float], int]]:
        """Group ``i``'s next step and its price: (whether it lowers the cost, time per
        capacity), the steps that lower the cost first; None where there is no step."""
        to = step(i, down)
        if to == widths[i]:
            return None
        trial = widths.copy()
        trial[i] = to
        structure = build(trial)
        c, t, cap = cost(structure), time(structure), capacity(structure)
        if down:
            # a step that does not lower the cost (a concatenation whose pieces leave the
            # runtime's block) is taken only when no step does: the next ones may
            return (c < state[0], _tie(state[1] - t, state[2] - cap)), to
        if c > budget:
            return None
        return (True, _tie(cap - state[2], t - state[1])), to

    def run(down: bool) -> bool:
        """Steps down to the budget (or up while they fit); False when none is left first."""
        nonlocal now, state
        prices = {i: price(i, down) for i in range(len(sizes))}
        while state[0] > budget if down else True:
            while True:  # the best cached price, checked afresh before it is taken
                best = max((i for i in prices if prices[i] is not None), key=lambda i: (prices[i][0], -i),
                           default=None)
                if best is None:
                    return not down
                fresh = price(best, down)
                if fresh == prices[best]:
                    break
                prices[best] = fresh
            widths[best] = prices[best][1]
            now = build(widths)
            state = [cost(now), time(now), capacity(now)]
            for j in near[best]:  # the only prices the step can have changed
                prices[int(j)] = price(int(j), down)
        return True

    if not run(True) and floors is not None:
        low = lowest(np.ones(len(sizes), dtype=np.int64))  # the floors give way to the budget
        run(True)
    if grow and state[0] <= budget:
        run(False)
    keep = build(widths)
    return settle_branches(graph, keep) if gone.any() else keep
