"""Channel labels: every channel of every traced tensor gets an integer label.

A *space* is a contiguous range of labels created by one producer (a conv's output
channels, a BatchNorm's features, the network input, the zero channels a pad adds…).
Handlers *tie* labels that must be kept or removed together (the two inputs of an add,
a conv's input channels with the channels that reach it) and *freeze* labels that must
stay (network inputs and outputs, ops nobody understands). After propagation the ties
are resolved into connected components, the *units*; see :mod:`dnnshrink_core.graph`.

The store is built for speed on large graphs: ties are collected as index arrays and
resolved once, in numpy, so the cost grows linearly with the number of channels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np


# Roles of spaces that read channels made elsewhere; they never link groups together.
# ("param": one dimension of a parameter or buffer reached through ``get_attr``.)
CONSUMER_ROLES = frozenset({"in", "features", "param"})


@dataclass
class Space:
    """A contiguous range of labels made by one producer.

    ``owner`` is the module name or graph-node name that made it and ``role`` says what
    the labels are for that owner (``"out"``, ``"in"``, ``"features"``, ``"pad"``,
    ``"input"``…).
    """

    index: int
    owner: str
    role: str
    start: int
    size: int

    @property
    def name(self) -> str:
        """``owner`` for producers' outputs, ``owner:role`` otherwise."""
        return self.owner if self.role == "out" else f"{self.owner}:{self.role}"


class Chan:
    """What the propagation knows about one traced tensor with a channel dimension.

    ``labels[i]`` is the label of channel ``i``; ``guard[i]`` is True when that channel
    is exactly zero whenever all BatchNorm sources of its unit have ``gamma = beta = 0``
    (it passed through such a BatchNorm and then only zero-preserving ops).

    ``dim`` is the tensor dimension the labels describe: 1 for the usual ``N, C, …``
    layout, the last dimension after a permute to channels-last (``N, H, W, C``), 0 for a
    per-channel parameter reached through ``get_attr`` (a layer scale, a BatchNorm weight
    used by ``F.batch_norm``). Only handlers with ``any_channel_dim = True`` see values
    whose ``dim`` is not 1; for the others they are frozen (see
    :class:`dnnshrink_core.OpHandler`).
    """

    __slots__ = ("labels", "guard", "dim")

    def __init__(self, labels: np.ndarray, guard: Optional[np.ndarray] = None, dim: int = 1):
        self.labels = labels
        self.guard = np.zeros(len(labels), dtype=bool) if guard is None else guard
        self.dim = dim

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        where = "" if self.dim == 1 else f" at dim {self.dim}"
        return f"Chan({len(self.labels)} channels{where})"


class ChanCount:
    """A number the model's code read from a tensor's shape at its channel dimension
    (``C`` in ``B, C, H, W = x.shape``, ``x.size(1)``): it changes when those channels are
    removed, so whatever uses it must be sized by the same channels."""

    __slots__ = ("labels",)

    def __init__(self, labels: np.ndarray):
        self.labels = labels

    def __repr__(self) -> str:
        return f"ChanCount({len(self.labels)})"


class ShapeOf:
    """A tensor's whole shape (``x.shape``, ``x.size()``) where the tensor has channels."""

    __slots__ = ("chan",)

    def __init__(self, chan: "Chan"):
        self.chan = chan

    def __repr__(self) -> str:
        return f"ShapeOf({self.chan!r})"


