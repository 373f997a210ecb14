"""Finding the user's model and input shape from strings (CLI and config files)."""
from __future__ import annotations

import difflib
import hashlib
import importlib
import re
import importlib.util
import sys
from pathlib import Path
from typing import Any, Tuple

from torch import nn

from .errors import DnnshrinkError


class SpecError(DnnshrinkError):
    """A model, function or shape given as text cannot be found or parsed."""


def load_object(spec: str, what: str = "object") -> Any:
    """``package.module:name`` or ``path/to/file.py:name`` → the named object."""
    if ":" not in spec:
        raise SpecError(f"{what} {spec!r} must look like `package.module:name` or `path/to/file.py:name`")
    source, _, name = spec.rpartition(":")
    if source.endswith(".py") or "/" in source or "\\" in source:
        path = Path(source)
        if not path.is_file():
            raise SpecError(f"{what} file {source} does not exist")
        # a name every process derives alike, so that objects of the file's classes can travel
        # between the ranks of a distributed run (pickle finds classes by module name)
        digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
        module_name = f"dnnshrink_user_{path.stem}_{digest}"
        if module_name in sys.modules:  # the model factory and the functions often share a file
            return _attribute(sys.modules[module_name], source, name, what)
        spec_obj = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec_obj)
        sys.modules[module_name] = module
        sys.path.insert(0, str(path.parent.resolve()))
        try:
            spec_obj.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[module_name]
            raise SpecError(f"importing {source} failed: {type(exc).__name__}: {exc}") from exc
        finally:
            sys.path.pop(0)
    else:
        try:
            module = importlib.import_module(source)
        except ImportError as exc:
            raise SpecError(f"cannot import module {source!r} for {what} {spec!r}: {exc}") from exc
    return _attribute(module, source, name, what)


def _attribute(module: Any, source: str, name: str, what: str) -> Any:
    if not hasattr(module, name):
        names = [n for n in dir(module) if not n.startswith("_")]
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise SpecError(f"{source} has no {what} named {name!r}.{hint}")
    return getattr(module, name)


def build_model(spec: str) -> nn.Module:
    """A model from ``package.module:factory``, ``file.py:factory`` or a torchvision model name."""
    if ":" in spec:
        factory = load_object(spec, "model factory")
        model = factory() if callable(factory) and not isinstance(factory, nn.Module) else factory
    else:
        try:
            import torchvision
        except ImportError as exc:
            raise SpecError(f"{spec!r} is not `package.module:factory`, and torchvision (for model names) "
                            "is not installed") from exc
        names = torchvision.models.list_models()
        if spec not in names:
            close = difflib.get_close_matches(spec, names, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise SpecError(f"{spec!r} is neither `package.module:factory` nor a torchvision model name.{hint}")
        model = torchvision.models.get_model(spec, weights=None)
    if not isinstance(model, nn.Module):
        raise SpecError(f"{spec!r} gave a {type(model).__name__}, not a torch.nn.Module")
    return model


def parse_shape(text: str, what: str = "input shape") -> Tuple[int, ...]:
    """``"1,3,224,224"`` (or ``1x3x224x224``) → ``(1, 3, 224, 224)``; ``what`` names the
    option in errors."""
    parts = re.split(r"\s*[,x]\s*", str(text).strip())
    if not all(part.isdigit() for part in parts):
        raise SpecError(f"{what} {text!r} must be whole numbers separated by commas, e.g. 1,3,224,224")
    shape = tuple(int(part) for part in parts)
    if len(shape) < 2 or any(n <= 0 for n in shape):
        raise SpecError(f"{what} {text!r} must have a batch and a channel dimension, all positive, "
                        "e.g. 1,3,224,224")
    return shape

