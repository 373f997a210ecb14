"""The algorithms: ``morphnet`` (default), ``slimming`` and ``magnitude``.

* ``morphnet``: train with the FLOP-weighted penalty until the alive channels meet the
  target (or ``max_epochs``), threshold, then MorphNet's expand step back to the budget
  (the width multiplier, or the capacity step as the ``scale`` option says).
* ``slimming`` (Network Slimming, Liu et al. 2017): train ``max_epochs`` with a uniform L1
  penalty on the scales, then drop the smallest ``|gamma|`` across the network until the
  MACs meet the target.
* ``magnitude`` (Li et al. 2017): no structure-learning epochs; rank each group's channels
  by the L1 norm of the filters that make them and cut the same share of every group, the
  weakest first, until the MACs meet the target (or, as the ``scale`` option says, cut the
  groups where the MACs cost the most predicted time).

Both honour ``scale``: ``multiplier``, ``capacity``, and ``auto`` at a target that is not
latency (build both structures, keep the one :func:`auto_scaled` chooses).
"""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
from torch import nn

from dnnshrink_core.plugin_api import (auto_scaled, capacity_to_budget, CostModel, divergence, DnnshrinkError,
    DnnshrinkWarning, LearnContext, LEARNING_ADVICE, LearnResult, log_epoch, weight_rows)

from .regularizer import GammaRegularizer, HeldScales, morphnet_flops, morphnet_size, slimming_l1
from .structure import (choose_depth, fill_to_budget, round_within_budget, scale_to_budget, toward_uniform,
                        uniform_fraction, width_floors)

REGULARIZERS = {"morphnet_flops": morphnet_flops, "morphnet_size": morphnet_size, "slimming_l1": slimming_l1}
# the share of the uniform width multiplier's widths no group goes under (MorphNet's floor;
# magnitude's too under ``scale: capacity``)
MIN_SHARE = 0.5


