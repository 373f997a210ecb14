"""Turning learned scales into a structure: minimum widths, rounding, and MorphNet's expand step."""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Tuple, Union

import numpy as np

# a channel multiple for every group (``round_to: auto`` gives one per group) or one for all
Multiple = Union[int, np.ndarray]

from dnnshrink_core.plugin_api import (ChannelGraph, dropped_groups, group_orders, largest_fitting, per_group_multiples,
                                       rounded_width, settle_branches)


def enforce_widths(graph: ChannelGraph, keep: np.ndarray, gammas: np.ndarray, min_width: int = 1,
                   multiple: Multiple = 1) -> np.ndarray:
    """Grow every group to at least ``min_width`` units and to a multiple of ``multiple``
    (re-adding the units with the largest ``|gamma|``), so no layer collapses. A residual
    branch's inner group left with no unit stays empty: the branch goes whole (a block
    whose channels all died), which is no collapse, the skip path carrying the signal."""
    keep = keep.copy()
    multiples = per_group_multiples(graph, multiple)
    counts = np.array([keep[g.units].sum() for g in graph.groups])
    gone = dropped_groups(graph, counts)
    for group, order, m, n, empty in zip(graph.groups, group_orders(graph, keep, gammas), multiples, counts, gone):
        if empty:
            continue
        n = int(n)
        t = rounded_width(n, group.size, min_width, int(m))
        if t > n:
            keep[order[:t]] = True
    return settle_branches(graph, keep) if gone.any() else keep


def expand_to_budget(graph: ChannelGraph, keep: np.ndarray, gammas: np.ndarray, cost: Callable[[np.ndarray], float],
                     budget: float, min_width: int = 1, multiple: Multiple = 1, steps: int = 40) -> np.ndarray:
    """MorphNet's expand step: one width multiplier (>= 1) for every group, as large as the budget allows.

    Each group keeps at least its alive units (rounded like :func:`enforce_widths`), grown
    by :func:`scale_to_budget`'s multiplier, the units with the largest ``|gamma|`` first.
    Returns ``keep`` (widened and rounded) unchanged when it already costs ``budget`` or more.
    """
    keep = enforce_widths(graph, keep, gammas, min_width, multiple)
    if cost(keep) >= budget:
        return keep
    alive = np.array([keep[g.units].sum() for g in graph.groups], dtype=np.int64)  # floors: it only grows
    return scale_to_budget(graph, keep, gammas, cost, budget, min_width, multiple, alive, steps)


def width_floors(graph: ChannelGraph, cost: Callable[[np.ndarray], float], budget: float, removable: np.ndarray,
                 share: float, min_width: int = 1, uniform: Optional[np.ndarray] = None) -> np.ndarray:
    """Per group, the fewest units a structure at ``budget`` may keep: ``share`` times what a
    uniform width multiplier keeps at that budget (at least ``min_width``). ``uniform`` is
    that multiplier's structure when the caller has it already (:func:`uniform_fraction`
    with the same ``removable`` and ``min_width``).

    Why relative to the uniform multiplier: the floor then follows the budget and each
    group's own width instead of a constant that fits one network. With ``share = 0.5`` no
    layer is thinner than half of what the uniform net would give it, which rules out the
    2-channel bottlenecks the bilinear FLOP cost drifts into at small budgets, while leaving
    the learned structure free to move every other channel.
    """
    if share <= 0:  # no share of the uniform structure: it need not be built
        keep = np.zeros(graph.num_units, dtype=bool)
    else:
        keep = uniform_fraction(graph, np.zeros(graph.num_units), cost, budget, removable, min_width) \
            if uniform is None else uniform
    floors = np.zeros(len(graph.groups), dtype=np.int64)
    for i, group in enumerate(graph.groups):
        units = group.units
        fixed = int((~removable[units]).sum())
        free_kept = int(keep[units].sum()) - fixed
        floors[i] = min(group.size, max(fixed + int(math.ceil(share * free_kept - 1e-9)), min_width, 1))
    return floors


