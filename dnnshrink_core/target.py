"""Size targets: one small value, parsed in one place for the config, the CLI and ``shrink()``.

A target names a resource (``macs``, also spelled ``flops``; ``params``; ``activations``;
``latency`` in milliseconds, priced by the calibrated latency profile) and either a
**fraction** of the baseline or an **absolute amount**. The two can never be confused: a bare number is a
fraction and must lie in (0, 1]; an absolute amount carries its unit.

==========================================  ==========================================
written as                                  means
==========================================  ==========================================
``0.5``, ``"0.5"``, ``"50%"``               half of the baseline's MACs
``"1.5M"``, ``"300K"``, ``"2G"``            1.5 million, 300 thousand, 2 billion MACs
``"1500000 MACs"``, ``"1.5M MACs"``         the same, with the unit spelled out
``{resource: macs, fraction: 0.5}``         the explicit form of a fraction
``{resource: macs, amount: 1.5e6}``         the explicit form of an amount (a plain
                                            number is fine: the key says it is absolute)
``{resource: macs, value: "1.5M"}``         ``value`` follows the short rules above
``{resource: latency, value: 0.5}``         half the baseline's predicted latency
``{resource: latency, amount: "3ms"}``      3 milliseconds (predicted by the profile)
``{resource: params, value: "1M params"}``  one million weights
==========================================  ==========================================

``target_macs`` (config key and ``shrink()`` option) takes the short forms;
``target`` (config key, ``--target``, ``shrink(target=...)``) takes every form, and is
where other resources will go.
"""
from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import numpy as np

from .branches import settle
from .cost import per_group_multiples
from .errors import TargetError