class Capacity:
    """``scale: capacity``'s pricing: time by the latency cost (the run's ``profile``),
    capacity in MACs, whatever the target's resource (``costs``, the run's own cost model,
    is used where it is one of them)."""

    def __init__(self, graph: Any, model: nn.Module, costs: CostModel, profile: Any = None):
        self.time = costs if costs.kind == "latency" else CostModel(graph, model, "latency", profile=profile)
        self.capacity = costs if costs.kind == "flops" else CostModel(graph, model, "flops")

    def density(self, keep: np.ndarray) -> float:
        """MACs per predicted millisecond."""
        return self.capacity.cost(keep) / max(self.time.cost(keep), 1e-18)

    def best(self, candidates: List[np.ndarray], cost: Callable[[np.ndarray], float], budget: float) -> np.ndarray:
        """The candidate with the most MACs per predicted ms within ``budget``; where none is
        within it, the cheapest (the caller's check says the target was missed)."""
        within = [k for k in candidates if cost(k) <= budget * (1 + 1e-9)]
        return max(within, key=self.density) if within else min(candidates, key=cost)

    def auto(self, multiplier: np.ndarray, capacity: np.ndarray, cost: Callable[[np.ndarray], float],
             budget: float, least_gain: Optional[float] = None) -> Tuple[np.ndarray, Dict[str, Any]]:
        """``scale: auto`` away from a latency target (:func:`auto_scaled`, held to
        ``least_gain``, by default ``AUTO_CAPACITY_GAIN``): the structure and what the report
        says of the choice (``scale``: which one; ``capacity_gain``: the share less predicted
        time per MAC that the capacity step's needs; ``scale_why``: what decided,
        :class:`~dnnshrink_core.plugin_api.AutoScale`; ``capacity_least_gain``: the gain it
        was held to)."""
        chosen = auto_scaled(multiplier, capacity, self.time.cost, self.capacity.cost, cost, budget, least_gain)
        return chosen.keep, {"scale": chosen.scale, "capacity_gain": chosen.gain, "scale_why": chosen.why,
                             "capacity_least_gain": chosen.least_gain}

    def fit(self, grow: bool) -> Callable[..., np.ndarray]:
        """The step to a budget, with :func:`round_within_budget`'s signature:
        :func:`capacity_to_budget` (``grow``: spend what is left of the budget too, the
        expand step), or the width multiplier's structure from the same seed where that has
        more MACs per predicted ms: a step at a time can miss what an even cut finds where a
        layer's cost falls with both of its widths (VGG-11 and GhostNet at 30% of their MACs
        predicted 8–11% slower by the steps alone)."""
        even = scale_to_budget if grow else round_within_budget

        def fit(graph: Any, seed: np.ndarray, gammas: np.ndarray, cost: Callable[[np.ndarray], float], budget: float,
                min_width: int = 1, round_to: Any = 1, floors: Optional[np.ndarray] = None) -> np.ndarray:
            stepped = capacity_to_budget(graph, seed, gammas, cost, budget, self.time.cost, self.capacity.cost,
                                         min_width, round_to, floors, grow)
            return self.best([stepped, even(graph, seed, gammas, cost, budget, min_width, round_to, floors)], cost,
                             budget)

        return fit

    def stepped(self, graph: Any, scores: np.ndarray, cost: Callable[[np.ndarray], float], budget: float,
                min_width: int, round_to: Any) -> np.ndarray:
        """The whole network brought to ``budget`` by :func:`capacity_to_budget` alone (floors
        at :data:`MIN_SHARE` of the uniform width, the budget left spent again)."""
        floors = width_floors(graph, cost, budget, ~graph.unit_frozen, MIN_SHARE, min_width)
        return capacity_to_budget(graph, np.ones(graph.num_units, dtype=bool), scores, cost, budget, self.time.cost,
                                  self.capacity.cost, min_width, round_to, floors, True)

    def whole(self, graph: Any, scores: np.ndarray, cost: Callable[[np.ndarray], float], budget: float,
              min_width: int, round_to: Any) -> np.ndarray:
        """What ``magnitude`` builds with ``scale: capacity`` where no residual block need go:
        the better of :meth:`stepped` and its even structure (the same share of every group,
        filled to the budget). ``measure_target`` times it for either algorithm (MorphNet
        starts from its learned structure, unknown before training)."""
        return self.best([self.stepped(graph, scores, cost, budget, min_width, round_to),
                          even_share(graph, scores, cost, budget, min_width, round_to)], cost, budget)


def even_share(graph: Any, scores: np.ndarray, cost: Callable[[np.ndarray], float], budget: float, min_width: int,
               round_to: Any) -> np.ndarray:
    """``magnitude``'s structure: the same share of every group (its best units by
    ``scores``), what rounding left of ``budget`` spent again."""
    keep = uniform_fraction(graph, scores, cost, budget, ~graph.unit_frozen, min_width, round_to)
    return fill_to_budget(graph, keep, scores, cost, budget, round_to)


def capacity_probe(graph: Any, model: nn.Module, costs: CostModel, profile: Any, min_width: int,
                   round_to: Any) -> Callable[[float], np.ndarray]:
    """``measure_target``'s structures under ``scale: capacity`` (the algorithms'
    ``capacity_probe``): budget → the whole network brought there by :meth:`Capacity.whole`."""
    capacity = Capacity(graph, model, costs, profile)
    return lambda budget: capacity.whole(graph, np.zeros(graph.num_units), costs.cost, budget, min_width, round_to)


