"""Checks of what the user hands in, before any work starts: option types and ranges (the
same for config keys and ``shrink(...)`` keyword arguments) and the example inputs'
count against the model's ``forward``.

Each check's message names the key or argument, the value, and what is allowed.
"""
from __future__ import annotations

import difflib
import inspect
import math
import numbers
import typing
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

from torch import nn

from .errors import ConfigError, TargetError, TraceError
from .target import resolve

# option → (test of a value of the right type, the allowed range in words)
RANGES: Dict[str, Tuple[Callable[[Any], bool], str]] = {
    "lr": (lambda v: v > 0, "a number > 0 (the learning rate handed to train_one_epoch)"),
    "max_epochs": (lambda v: v >= 0, "an integer >= 0 (>= 1 for algorithms that learn the structure)"),
    "strength": (lambda v: v > 0, "a number > 0, or null for MorphNet's rule of thumb (strength_scale / MACs)"),
    "strength_scale": (lambda v: v > 0, "a number > 0"),
    "threshold": (lambda v: v >= 0, "a number >= 0 (the |gamma| at or below which a channel is dead)"),
    "min_width": (lambda v: v >= 1, "an integer >= 1 (channels every layer keeps at least)"),
    "round_to": (lambda v: v == "auto" if isinstance(v, str) else v >= 1,
                 "an integer >= 1 (1 = no rounding of layer widths) or 'auto' (the channel block the latency "
                 "profile measured)"),
    "trust": (lambda v: v == "auto" if isinstance(v, str) else 0 <= v <= 1,
              "a number from 0 to 1 (how far MorphNet follows its learned widths below where learning "
              "stopped; 0 = the uniform multiplier's widths) or 'auto'"),
    "depth": (lambda v: v == "auto" if isinstance(v, str) else True,
              "true, false or 'auto' (whether whole residual blocks may go; auto: where channels alone cannot "
              "reach the target)"),
    "scale": (lambda v: v in ("auto", "multiplier", "capacity"),
              "'auto' (capacity for a latency target, multiplier otherwise), 'multiplier' (one width multiplier "
              "to the budget, the learned proportions kept) or 'capacity' (blocks of channels cut where the MACs "
              "cost the most predicted time)"),
    "latency_runs": (lambda v: v >= 1, "an integer >= 1"),
    "max_score_drop": (lambda v: v >= 0, "a number >= 0 (how far below the baseline's score the shrunk "
                                         "model may score), or null for no limit"),
}
TARGET_KEYS = ("target", "target_macs")