def round_within_budget(graph: ChannelGraph, keep: np.ndarray, gammas: np.ndarray,
                        cost: Callable[[np.ndarray], float], budget: float, min_width: int = 1,
                        multiple: Multiple = 1, floors: Optional[np.ndarray] = None) -> np.ndarray:
    """``keep`` with every group rounded up by :func:`enforce_widths`; where that rounding
    went past ``budget``, :func:`scale_to_budget` scales the structure down instead, still
    rounded and no group below its floor."""
    rounded = enforce_widths(graph, keep, gammas, min_width, multiple)
    if cost(rounded) <= budget:
        return rounded
    return scale_to_budget(graph, keep, gammas, cost, budget, min_width, multiple, floors)


def scale_to_budget(graph: ChannelGraph, keep: np.ndarray, gammas: np.ndarray, cost: Callable[[np.ndarray], float],
                    budget: float, min_width: int = 1, multiple: Multiple = 1, floors: Optional[np.ndarray] = None,
                    steps: int = 40) -> np.ndarray:
    """MorphNet's width multiplier in both directions: every group keeps
    ``max(ceil(m · alive units), floor)`` units (the largest ``|gamma|`` first), with the
    largest ``m`` whose cost fits ``budget``.

    ``m > 1`` is the paper's expand step; ``m < 1`` shrinks a structure learned at a larger
    cost (or one training left above the target) *evenly*, keeping its learned proportions,
    instead of cutting the smallest scales across the whole network, which empties the
    groups whose scales happen to be small and leaves the others whole.
    """
    floors = np.ones(len(graph.groups), dtype=np.int64) if floors is None else floors
    # frozen units (a network output, an op that couples channels) are never cut
    frozen = np.array([int(graph.unit_frozen[g.units].sum()) for g in graph.groups], dtype=np.int64)
    floors = np.maximum(floors, frozen)
    orders = group_orders(graph, keep, gammas)
    counts = np.array([keep[g.units].sum() for g in graph.groups], dtype=np.float64)
    sizes = np.array([g.size for g in graph.groups])
    gone = dropped_groups(graph, counts)  # a residual branch the structure drops stays dropped

    multiples = per_group_multiples(graph, multiple)

    def build(mult: float, given: Optional[np.ndarray] = None) -> np.ndarray:
        out = np.zeros_like(keep)
        for order, n, size, floor, m, empty in zip(orders, counts, sizes, floors if given is None else given,
                                                   multiples, gone):
            if empty:
                continue
            # the floor is rounded like any width: a floor off the multiple would put the
            # group back on the runtime's slow kernels (the groups at their floor are many)
            width = rounded_width(max(n * mult, min(int(floor), size)), size, min_width, int(m))
            out[order[:width]] = True
        return out

    if cost(build(0.0)) > budget:
        # the floors, rounded up to the runtime's blocks, cost more than the budget (DenseNet's
        # 58 groups of 32 at a block of 16 cannot all keep half): they shrink, all by one
        # share, until they fit; the budget is the user's word, the floors a safeguard
        full = floors.copy()

        def shrunk(share: float) -> np.ndarray:
            return np.maximum(np.floor(full * share).astype(np.int64), np.maximum(frozen, 1))

        floors = largest_fitting(shrunk, lambda given: cost(build(0.0, given)), budget, 0.0, 1.0, shrunk(0.0), 20)

    high = float(np.max(sizes / np.maximum(counts, 1)))
    if cost(build(high)) <= budget:
        keep = build(high)
    else:
        keep = _fill(graph, largest_fitting(build, cost, budget, 0.0, high, build(0.0), steps), orders, counts,
                     multiples, cost, budget)
    return settle_branches(graph, keep) if gone.any() else keep