def train_regularized(ctx: LearnContext, reg: GammaRegularizer, stop_at_target: bool,
                      stop_at: Optional[float] = None, history: Optional[List[List[int]]] = None,
                      after_epoch: Optional[Callable[[int, np.ndarray, np.ndarray], Tuple[np.ndarray, bool]]] = None
                      ) -> int:
    """Run ``train_one_epoch`` under the regularizer's hooks; returns the epochs run.

    Stops early when ``stop_at_target`` and the alive channels cost at most ``stop_at``
    MACs (default: the target). ``history``, when given, gets each epoch's alive width of
    every group (also logged to TensorBoard as ``alive/<group>``). ``after_epoch(epoch,
    alive, gammas)``, when given, runs after each epoch is logged and before its checkpoint;
    it returns the alive units from then on (it may cut some) and whether to stop. Scales
    that turn NaN or infinite stop the run with an error naming the epoch.
    """
    stop_at = ctx.target if stop_at is None else stop_at
    from tqdm import tqdm

    opts, epochs = ctx.options, ctx.start_epoch - 1
    bar = tqdm(range(ctx.start_epoch, opts.max_epochs + 1), desc="structure learning", disable=not ctx.progress)
    with reg.attach():
        for epoch in bar:
            ctx.model.train()
            ctx.train_one_epoch(ctx.model, opts.lr)
            epochs = epoch
            if getattr(reg, "steps", None) == 0:
                raise DnnshrinkError(
                    f"train_one_epoch made no step of a torch.optim optimizer in epoch {epoch}, so the "
                    f"{opts.regularizer} penalty was never applied (it is added to the BatchNorm scales' "
                    "gradients at each optimizer step). Train with a torch.optim optimizer (any kind).")
            gammas = ctx.graph.unit_gammas(ctx.model)
            if not np.isfinite(gammas).all() or not np.isfinite(reg.last_penalty):
                raise divergence(f"structure learning diverged in epoch {epoch}",
                                 "BatchNorm scales or the regularizer became NaN or infinite", LEARNING_ADVICE,
                                 ctx.last_good)
            alive = reg.alive(gammas)
            share = reg.gradient_share() if hasattr(reg, "gradient_share") else None
            cost = log_epoch(ctx, epoch, alive, gammas, reg.last_penalty * reg.strength, share)
            if history is not None:
                history.append([int(alive[g.units].sum()) for g in ctx.graph.groups])
            done = False
            if after_epoch is not None:
                alive, done = after_epoch(epoch, alive, gammas)
                cost = ctx.costs.cost(alive)
            ctx.epoch_done(epoch)
            bar.set_postfix(macs=f"{cost / ctx.costs.initial:.1%}", target=f"{stop_at / ctx.costs.initial:.0%}")
            if ctx.agree(done or (stop_at_target and cost <= stop_at)):
                break
    return epochs


