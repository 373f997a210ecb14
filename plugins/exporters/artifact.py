"""The ``pytorch`` artifact: a shrunk network that loads without its source and without pickles.

Why this format (and not ``torch.save(model)`` or ``torch.export.save``): unpickling runs
code named by the file, and ``torch.export.load`` still unpickles some entries with
``weights_only=False``. Here the file holds only data:

* ``graph.json`` — the network's torch.fx graph: every op as a *name* (``torch.cat``,
  ``torch.nn.functional.relu``, ``operator.add``, a Tensor method) plus its literal arguments;
* ``modules.json`` — every called layer as a ``torch.nn`` class name and its plain
  attributes (channels, kernel size…);
* ``weights.pt`` — the tensors, read back with ``torch.load(weights_only=True)``;
* ``manifest.json`` — format version, versions, input shapes and a SHA-256 of each member.

Loading checks the checksums, accepts only functions from ``torch``, ``operator``,
``math`` (and ``torchvision.ops``) and only ``torch.nn`` layer classes, rebuilds the graph
and lets torch.fx generate the Python code from it. The result is a
:class:`torch.fx.GraphModule` for inference (it follows the eval-mode graph).
"""
from __future__ import annotations

import importlib
import io
import json
import math
import zipfile
import zlib
from pathlib import Path
from typing import Any, Dict, List

import torch
from torch import fx, nn

from dnnshrink_core import __version__
from dnnshrink_core.errors import ArtifactError, ExportError
from dnnshrink_core.fileio import atomic_write, sha256_bytes
from dnnshrink_core.tracing import eval_graph_module, normalize_inputs

FORMAT = "dnnshrink-graph/1"
MEMBERS = ("graph.json", "modules.json", "weights.pt")
ALLOWED_FUNCTION_MODULES = ("torch", "operator", "_operator", "math", "torchvision.ops")
ALLOWED_BUILTINS = {"getattr": getattr}
_MODULE_BASE_ATTRS = frozenset(vars(nn.Module()))


# --- values -------------------------------------------------------------------------
def _encode(value: Any) -> Any:
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, tuple):
        return {"tuple": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {"dict": [[k, _encode(v)] for k, v in value.items()]}
    if isinstance(value, slice):
        return {"slice": [_encode(value.start), _encode(value.stop), _encode(value.step)]}
    if value is Ellipsis:
        return {"ellipsis": True}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).replace("torch.", "")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if isinstance(value, torch.memory_format):
        return {"memory_format": str(value).replace("torch.", "")}
    raise ExportError(f"the pytorch artifact cannot store a value of type {type(value).__name__} ({value!r}); "
                      "export to ONNX instead")


def _decode(value: Any, nodes: Dict[str, fx.Node]) -> Any:
    if isinstance(value, list):
        return [_decode(v, nodes) for v in value]
    if not isinstance(value, dict):
        return value
    (kind, payload), = value.items()
    if kind == "node":
        return nodes[payload]
    if kind == "float":
        return float(payload)
    if kind == "tuple":
        return tuple(_decode(v, nodes) for v in payload)
    if kind == "dict":
        return {k: _decode(v, nodes) for k, v in payload}
    if kind == "slice":
        return slice(*(_decode(v, nodes) for v in payload))
    if kind == "ellipsis":
        return Ellipsis
    if kind == "dtype":
        return _torch_attr(payload, torch.dtype)
    if kind == "device":
        return torch.device(payload)
    if kind == "memory_format":
        return _torch_attr(payload, torch.memory_format)
    raise ArtifactError(f"unknown value kind {kind!r} in the artifact")


def _torch_attr(name: str, kind: type) -> Any:
    value = getattr(torch, name, None)
    if not isinstance(value, kind):
        raise ArtifactError(f"{name!r} is not a torch {kind.__name__}")
    return value


# --- targets ------------------------------------------------------------------------
def _function_name(target: Any) -> str:
    module = getattr(target, "__module__", None) or ""
    if module == "builtins" and getattr(target, "__name__", "") in ALLOWED_BUILTINS:
        return f"builtins.{target.__name__}"
    allowed_roots = {m.split(".")[0] for m in ALLOWED_FUNCTION_MODULES}
    for name in (getattr(target, "__name__", None), getattr(target, "__qualname__", None)):
        if not name or module.split(".")[0] not in allowed_roots:
            continue
        try:
            if _resolve_function(f"{module}.{name}") is target:
                return f"{module}.{name}"
        except ArtifactError:
            continue
    raise ExportError(f"the pytorch artifact only stores ops it can find again by name in torch, operator and "
                      f"math; `{module}.{getattr(target, '__qualname__', target)}` is not one of them. "
                      "Export to ONNX instead.")