class LabelStore:
    """Collects spaces, ties, freezes and sources while the graphs are propagated."""

    def __init__(self) -> None:
        self.size = 0
        self.spaces: List[Space] = []
        self._tie_a: List[np.ndarray] = []
        self._tie_b: List[np.ndarray] = []
        self.frozen: List[Tuple[np.ndarray, str]] = []
        # (labels, BatchNorm module name, channel indices into its weight)
        self.sources: List[Tuple[np.ndarray, str, np.ndarray]] = []
        self.unguarded: List[np.ndarray] = []
        # (labels, labels, reason): the two must end in the same units, else both are frozen
        self.same_units: List[Tuple[np.ndarray, np.ndarray, str]] = []
        self.module_spaces: Dict[Tuple[str, str], Space] = {}
        self.opaque_modules: Dict[str, str] = {}
        # (parameter or buffer path, dimension) -> its labels; the generator slices that
        # dimension of the tensor, in the module that owns it, by these labels' keep flags
        self.param_spaces: Dict[Tuple[str, int], Space] = {}

    def new_space(self, owner: str, role: str, size: int) -> np.ndarray:
        """Create ``size`` fresh labels owned by ``owner`` and return them."""
        space = Space(len(self.spaces), owner, role, self.size, int(size))
        self.spaces.append(space)
        self.size += int(size)
        return np.arange(space.start, space.start + space.size, dtype=np.int64)

    def module_space(self, owner: str, role: str, size: int) -> Tuple[np.ndarray, bool]:
        """The persistent space of a module's channel dimension, shared by every trace.

        Returns the labels and whether the space was created by this call. A module
        called from several traced modes (or twice in one) thus keeps one set of weights.
        """
        key = (owner, role)
        space = self.module_spaces.get(key)
        if space is not None:
            if space.size != size:
                raise ValueError(f"{owner}:{role} has {space.size} channels in one trace and {size} in another")
            return np.arange(space.start, space.start + space.size, dtype=np.int64), False
        labels = self.new_space(owner, role, size)
        self.module_spaces[key] = self.spaces[-1]
        if owner in self.opaque_modules:
            self.freeze(labels, self.opaque_modules[owner])
        return labels, True

    def param_space(self, path: str, dim: int, size: int, owner: Optional[str] = None,
                    role: str = "param") -> Tuple[np.ndarray, bool]:
        """The persistent labels of dimension ``dim`` of the parameter or buffer at ``path``.

        Every use of the tensor, in every trace, gets the same labels, so it is sliced once
        and consistently. ``owner`` and ``role`` name the space when it is created (a conv
        weight's rows are the ``"out"`` channels of the layer that owns it). Returns the
        labels and whether the space was created by this call.
        """
        key = (path, int(dim))
        space = self.param_spaces.get(key)
        if space is not None:
            if space.size != size:
                raise ValueError(f"{path} dim {dim} has {space.size} entries in one use and {size} in another")
            return np.arange(space.start, space.start + space.size, dtype=np.int64), False
        labels = self.new_space(owner or path, role, size)
        self.param_spaces[key] = self.spaces[-1]
        return labels, True

    def param_labels(self, path: str) -> List[np.ndarray]:
        """The labels of every dimension of ``path`` that has a parameter space."""
        return [np.arange(s.start, s.start + s.size, dtype=np.int64)
                for (p, _), s in self.param_spaces.items() if p == path]

    def make_opaque(self, owner: str, reason: str) -> None:
        """Keep every channel of module ``owner``, in this call and in every other one."""
        if owner in self.opaque_modules:
            return
        self.opaque_modules[owner] = reason
        for (name, _), space in self.module_spaces.items():
            if name == owner:
                self.freeze(np.arange(space.start, space.start + space.size, dtype=np.int64), reason)

    def tie(self, a: np.ndarray, b: np.ndarray) -> None:
        """Tie ``a[i]`` with ``b[i]`` for every i: they are kept or removed together."""
        a = np.asarray(a, dtype=np.int64)
        b = np.asarray(b, dtype=np.int64)
        if a.shape != b.shape:
            raise ValueError(f"cannot tie {a.shape[0]} channels with {b.shape[0]}")
        if a.size:
            self._tie_a.append(a)
            self._tie_b.append(b)

    def freeze(self, labels: np.ndarray, reason: str) -> None:
        """Keep every channel of ``labels``'s units; ``reason`` is shown to the user."""
        labels = np.asarray(labels, dtype=np.int64)
        if labels.size:
            self.frozen.append((labels, reason))

    def require_same_units(self, a: np.ndarray, b: np.ndarray, reason: str) -> None:
        """``a`` and ``b`` must be kept and removed together (a channel count read from one
        tensor sizes another); checked once every tie is known, both frozen if they are not."""
        self.same_units.append((np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64), reason))

    def frozen_so_far(self, labels: np.ndarray) -> bool:
        """Whether every one of ``labels`` has been frozen itself so far (ties to frozen
        labels are resolved only at the end, so False does not mean it will stay free)."""
        flags = getattr(self, "_frozen_flags", np.zeros(0, dtype=bool))
        done = getattr(self, "_frozen_seen", 0)
        if len(flags) < self.size:
            flags = np.concatenate([flags, np.zeros(self.size - len(flags), dtype=bool)])
        for frozen, _ in self.frozen[done:]:  # only the freezes since the last call
            flags[frozen] = True
        self._frozen_flags, self._frozen_seen = flags, len(self.frozen)
        labels = np.asarray(labels, dtype=np.int64)
        return bool(labels.size) and bool(flags[labels].all())

    def add_source(self, labels: np.ndarray, module_name: str, channels: np.ndarray) -> None:
        """Record that BatchNorm ``module_name`` scales ``labels`` with ``weight[channels]``."""
        self.sources.append((np.asarray(labels, dtype=np.int64), module_name, np.asarray(channels, dtype=np.int64)))

    def mark_unguarded(self, labels: np.ndarray) -> None:
        """Record that ``labels`` reach a channel-mixing op without being zeroed by a source.

        Removing such a unit would change the network's output even when all its
        BatchNorm scales are zero, so it is never removed.
        """
        labels = np.asarray(labels, dtype=np.int64)
        if labels.size:
            self.unguarded.append(labels)

    def ties(self) -> Tuple[np.ndarray, np.ndarray]:
        """All ties as two aligned label arrays."""
        if not self._tie_a:
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty
        return np.concatenate(self._tie_a), np.concatenate(self._tie_b)


def connected_components(n: int, a: np.ndarray, b: np.ndarray) -> Tuple[np.ndarray, int]:
    """Label the connected components of ``n`` nodes joined by edges ``a[i]``—``b[i]``.

    Returns ``(component of each node, number of components)``; components are numbered
    in the order of their smallest node. Hook-and-shortcut in numpy: every round hooks
    each root to the smallest root it touches, then compresses paths, so the work is
    linear in ``n + len(a)`` per round and the rounds are few.
    """
    parent = np.arange(n, dtype=np.int64)
    if len(a):
        while True:
            ra, rb = parent[a], parent[b]
            differ = ra != rb
            if not differ.any():
                break
            ra, rb = ra[differ], rb[differ]
            low = np.minimum(ra, rb)
            np.minimum.at(parent, ra, low)
            np.minimum.at(parent, rb, low)
            while True:
                grand = parent[parent]
                if np.array_equal(grand, parent):
                    break
                parent = grand
    roots, comp = np.unique(parent, return_inverse=True)
    return comp.astype(np.int64), int(len(roots))