class MorphNet:
    """MorphNet: learn the structure with the FLOP penalty, then one width multiplier to the budget
    (``scale: capacity``: the capacity step; ``auto`` at a target that is not latency: the
    multiplier's structure unless the capacity step's needs 10% less predicted time per MAC).

    Structure learning stops at ``target ** learn_exponent`` of the baseline's MACs (the
    geometric midpoint between the baseline and the target for the default 0.5), not at
    the target itself; MorphNet's width multiplier then scales the learned widths to the
    budget, down as well as up (the paper's recipe: learn at one strength, then scale).
    Why: the FLOP cost is bilinear (alive inputs × alive outputs), so the penalty on a
    channel is proportional to the width of its neighbours. Pushed all the way to a tiny
    target, a layer that got thin makes its neighbours look free and is itself pressed by
    the wide neighbours, so it thins further: the learned structure degenerates into a
    bottleneck of a few channels next to an untouched layer (docs/benchmarks.md has the
    per-epoch widths). Stopping where the structure is still healthy and scaling it evenly
    keeps MorphNet's learned proportions without that feedback loop.

    ``anneal`` (None: the run's ``anneal`` option, on by default): what happens when the
    penalty is slow. For the first ``anneal_start`` share of ``max_epochs`` learning is as
    above (stop at the midpoint). A penalty that has not got there by then (small targets:
    on MNIST-1D at 1.5% of the MACs it was at 20–25% after 10 epochs) no longer leaves one
    cut of 10x the MACs to the end: every later epoch's end cuts the alive channels by an
    even share of what is left of the way to the target, with the width multiplier, and holds
    the cut scales at zero, so the network trains on without them between the cuts (gradual
    pruning, where MorphNet's penalty still decides which channels go first and the widths
    lean). The last epoch's cut is at the target.

    ``anneal_power`` and ``anneal_strength`` (constructor only; 1 and 1, the measured
    defaults): each annealing cut goes ``1 - ((n - 1) / n) ** anneal_power`` of the log-way
    left with ``n`` epochs left (1: even shares; 3: front-loaded), and the penalty's strength
    is multiplied by ``anneal_strength`` once the first cut is made. The alternatives are in
    docs/benchmarks.md ("the schedule's shape"); none was better on both tasks.

    ``min_share``: no group keeps fewer than this share of what the uniform width
    multiplier keeps at the same budget (0 turns the floor off); a learned structure may
    still move channels between layers, but not starve one.

    ``trust``: how far the learned proportions are followed below where learning stopped.
    Each group's learned width is blended with the uniform multiplier's at the target
    (``learned ** trust · uniform ** (1 - trust)``) before the multiplier scales the whole to
    the budget. ``"auto"`` (the default) trusts them for the share of the way to the target,
    in log MACs, that learning actually went (0.5 when it stops at the geometric midpoint,
    less when training falls short, 1 when it reached the target): the proportions were
    learned at that budget, and the rest of the way is extrapolation. On MNIST-1D at 1.5% and
    3% of the MACs this took MorphNet from 0.923 / 0.967 to 0.938 / 0.971 (3 seeds; magnitude
    pruning 0.938 / 0.959, the uniform multiplier 0.931 / 0.960; docs/benchmarks.md). An
    instance built with ``trust="auto"`` (the registered ``morphnet``) takes the run's
    ``trust`` option instead, so a user can set it; the sweeps behind it are in
    docs/benchmarks.md ("How far the learned widths are trusted").

    ``price_at_target``: every channel's penalty weight is its cost in the network the
    budget allows (the uniform multiplier's structure at the target), fixed for the whole
    run, instead of its cost in the current structure, which moves as the network thins
    and feeds the bottleneck loop above (see ``GammaRegularizer.price_at``). On MNIST-1D at
    1.5% of the MACs it lifted accuracy from 0.909 to 0.931 (3 seeds; docs/benchmarks.md).
    """

    name = "morphnet"
    chooses_depth = True  # its structure step may drop whole residual blocks (the ``depth`` option)
    scales_by_capacity = True  # its step to the budget honours scale: capacity
    chooses_scale = True  # and scale: auto at targets that are not latency (it weighs both structures)
    capacity_probe = staticmethod(capacity_probe)

    def __init__(self, regularizers: Callable[[str], Any], learn_exponent: float = 0.5, min_share: float = MIN_SHARE,
                 price_at_target: bool = True, trust: Union[float, str] = "auto", anneal: Optional[bool] = None,
                 anneal_start: float = 0.5, anneal_power: float = 1.0, anneal_strength: float = 1.0):
        self._regularizers = regularizers
        self.anneal_power, self.anneal_strength = anneal_power, anneal_strength
        self.learn_exponent, self.min_share = learn_exponent, min_share
        self.price_at_target, self.trust, self.anneal, self.anneal_start = price_at_target, trust, anneal, anneal_start

    def learn(self, ctx: LearnContext) -> LearnResult:
        opts = ctx.options
        # a latency profile other than the default goes to the regularizers that take one
        extra = {"profile": opts.profile} if getattr(opts, "profile", None) is not None else {}
        reg = self._regularizers(opts.regularizer)(ctx.graph, ctx.model, strength=opts.strength,
                                                    strength_scale=opts.strength_scale, threshold=opts.threshold,
                                                    **extra)
        fraction = ctx.target / ctx.costs.initial
        # the uniform width multiplier's structure at the target: the prices, the floors and
        # the blend below are all taken from it
        uniform = self._uniform(ctx, ctx.target)
        if self.price_at_target and fraction < 1 and hasattr(reg, "price_at"):
            reg.price_at(uniform)
        trust = getattr(opts, "trust", "auto") if self.trust == "auto" else self.trust  # the user's, unless fixed
        anneal = getattr(opts, "anneal", True) if self.anneal is None else self.anneal
        learn_at = ctx.costs.initial * fraction ** self.learn_exponent if fraction < 1 else ctx.target
        after_epoch, cuts, final, hooks, held = None, [], {}, contextlib.nullcontext(), None
        if anneal and fraction < 1:  # the held scales' hook only where annealing may cut
            held = HeldScales(ctx.graph, ctx.model)
            after_epoch = self._annealer(ctx, held, trust, learn_at, cuts, final, reg)
            if ctx.start_epoch - 1 > self._grace(opts.max_epochs):
                # resumed after cuts: the scales they cut are at zero in the checkpoint
                held.hold(ctx.graph.unit_gammas(ctx.model) == 0)
                reg.strength *= self.anneal_strength
            hooks = held.attach()
        history: List[List[int]] = []
        with hooks:
            epochs = train_regularized(ctx, reg, stop_at_target=after_epoch is None, stop_at=learn_at,
                                       history=history, after_epoch=after_epoch)
        gammas = ctx.graph.unit_gammas(ctx.model)
        learned = reg.alive(gammas)
        learned_cost = ctx.costs.cost(learned)
        info: Dict[str, Any] = {"annealed": True} if after_epoch is not None else {}
        if cuts:
            info["cuts"] = cuts
        if "keep" in final:  # annealed down to the target: the last cut is the structure
            keep = final["keep"]
            info.update(final.get("auto", {}))
        else:
            if learned_cost > learn_at:
                # said aloud: the width multiplier below then shrinks the partly learned structure evenly
                info["target_reached_by_training"] = False
                warnings.warn(f"dnnshrink: MorphNet did not reach the target by training: in {epochs} epoch(s) the "
                              f"learned structure did not get down to {learn_at / ctx.costs.initial:.1%} of the MACs "
                              "(where learning stops before the width multiplier scales it to the target); the "
                              "learned widths are scaled down evenly to meet the target. Raise max_epochs or "
                              "strength_scale for a fully learned structure.", DnnshrinkWarning, stacklevel=2)
            keep, used, auto = self._to_budget(ctx, learned, gammas, ctx.target, opts.round_to, trust, uniform,
                                               opts.expand)
            if used is not None:
                info["trust"] = round(used, 3)
            info.update(auto)
            if held is not None:  # units annealing cut that the structure keeps again
                revived = held.revive_kept(keep, self._revival(opts))
                if revived:
                    info["revived"] = revived
        return LearnResult(keep, epochs, {"regularizer": opts.regularizer, "strength": reg.strength,
                                          "threshold": opts.threshold, "learned_cost": learned_cost,
                                          "learned_at_cost": learn_at,
                                          "learned_widths": {g.name: int(learned[g.units].sum())
                                                             for g in ctx.graph.groups},
                                          "widths_per_epoch": history, **info})

    @staticmethod
    def _revival(opts: Any) -> float:
        """The scale a revived unit starts from: alive by the threshold, small enough that the
        network's function barely moves."""
        return max(2.0 * opts.threshold, 1e-2)

    def _grace(self, max_epochs: int) -> int:
        """The epochs the penalty learns alone before annealing may cut."""
        return int(math.floor(self.anneal_start * max_epochs))

    @staticmethod
    def _uniform(ctx: LearnContext, budget: float) -> np.ndarray:
        """The uniform width multiplier's structure at ``budget``; where channels alone cannot
        get there, with the residual blocks dropped that it takes (the most units kept), so
        that the widths learned structures are blended toward and floored by are not the
        smallest the channels go to."""
        graph, cost, opts = ctx.graph, ctx.costs.cost, ctx.options
        keep = uniform_fraction(graph, np.zeros(graph.num_units), cost, budget, ~graph.unit_frozen, opts.min_width)

        def multiplier(seed: np.ndarray) -> np.ndarray:
            return scale_to_budget(graph, seed, np.zeros(graph.num_units), cost, budget, opts.min_width)

        # "auto" even under depth: true (a reference drops only the blocks the budget needs)
        depth = "auto" if getattr(opts, "depth", "auto") is not False else False
        return choose_depth(graph, keep, np.ones(graph.num_units), cost, budget, multiplier, depth,
                            start=np.ones(graph.num_units, dtype=bool))

    def _to_budget(self, ctx: LearnContext, learned: np.ndarray, gammas: np.ndarray, budget: float, round_to: Any,
                   trust: Union[float, str], uniform: Optional[np.ndarray] = None, expand: bool = False,
                   scale: Optional[str] = None) -> Tuple[np.ndarray, Optional[float], Dict[str, Any]]:
        """The learned structure at ``budget``: blended toward the uniform multiplier's widths
        as far as it is not trusted, then one width multiplier to the budget (with the
        floors), or the capacity step as the ``scale`` option says. ``"auto"`` trust is the
        share of the way to the *target* (not to ``budget``, which an annealing cut sets a
        step ahead) that learning covered. ``scale``: the run's option unless given. Returns
        the structure, the trust used (None when no blend was needed) and, under ``scale:
        auto`` (a target that is not latency), what :meth:`Capacity.auto` chose."""
        opts = ctx.options
        uniform = self._uniform(ctx, budget) if uniform is None else uniform
        floors = None
        if self.min_share > 0:
            floors = width_floors(ctx.graph, ctx.costs.cost, budget, ~ctx.graph.unit_frozen, self.min_share,
                                  opts.min_width, uniform=uniform)
        learned_cost = ctx.costs.cost(learned)
        if trust == "auto":  # the share of the way to the target (in log MACs) that learning went
            trust = 1.0 if learned_cost <= ctx.target else \
                math.log(learned_cost / ctx.costs.initial) / math.log(ctx.target / ctx.costs.initial)
        trust = min(max(float(trust), 0.0), 1.0)
        start, used = learned, None  # what the width multiplier scales: the learned widths, blended when trusted less
        if trust < 1 and learned_cost > budget:
            start, used = toward_uniform(ctx.graph, learned, gammas, uniform, trust), trust

        def built(fit: Callable[..., np.ndarray]) -> np.ndarray:
            def structure(seed: np.ndarray) -> np.ndarray:
                return fit(ctx.graph, seed, gammas, ctx.costs.cost, budget, opts.min_width, round_to, floors)

            return choose_depth(ctx.graph, structure(start), gammas, ctx.costs.cost, budget, structure,
                                getattr(opts, "depth", "auto"), start=start)

        # rounded up and scaled down by the multiplier only if that went past the budget; or
        # scaled to the budget by the multiplier in both directions (the expand step); or,
        # with scale: capacity, cut (and grown) where the capacity is dearest in time
        even = round_within_budget if not expand else scale_to_budget
        scale = scale or getattr(opts, "scale", "multiplier")
        if scale not in ("capacity", "auto"):
            return built(even), used, {}
        capacity = Capacity(ctx.graph, ctx.model, ctx.costs, getattr(opts, "profile", None))
        keep = built(capacity.fit(expand))
        if scale == "capacity":
            return keep, used, {}
        keep, auto = capacity.auto(built(even), keep, ctx.costs.cost, budget)
        return keep, used, auto

    def _annealer(self, ctx: LearnContext, held: HeldScales, trust: Union[float, str], learn_at: float,
                  cuts: List[Dict[str, Any]], final: Dict[str, np.ndarray], reg: Any = None
                  ) -> Callable[[int, np.ndarray, np.ndarray], Tuple[np.ndarray, bool]]:
        """The end-of-epoch step of annealed learning. For the first ``anneal_start`` share of
        ``max_epochs`` the penalty learns alone and learning stops when it gets to ``learn_at``
        (the midpoint), as without annealing: at large budgets the penalty is the faster
        teacher. After that, every epoch's end cuts the alive channels by an even share of
        what is left of the way to the target (``cost · (target / cost) ** (1 / epochs
        left)``) with the width multiplier (:meth:`_to_budget`; the capacity step under ``scale:
        capacity``, and under ``auto`` at the last cut only), and holds the cut channels'
        scales at zero, so the network trains on without them; the last epoch's cut is at the
        target and is the structure (``final["keep"]``). The step depends only on the current
        structure and the epochs left, so a resumed run continues the same way."""
        opts, target = ctx.options, ctx.target
        start = self._grace(opts.max_epochs)

        def step(epoch: int, alive: np.ndarray, gammas: np.ndarray) -> Tuple[np.ndarray, bool]:
            last, cost = epoch >= opts.max_epochs, ctx.costs.cost(alive)
            if epoch <= start and not last:  # the penalty alone, as without annealing
                return alive, cost <= learn_at
            if cost <= target:
                return alive, True
            left = opts.max_epochs - epoch + 1  # epochs left, this one included
            budget = target if last else cost * (target / cost) ** (1.0 - ((left - 1) / left) ** self.anneal_power)
            # scale: auto weighs the two structures once, at the last cut: the cuts before it
            # go with the multiplier, so the learned proportions it weighs are MorphNet's own
            scale = None if last or getattr(opts, "scale", "multiplier") != "auto" else "multiplier"
            keep, _, auto = self._to_budget(ctx, alive, gammas, budget, opts.round_to if last else 1, trust,
                                            scale=scale)
            revived = held.revive_kept(keep, self._revival(opts))  # cut before, kept again: training can use them
            held.hold(~keep)
            if not cuts and reg is not None:
                reg.strength *= self.anneal_strength
            cuts.append({"epoch": epoch, "budget": budget / ctx.costs.initial,
                         "widths": [int(keep[g.units].sum()) for g in ctx.graph.groups],
                         "revived": revived})
            if ctx.writer is not None:  # the alive/<group> curves show the widths before the cut
                ctx.writer.add_scalar("anneal/budget_fraction", budget / ctx.costs.initial, epoch)
            if last:
                final["keep"], final["auto"] = keep, auto
            return keep, last

        return step