def _fill(graph: ChannelGraph, keep: np.ndarray, orders: List[np.ndarray], counts: np.ndarray,
          multiples: np.ndarray, cost: Callable[[np.ndarray], float], budget: float) -> np.ndarray:
    """Spend what the rounding of one multiplier left of the budget: ``ceil(m · width)`` moves
    in whole channels, so at small widths the largest fitting ``m`` can stop well short of
    the budget (13% short on a 4-layer net at 1.5% of its MACs). The group furthest below its
    share of the multiplier gets its next units (a multiple's worth, the best ``|gamma|``
    first) while the cost fits; a group whose next units do not fit is done."""
    keep = keep.copy()
    widths = np.array([keep[order].sum() for order in orders], dtype=np.int64)
    open_ = np.array([w < len(order) and graph.unit_removable[order].any() and c > 0
                      for w, order, c in zip(widths, orders, counts)])
    while open_.any():
        # the ratio of each open group's width to its learned width: the lowest grows first
        share = np.where(open_, widths / np.maximum(counts, 1), np.inf)
        i = int(np.argmin(share))
        step = min(int(multiples[i]), len(orders[i]) - int(widths[i]))
        trial = keep.copy()
        trial[orders[i][:widths[i] + step]] = True
        if cost(trial) <= budget:
            keep, widths[i] = trial, widths[i] + step
            open_[i] = widths[i] < len(orders[i])
        else:
            open_[i] = False
    return keep


def fill_to_budget(graph: ChannelGraph, keep: np.ndarray, scores: np.ndarray, cost: Callable[[np.ndarray], float],
                   budget: float, multiple: Multiple = 1) -> np.ndarray:
    """``keep`` grown toward ``budget`` a multiple's worth of units at a time (the best by
    ``scores`` first), the group with the smallest kept share of its width first, while the
    cost fits: what a uniform fraction rounded to the runtime's blocks left of the budget
    (DenseNet-121's 58 groups of 32 at a block of 16 kept 6.4% of the MACs for a 10%
    target) is spent instead of lost."""
    orders = group_orders(graph, keep, scores)
    sizes = np.array([g.size for g in graph.groups], dtype=np.float64)
    return _fill(graph, keep, orders, sizes, per_group_multiples(graph, multiple), cost, budget)


def uniform_fraction(graph: ChannelGraph, scores: np.ndarray, cost: Callable[[np.ndarray], float], budget: float,
                     removable: np.ndarray, min_width: int = 1, multiple: Multiple = 1, steps: int = 40) -> np.ndarray:
    """Keep the same fraction of every group's removable units (the best by ``scores``), the
    largest fraction whose cost fits ``budget`` (a uniform width multiplier on the groups)."""
    orders = []
    for group in graph.groups:
        units = group.units
        fixed = units[~removable[units]]
        free = units[removable[units]]
        orders.append((fixed, free[np.argsort(-scores[free], kind="stable")]))

    multiples = per_group_multiples(graph, multiple)

    def build(fraction: float) -> np.ndarray:
        keep = np.zeros(graph.num_units, dtype=bool)
        for (fixed, free), m in zip(orders, multiples):
            keep[fixed] = True
            size = len(fixed) + len(free)
            n = rounded_width(len(free) * fraction + len(fixed), size, min_width, int(m)) - len(fixed)
            keep[free[:max(n, 0)]] = True
        return keep

    whole = build(1.0)
    if cost(whole) <= budget:
        return whole
    return largest_fitting(build, cost, budget, 0.0, 1.0, build(0.0), steps)


def toward_uniform(graph: ChannelGraph, learned: np.ndarray, gammas: np.ndarray, uniform: np.ndarray,
                   trust: float) -> np.ndarray:
    """Learned widths pulled toward the uniform multiplier's structure ``uniform`` (from
    :func:`uniform_fraction` at the budget): each group keeps ``learned ** trust · uniform **
    (1 - trust)`` units (a geometric blend; the largest ``|gamma|`` first), for the width
    multiplier to scale to the budget after."""
    out = learned.copy()
    for group, order in zip(graph.groups, group_orders(graph, learned, gammas)):
        n, u = int(learned[group.units].sum()), int(uniform[group.units].sum())
        if n and u and graph.unit_removable[group.units].any():
            width = min(group.size, max(1, int(round(n ** trust * u ** (1 - trust)))))
            out[group.units] = False
            out[order[:width]] = True
    return out


