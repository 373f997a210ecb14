"""The count-based resources: MACs, parameters and activations of conv/linear layers.

Each is a factory ``Cost(table, **options)`` with ``layer_costs(kept_in, kept_out)`` and
``partials(kept_in, kept_out)`` vectorised over the layers of a
:class:`dnnshrink_core.cost.LayerTable` (see the ``dnnshrink_cost_model`` hook).
"""
from __future__ import annotations

from typing import Any, Tuple

import numpy as np

from dnnshrink_core.plugin_api import LayerTable


class _Bilinear:
    """A cost of ``c · kept_in · kept_out`` per layer (``c · kept_out`` when depthwise)."""

    unit = ""
    fixed = 0.0

    def __init__(self, table: LayerTable, coef: np.ndarray):
        self.table, self.c, self.depthwise = table, np.asarray(coef, dtype=np.float64), table.depthwise

    def layer_costs(self, kept_in: np.ndarray, kept_out: np.ndarray) -> np.ndarray:
        """Each layer's cost."""
        return np.where(self.depthwise, self.c * kept_out, self.c * kept_in * kept_out)

    def partials(self, kept_in: np.ndarray, kept_out: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """``(d cost / d kept_in, d cost / d kept_out)`` per layer."""
        return (np.where(self.depthwise, 0.0, self.c * kept_out),
                np.where(self.depthwise, self.c, self.c * kept_in))


class FlopsCost(_Bilinear):
    """MACs (MorphNet's GammaFlops cost): ``coef · kept_in · kept_out`` per layer."""

    unit = "MACs"

    def __init__(self, table: LayerTable, **_: Any):
        super().__init__(table, table.coef)


class ParamsCost(_Bilinear):
    """Weights (MorphNet's model-size cost): ``weights per pair · kept_in · kept_out``."""

    unit = "params"

    def __init__(self, table: LayerTable, **_: Any):
        super().__init__(table, table.weights_per_pair)


class ActivationsCost:
    """Activation memory (MorphNet's activation-count cost): the elements each conv/linear
    layer writes, ``output positions · kept_out`` (the input side is the previous layer's
    output, so it is not counted twice)."""

    unit = "activations"
    fixed = 0.0

    def __init__(self, table: LayerTable, **_: Any):
        self.positions = np.asarray(table.out_positions, dtype=np.float64)

    def layer_costs(self, kept_in: np.ndarray, kept_out: np.ndarray) -> np.ndarray:
        """Each layer's output elements."""
        return self.positions * kept_out

    def partials(self, kept_in: np.ndarray, kept_out: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """``(0, output positions)`` per layer."""
        return np.zeros_like(self.positions), self.positions.copy()