def _resolve_function(path: str) -> Any:
    if path.startswith("builtins."):
        name = path.split(".", 1)[1]
        if name in ALLOWED_BUILTINS:
            return ALLOWED_BUILTINS[name]
        raise ArtifactError(f"the artifact refers to builtins.{name}, which is not allowed")
    if not any(path == m or path.startswith(m + ".") for m in ALLOWED_FUNCTION_MODULES):
        raise ArtifactError(f"the artifact refers to `{path}`, outside torch/operator/math: refusing to load it")
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            break
        return obj
    raise ArtifactError(f"the artifact refers to `{path}`, which this torch does not have")


# --- modules ------------------------------------------------------------------------
def _module_spec(module: nn.Module, prefix: str, tensors: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    cls = type(module)
    if not cls.__module__.startswith("torch.nn."):
        raise ExportError(f"layer `{prefix}` is a {cls.__module__}.{cls.__qualname__}; the pytorch artifact only "
                          "stores torch.nn layers (so it loads without your source). Export to ONNX instead.")
    attrs = {}
    for key, value in vars(module).items():
        if key in _MODULE_BASE_ATTRS:
            continue
        try:
            attrs[key] = _encode(value)
        except ExportError as exc:
            raise ExportError(f"layer `{prefix}` ({cls.__name__}) has attribute {key!r} that cannot be stored: {exc}") from exc
    params, buffers = [], []
    for name, p in module._parameters.items():
        if p is not None:
            tensors[f"{prefix}.{name}"] = p.detach().cpu()
        params.append([name, None if p is None else p.requires_grad])
    for name, b in module._buffers.items():
        if b is not None:
            tensors[f"{prefix}.{name}"] = b.detach().cpu()
        buffers.append([name, None if b is None else name not in module._non_persistent_buffers_set])
    children = {name: _module_spec(child, f"{prefix}.{name}", tensors)
                for name, child in module._modules.items() if child is not None}
    return {"class": f"{cls.__module__}.{cls.__qualname__}", "attrs": attrs, "params": params,
            "buffers": buffers, "children": children}


def _build_module(spec: Dict[str, Any], prefix: str, tensors: Dict[str, torch.Tensor]) -> nn.Module:
    path = spec["class"]
    if not path.startswith("torch.nn."):
        raise ArtifactError(f"the artifact asks for layer class `{path}`; only torch.nn classes are allowed")
    module_name, _, qualname = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), qualname)
    except (ImportError, AttributeError) as exc:
        raise ArtifactError(f"this torch has no layer class `{path}`") from exc
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ArtifactError(f"`{path}` is not a layer class")
    module = cls.__new__(cls)
    nn.Module.__init__(module)
    for key, value in spec["attrs"].items():
        object.__setattr__(module, key, _decode(value, {}))
    for name, requires_grad in spec["params"]:
        value = None if requires_grad is None else \
            nn.Parameter(_tensor(tensors, f"{prefix}.{name}"), requires_grad=requires_grad)
        module.register_parameter(name, value)
    for name, persistent in spec["buffers"]:
        value = None if persistent is None else _tensor(tensors, f"{prefix}.{name}")
        module.register_buffer(name, value, persistent=bool(persistent))
    for name, child in spec["children"].items():
        module.add_module(name, _build_module(child, f"{prefix}.{name}", tensors))
    return module


