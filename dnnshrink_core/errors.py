"""Errors and warnings raised by dnnshrink.

Every error says what is wrong and what to do about it; the CLI prints the message
without a traceback (``--debug`` shows it).
"""
from __future__ import annotations


class DnnshrinkError(Exception):
    """Base class of every error dnnshrink raises on purpose."""


class TraceError(DnnshrinkError):
    """The model could not be traced or run on the example inputs."""


class NoBatchNormError(DnnshrinkError):
    """The model has no BatchNorm layer, so MorphNet has no channel scale to learn."""


class MaskError(DnnshrinkError):
    """Masks handed to :func:`dnnshrink_core.generate` do not fit the channel graph."""


class PluginError(DnnshrinkError):
    """A plugin that a step needs is missing, blocked, or misbehaved."""


class ExportError(DnnshrinkError):
    """An export failed, or its verification did (the message gives the measured error)."""


class ArtifactError(DnnshrinkError):
    """A saved artifact is missing, truncated, tampered with, or holds something unsafe."""


class DnnshrinkWarning(UserWarning):
    """Base class of dnnshrink's warnings."""


class UnknownOpWarning(DnnshrinkWarning):
    """An op without a channel handler was found; the channels crossing it are kept."""


class UntracedModuleWarning(DnnshrinkWarning):
    """A module with weights was never called in any traced mode of the model."""
