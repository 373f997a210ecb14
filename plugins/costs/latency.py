"""The ``latency`` cost: a roofline per conv/linear layer, with constants measured on the
target runtime (``dnnshrink calibrate``) and stored in a versioned JSON profile.

A layer at batch ``b`` moves ``bytes = 4 · (b · in_positions · kept_in + b · out_positions ·
kept_out + weights)`` (float32) and computes ``macs = b · coef · kept_in · kept_out``; it takes

    max(macs / peak, bytes / bandwidth) + overhead + b · out_positions · per_position   (seconds)

with ``peak``, ``bandwidth``, ``overhead`` and ``per_position`` fitted per op kind (``conv``,
``pointwise``, ``depthwise``, ``linear``). The per-position term (``position_ns``, fitted by
``dnnshrink calibrate --per-position``; 0 otherwise and in older profiles) is what a layer
pays per output pixel whatever its widths (the runtime's loops and layout changes around the
kernel): a thin layer at a high resolution (a shrunk network's first layers, a 3-channel
stem) is slower than its MACs and bytes say, while onnxruntime's real per-call cost is about
a microsecond (``bench/bench_per_call.py``); without the term, the fitted ``overhead``
absorbs it. Runtimes such as onnxruntime's CPU provider run a convolution
with their fast blocked-channel kernels only when its channel counts fit the block, so each
kind has a second peak, ``peak_unaligned``, for widths that do not, and its measured block
(``channel_multiple``), which ``round_to: auto`` rounds widths to. The network's cost adds
``overhead_ms`` per run. Costs are in milliseconds.

The ops between the layers that a runtime runs by themselves (:data:`TENSOR_KINDS`: SiLU, the
excitation multiply, pooling, concatenation… on onnxruntime's CPU provider; 43% of
EfficientNet-B0's time)
are priced too, each ``bytes / bandwidth + overhead + b · positions · per_position`` with
constants per kind (version 2 profiles). A kind the profile does not hold costs nothing: the
calibration leaves out the kinds the runtime fuses into the conv before them, and version 1
profiles hold none.

A concatenation stays in a blocked-channel layout only when each of its pieces fits the
layout's block: onnxruntime's CPU provider otherwise reorders every piece out of the layout
and the result back in (two more passes over the tensor; GhostNet's 12 + 12 channel halves
pay 94 reorders, a third of its time). Version 3 profiles give such a kind its measured
block (``channel_multiple``, read from the graph the runtime optimises) and the bandwidth it
moves its bytes at when a piece misses it (``bandwidth_unaligned_gbs``); the pieces are the
``"piece"`` rows that follow a concatenation's row in the table
(:func:`dnnshrink_core.tensor_ops.find_tensor_ops`).
"""
from __future__ import annotations

import json
import math
import numbers
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np

from dnnshrink_core.plugin_api import (PIECE_OP as PIECE, PRODUCT_OP as PRODUCT, SPINNING, TENSOR_KINDS, ConfigError,
                                      DnnshrinkWarning, LayerTable, runtime_spinning)

FORMAT = "dnnshrink-latency-profile"
# 2: the tensor ops' kinds (optional); 3: a tensor kind's block and unaligned bandwidth
# (optional); older profiles are read as they are
VERSION = 3
READS = (1, 2, 3)
KINDS = ("conv", "pointwise", "depthwise", "linear")  # every profile has these
# a grouped conv that is not depthwise: a kind of its own in profiles that measured it (its
# speed depends on the channels per group), priced as ``conv`` by the others
GROUPED = "grouped"
DEFAULT_PROFILE = Path(__file__).parent / "profiles" / "onnxruntime-cpu-2t-b1.json"
BYTES_PER_ELEMENT = 4  # float32


class ProfileError(ConfigError):
    """A latency profile that is missing, unreadable or does not follow the schema."""