# resource name → the unit word an absolute amount may carry
RESOURCES = {"macs": "MACs", "params": "params", "activations": "activations", "latency": "ms"}
# other spellings of a resource
RESOURCE_ALIASES = {"flops": "macs", "size": "params", "weights": "params"}
# resource → the cost model (dnnshrink_cost_model hook) that prices it
COST_MODELS = {"macs": "flops", "params": "params", "activations": "activations", "latency": "latency"}
MULTIPLIERS = {"k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_NUMBER = r"[+-]?(?:\d[\d_]*\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"
FORMS = "a fraction of the baseline in (0, 1] such as 0.5 or '50%', or an amount with its unit such as '1.5M', " \
        "'300K', '2G' or '1500000 MACs'"


@dataclass(frozen=True)
class Target:
    """A size target: ``resource`` with either ``fraction`` (of the baseline, in (0, 1]) or
    ``amount`` (absolute, > 0). Build one with :meth:`parse`, or directly::

        Target("macs", fraction=0.5)
        Target("macs", amount=1.5e6)
    """

    resource: str = "macs"
    fraction: Optional[float] = None
    amount: Optional[float] = None

    def __post_init__(self) -> None:
        if self.resource in RESOURCE_ALIASES:  # frozen: set through object's own setattr
            object.__setattr__(self, "resource", RESOURCE_ALIASES[self.resource])
        if self.resource not in RESOURCES:
            raise TargetError(f"target resource {self.resource!r} is not supported; choose one of: "
                              f"{', '.join(RESOURCES)}")
        if (self.fraction is None) == (self.amount is None):
            raise TargetError("a Target has either a fraction or an amount, not both and not neither")
        if self.fraction is not None and not (0 < self.fraction <= 1):
            raise TargetError(f"a target fraction must be in (0, 1], not {self.fraction!r}")
        if self.amount is not None and not (self.amount > 0 and math.isfinite(self.amount)):
            raise TargetError(f"a target amount must be a finite number > 0, not {self.amount!r}")

    @property
    def unit(self) -> str:
        """The resource's unit word (``MACs``, ``params``, ``activations``, ``ms``)."""
        return RESOURCES[self.resource]

    @property
    def cost_model(self) -> str:
        """The name of the cost model that prices this resource (``flops`` for ``macs``)."""
        return COST_MODELS[self.resource]

    @classmethod
    def parse(cls, value: Any, key: str = "target", resource: str = "macs") -> "Target":
        """A :class:`Target` from any accepted form (see the module's table).

        ``key`` names the option in error messages; ``resource`` is the resource of the
        short forms (``target_macs`` → ``macs``). Raises :class:`TargetError`.
        """
        resource = RESOURCE_ALIASES.get(resource, resource)
        if isinstance(value, Target):
            if value.resource != resource and key != "target":
                raise TargetError(f"{key} is a {resource} target, not a {value.resource} one")
            return value
        if isinstance(value, str) and ":" in value:  # RESOURCE:VALUE, the command line's short form
            name, _, rest = value.partition(":")
            name = RESOURCE_ALIASES.get(name.strip().lower(), name.strip().lower())
            if name in RESOURCES:
                if key == "target_macs" and name != "macs":
                    raise TargetError(f"{key} is a MACs target; give a {name} target as `target: {value}`")
                return cls._parse_mapping({"resource": name, "value": rest.strip()}, key)
        if isinstance(value, Mapping):
            if key not in ("target", "--target"):
                raise TargetError(f"{key} takes {FORMS}; the mapping form ({{resource: ..., amount: ...}}) "
                                  "belongs under `target`")
            return cls._parse_mapping(value, key)
        return cls._parse_scalar(value, key, resource)

    @classmethod
    def _parse_mapping(cls, value: Mapping, key: str) -> "Target":
        unknown = set(value) - {"resource", "fraction", "amount", "value"}
        if unknown:
            # YAML reads {resource:latency,value:0.5} as one key: a colon needs a space after it
            spacing = " (YAML needs a space after each colon: {resource: latency, value: 0.5})" \
                if any(":" in str(k) for k in unknown) else ""
            raise TargetError(f"{key} has unknown field(s) {', '.join(sorted(map(str, unknown)))}; it takes "
                              f"`resource` and one of `fraction`, `amount` or `value`{spacing}")
        resource = value.get("resource", "macs")
        resource = RESOURCE_ALIASES.get(resource, resource) if isinstance(resource, str) else resource
        if resource not in RESOURCES:
            raise TargetError(f"{key}: resource {resource!r} is not supported; choose one of: {', '.join(RESOURCES)}")
        given = [k for k in ("fraction", "amount", "value") if k in value]
        if len(given) != 1:
            raise TargetError(f"{key} needs exactly one of `fraction`, `amount` or `value`, not "
                              f"{' and '.join(given) or 'none'}")
        field, raw = given[0], value[given[0]]
        if field == "value":
            return cls._parse_scalar(raw, f"{key}.value", resource)
        if field == "fraction":
            number = _number(raw)
            if number is None or not (0 < number <= 1):
                raise TargetError(f"{key}.fraction must be a number in (0, 1] (0.5 = half the baseline's "
                                  f"{RESOURCES[resource]}), not {raw!r}")
            return cls(resource, fraction=number)
        number = _number(raw)
        if number is None:  # an amount may still be written with its unit
            parsed = cls._parse_scalar(raw, f"{key}.amount", resource) if isinstance(raw, str) else None
            if parsed is None or parsed.amount is None:
                raise TargetError(f"{key}.amount must be an absolute count > 0 (1.5e6 or '1.5M'), not {raw!r}")
            return parsed
        if not (number > 0):
            raise TargetError(f"{key}.amount must be an absolute count > 0 (1.5e6 or '1.5M'), not {raw!r}")
        return cls(resource, amount=number)

    @classmethod
    def _parse_scalar(cls, value: Any, key: str, resource: str) -> "Target":
        unit = RESOURCES[resource]
        number = _number(value)
        if number is None and isinstance(value, str):
            text = value.strip()
            match = re.fullmatch(rf"({_NUMBER})\s*(%|[kKmMgGtT])?\s*({re.escape(unit)})?", text, re.I)
            if match is None:
                raise TargetError(f"{key} must be {FORMS}, not {value!r}")
            number = float(match.group(1).replace("_", ""))
            suffix, has_unit = match.group(2), match.group(3) is not None
            if suffix == "%":
                if has_unit or not (0 < number <= 100):
                    raise TargetError(f"{key} = {value!r}: a percentage of the baseline must be in (0%, 100%]")
                return cls(resource, fraction=number / 100)
            if suffix or has_unit:
                amount = number * MULTIPLIERS.get((suffix or "").lower(), 1.0)
                if not (amount > 0 and math.isfinite(amount)):
                    raise TargetError(f"{key} = {value!r}: an absolute count of {unit} must be > 0")
                return cls(resource, amount=amount)
            # a bare number written as text ("0.5" on the command line): the numeric rule below
        if number is None:
            raise TargetError(f"{key} must be {FORMS}, not {value!r}")
        if 0 < number <= 1:
            return cls(resource, fraction=number)
        if number > 1 and math.isfinite(number):
            if number >= 1000:
                absolute = f"write '{_human(number)}' (or '{number:.0f} {unit}')"
            else:  # 1.5 is far more likely 1.5 million than 1.5 MACs: show both spellings
                absolute = f"write '{number:g}M' for {number:g} million {unit}, '{number:g} {unit}' for {number:g}"
            raise TargetError(
                f"{key} = {value!r} is neither a fraction in (0, 1] nor an amount with its unit. For an absolute "
                f"count, {absolute}; for a fraction of the baseline give 0 < {key} <= 1 (0.5 = half). Targets "
                "above the baseline (such as 150%) are not possible: dnnshrink only removes channels.")
        why = "; a target at or below zero would remove the whole network" if number <= 0 else ""
        raise TargetError(f"{key} = {value!r} must be {FORMS}{why}")

    def absolute(self, baseline: float) -> float:
        """The target as an amount, given the baseline's amount."""
        return self.fraction * baseline if self.fraction is not None else float(self.amount)

    def to_dict(self) -> dict:
        """``{"resource": ..., "fraction": ...}`` or ``{"resource": ..., "amount": ...}`` (for reports)."""
        return ({"resource": self.resource, "fraction": self.fraction} if self.fraction is not None
                else {"resource": self.resource, "amount": self.amount})

    def __str__(self) -> str:
        if self.fraction is not None:
            what = {"latency": "latency", "params": "parameters"}.get(self.resource, self.unit)
            return f"{self.fraction * 100:.4g}% of the baseline's {what}"
        return f"{_human(self.amount)} {self.unit}"


def resolve(target: Any = None, target_macs: Any = None, where: str = "") -> Target:
    """The one :class:`Target` of a run from the ``target`` and ``target_macs`` options
    (half the baseline's MACs when neither is given; both is an error)."""
    if target is not None and target_macs is not None:
        raise TargetError(f"{where}give either `target` or `target_macs`, not both (target_macs: X is short for "
                          "target: {resource: macs, value: X})")
    if target is not None:
        return Target.parse(target, "target")
    if target_macs is not None:
        return Target.parse(target_macs, "target_macs", "macs")
    return Target("macs", fraction=0.5)


def notable_constant(constant: float, baseline: float) -> bool:
    """Whether what no channel cut changes is worth saying (1% of the baseline or more)."""
    return constant >= 0.01 * baseline


def smallest_cost(graph: Any, costs: Any, min_width: int = 1, round_to: Any = 1, depth: bool = False) -> float:
    """The cost of the smallest network the model can become: every group keeps its
    units that cannot be removed and, if that is fewer, grows to ``min_width`` (at least
    one unit, rounded up to a multiple of ``round_to``) with its cheapest removable units;
    with ``depth``, every residual block that can go whole is dropped as well
    (:mod:`dnnshrink_core.branches`).

    ``costs`` is the cost model of the target's resource; ``round_to`` an int or one
    multiple per group (``round_to: auto``)."""
    keep = ~graph.unit_removable.copy()
    weights = costs.unit_weights(np.ones(graph.num_units, dtype=bool))
    for group, multiple in zip(graph.groups, per_group_multiples(graph, round_to)):
        units = group.units
        fixed = int(keep[units].sum())
        need = max(min_width, 1)
        if multiple > 1:
            need = int(math.ceil(need / multiple) * multiple)
        need = min(need, group.size)
        if fixed >= need:
            continue
        free = units[~keep[units]]
        keep[free[np.argsort(weights[free], kind="stable")][: need - fixed]] = True
    if depth and graph.branches:  # every block that can go, gone
        for g in {g for b in graph.branches for g in b.own}:
            keep[graph.groups[g].units] = False
        keep = settle(graph, keep)
    return costs.cost(keep)


def check_reachable(target: Target, baseline: float, minimum: float, *, key: str = "target",
                    algorithm: str = "morphnet", grows: bool = False, min_width: int = 1,
                    depth: bool = False, deeper: Optional[float] = None, constant: float = 0.0,
                    kept_share: float = 0.0, kept_by: str = "", needs_batchnorm: bool = True) -> float:
    """The target's absolute amount, or :class:`TargetError` when the model cannot meet it:
    below ``minimum`` (:func:`smallest_cost`, whole residual blocks dropped too where
    ``depth``), or above ``baseline`` unless the algorithm ``grows`` networks. ``deeper``:
    the smallest cost with blocks dropped, where depth was turned off (the message says
    that it would reach the target). ``constant``: the part of every network's cost no
    channel cut changes (:attr:`CostModel.constant`), which the message names when it weighs;
    ``kept_share``: the share of the channel units no cut may remove, named when it is a
    tenth or more (most often what keeps a model from a target: layers without BatchNorm);
    ``kept_by``: why most of the kept units are kept (:meth:`ChannelGraph.commonest_reason`),
    named when no channel is removable; ``needs_batchnorm``: whether the advice is to add
    BatchNorms (the algorithm removes only the channels they scale)."""
    amount = target.absolute(baseline)
    unit = target.unit
    if amount < minimum * (1 - 1e-9):
        if minimum >= baseline * (1 - 1e-9):
            why = "no removable channel: this model cannot get smaller than its baseline" + \
                (f" (most of its channels are kept because {kept_by})" if kept_by else "")
        else:
            why = (f"every removable channel group at its minimum width ({max(min_width, 1)} unit"
                   f"{'s' if min_width > 1 else ''})" + (" and every residual block that can go dropped whole"
                                                         if depth else ""))
            if kept_share >= 0.1:
                why += (f"; {kept_share:.0%} of its channels cannot be removed (no BatchNorm scales them, or an op "
                        "the graph cannot follow keeps them: `dnnshrink inspect` shows which)")
            if notable_constant(constant, baseline):
                why += (f"; {constant / baseline:.0%} of the baseline is what no channel cut changes (attention's "
                        "matrix products, layers the graph cannot follow)")
        asked = f"{target}" if target.amount is not None else f"{target} ({_fmt(amount)} {unit})"
        if minimum >= baseline * (1 - 1e-9):
            advice = ("Give the fraction 1, or make channels removable (" +
                      ("a BatchNorm after each conv; " if needs_batchnorm else "") +
                      "`dnnshrink inspect` shows each group and what keeps it).")
        else:
            smallest = min(math.ceil(minimum / baseline * 1000) / 1000, 1.0)
            suggestion = _writable(minimum, unit, "up")
            # rounding the suggestion up may go past the baseline
            if Target.parse(suggestion.strip("'"), resource=target.resource).amount > baseline:
                suggestion = f"'{math.ceil(minimum)} {unit}'"
            advice = f"Give a target of at least {suggestion} (or the fraction {smallest:g})."
            if deeper is not None and amount >= deeper * (1 - 1e-9):
                advice += (f" With depth: auto (or true), whole residual blocks may go and the model can get down "
                           f"to {_fmt(deeper)} {unit}, which meets this target.")
        raise TargetError(
            f"{key} {asked} is below the smallest network this model can become: {_fmt(minimum)} {unit} "
            f"({minimum / baseline:.1%} of the baseline's {_fmt(baseline)}), with {why}. {advice}")
    if amount > baseline * (1 + 1e-9) and not grows:
        raise TargetError(
            f"{key} {target} is above the baseline's {_fmt(baseline)} {unit}; the {algorithm} algorithm only "
            f"removes channels. Give at most {_writable(baseline, unit, 'down')}, or a fraction in (0, 1].")
    return amount


def _fmt(amount: float) -> str:
    """``1,234,567`` for counts; ``0.0624`` for small amounts such as milliseconds."""
    return f"{amount:,.0f}" if amount >= 100 else f"{amount:.4g}"


def _number(value: Any) -> Optional[float]:
    """``value`` as a float when it is a real number (or a numeric string), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip().replace("_", ""))
        except ValueError:
            return None
    return None


def _writable(amount: float, unit: str, rounding: str) -> str:
    """An amount as a target would be written: ``'1.5M'``, or ``'146 MACs'`` below a thousand
    (a bare ``146`` would be refused as a fraction)."""
    text = _human(amount, rounding)
    return f"'{text}'" if text[-1].isalpha() else f"'{text} {unit}'"


def _human(amount: float, rounding: str = "nearest") -> str:
    """``1500000`` → ``1.5M`` (three significant digits, rounded ``nearest``, ``up`` or
    ``down``: a suggested minimum must not fall below the real one, nor a maximum above)."""
    for suffix, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if amount >= scale:
            value = amount / scale
            break
    else:
        suffix, value = "", amount
    if rounding != "nearest" and value > 0:
        digits = max(0, 2 - int(math.floor(math.log10(value))))
        step = math.ceil if rounding == "up" else math.floor
        value = step(value * 10 ** digits + (-1e-9 if rounding == "up" else 1e-9)) / 10 ** digits
    return f"{value:.3g}{suffix}"
