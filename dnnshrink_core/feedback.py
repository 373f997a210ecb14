"""A latency target met as measured on the runtime, not only as predicted (``measure_target``).

The latency profile predicts whole networks within about 10–15%, but on a family it was not
fitted on its error at the thinner widths a target builds can be 20–40% (GhostNet, RexNet,
RegNetZ at a quarter of their widths: docs/benchmarks.md), and a target lands that far off.
With ``measure_target`` the pipeline times the network itself before any training: the
uniform width multiplier (rounded as the run rounds) at a few predicted budgets, each
generated, exported to ONNX and timed with onnxruntime interleaved with the baseline, and the
predicted budget whose *measured* ratio to the baseline is the target is found between them
(secant steps on a log–log scale). The algorithm then works to that predicted budget; the
report keeps the probes, and its ``onnx_latency`` measures the network it built.
"""
from __future__ import annotations

import math
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .errors import TargetError
from .target import Target
from .timing import SPINNING, TIMED_RTOL, checked_spinning, exported_session, interleaved_times, runs_for

PROBES = 3  # timed structures at most: each is generated, exported and timed once
TOLERANCE = 0.03  # a probe within 3% of the target (measured) ends the search


@dataclass
class MeasuredTarget:
    """What the measurement found: the target as a measured share of the baseline's latency
    (``target``), the predicted share the algorithm works to (``budget``), the baseline's
    measured latency, every probe as ``(predicted share, measured share)``, and how the
    sessions were timed (``threads``, ``spinning``)."""

    target: float
    budget: float
    baseline_ms: float
    threads: int
    probes: List[Tuple[float, float]] = field(default_factory=list)
    asked: Optional[Target] = None  # the target as the user gave it
    spinning: str = "run"

    def to_dict(self) -> Dict[str, Any]:
        """The report's form (``structure_learning.measured_target``)."""
        return {"target": self.target, "predicted_budget": self.budget, "baseline_ms": self.baseline_ms,
                "threads": self.threads, "spinning": self.spinning,
                "probes": [{"predicted": p, "measured": m} for p, m in self.probes],
                "asked": self.asked.to_dict() if self.asked is not None else None}

    @classmethod
    def from_dict(cls, data: Any) -> "MeasuredTarget":
        """Read back what :meth:`to_dict` wrote (a resumed run's); raises ``ValueError`` on
        anything else. One written before measured targets said how they were timed reads as
        ``spinning: never`` (how every session was timed then)."""
        keys = {"target", "predicted_budget", "baseline_ms", "threads", "probes", "asked"}
        if not isinstance(data, dict) or set(data) not in (keys, keys | {"spinning"}):
            raise ValueError("not a measured target")
        spinning = data.get("spinning", "never")
        if spinning not in SPINNING:
            raise ValueError(f"a measured target's spinning is not one of {', '.join(SPINNING)}")
        asked = data["asked"]
        if asked is not None:
            if not isinstance(asked, dict) or set(asked) - {"resource", "fraction", "amount"} or \
                    not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                            for k, v in asked.items() if k != "resource"):
                raise ValueError("a measured target's `asked` is not a target")
            try:
                asked = Target(**asked)
            except TargetError as exc:
                raise ValueError(str(exc)) from None
        numbers = [data["target"], data["predicted_budget"], data["baseline_ms"]]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
                   for v in numbers) or type(data["threads"]) is not int or not isinstance(data["probes"], list):
            raise ValueError("a measured target's numbers are not positive finite numbers")
        probes = []
        for probe in data["probes"]:
            if not isinstance(probe, dict) or set(probe) != {"predicted", "measured"} or \
                    not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                            for v in probe.values()):
                raise ValueError("a measured target's probe is not {predicted, measured}")
            probes.append((float(probe["predicted"]), float(probe["measured"])))
        return cls(float(data["target"]), float(data["predicted_budget"]), float(data["baseline_ms"]),
                   data["threads"], probes, asked, spinning)


def next_budget(points: Sequence[Tuple[float, float]], target: float, low: float, high: float = 1.0) -> float:
    """The predicted share to try next (or to settle on), from probes ``(predicted, measured)``
    so far: between the two probes that bracket ``target`` on a log–log line; beyond them,
    from the closest probe along the slope of the two closest (measured latency falls with
    the predicted one, at a slope kept within [0.3, 3]; 1 with one probe). Within
    ``[low, high]``."""
    pts = sorted(points)
    below = [pm for pm in pts if pm[1] <= target]
    above = [pm for pm in pts if pm[1] > target]
    if below and above and max(below)[0] < min(above)[0]:
        (p0, m0), (p1, m1) = max(below), min(above)
        w = math.log(target / m0) / math.log(m1 / m0) if m1 != m0 else 0.5
        guess = math.exp(math.log(p0) + w * (math.log(p1) - math.log(p0)))
    else:
        closest = sorted(pts, key=lambda pm: abs(math.log(pm[1] / target)))
        p0, m0 = closest[0]
        slope = 1.0
        if len(closest) > 1 and closest[1][0] != p0:
            p1, m1 = closest[1]
            slope = min(3.0, max(0.3, math.log(m1 / m0) / math.log(p1 / p0)))
        guess = p0 * (target / m0) ** (1 / slope)
    return float(min(high, max(low, guess)))