@dataclass(frozen=True)
class OpConstants:
    """The fitted roofline of one op kind: ``peak_gmacs`` (GMAC/s with aligned widths),
    ``peak_unaligned_gmacs`` (GMAC/s when the widths miss the block), ``bandwidth_gbs``
    (GB/s), ``overhead_us`` (per call), ``channel_multiple`` (the measured block) and
    ``position_ns`` (per output position and image; 0 in profiles made before it was fitted).
    A tensor op's kind has no peaks; a concatenation's may have a block (``channel_multiple``)
    and ``bandwidth_unaligned_gbs``, what it moves its bytes at when a piece misses the block
    (None: no block)."""

    peak_gmacs: float
    peak_unaligned_gmacs: float
    bandwidth_gbs: float
    overhead_us: float
    channel_multiple: int = 1
    position_ns: float = 0.0
    bandwidth_unaligned_gbs: Optional[float] = None

    @classmethod
    def tensor_op(cls, bandwidth_gbs: float, overhead_us: float, position_ns: float = 0.0, channel_multiple: int = 1,
                  bandwidth_unaligned_gbs: Optional[float] = None) -> "OpConstants":
        """The constants of a tensor op's kind (an activation, add, multiply, pooling): it
        computes nothing, so only its bandwidth, overhead and per-position cost count, and
        for a concatenation with a block, its bandwidth when a piece misses it."""
        if bandwidth_unaligned_gbs is None:
            channel_multiple = 1
        return cls(math.inf, math.inf, bandwidth_gbs, overhead_us, channel_multiple, position_ns,
                   bandwidth_unaligned_gbs)

    @property
    def bandwidth_unaligned(self) -> float:
        """The bandwidth (GB/s) when the pieces miss the block (the aligned one without a block)."""
        return self.bandwidth_gbs if self.bandwidth_unaligned_gbs is None else self.bandwidth_unaligned_gbs

    def to_dict(self) -> Dict[str, Any]:
        """The JSON form (a tensor op's kind has no peaks, and a block only with its bandwidth)."""
        data = vars(self).copy()
        if self.bandwidth_unaligned_gbs is None:
            del data["bandwidth_unaligned_gbs"]
        if math.isinf(self.peak_gmacs):
            del data["peak_gmacs"], data["peak_unaligned_gmacs"]
            if self.bandwidth_unaligned_gbs is None:
                del data["channel_multiple"]
        return data


# how :meth:`Profile.describe` says how an onnxruntime profile's threads waited
_SPINNING_SAID = {"run": "", "always": ", threads spinning between runs too", "never": ", threads sleeping between ops"}


