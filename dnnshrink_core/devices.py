"""The device a user names, checked before any work: one place for the run (``device``) and
for ``dnnshrink calibrate --device``."""
from __future__ import annotations

import torch

from .errors import ConfigError


def checked_device(requested: str, name: str = "device", advice: str = "give device: cpu") -> torch.device:
    """``requested`` as a :class:`torch.device`; a CUDA one always with its index (``cuda``
    is the current one: ``torch.cuda.set_device`` refuses a CUDA device without one). A name
    torch does not know, or a CUDA device this machine lacks, is a :class:`ConfigError` that
    names the option (``name``) and says what to do (``advice``, where torch sees no GPU)."""
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"{name} {requested!r} is not a device torch knows ({exc}); give cpu, cuda or cuda:N") \
            from None
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ConfigError(f"{name} {requested!r}: torch sees no CUDA device on this machine "
                          f"(torch.cuda.is_available() is False); {advice}")
    index = torch.cuda.current_device() if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise ConfigError(f"{name} {requested!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", index)