class Slimming:
    """Network Slimming: uniform L1 on the scales for ``max_epochs``, then a global cut."""

    name = "slimming"
    chooses_depth = True

    def learn(self, ctx: LearnContext) -> LearnResult:
        opts = ctx.options
        reg = slimming_l1(ctx.graph, ctx.model, strength=opts.strength, strength_scale=opts.strength_scale,
                          threshold=opts.threshold)
        epochs = train_regularized(ctx, reg, stop_at_target=False)
        gammas = ctx.graph.unit_gammas(ctx.model)
        keep = ctx.costs.cheapest_first(np.ones(ctx.graph.num_units, dtype=bool), gammas, ctx.target)
        floors = width_floors(ctx.graph, ctx.costs.cost, ctx.target, ctx.graph.unit_removable, 0.0, opts.min_width)
        keep = round_within_budget(ctx.graph, keep, gammas, ctx.costs.cost, ctx.target, opts.min_width,
                                   opts.round_to, floors)
        keep = _with_depth(ctx, keep, gammas)
        return LearnResult(keep, epochs, {"regularizer": "slimming_l1", "strength": reg.strength})


def filter_l1(model: nn.Module, ctx: LearnContext) -> np.ndarray:
    """Per unit, the mean ``|w|`` of the conv/linear filters that produce its channels (a
    layer's weight arranged one row per output by :func:`weight_rows`: a conv's filters, the
    columns of ``x @ W``)."""
    scores = np.zeros(ctx.graph.num_units, dtype=np.float64)
    ranked = np.zeros(ctx.graph.num_units, dtype=bool)
    for layer in ctx.costs.layers:
        rows = weight_rows(model, layer)
        if rows is None:
            continue
        per_filter = rows.float().abs().mean(1).cpu().numpy()
        np.add.at(scores, layer.out_units, per_filter[: len(layer.out_units)])
        ranked[layer.out_units[: len(per_filter)]] = True
    # a unit no readable weight makes is not the weakest: it ranks as the average unit, not first to go
    if ranked.any() and not ranked.all():
        scores[~ranked] = scores[ranked].mean()
    return scores


