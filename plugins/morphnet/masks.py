"""MorphNet's mask extractor: a channel unit lives if any BatchNorm source has |gamma| > threshold."""
from __future__ import annotations

import warnings
from typing import Any, Optional

import numpy as np
from torch import nn

from dnnshrink_core.plugin_api import DEFAULT_THRESHOLD, ChannelGraph, DnnshrinkWarning, Masks, emptiable_groups


def gap_threshold(gammas: np.ndarray, floor: float = 1e-12) -> float:
    """A threshold in the widest gap of the ``log |gamma|`` distribution.

    After MorphNet training the scales are bimodal (dead ones near zero, live ones near
    one); the geometric middle of the widest gap separates them. With fewer than two
    distinct values there is no gap and 1e-2 (MorphNet's default) is returned.
    """
    values = np.unique(np.log10(np.maximum(np.abs(gammas), floor)))
    if len(values) < 2:
        return DEFAULT_THRESHOLD
    gaps = np.diff(values)
    i = int(np.argmax(gaps))
    return float(10 ** ((values[i] + values[i + 1]) / 2))


def threshold_masks(graph: ChannelGraph, model: nn.Module, threshold: Optional[float] = DEFAULT_THRESHOLD,
                    **_: Any) -> Masks:
    """Keep a unit unless it is removable and all its BatchNorm sources have ``|gamma| <= threshold``.

    ``threshold=None`` picks one with :func:`gap_threshold`. Every group keeps at least
    its unit with the largest ``|gamma|``, except the inner group of a residual branch
    (:func:`~dnnshrink_core.plugin_api.emptiable_groups`): the generator drops that branch
    whole, as MorphNet removes a block whose channels all died.
    """
    gammas = graph.unit_gammas(model)
    if threshold is None:
        threshold = gap_threshold(gammas[graph.unit_removable])
    alive = ~graph.unit_removable | (gammas > threshold)
    masks, emptied = {}, []
    can_empty = None  # found only when some group dies whole (finding branches costs a walk of the graph)
    for group in graph.groups:
        mask = alive[group.units]
        if not mask.any() and can_empty is None:
            can_empty = emptiable_groups(graph)
        if not mask.any() and not can_empty[group.index]:
            mask = mask.copy()
            mask[int(np.argmax(gammas[group.units]))] = True
            emptied.append(group.name)
        masks[group.name] = mask
    if emptied:  # said aloud: a threshold that empties a layer is usually a mistake
        warnings.warn(f"dnnshrink: threshold {threshold:g} removes every unit of group(s) "
                      f"{', '.join(map(repr, emptied))}; one unit (the largest |gamma|) is kept in each so no "
                      "layer collapses.", DnnshrinkWarning, stacklevel=4)
    result = Masks(masks, graph)
    result.threshold = threshold
    return result


class ThresholdExtractor:
    """The ``threshold`` mask extractor: :func:`threshold_masks` when called."""

    def __call__(self, graph: ChannelGraph, model: nn.Module, threshold: Optional[float] = DEFAULT_THRESHOLD,
                 **options: Any) -> Masks:
        return threshold_masks(graph, model, threshold, **options)