@dataclass(frozen=True)
class Profile:
    """A calibrated latency profile: the runtime it was measured on, the per-run overhead,
    the constants of every op kind, and what the calibration measured (kept for the record)."""

    runtime: Dict[str, Any]
    overhead_ms: float
    ops: Dict[str, OpConstants]
    calibration: Dict[str, Any] = field(default_factory=dict)

    @property
    def batch(self) -> int:
        """The batch size the profile was measured at."""
        return int(self.runtime.get("batch", 1))

    @property
    def threads(self) -> int:
        """The intra-op threads the profile was measured with."""
        return int(self.runtime.get("threads", 1))

    @property
    def spinning(self) -> str:
        """How the profile's onnxruntime sessions' threads waited for work
        (:data:`~dnnshrink_core.plugin_api.SPINNING`, by
        :func:`~dnnshrink_core.plugin_api.runtime_spinning`: ``"never"`` for an onnxruntime
        profile made before profiles said so)."""
        return runtime_spinning(self.runtime)

    def describe(self) -> str:
        """``onnxruntime cpu, 2 threads, batch 1`` (and how the threads waited, where not
        the default)."""
        r = self.runtime
        dtype = "" if r.get("dtype", "float32") == "float32" else f", {r['dtype']}"
        spin = "" if r.get("name") != "onnxruntime" else _SPINNING_SAID[self.spinning]
        return f"{r.get('name')} {r.get('device')}, {r.get('threads')} threads, batch {r.get('batch')}{dtype}{spin}"

    def to_dict(self) -> Dict[str, Any]:
        """The JSON form (see :func:`load_profile`)."""
        return {"format": FORMAT, "version": VERSION, "runtime": dict(self.runtime), "overhead_ms": self.overhead_ms,
                "ops": {k: v.to_dict() for k, v in self.ops.items()}, "calibration": dict(self.calibration)}

    def save(self, path: Union[str, Path]) -> Path:
        """Write the profile as JSON (atomically)."""
        from dnnshrink_core.plugin_api import atomic_write

        path = Path(path)
        with atomic_write(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")
        return path


_RUNTIME_KEYS = {"name": str, "device": str, "threads": int, "batch": int, "version": str, "dtype": str, "spinning": str}
# the number formats a profile may be timed in (``dnnshrink calibrate --dtype``, eager PyTorch)
DTYPES = ("float32", "float16", "bfloat16")
_OP_KEYS = {"peak_gmacs": float, "peak_unaligned_gmacs": float, "bandwidth_gbs": float, "overhead_us": float,
            "channel_multiple": int, "position_ns": float}
_TENSOR_OP_KEYS = {"bandwidth_gbs": float, "overhead_us": float, "position_ns": float}
_TENSOR_BLOCK_KEYS = {"channel_multiple": int, "bandwidth_unaligned_gbs": float}  # version 3, both or neither


def _check_number(value: Any, kind: type, where: str, minimum: float = 0.0, strict: bool = True) -> Any:
    ok = (isinstance(value, numbers.Integral) if kind is int else isinstance(value, numbers.Real)) \
        and not isinstance(value, bool) and math.isfinite(value) and (value > minimum if strict else value >= minimum)
    if not ok:
        word = "an integer" if kind is int else "a number"
        raise ProfileError(f"{where} must be {word} {'>' if strict else '>='} {minimum:g}, not {value!r}")
    return kind(value)


def _closed(data: Mapping, keys: Mapping[str, Any], where: str, optional: Tuple[str, ...] = ()) -> None:
    if not isinstance(data, Mapping):
        raise ProfileError(f"{where} must be a mapping, not {type(data).__name__}")
    unknown = sorted(set(map(str, data)) - set(keys))
    if unknown:
        raise ProfileError(f"{where} has unknown key(s) {', '.join(unknown)}; it takes {', '.join(keys)}")
    missing = [k for k in keys if k not in data and k not in optional]
    if missing:
        raise ProfileError(f"{where} is missing {', '.join(missing)}")


def profile_from_dict(data: Any, source: str = "profile") -> Profile:
    """A :class:`Profile` from its JSON form, checked against the closed schema (every key
    known, every value of its type and range); :class:`ProfileError` names what is wrong."""
    _closed(data, {"format": str, "version": int, "runtime": dict, "overhead_ms": float, "ops": dict,
                   "calibration": dict}, source, optional=("calibration",))
    if data["format"] != FORMAT:
        raise ProfileError(f"{source}: format must be {FORMAT!r}, not {data['format']!r}")
    if data["version"] not in READS:
        raise ProfileError(f"{source}: version {data['version']!r} is not supported (this dnnshrink reads versions "
                           f"{', '.join(map(str, READS))}); make a new one with `dnnshrink calibrate`")
    runtime = data["runtime"]
    _closed(runtime, _RUNTIME_KEYS, f"{source}: runtime", optional=("version", "dtype", "spinning"))
    for key in ("name", "device", "version", "dtype", "spinning"):
        if key in runtime and not isinstance(runtime[key], str):
            raise ProfileError(f"{source}: runtime.{key} must be a string, not {runtime[key]!r}")
    if runtime.get("dtype", "float32") not in DTYPES:
        raise ProfileError(f"{source}: runtime.dtype must be one of {', '.join(DTYPES)}, not {runtime['dtype']!r}")
    if runtime.get("spinning", "never") not in SPINNING:
        raise ProfileError(f"{source}: runtime.spinning must be one of {', '.join(SPINNING)}, not "
                           f"{runtime['spinning']!r}")
    for key in ("threads", "batch"):
        _check_number(runtime[key], int, f"{source}: runtime.{key}")
    ops_data = data["ops"]
    optional = (GROUPED,) + TENSOR_KINDS if data["version"] >= 2 else ()
    _closed(ops_data, {k: dict for k in KINDS + optional}, f"{source}: ops", optional=optional)
    ops = {}
    for kind in KINDS + tuple(k for k in optional if k in ops_data):
        entry = ops_data[kind]
        keys = _TENSOR_OP_KEYS if kind in TENSOR_KINDS else _OP_KEYS
        optional_keys: Tuple[str, ...] = ("position_ns",)
        if kind in TENSOR_KINDS and data["version"] >= 3:
            keys = {**keys, **_TENSOR_BLOCK_KEYS}
            optional_keys += tuple(_TENSOR_BLOCK_KEYS)
            if isinstance(entry, Mapping) and len(set(_TENSOR_BLOCK_KEYS) & set(entry)) == 1:
                raise ProfileError(f"{source}: ops.{kind} gives one of {', '.join(_TENSOR_BLOCK_KEYS)} without "
                                   "the other")
        _closed(entry, keys, f"{source}: ops.{kind}", optional=optional_keys)
        values = {key: _check_number(entry[key], typ, f"{source}: ops.{kind}.{key}",
                                     strict=key not in ("overhead_us", "position_ns"))
                  for key, typ in keys.items() if key in entry}
        if kind in TENSOR_KINDS:
            ops[kind] = OpConstants.tensor_op(**values)
            continue
        if values["channel_multiple"] < 1:
            raise ProfileError(f"{source}: ops.{kind}.channel_multiple must be >= 1")
        ops[kind] = OpConstants(**values)
    overhead = _check_number(data["overhead_ms"], float, f"{source}: overhead_ms", strict=False)
    calibration = data.get("calibration", {})
    if not isinstance(calibration, Mapping):
        raise ProfileError(f"{source}: calibration must be a mapping")
    return Profile(dict(runtime), overhead, ops, dict(calibration))


def load_profile(profile: Union[None, str, Path, Profile, Mapping] = None) -> Profile:
    """The profile at ``profile`` (a path to its JSON), or the given :class:`Profile` or
    mapping; ``None`` is the default one shipped with dnnshrink (onnxruntime CPU, 2
    threads, batch 1)."""
    if isinstance(profile, Profile):
        return profile
    if isinstance(profile, Mapping):
        return profile_from_dict(profile)
    path = Path(profile) if profile is not None else DEFAULT_PROFILE
    if not path.is_file():
        raise ProfileError(f"latency profile {path} does not exist; make one with `dnnshrink calibrate --out {path}`")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ProfileError(f"latency profile {path} is not readable JSON: {exc}") from exc
    return profile_from_dict(data, str(path))


def roofline_seconds(macs: np.ndarray, traffic: np.ndarray, peak: np.ndarray, bandwidth: np.ndarray,
                     overhead: np.ndarray) -> np.ndarray:
    """``max(macs / peak, bytes / bandwidth) + overhead`` (peak in MAC/s, bandwidth in B/s)."""
    return np.maximum(macs / peak, traffic / bandwidth) + overhead


class LatencyCost:
    """The ``latency`` resource (milliseconds) for a :class:`LayerTable`, from a profile
    (``profile=``: a path, a :class:`Profile`, or ``None`` for the default)."""

    unit = "ms"
    prices_tensor_ops = True  # the ops between the layers too (dnnshrink_core.tensor_ops)

    def __init__(self, table: LayerTable, profile: Union[None, str, Path, Profile] = None, **_: Any):
        self.profile = load_profile(profile)
        ops = self.profile.ops
        kinds = [str(k) for k in table.op]
        free = OpConstants.tensor_op(math.inf, 0.0)  # a tensor op a (version 1) profile does not price
        # a product of two activations runs as a MatMul, like a linear layer over tokens
        known = {k: ops.get(k, ops["conv"] if k == GROUPED else ops["linear"] if k == PRODUCT else free)
                 for k in set(kinds)}
        pick = (lambda attr, scale: np.array([getattr(known[k], attr) * scale for k in kinds], dtype=np.float64))
        self.peak, self.peak_unaligned = pick("peak_gmacs", 1e9), pick("peak_unaligned_gmacs", 1e9)
        self.bandwidth, self.overhead = pick("bandwidth_gbs", 1e9), pick("overhead_us", 1e-6)
        self.multiple = np.array([known[k].channel_multiple for k in kinds], dtype=np.int64)
        self._pieces(kinds, pick("bandwidth_unaligned", 1e9))
        self.groups = np.asarray(table.groups, dtype=np.float64)
        self.depthwise = table.depthwise
        self.linear = np.array([k in ("linear", PRODUCT) for k in kinds], dtype=bool)
        b = float(self.profile.batch)
        self.macs_coef = b * table.coef
        self.in_bytes = BYTES_PER_ELEMENT * b * table.in_positions
        self.out_bytes = BYTES_PER_ELEMENT * b * table.out_positions
        self.weight_bytes = BYTES_PER_ELEMENT * table.weights_per_pair
        self.per_position = pick("position_ns", 1e-9) * b * table.rows  # seconds per layer
        self.fixed = self.profile.overhead_ms
        self.runtime = dict(self.profile.runtime)

    def _pieces(self, kinds: List[str], bandwidth_unaligned: np.ndarray) -> None:
        """Which rows are pieces of which concatenation (a piece row follows its
        concatenation's row, or another piece of it), for the concatenations whose kind has a
        block: their bandwidth is the unaligned one when a piece's kept count misses it."""
        piece_rows, parents, parent = [], [], -1
        for i, kind in enumerate(kinds):
            if kind == PIECE:
                if parent >= 0:
                    piece_rows.append(i)
                    parents.append(parent)
            else:
                parent = i if kind in TENSOR_KINDS and self.multiple[i] > 1 else -1
        self.piece_rows = np.array(piece_rows, dtype=np.int64)
        self.piece_parent = np.array(parents, dtype=np.int64)
        self.bandwidth_unaligned = bandwidth_unaligned
        # a block means something only for a join whose pieces are known (a pad priced as a
        # concatenation has none): no other row asks round_to: auto for it
        tensor_rows = np.array([kind in TENSOR_KINDS for kind in kinds], dtype=bool)
        joins = np.zeros(len(kinds), dtype=bool)
        joins[self.piece_parent] = True
        self.multiple[tensor_rows & ~joins] = 1

    def _bandwidth(self, kept_out: np.ndarray) -> np.ndarray:
        """Each row's bandwidth at these kept counts: a concatenation with a piece that
        misses its block moves its bytes at the unaligned one."""
        if not len(self.piece_rows):
            return self.bandwidth
        parents = self.piece_parent
        missed = np.mod(kept_out[self.piece_rows], self.multiple[parents]) != 0
        unaligned = np.bincount(parents, weights=missed, minlength=len(self.bandwidth)) > 0
        return np.where(unaligned, self.bandwidth_unaligned, self.bandwidth)

    @staticmethod
    def calibrate(**options: Any) -> Profile:
        """Measure a profile of a runtime (``dnnshrink calibrate``; see :mod:`.calibrate`)."""
        from .calibrate import calibrate

        return calibrate(**options)

    def channel_multiples(self) -> Tuple[np.ndarray, np.ndarray]:
        """Per layer, the channel block of its input and output sides (``round_to: auto``).
        A linear layer's runtime kernel has no block (its multiple is what was measured). A
        profile whose block probes disagreed between timings says so here, where the blocks
        are relied on."""
        if self.profile.calibration.get("blocks_stable") is False:
            warnings.warn("dnnshrink: the latency profile's channel blocks changed between timings of the same "
                          f"probes when it was made ({self.profile.describe()}): round_to: auto rounds to blocks that "
                          "may be wrong. Calibrate again on an idle machine (--blocks-from a steadier profile keeps "
                          "its blocks), or give round_to an integer.", DnnshrinkWarning, stacklevel=3)
        return self.multiple.copy(), self.multiple.copy()

    def aligned(self, kept_in: np.ndarray, kept_out: np.ndarray) -> np.ndarray:
        """Whether each layer's kept widths fit its block (an input narrower than the block,
        such as an image's 3 channels, is read as it is and does not count; a grouped conv's
        block is in its channels per group)."""
        m = self.multiple
        kept_in, kept_out = kept_in / self.groups, kept_out / self.groups
        out_ok = np.mod(kept_out, m) == 0
        in_ok = (np.mod(kept_in, m) == 0) | (kept_in < m) | self.depthwise
        return out_ok & in_ok | self.linear

    def _terms(self, kept_in: np.ndarray, kept_out: np.ndarray) -> Tuple[np.ndarray, ...]:
        kin = np.where(self.depthwise, kept_out, kept_in)  # a depthwise layer reads what it writes
        macs = np.where(self.depthwise, self.macs_coef * kept_out, self.macs_coef * kin * kept_out)
        weights = np.where(self.depthwise, self.weight_bytes * kept_out, self.weight_bytes * kin * kept_out)
        traffic = self.in_bytes * kin + self.out_bytes * kept_out + weights
        peak = np.where(self.aligned(kept_in, kept_out), self.peak, self.peak_unaligned)
        return kin, macs, traffic, peak, self._bandwidth(kept_out)

    def layer_costs(self, kept_in: np.ndarray, kept_out: np.ndarray) -> np.ndarray:
        """Each layer's predicted milliseconds."""
        _, macs, traffic, peak, bandwidth = self._terms(kept_in, kept_out)
        return 1e3 * (roofline_seconds(macs, traffic, peak, bandwidth, self.overhead) + self.per_position)

    def partials(self, kept_in: np.ndarray, kept_out: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """``(d ms / d kept_in, d ms / d kept_out)``: the bound side of the roofline (compute
        or memory) at the current widths gives the derivative (a concatenation's at the
        bandwidth its pieces' alignment gives now)."""
        kin, macs, traffic, peak, bandwidth = self._terms(kept_in, kept_out)
        compute = macs / peak >= traffic / bandwidth
        d_in = np.where(compute, self.macs_coef * kept_out / peak,
                        (self.in_bytes + self.weight_bytes * kept_out) / bandwidth)
        d_out_dense = np.where(compute, self.macs_coef * kin / peak,
                               (self.out_bytes + self.weight_bytes * kin) / bandwidth)
        d_out_dw = np.where(compute, self.macs_coef / peak,
                            (self.in_bytes + self.out_bytes + self.weight_bytes) / bandwidth)
        return 1e3 * np.where(self.depthwise, 0.0, d_in), 1e3 * np.where(self.depthwise, d_out_dw, d_out_dense)
