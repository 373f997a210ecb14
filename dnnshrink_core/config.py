"""The YAML config of ``dnnshrink run``: loading, validation, and turning it into a shrink call.

Every key is checked before any work starts; an error names the bad key or value and,
for a mistyped key, the closest valid one.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
from pathlib import Path
from typing import Any, Callable, Dict, Tuple

import yaml

from .errors import ConfigError, DnnshrinkError, InputRunError, UnknownOptionError
from .pipeline import OPTION_HINTS, ShrinkOptions, get_algorithm
from .userspec import SpecError, build_model, load_object, parse_shape
from .validation import check_algorithm, check_exporters, check_options

__all__ = ["ConfigError", "load_config", "load_functions", "run_config"]  # ConfigError lives in errors.py

# keys of the config beyond the pipeline options
GENERAL_KEYS = {
    "model": "the model factory: `package.module:factory`, `file.py:factory`, or a torchvision model name",
    "functions": "where train_one_epoch, train and test live: a module (`package.module`) or a `.py` file",
    "input_shape": "one batch's shape, e.g. [1, 3, 224, 224]",
    "out": "the output folder",
}
OPTION_KEYS = {f.name: f for f in dataclasses.fields(ShrinkOptions)
               if f.name not in ("out_dir", "force", "progress", "resume")}
HINTS = OPTION_HINTS
FUNCTION_NAMES = ("train_one_epoch", "train", "test")


class _Loader(yaml.SafeLoader):
    """YAML's safe loader, reading ``1e-6`` as a number (YAML 1.2) instead of a string (1.1)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def load_config(path: Any) -> Dict[str, Any]:
    """Read and validate a config file; relative paths are taken from the file's folder.

    Every option is type- and range-checked here (the key, the value and the allowed range
    are in the message), and the target is parsed; whether the model can reach the target
    is checked by :func:`~dnnshrink_core.pipeline.shrink` once the model is built, before
    any training.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.load(path.read_text(), Loader=_Loader) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of keys to values, not a {type(data).__name__}")
    valid = sorted(set(GENERAL_KEYS) | set(OPTION_KEYS))
    for key, value in data.items():
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else f" Valid keys: {', '.join(valid)}."
            raise UnknownOptionError(f"{path}: unknown key {key!r}.{hint}")
    options = {k: v for k, v in data.items() if k in OPTION_KEYS}
    check_options(options, HINTS, f"{path}: ", "key")
    for key in ("model", "functions", "input_shape"):
        if key not in data:
            raise ConfigError(f"{path}: key {key!r} is missing ({GENERAL_KEYS[key]})")
    try:
        algorithm = get_algorithm(data.get("algorithm", "morphnet"))
    except DnnshrinkError as exc:
        raise ConfigError(f"{path}: key 'algorithm': {exc}") from exc
    check_algorithm(algorithm, data.get("max_epochs", ShrinkOptions.max_epochs),
                    data.get("scale", ShrinkOptions.scale), f"{path}: ", "key")
    check_exporters(data.get("exporters", ShrinkOptions.exporters), f"{path}: ", "key")
    data["_base"] = str(path.parent.resolve())
    data["_path"] = str(path)
    return data


def _resolve(base: str, spec: str) -> str:
    """Make a file path in ``spec`` (before ``:``) relative to the config's folder."""
    source, sep, name = spec.rpartition(":") if ":" in spec else (spec, "", "")
    if source.endswith(".py") and not Path(source).is_absolute():
        source = str(Path(base) / source)
    return f"{source}{sep}{name}" if sep else source


def load_functions(base: str, spec: str) -> Tuple[Callable, Callable, Callable]:
    """``train_one_epoch``, ``train`` and ``test`` from a module name or a ``.py`` file."""
    given, spec = spec, _resolve(base, spec)
    functions = []
    for name in FUNCTION_NAMES:
        try:
            fn = load_object(f"{spec}:{name}", "function")
        except SpecError as exc:
            beside = Path(base) / (given.replace(".", "/") + ".py")
            if given.endswith(".py") or not beside.is_file():
                raise
            raise SpecError(f"{exc}. `functions: {given}` is read as a module on Python's path; the file "
                            f"{beside.name} next to the config is given as `functions: {beside.name}`") from exc
        if not callable(fn):
            raise ConfigError(f"{name} in {spec} is not a function")
        functions.append(fn)
    return tuple(functions)


def run_config(data: Dict[str, Any], out: Any = None, force: bool = False, resume: bool = False,
               **overrides: Any) -> Any:
    """Build the model, inputs and functions a validated config names, and run :func:`shrink`."""
    import torch

    from .pipeline import shrink

    base = data["_base"]
    model = build_model(_resolve(base, data["model"]))
    shape = parse_shape(",".join(map(str, data["input_shape"])) if isinstance(data["input_shape"], list)
                        else data["input_shape"])
    train_one_epoch, train, test = load_functions(base, data["functions"])
    options = {k: v for k, v in data.items() if k in OPTION_KEYS}
    if isinstance(options.get("exporters"), list):
        options["exporters"] = tuple(options["exporters"])
    given = {k: v for k, v in overrides.items() if v is not None}
    if "target" in given:  # --target replaces the config's target, whichever key gave it
        options.pop("target_macs", None)
    options.update(given)
    if isinstance(options.get("profile"), str) and not Path(options["profile"]).is_absolute() \
            and "profile" not in given:  # a profile named in the config is found next to it
        options["profile"] = str(Path(base) / options["profile"])
    # the command line's overrides, checked like config keys (before the model is built)
    where = f"{data.get('_path', 'config')} with the command-line options: "
    check_options(options, HINTS, where, "key")
    check_algorithm(get_algorithm(options.get("algorithm", ShrinkOptions.algorithm)),
                    options.get("max_epochs", ShrinkOptions.max_epochs), options.get("scale", ShrinkOptions.scale),
                    where, "key")
    out = out or data.get("out")
    if out is None:
        raise ConfigError("no output folder: give `out:` in the config or --out on the command line")
    out_path = Path(out)
    if not out_path.is_absolute() and out is data.get("out"):
        out_path = Path(base) / out_path
    try:
        return shrink(model, torch.zeros(shape), train_one_epoch=train_one_epoch, train=train, test=test,
                      out_dir=str(out_path), force=force, resume=resume, **options)
    except InputRunError as exc:  # the input came from the config: say which key to fix
        raise DnnshrinkError(
            f"the model cannot run on input_shape {list(shape)} from {data.get('_path', 'the config')}: it failed at "
            f"{exc.failure}. Give input_shape as one batch of the model's input, batch first (e.g. [1, 3, 224, 224] "
            "for one RGB image, [1, 2, 16] for one 2-channel signal).") from exc