def solve(measure: Callable[[float], Tuple[float, float]], target: float, low: float,
          probes: int = PROBES, tolerance: float = TOLERANCE) -> Tuple[float, List[Tuple[float, float]]]:
    """The predicted share whose measured share is ``target``. ``measure(share)`` builds a
    structure at a predicted ``share`` and returns ``(its predicted share, its measured share)``
    (rounding makes the first differ from what was asked). Stops at ``probes`` timings or at a
    probe within ``tolerance`` of the target; returns the share and the probes."""
    points: List[Tuple[float, float]] = []
    share = min(1.0, max(low, target))
    for _ in range(probes):
        predicted, measured = measure(share)
        same = [i for i, (p, _) in enumerate(points) if abs(predicted / p - 1) < 1e-9]
        if same:  # rounding built a structure timed before: one more timing of it, averaged
            p, m = points[same[0]]
            points[same[0]] = (p, math.sqrt(m * measured))
            break
        points.append((predicted, measured))
        if abs(measured / target - 1) <= tolerance:
            return predicted, points
        share = next_budget(points, target, low)
    return next_budget(points, target, low), points


class OnnxRatio:
    """Times networks against one baseline with onnxruntime (CPU, ``threads``, batch of the
    example input), interleaved: each call exports the network (dnnshrink's verified ONNX
    exporter) and returns its fastest run over the baseline's fastest run of the same
    rounds."""

    def __init__(self, baseline: Any, inputs: tuple, threads: int, rounds: int = 12, runs: int = 4,
                 spinning: str = "run"):
        self.inputs = inputs
        self.threads, self.rounds, self.runs = threads, rounds, runs
        self.spinning = checked_spinning(spinning)
        self._folder = tempfile.TemporaryDirectory(prefix="dnnshrink-measure-")
        self.baseline = self._session(baseline, "baseline")
        self.baseline_s = math.inf
        self.runs = runs_for({"baseline": self.baseline[0]}, {"baseline": self.baseline[1]}, runs)

    def _session(self, model: Any, name: str) -> Tuple[Any, dict]:
        return exported_session(model, self.inputs, Path(self._folder.name) / f"{name}.onnx", self.threads, name,
                                TIMED_RTOL, self.spinning)

    def __call__(self, model: Any) -> float:
        probe = self._session(model, "probe")
        (base, base_feed), (s, feed) = self.baseline, probe
        times = interleaved_times({"baseline": base, "probe": s}, {"baseline": base_feed, "probe": feed},
                                  self.rounds, self.runs)
        self.baseline_s = min(self.baseline_s, min(times["baseline"]))
        return min(times["probe"]) / min(times["baseline"])

    def close(self) -> None:
        """Delete the exported files."""
        self._folder.cleanup()


def measured_budget(graph: Any, model: Any, inputs: tuple, costs: Any, goal: Target, round_to: Any,
                    min_width: int, minimum: float, threads: int, log: Callable[[str], None] = lambda _: None,
                    timer: Any = None, probe: Optional[Tuple[str, Callable[[float], np.ndarray]]] = None,
                    spinning: str = "run") -> MeasuredTarget:
    """The predicted budget (a share of ``costs.initial``) at which the uniform width
    multiplier measures the latency target ``goal`` (a share of the baseline's latency, or an
    amount in ms), timed with onnxruntime; ``minimum`` is the smallest predicted cost the run
    can reach; ``threads`` and ``spinning`` as :func:`~dnnshrink_core.timing.session` (the
    profile's). ``timer``: another runtime with :class:`OnnxRatio`'s interface (called with a
    network, it returns its latency over the baseline's; ``baseline_s``; ``close()``).
    ``probe``: another family of structures to time instead of the uniform multiplier's, as
    ``(its name, budget → keep flags)`` (``scale: capacity``'s step: the run builds those,
    and they run at another share of their prediction). Raises :class:`TargetError` when the
    smallest network measured is still above the target."""
    import copy

    from .cost import uniform_keep
    from .generate import build

    timer = timer if timer is not None else OnnxRatio(copy.deepcopy(model).cpu().eval(), inputs, threads,
                                                           spinning=spinning)
    low, fraction = minimum / costs.initial, goal.fraction
    try:
        if fraction is None:  # an amount in ms: the baseline's own time sets the share
            timer(copy.deepcopy(model).cpu().eval())
            fraction = goal.amount / (1e3 * timer.baseline_s)
            if fraction >= 1:
                raise TargetError(f"target: {goal.amount:g} ms is at or above the baseline's measured latency "
                                  f"({1e3 * timer.baseline_s:.3g} ms with onnxruntime, {threads} threads)")

        name, structure = probe if probe is not None else (
            "the uniform multiplier", lambda budget: uniform_keep(graph, costs.cost, budget, min_width, round_to))

        def measure(share: float) -> Tuple[float, float]:
            keep = structure(share * costs.initial)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                net = build(model, graph, keep).cpu().eval()  # the weights do not matter to its time
            predicted, measured = costs.cost(keep) / costs.initial, timer(net)
            log(f"measured target: {name} at {predicted:.3f} of the predicted latency runs at "
                f"{measured:.3f} of the baseline's")
            return predicted, measured

        budget, probes = solve(measure, fraction, low)
    finally:
        timer.close()
    smallest = [m for p, m in probes if p <= low * (1 + 1e-6)]
    if smallest and min(smallest) > fraction * (1 + TOLERANCE):
        raise TargetError(f"target: {fraction:.3g} of the baseline's latency, measured, is below what the smallest "
                          f"network this model can become runs at ({min(smallest):.3g} of the baseline with "
                          f"onnxruntime, {threads} threads). Aim higher, or drop measure_target to work to the "
                          "profile's prediction.")
    return MeasuredTarget(float(fraction), float(budget), 1e3 * timer.baseline_s, threads, probes, goal, spinning)
