"""Errors and warnings raised by dnnshrink.

Every error says what is wrong and what to do about it; the CLI prints the message
without a traceback (``--debug`` shows it).
"""
from __future__ import annotations


class DnnshrinkError(Exception):
    """Base class of every error dnnshrink raises on purpose."""


class ConfigError(DnnshrinkError, ValueError):
    """A config key, a ``shrink(...)`` keyword argument or an API argument has a bad value.

    Also a :class:`ValueError`, so code that catches bad arguments the Python way still does.
    """


class UnknownOptionError(ConfigError, TypeError):
    """A config key or ``shrink(...)`` keyword that no option has (also a :class:`TypeError`,
    as Python raises for an unexpected keyword argument)."""


class TargetError(ConfigError):
    """A size target is malformed (a count without its unit, a fraction outside (0, 1]) or
    cannot be reached by the model (below its smallest form, above its baseline)."""


class ScoreDropError(DnnshrinkError):
    """The shrunk model scored more than ``max_score_drop`` below the baseline.

    Raised after the report and the model are written; ``result`` holds the
    :class:`~dnnshrink_core.pipeline.ShrinkResult` so the numbers can still be read.
    """

    def __init__(self, message: str, result: object = None):
        super().__init__(message)
        self.result = result


class TraceError(DnnshrinkError):
    """The model could not be traced or run on the example inputs."""


class InputRunError(TraceError):
    """The model failed when run on the example inputs (most often: the wrong shape).

    ``failure`` says where and how, without the advice, so a caller that got the inputs
    another way (the CLI's ``--input-shape``) can give its own.
    """

    def __init__(self, failure: str):
        super().__init__(f"running the model on example_inputs failed at {failure}\n"
                         "What to do: pass example_inputs shaped exactly like one batch of your model's input "
                         "(e.g. torch.randn(1, 3, 224, 224)) on the model's device.")
        self.failure = failure


class OutputExistsError(DnnshrinkError):
    """The output folder holds files and overwriting was not asked for."""

    def __init__(self, path: object):
        super().__init__(f"output folder {path} already exists and is not empty; choose another one or pass "
                         "force=True to overwrite it")
        self.path = path


class NoBatchNormError(DnnshrinkError):
    """The model has no BatchNorm layer, so MorphNet has no channel scale to learn."""


class MaskError(DnnshrinkError):
    """Masks handed to :func:`dnnshrink_core.generate` do not fit the channel graph."""


class GenerationError(DnnshrinkError):
    """The generated network does not run on the example input (a channel handler's bug)."""


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


class NothingRemovedWarning(DnnshrinkWarning):
    """:func:`~dnnshrink_core.generate` was given masks that keep every channel."""
