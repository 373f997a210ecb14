"""Timing ONNX models with onnxruntime the way ``bench/bench_onnx_latency.py`` and the
latency profile do: CPU provider, fixed intra-op threads, variants interleaved, fastest
and median of repeated runs."""
from __future__ import annotations

import math
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np


#: How a session's intra-op threads wait for work (``spinning`` of :func:`session`):
#: ``"run"`` spin while a run lasts and stop at its end (the default), ``"always"`` spin on
#: after it too (onnxruntime's own default), ``"never"`` sleep between ops.
SPINNING = ("run", "always", "never")


def runtime_spinning(runtime: Mapping[str, Any]) -> str:
    """How the sessions of a latency profile's ``runtime`` (its JSON ``runtime`` entry, or a
    cost plugin's ``resource.runtime``) are timed (:data:`SPINNING`): its ``spinning``; an
    onnxruntime profile made before profiles said so reads as ``"never"`` (dnnshrink timed
    every session without spinning then), anything else as ``"run"``. A value that is not
    one of :data:`SPINNING` is a :class:`~dnnshrink_core.errors.ConfigError` naming it."""
    if "spinning" not in runtime:
        return "never" if runtime.get("name") == "onnxruntime" else "run"
    return checked_spinning(runtime["spinning"], "the latency profile's runtime.spinning")


def checked_spinning(spinning: Any, where: str = "spinning") -> str:
    """``spinning`` if it is one of :data:`SPINNING`; else a
    :class:`~dnnshrink_core.errors.ConfigError` that says ``where`` it came from (checked
    before anything is exported or timed)."""
    from .errors import ConfigError

    if not isinstance(spinning, str) or spinning not in SPINNING:
        raise ConfigError(f"{where} must be one of {', '.join(SPINNING)}, not {spinning!r}")
    return spinning


def session(model: Union[str, bytes], threads: int, spinning: str = "run") -> Any:
    """An onnxruntime CPU session with ``threads`` intra-op threads and one inter-op thread
    (full graph optimisation, as a deployed model runs), its threads waiting for work as
    ``spinning`` says (:data:`SPINNING`).

    Why ``"run"``: within a run a deployed session's threads spin between ops (onnxruntime's
    default), and a network of many small ops is timed wrong without it: MobileNetV2 at 30%
    of its MACs ran in 1.26 ms with threads that sleep between ops against 0.76 ms spinning
    within the run, its baseline 2.32 against 1.96 ms (docs/benchmarks.md, "Timing as a
    deployed session runs"). Spinning on after a run (``"always"``) is what one session
    serving back-to-back calls gets, but timed interleaved, many sessions taking turns, the
    pool of the session that just ran keeps spinning on the cores the next one needs (its
    pool burned 39 ms of CPU in the 200 ms after a run; interleaved timings ran 12–45%
    slower in the ninth session's measurements); stopping at the end of each run
    (``session.force_spinning_stop``) gives the spinning without the stealing. A value that
    is not one of :data:`SPINNING` is a :class:`~dnnshrink_core.errors.ConfigError`."""
    import onnxruntime as ort

    checked_spinning(spinning)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if spinning == "never":
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    elif spinning == "run":
        options.add_session_config_entry("session.force_spinning_stop", "1")
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def interleaved_times(sessions: Mapping[str, Any], feeds: Mapping[str, dict], rounds: int, runs: int,
                      warmup: int = 2, budget_s: float = float("inf")) -> Dict[str, List[float]]:
    """Seconds of every timed run of each session. The sessions take turns in blocks of
    ``warmup`` + ``runs`` consecutive runs, ``rounds`` times, the order rotated every round,
    so that the machine's drift hits every one alike. Stops after the round that passes
    ``budget_s``."""
    times: Dict[str, List[float]] = {label: [] for label in sessions}
    order = list(sessions)
    begin = time.perf_counter()
    for r in range(rounds):
        shift = r % len(order)
        for label in order[shift:] + order[:shift]:
            s, feed = sessions[label], feeds[label]
            for i in range(warmup + runs):
                start = time.perf_counter()
                s.run(None, feed)
                if i >= warmup:
                    times[label].append(time.perf_counter() - start)
        if time.perf_counter() - begin > budget_s:
            break
    return times