def drop_branches(graph: ChannelGraph, keep: np.ndarray, scores: np.ndarray,
                  rescale: Callable[[np.ndarray], np.ndarray], cost: Optional[Callable[[np.ndarray], float]] = None,
                  budget: Optional[float] = None, until_within: bool = False,
                  start: Optional[np.ndarray] = None) -> np.ndarray:
    """Drop whole residual branches (:func:`~dnnshrink_core.plugin_api.emptiable_groups`)
    while that helps: each round tries every branch still there, emptied and the rest
    re-scaled by ``rescale`` (the width multiplier to the budget), and keeps the best trial.
    With ``cost`` and ``budget``, a structure that costs less above the budget is better
    whatever it keeps (a target below what channels alone can reach is met by dropping
    blocks; among drops that meet it, the one that keeps most ``scores``); within the budget
    a trial must hold more ``scores`` than the structure before, unless ``until_within``,
    which stops as soon as the budget is met. ``start``: the structure each trial is cut
    from, with the branches dropped so far and the one tried emptied, before ``rescale``
    (default: the best structure so far, re-scaled again); give the structure before it was
    scaled to the budget, so that a structure squeezed to its floors while over the budget
    does not set the proportions of one that fits.

    A cost that charges each layer a fixed per-call time (the ``latency`` cost) prices a
    whole branch above the sum of its channels: dropping a thin, cheap block frees that time
    for channels elsewhere, which no per-channel ranking sees."""
    tolerance = 1e-9 * (budget or 0.0)

    def rank(k: np.ndarray) -> Tuple[float, float]:
        over = max(cost(k) - budget, 0.0) if cost is not None and budget is not None else 0.0
        return over, float(scores[k].sum())

    def better(a: Tuple[float, float], b: Tuple[float, float]) -> bool:
        if a[0] < b[0] - tolerance:
            return True
        return a[0] <= b[0] + tolerance and a[1] > b[1] + 1e-9 * abs(b[1])

    best, value = keep, rank(keep)
    gone: List[int] = []  # the own groups of the branches dropped so far
    while not (until_within and value[0] <= tolerance):
        top = None  # every branch still there is tried each round: a lazier greedy that re-tried
        # only the best-looking one kept 8% fewer MACs on MobileNetV2 (a drop can help more once
        # another went)
        for branch in graph.branches:
            if not all(best[graph.groups[g].units].any() for g in branch.own):
                continue
            seed = (best if start is None else start).copy()  # (best's dropped groups are empty already)
            for g in gone + list(branch.own):
                seed[graph.groups[g].units] = False
            trial = rescale(settle_branches(graph, seed))
            score = rank(trial)
            if top is None or better(score, top[0]):
                top = (score, trial, list(branch.own))
        if top is None or not better(top[0], value):
            return best
        value, best = top[0], top[1]
        gone += top[2]
    return best


def choose_depth(graph: ChannelGraph, keep: np.ndarray, scores: np.ndarray, cost: Callable[[np.ndarray], float],
                 budget: float, rescale: Callable[[np.ndarray], np.ndarray],
                 depth: Union[bool, str] = "auto", start: Optional[np.ndarray] = None) -> np.ndarray:
    """The structure ``keep`` (at ``budget``, by ``cost``) with whole residual blocks
    dropped by :func:`drop_branches`, as the pipeline's ``depth`` option says.

    ``"auto"``: only where ``keep`` costs more than the budget (a target below what channels
    alone can reach), and only as many blocks as meeting it takes. ``True``: also wherever
    a drop keeps more ``scores`` at the budget. ``False``: never (a block whose channels all
    died still goes: that is exact and costs nothing). ``start``: what ``rescale`` made
    ``keep`` from (see :func:`drop_branches`).

    Why ``"auto"`` stops there: measured with onnxruntime (docs/benchmarks.md, "Depth in the
    pipeline" and "Depth with the remade profile"), dropping blocks for more of a ranking's
    value at reachable latency targets ran 4–17% slower than channels alone on ResNet-18/50,
    MobileNetV3 and EfficientNet-B0 at the same predicted latency (a removed block saves less
    time than the profile says); below the floor of rounded channels, the dropped networks
    measured 1.4–2× faster than channels alone with unrounded widths."""
    if depth is False or not graph.branches:
        return keep
    if depth == "auto":
        if cost(keep) <= budget * (1 + 1e-9):
            return keep
        return drop_branches(graph, keep, scores, rescale, cost, budget, until_within=True, start=start)
    return drop_branches(graph, keep, scores, rescale, cost, budget, start=start)