def type_ok(value: Any, hint: Any) -> bool:
    """Whether ``value`` fits the type hint of a :class:`~dnnshrink_core.pipeline.ShrinkOptions` field."""
    if hint is Any:
        return True
    if typing.get_origin(hint) is typing.Union:
        return any(type_ok(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)  # Sequence[str]


def describe(hint: Any) -> str:
    """A type hint in words: ``Optional[float]`` → ``a number or null``."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if args:
        return " or ".join(describe(a) for a in args) + (" or null" if type(None) in typing.get_args(hint) else "")
    return {float: "a number", int: "an integer", bool: "true or false", str: "a string"}.get(hint, "a list of names")


def option_problem(key: str, value: Any, hint: Any) -> Optional[str]:
    """What is wrong with ``value`` for option ``key`` (``"must be …, not …"``), or None."""
    if key in TARGET_KEYS:
        return None  # targets have their own parser (dnnshrink_core.target), checked by check_options
    if not type_ok(value, hint):
        return f"must be {describe(hint)}, not {value!r}"
    if key in RANGES and value is not None:
        test, allowed = RANGES[key]
        if isinstance(value, float) and not math.isfinite(value) or not test(value):
            return f"must be {allowed}, not {value!r}"
    return None


def check_options(options: Mapping[str, Any], hints: Mapping[str, Any], where: str = "",
                  noun: str = "option") -> None:
    """Raise :class:`ConfigError` for the first option of the wrong type or out of range, and
    :class:`TargetError` for a bad or doubly given target. Messages start with ``where``
    (``"config.yaml: "``, ``"shrink(): "``) and call an option a ``noun`` (``key``, ``option``)."""
    for key, value in options.items():
        problem = option_problem(key, value, hints[key])
        if problem:
            raise ConfigError(f"{where}{noun} {key!r} {problem}")
    try:
        goal = resolve(options.get("target"), options.get("target_macs"))
    except TargetError as exc:
        raise TargetError(f"{where}{exc}") from None
    if options.get("measure_target") and goal.resource != "latency":
        raise ConfigError(f"{where}{noun} 'measure_target' applies to latency targets; the target is "
                          f"{goal}, which is counted exactly. Drop measure_target, or give "
                          "target: {resource: latency, value: ...}")


def check_algorithm(algorithm: Any, max_epochs: int, scale: str, where: str = "", noun: str = "option") -> None:
    """The options an algorithm must support, from its attributes: ``max_epochs`` at least 1
    for one that learns over epochs (``learns_over_epochs`` not False), and ``scale:
    capacity`` only for one whose structure step offers it (``scales_by_capacity``; one that
    ignored it would hand back a structure the user did not ask for, found out only after
    training)."""
    name = getattr(algorithm, "name", type(algorithm).__name__)
    if max_epochs < 1 and getattr(algorithm, "learns_over_epochs", True):
        raise ConfigError(f"{where}{noun} 'max_epochs' must be at least 1 for the {name} algorithm, which "
                          f"learns the structure over training epochs, not {max_epochs!r} (one-shot algorithms "
                          "such as `magnitude` run none)")
    if scale == "capacity" and not getattr(algorithm, "scales_by_capacity", False):
        raise ConfigError(f"{where}{noun} 'scale': the {name} algorithm has no capacity step (it brings its "
                          "structure to the budget its own way); use scale: multiplier, or an algorithm that "
                          "offers it (morphnet, magnitude)")


def resolved_scale(scale: str, goal: Any, algorithm: Any) -> str:
    """The ``scale`` a run uses. ``"auto"`` is ``"capacity"`` at a latency target for an
    algorithm that offers the capacity step (``scales_by_capacity``: a user who names time
    gets the most MACs per predicted millisecond at that time; MobileNetV2 at 40% of its
    latency kept 34% more MACs and measured faster, docs/benchmarks.md). At a MACs, parameter
    or activation target it stays ``"auto"`` for an algorithm that weighs both structures
    itself (``chooses_scale``: it keeps the width multiplier's learned proportions unless the
    capacity step's structure needs :data:`~dnnshrink_core.capacity.AUTO_CAPACITY_GAIN` less
    predicted time per MAC, or as little as the algorithm asks: :func:`~dnnshrink_core.capacity.auto_scaled`).
    Otherwise
    ``"auto"`` is ``"multiplier"``; an explicit value is itself."""
    if scale != "auto":
        return scale
    if getattr(goal, "resource", None) == "latency":
        return "capacity" if getattr(algorithm, "scales_by_capacity", False) else "multiplier"
    return "auto" if getattr(algorithm, "chooses_scale", False) else "multiplier"


def check_exporters(names: Any, where: str = "", noun: str = "option") -> None:
    """Every exporter named must be loaded (an unknown one would fail only after training)."""
    from .export import export_formats

    known = export_formats()
    for name in names or ():
        if name not in known:
            close = difflib.get_close_matches(str(name), known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{where}{noun} 'exporters': no exporter called {name!r} is loaded.{hint} Choose "
                              f"from: {', '.join(known) or 'none'} (`dnnshrink plugins` lists the plugins)")


def positional_arity(model: nn.Module) -> Optional[Tuple[int, Optional[int], str]]:
    """``(required, maximum or None for *args, names)`` of ``model.forward``'s positional
    parameters, or None when its signature cannot be read."""
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return None
    required, total, names, varargs = 0, 0, [], False
    for param in signature.parameters.values():
        if param.kind is param.VAR_POSITIONAL:
            varargs = True
            names.append(f"*{param.name}")
        elif param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
            total += 1
            names.append(param.name if param.default is param.empty else f"{param.name}=…")
            required += param.default is param.empty
    return required, None if varargs else total, ", ".join(names)


def check_input_count(model: nn.Module, inputs: tuple) -> None:
    """:class:`TraceError` when ``model(*inputs)`` would pass more or fewer positional inputs
    than ``model.forward`` takes (an extra input would otherwise be dropped silently)."""
    arity = positional_arity(model)
    if arity is None:
        return
    required, maximum, names = arity
    given = len(inputs)
    if given >= required and (maximum is None or given <= maximum):
        return
    if maximum is None:
        takes = f"at least {required}"
    elif maximum == required:
        takes = str(required)
    else:
        takes = f"{required} to {maximum}"
    raise TraceError(
        f"example_inputs holds {given} positional input(s) but {type(model).__name__}.forward({names}) takes "
        f"{takes}. Pass what model(*example_inputs) should get: one tensor for a single input, a tuple of "
        "tensors for several.")