def fastest_and_median(times: Mapping[str, List[float]]) -> Dict[str, Tuple[float, float]]:
    """``{label: (fastest, median)}`` in seconds."""
    return {label: (min(t), statistics.median(t)) for label, t in times.items()}


# a file that is only timed, never shipped, is checked against PyTorch to this instead of the
# exporter's 1e-4: a deep randomly initialised network's float32 error can pass 1e-4
TIMED_RTOL = 1e-2


def onnx_latency(models: Mapping[str, Any], inputs: tuple, threads: int, rounds: int = 10,
                 runs: int = 5, keep: Optional[Mapping[str, Path]] = None,
                 timed_only: Sequence[str] = (), spinning: str = "run") -> Dict[str, Tuple[float, float]]:
    """Export each PyTorch model to ONNX (dnnshrink's verified exporter) and time it with
    onnxruntime: ``{label: (fastest, median)}`` seconds, the models interleaved. ``keep``:
    where to leave the exported files of some labels (the others are deleted).
    ``timed_only``: labels whose files are only timed, never shipped (checked to
    :data:`TIMED_RTOL`). ``spinning``: as :func:`session`. An export that fails names its
    label."""
    checked_spinning(spinning)
    with tempfile.TemporaryDirectory() as tmp:
        sessions, feeds = {}, {}
        for label, model in models.items():
            path = Path((keep or {}).get(label) or Path(tmp) / f"{label}.onnx")
            sessions[label], feeds[label] = exported_session(model, inputs, path, threads, label,
                                                             TIMED_RTOL if label in timed_only else None, spinning)
        return fastest_and_median(interleaved_times(sessions, feeds, rounds, runs_for(sessions, feeds, runs)))


def exported_session(model: Any, inputs: tuple, path: Path, threads: int, label: str,
                     rtol: Optional[float] = None, spinning: str = "run") -> Tuple[Any, dict]:
    """Export ``model`` to ``path`` (dnnshrink's verified exporter, to ``rtol`` when given)
    and open it in an onnxruntime :func:`session` (``spinning`` as there); returns the
    session and its feed of ``inputs``. An export that fails names ``label``."""
    from .errors import DnnshrinkWarning, ExportError
    from .export import export

    checked_spinning(spinning)
    cpu_inputs = tuple(x.detach().cpu() if hasattr(x, "detach") else x for x in inputs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            export(model, cpu_inputs, "onnx", path, **({"rtol": rtol} if rtol is not None else {}))
        except ExportError as exc:
            raise ExportError(f"{label}: {exc}") from exc
    if rtol is None:  # checked strictly: the file may be the one the run keeps, so what its export said is said
        for said in caught:
            if issubclass(said.category, DnnshrinkWarning):
                warnings.warn(f"{label}: {said.message}", DnnshrinkWarning, stacklevel=3)
    s = session(str(path), threads, spinning)
    return s, {i.name: np.asarray(x.numpy() if hasattr(x, "numpy") else x) for i, x in zip(s.get_inputs(), cpu_inputs)}


def runs_for(sessions: Mapping[str, Any], feeds: Mapping[str, dict], runs: int, turn_s: float = 0.02,
             most: int = 200) -> int:
    """Runs per turn for :func:`interleaved_times`: at least ``runs``, and enough that the
    fastest session's turn lasts about ``turn_s`` (at most ``most``). A small network runs in
    tens of microseconds; the fastest of four such runs is mostly the machine's noise."""
    once = min(min(t) for t in interleaved_times(sessions, feeds, 1, 3, warmup=1).values())
    return max(runs, min(most, math.ceil(turn_s / max(once, 1e-7))))
