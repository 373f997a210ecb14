"""Everything a plugin may use from dnnshrink's core, in one place.

Plugins (dnnshrink's own under ``plugins/`` and third parties') import from here and from
nowhere else in the core, so the rest of the core can change without breaking them::

    from dnnshrink_core.plugin_api import OpHandler, PropagateContext, RebuildContext, hookimpl

What is here, by the kind of plugin that needs it:

* every plugin: :func:`hookimpl`, the errors and warnings, :func:`get_plugin_manager`;
* channel handlers: :class:`OpHandler`, :class:`PropagateContext`, :class:`RebuildContext`,
  :class:`TensorSpec`, :class:`Chan`, :func:`index_of`, :func:`resized`, :func:`conv_terms`
  (a conv call's layer kind and MACs factor for ``declare_layer``);
* algorithms, regularizers and mask extractors: :class:`ChannelGraph`, :class:`Masks`,
  :class:`LearnContext`, :class:`LearnResult`, :func:`log_epoch`, :class:`CostModel`,
  :func:`cost_model_names`, :func:`weight_rows` (a layer's weight, one row per output
  channel), :func:`divergence` and :data:`LEARNING_ADVICE`; their width rules:
  :func:`largest_fitting`, :func:`per_group_multiples`, :data:`DEFAULT_THRESHOLD`,
  :func:`group_orders`, :func:`rounded_width`, :func:`dropped_groups`, the ``scale:
  capacity`` step, :func:`capacity_to_budget`, and ``scale: auto``'s choice away from a
  latency target, :func:`auto_scaled` (:class:`AutoScale`, :func:`capacity_gain`,
  :data:`AUTO_CAPACITY_GAIN`);
* cost models: :class:`LayerTable`, :data:`TENSOR_KINDS` (the tensor ops a cost model that
  declares ``prices_tensor_ops`` sees as extra rows), :data:`PRODUCT_OP` (the ``op`` of a
  row that is a product of two activations, in the table of what no channel cut changes),
  :data:`PIECE_OP` (the ``op`` of the rows that follow a concatenation's: its inputs);
* exporters: :func:`eval_graph_module` (the eval-mode graph, recorded on the example input
  where torch.fx cannot trace), :func:`normalize_inputs`, :func:`flatten_outputs`, :func:`model_mode`,
  :class:`InputShapeCheck`, :func:`atomic_write`, :func:`atomic_path`, :func:`sha256_bytes`,
  :func:`count_macs`, :func:`layer_width`, :data:`LAYER_TYPES`, :func:`export`;
* latency measurement: :func:`session`, :func:`onnx_latency`, :func:`interleaved_times`,
  :func:`fastest_and_median`, :data:`SPINNING` and :func:`runtime_spinning` (how sessions'
  threads wait for work, and how a profile's were timed), :func:`checked_device` (a device
  the user names, checked as the run checks its own).
"""
from . import __version__
from .algorithm import LearnContext, LearnResult, log_epoch
from .branches import Branch, emptiable as emptiable_groups, settle as settle_branches
from .cost import CostModel, LayerTable, cost_model_names, largest_fitting, per_group_multiples, weight_rows
from .errors import (ArtifactError, ConfigError, DnnshrinkError, DnnshrinkWarning, ExportError, MaskError,
                     PluginError, TraceError)
from .export import export
from .fixed import PRODUCT as PRODUCT_OP
from .fileio import atomic_path, atomic_write, sha256_bytes
from .graph import ChannelGraph, Group
from .guard import LEARNING_ADVICE, divergence
from .capacity import (AUTO_CAPACITY_GAIN, AutoScale, auto_scaled, capacity_gain, capacity_to_budget, dropped_groups,
                       group_orders, rounded_width)
from .devices import checked_device
from .handler import OpHandler, PropagateContext, RebuildContext, TensorSpec, conv_terms, index_of, resized
from .labels import Chan
from .masks import DEFAULT_THRESHOLD, Masks
from .plugins import get_plugin_manager, hookimpl, lookup, plugin_names
from .recording import InputShapeCheck
from .report import LAYER_TYPES, count_macs, layer_width
from .tensor_ops import PIECE as PIECE_OP, TENSOR_KINDS
from .timing import SPINNING, fastest_and_median, interleaved_times, onnx_latency, runtime_spinning, session
from .tracing import eval_graph_module, flatten_outputs, model_mode, normalize_inputs

__all__ = [
    "ArtifactError", "atomic_path", "AUTO_CAPACITY_GAIN", "AutoScale", "auto_scaled", "Branch", "atomic_write",
    "capacity_gain", "capacity_to_budget", "Chan", "ChannelGraph",
    "checked_device", "ConfigError", "cost_model_names",
    "conv_terms", "CostModel", "count_macs", "DEFAULT_THRESHOLD", "divergence", "DnnshrinkError", "DnnshrinkWarning",
    "dropped_groups", "emptiable_groups", "eval_graph_module", "export", "ExportError", "fastest_and_median", "flatten_outputs", "get_plugin_manager",
    "Group", "group_orders", "hookimpl", "index_of", "InputShapeCheck", "interleaved_times", "largest_fitting", "LAYER_TYPES",
    "layer_width", "LayerTable", "LearnContext", "LEARNING_ADVICE", "LearnResult", "log_epoch", "lookup",
    "MaskError", "Masks", "model_mode", "normalize_inputs", "onnx_latency", "OpHandler", "per_group_multiples",
    "plugin_names", "PluginError", "PRODUCT_OP", "PropagateContext", "RebuildContext", "resized", "rounded_width", "runtime_spinning", "session", "settle_branches", "sha256_bytes",
    "PIECE_OP", "SPINNING", "TENSOR_KINDS", "TensorSpec", "TraceError", "weight_rows", "__version__"
]
