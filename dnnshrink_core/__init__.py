"""dnnshrink: make trained PyTorch networks physically smaller.

The core holds the hook specs, the plugin manager, the channel graph and the generator
driver; every algorithm, layer handler and exporter is a plugin. Plugin authors need
one import::

    from dnnshrink_core import hookimpl
"""
from .api import alive_masks, generate, trace
from .errors import (ArtifactError, ConfigError, DnnshrinkError, DnnshrinkWarning, ExportError, GenerationError, InputRunError,
                     MaskError, NoBatchNormError, NothingRemovedWarning, OutputExistsError, PluginError,
                     ScoreDropError, TargetError, TraceError, UnknownOptionError, UnknownOpWarning,
                     UntracedModuleWarning)
from .export import export, export_formats, load
from .graph import ChannelGraph, Group
from .guard import DivergenceError
from .handler import OpHandler, PropagateContext, RebuildContext, TensorSpec
from .labels import Chan
from .masks import Masks
from .plugins import get_plugin_manager, hookimpl, list_plugins
from .report import Report, layer_report
from .target import Target

__version__ = "0.1.0"

__all__ = [
    "ArtifactError", "ConfigError", "ExportError", "InputRunError", "NothingRemovedWarning", "OutputExistsError",
    "ScoreDropError", "Target", "TargetError", "UnknownOptionError", "Report", "export", "export_formats",
    "layer_report", "load",
    "Chan", "ChannelGraph", "DivergenceError", "DnnshrinkError", "DnnshrinkWarning", "GenerationError", "Group",
    "MaskError", "Masks", "NoBatchNormError", "OpHandler", "PluginError", "PropagateContext", "RebuildContext", "TensorSpec",
    "TraceError", "UnknownOpWarning", "UntracedModuleWarning", "alive_masks", "generate",
    "get_plugin_manager", "hookimpl", "list_plugins", "trace", "__version__",
]