def _tensor(tensors: Dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in tensors:
        raise ArtifactError(f"the artifact's weights miss `{key}`")
    return tensors[key]


def _set_path(root: nn.Module, path: str, module: nn.Module) -> None:
    *parents, leaf = path.split(".")
    for name in parents:
        if name not in root._modules:
            root.add_module(name, nn.Module())
        root = root._modules[name]
    root.add_module(leaf, module)


# --- save / load --------------------------------------------------------------------
def save_artifact(model: nn.Module, example_inputs: Any, path: Path) -> Dict[str, Any]:
    """Write ``model`` (its eval-mode graph) as a pytorch artifact at ``path``."""
    inputs = normalize_inputs(example_inputs)
    gm = eval_graph_module(model)
    graph = gm.graph
    tensors: Dict[str, torch.Tensor] = {}
    nodes: List[Dict[str, Any]] = []
    modules: Dict[str, Any] = {}
    for node in graph.nodes:
        record: Dict[str, Any] = {"op": node.op, "name": node.name, "args": _encode(node.args),
                                  "kwargs": _encode(dict(node.kwargs))}
        if node.op == "call_function":
            record["target"] = _function_name(node.target)
        else:
            record["target"] = node.target
        if node.op == "call_module" and node.target not in modules:
            modules[node.target] = _module_spec(gm.get_submodule(node.target), node.target, tensors)
        if node.op == "get_attr":
            value = _fetch_attr(gm, node.target)
            if isinstance(value, torch.Tensor):
                tensors[f"attr:{node.target}"] = value.detach().cpu()
            else:
                raise ExportError(f"attribute `{node.target}` is a {type(value).__name__}, not a tensor")
        nodes.append(record)
    graph_json = json.dumps({"nodes": nodes}).encode()
    modules_json = json.dumps(modules).encode()
    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    payload = {"graph.json": graph_json, "modules.json": modules_json, "weights.pt": buffer.getvalue()}
    manifest = {
        "format": FORMAT, "dnnshrink": __version__, "torch": torch.__version__,
        "class_name": type(model).__name__,
        "inputs": [list(x.shape) if isinstance(x, torch.Tensor) else None for x in inputs],
        "sha256": {name: sha256_bytes(data) for name, data in payload.items()},
    }
    with atomic_write(path) as handle, zipfile.ZipFile(handle, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("manifest.json", json.dumps(manifest, indent=2))
        for name, data in payload.items():
            archive.writestr(name, data)
    return manifest


def _fetch_attr(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def load_artifact(path: Path) -> fx.GraphModule:
    """Load a pytorch artifact written by :func:`save_artifact`, checking it on the way."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path} does not exist")
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            missing = [m for m in ("manifest.json",) + MEMBERS if m not in names]
            if missing:
                raise ArtifactError(f"{path} is not a complete dnnshrink artifact (missing {', '.join(missing)})")
            manifest = json.loads(archive.read("manifest.json"))
            data = {name: archive.read(name) for name in MEMBERS}
    except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as exc:
        raise ArtifactError(f"{path} is truncated or not a dnnshrink artifact ({type(exc).__name__}: {exc})") from exc
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path} has an unreadable manifest ({exc})") from exc
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path} has format {manifest.get('format')!r}; this dnnshrink reads {FORMAT!r}")
    for name, blob in data.items():
        if sha256_bytes(blob) != manifest.get("sha256", {}).get(name):
            raise ArtifactError(f"{path} is corrupted or was tampered with: the checksum of {name} does not match")
    try:
        tensors = torch.load(io.BytesIO(data["weights.pt"]), weights_only=True, map_location="cpu")
    except Exception as exc:
        raise ArtifactError(f"{path}: its weights cannot be read safely ({type(exc).__name__}: {exc})") from exc
    graph_data, module_data = json.loads(data["graph.json"]), json.loads(data["modules.json"])
    root = nn.Module()
    for target, spec in module_data.items():
        _set_path(root, target, _build_module(spec, target, tensors))
    graph = fx.Graph()
    nodes: Dict[str, fx.Node] = {}
    for record in graph_data["nodes"]:
        op, target = record["op"], record["target"]
        if op == "call_function":
            target = _resolve_function(target)
        elif op == "call_method":
            if not (isinstance(target, str) and target.isidentifier() and hasattr(torch.Tensor, target)):
                raise ArtifactError(f"the artifact calls `{target}`, which is not a Tensor method")
        elif op == "get_attr":
            tensor = _tensor(tensors, f"attr:{target}")
            *parents, leaf = target.split(".")
            owner = root
            for name in parents:
                if name not in owner._modules:
                    owner.add_module(name, nn.Module())
                owner = owner._modules[name]
            owner.register_buffer(leaf, tensor)
        elif op not in ("placeholder", "output", "call_module"):
            raise ArtifactError(f"the artifact has an op of kind {op!r}")
        node = graph.create_node(op, target, _decode(record["args"], nodes), _decode(record["kwargs"], nodes),
                                 name=record["name"])
        nodes[record["name"]] = node
    try:
        graph.lint()
        module = fx.GraphModule(root, graph, class_name=manifest.get("class_name", "Shrunk"))
    except Exception as exc:
        raise ArtifactError(f"{path} holds an inconsistent graph ({type(exc).__name__}: {exc})") from exc
    module.eval()
    module.dnnshrink_manifest = manifest
    return module