class Magnitude:
    """One-shot L1-norm filter ranking down to the MACs target (no structure-learning epochs)."""

    name = "magnitude"
    chooses_depth = True
    scales_by_capacity = True  # honours scale: capacity
    chooses_scale = True  # and scale: auto at targets that are not latency
    learns_over_epochs = False  # one shot: max_epochs may be 0
    needs_batchnorm = False  # ranks conv filters, not BatchNorm scales

    def learn(self, ctx: LearnContext) -> LearnResult:
        opts = ctx.options
        scores = filter_l1(ctx.model, ctx)
        keep = _with_depth(ctx, even_share(ctx.graph, scores, ctx.costs.cost, ctx.target, opts.min_width,
                                           opts.round_to), scores)
        ranking, info = "filter L1 norm, the same share cut in every group", {}
        scale = getattr(opts, "scale", "multiplier")
        if scale in ("capacity", "auto"):  # the whole network cut where MACs cost most time
            capacity = Capacity(ctx.graph, ctx.model, ctx.costs, getattr(opts, "profile", None))
            stepped = capacity.stepped(ctx.graph, scores, ctx.costs.cost, ctx.target, opts.min_width, opts.round_to)
            stepped = _with_depth(ctx, stepped, scores, capacity.fit(grow=True))
            # the better of both, blocks dropped or not (Capacity.whole where none go)
            best = capacity.best([stepped, keep], ctx.costs.cost, ctx.target)
            if scale == "auto":  # no learned proportions to keep: the capacity step wherever it is denser
                best, info = capacity.auto(keep, best, ctx.costs.cost, ctx.target, least_gain=0.0)
            if best is not keep:
                keep = best
                ranking = "filter L1 norm within each group; groups cut where the MACs cost the most predicted time"
        log_epoch(ctx, 0, keep)
        return LearnResult(keep, 0, {"ranking": ranking, **info})

    capacity_probe = staticmethod(capacity_probe)


def _with_depth(ctx: LearnContext, keep: np.ndarray, scores: np.ndarray,
                fit: Callable[..., np.ndarray] = scale_to_budget) -> np.ndarray:
    """``keep`` at the target with whole residual blocks dropped where the ``depth`` option
    lets them go and that helps (:func:`choose_depth`), the rest re-scaled by ``fit`` (one
    width multiplier over the algorithm's own widths, or :class:`Capacity`'s step)."""
    opts = ctx.options

    def structure(seed: np.ndarray) -> np.ndarray:
        return fit(ctx.graph, seed, scores, ctx.costs.cost, ctx.target, opts.min_width, opts.round_to)

    return choose_depth(ctx.graph, keep, scores, ctx.costs.cost, ctx.target, structure, getattr(opts, "depth", "auto"))


ALGORITHMS = {a.name: a for a in (MorphNet(lambda name: _regularizer(name)), Slimming(), Magnitude())}


def _regularizer(name: str) -> Callable[..., GammaRegularizer]:
    from dnnshrink_core.plugin_api import lookup

    return lookup("regularizer", name)
