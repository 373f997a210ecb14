"""The ``pytorch`` artifact: a shrunk network that loads without its source and without pickles.

Why this format (and not ``torch.save(model)`` or ``torch.export.save``): unpickling runs
code named by the file, and ``torch.export.load`` still unpickles some entries with
``weights_only=False``. Here the file is a zip of data:

* ``manifest.json`` — format, versions, input shapes, the size and SHA-256 of every other
  member, the dtype and shape of every tensor, and an optional HMAC signature;
* ``graph.json`` — the network's torch.fx graph: every op as an exact *name* from
  :mod:`.allowlist` plus its literal arguments;
* ``modules.json`` — every called layer as a listed ``torch.nn`` class and its settings;
* ``weights.pt`` — the tensors, stored uncompressed and read with ``torch.load(weights_only=True)``.

Loading treats the file as hostile until every part is checked, in this order, and refuses
anything else with :class:`~dnnshrink_core.errors.ArtifactError` before building anything:
the zip holds exactly these four members; the manifest is small and well-formed (and its
signature matches, when a key is given); each member has the declared size, within the
bounds below, and the declared checksum; the graph and layer descriptions follow a closed
schema (ops and layer classes on the allowlist, names that are plain identifiers, references
only to earlier nodes); the tensors match the declared table. Layers are then rebuilt by
calling their own constructor (on the ``meta`` device, so nothing is allocated) with settings
checked against its signature, and every tensor must have the shape those settings give.

Bounds: ``manifest.json`` at most 4 MiB, ``graph.json`` and ``modules.json`` at most 32 MiB
each, a graph of at most 100,000 nodes; ``weights.pt`` is stored, not deflated, and may be at
most the bytes of the tensors the manifest declares plus 1 KiB per tensor and 64 KiB, so
loading never reads more than the file's size plus the JSON bounds (no zip bombs).

The result is a :class:`torch.fx.GraphModule` for inference (the eval-mode graph).
"""
from __future__ import annotations

import hashlib
import hmac
import inspect
import io
import json
import math
import zipfile
import zlib
from pathlib import Path
from typing import Any, Dict, List, Optional, Set, Union

import torch
from torch import fx, nn

from dnnshrink_core.plugin_api import (__version__, ArtifactError, atomic_write, eval_graph_module, ExportError,
    InputShapeCheck, normalize_inputs, sha256_bytes)

from . import allowlist

FORMAT = "dnnshrink-graph/2"
MEMBERS = ("graph.json", "modules.json", "weights.pt")
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 4 << 20
MAX_JSON_BYTES = 32 << 20
MAX_NODES = 100_000
MAX_NESTING = 32
WEIGHTS_OVERHEAD_PER_TENSOR = 1024
WEIGHTS_OVERHEAD = 64 << 10
_MANIFEST_KEYS = {"format", "dnnshrink", "torch", "class_name", "inputs", "specialized", "members", "tensors",
                  "signature"}
_NODE_KEYS = {"op", "name", "target", "args", "kwargs"}
_SPEC_KEYS = {"class", "attrs", "params", "buffers", "children"}
_MODULE_BASE_ATTRS = frozenset(vars(nn.Module()))
Key = Union[bytes, str]


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
        if not all(isinstance(k, str) for k in value):
            raise ExportError(f"the pytorch artifact stores dicts with string keys only, not {value!r}")
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


_FLOATS = {"nan", "inf", "-inf"}
_DEVICE_TYPES = {"cpu", "cuda", "mps", "xpu", "meta"}


def _check_value(value: Any, earlier: Set[str], where: str, depth: int = 0) -> None:
    """Refuse any encoding :func:`_decode` does not know, and references to later or missing nodes."""
    if depth > MAX_NESTING:
        raise ArtifactError(f"{where}: values nested deeper than {MAX_NESTING} levels")
    if value is None or isinstance(value, (bool, int, str)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ArtifactError(f"{where}: a non-finite number must be encoded as {{'float': ...}}")
        return
    if isinstance(value, list):
        for item in value:
            _check_value(item, earlier, where, depth + 1)
        return
    if not (isinstance(value, dict) and len(value) == 1):
        raise ArtifactError(f"{where}: bad value encoding {_short(value)}")
    (kind, payload), = value.items()
    if kind == "node":
        if not (isinstance(payload, str) and payload in earlier):
            raise ArtifactError(f"{where}: refers to node {_short(payload)}, which is not defined before it")
    elif kind == "float":
        if payload not in _FLOATS:
            raise ArtifactError(f"{where}: bad float {_short(payload)}")
    elif kind in ("tuple", "slice"):
        if not isinstance(payload, list) or (kind == "slice" and len(payload) != 3):
            raise ArtifactError(f"{where}: bad {kind} encoding {_short(payload)}")
        for item in payload:
            _check_value(item, earlier, where, depth + 1)
    elif kind == "dict":
        if not isinstance(payload, list):
            raise ArtifactError(f"{where}: bad dict encoding {_short(payload)}")
        for pair in payload:
            if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)):
                raise ArtifactError(f"{where}: bad dict item {_short(pair)}")
            _check_value(pair[1], earlier, where, depth + 1)
    elif kind == "ellipsis":
        if payload is not True:
            raise ArtifactError(f"{where}: bad ellipsis encoding")
    elif kind in ("dtype", "memory_format"):
        wanted = torch.dtype if kind == "dtype" else torch.memory_format
        if not (allowlist.is_identifier(payload) and isinstance(getattr(torch, payload, None), wanted)):
            raise ArtifactError(f"{where}: {_short(payload)} is not a torch {kind}")
    elif kind == "device":
        if not (isinstance(payload, str) and payload.split(":")[0] in _DEVICE_TYPES):
            raise ArtifactError(f"{where}: bad device {_short(payload)}")
        try:
            torch.device(payload)
        except (RuntimeError, ValueError) as exc:
            raise ArtifactError(f"{where}: bad device {_short(payload)}") from exc
    else:
        raise ArtifactError(f"{where}: unknown value kind {_short(kind)}")


def _decode(value: Any, nodes: Dict[str, fx.Node]) -> Any:
    """A value checked by :func:`_check_value`, turned back into Python."""
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
    if kind == "device":
        return torch.device(payload)
    return getattr(torch, payload)  # dtype, memory_format: checked to be one


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# --- the graph's and the layers' schema ----------------------------------------------
def check_graph(graph_data: Any, module_data: Any, tensor_table: Dict[str, Any]) -> None:
    """Refuse, with :class:`ArtifactError`, anything in ``graph.json``/``modules.json`` outside
    the closed schema: unknown ops, unsafe names, bad encodings, dangling references."""
    if not isinstance(module_data, dict):
        raise ArtifactError("modules.json must be an object of layer path -> layer")
    for path, spec in module_data.items():
        if not allowlist.is_path(path):
            raise ArtifactError(f"modules.json: {_short(path)} is not a plain layer path")
        _check_spec(spec, path, top=True)
    if not (isinstance(graph_data, dict) and set(graph_data) == {"nodes"} and isinstance(graph_data["nodes"], list)):
        raise ArtifactError("graph.json must be an object with a list of nodes")
    records = graph_data["nodes"]
    if len(records) > MAX_NODES:
        raise ArtifactError(f"the graph has {len(records)} nodes; at most {MAX_NODES} are accepted")
    if not records or not isinstance(records[-1], dict) or records[-1].get("op") != "output":
        raise ArtifactError("the graph must end with its output node")
    earlier: Set[str] = set()
    for index, record in enumerate(records):
        if not (isinstance(record, dict) and set(record) == _NODE_KEYS):
            raise ArtifactError(f"graph node {index} must have exactly the keys {sorted(_NODE_KEYS)}")
        name, op, target = record["name"], record["op"], record["target"]
        if not allowlist.is_identifier(name):
            raise ArtifactError(f"graph node {index} has the name {_short(name)}, which is not a plain identifier")
        if name in earlier:
            raise ArtifactError(f"graph node name {name!r} is used twice")
        where = f"graph node {name!r}"
        _check_target(op, target, where, module_data, tensor_table)
        if op == "output" and index != len(records) - 1:
            raise ArtifactError("the graph has more than one output node")
        args, kwargs = record["args"], record["kwargs"]
        if not (isinstance(args, dict) and set(args) == {"tuple"}):
            raise ArtifactError(f"{where}: its arguments must be a tuple")
        if not (isinstance(kwargs, dict) and set(kwargs) == {"dict"}):
            raise ArtifactError(f"{where}: its keyword arguments must be a dict")
        _check_value(args, earlier, where)
        _check_value(kwargs, earlier, where)
        if not all(allowlist.is_identifier(k) for k, _ in kwargs["dict"]):
            raise ArtifactError(f"{where}: a keyword argument name is not a plain identifier")
        if op == "call_function" and target == allowlist.GETATTR:
            _check_getattr(args["tuple"], kwargs["dict"], where)
        earlier.add(name)


def _check_target(op: Any, target: Any, where: str, module_data: Dict[str, Any],
                  tensor_table: Dict[str, Any]) -> None:
    if op == "call_function":
        allowlist.resolve_function(target)
    elif op == "call_method":
        allowlist.check_method(target)
    elif op == "call_module":
        if target not in module_data:
            raise ArtifactError(f"{where} calls layer {_short(target)}, which modules.json does not describe")
    elif op == "get_attr":
        if not allowlist.is_path(target) or f"attr:{target}" not in tensor_table:
            raise ArtifactError(f"{where} reads {_short(target)}, which is not a stored tensor")
    elif op == "placeholder":
        if not allowlist.is_identifier(target):
            raise ArtifactError(f"{where}: the input name {_short(target)} is not a plain identifier")
    elif op == "output":
        if target != "output":
            raise ArtifactError(f"{where}: bad output node")
    else:
        raise ArtifactError(f"{where} has an op of kind {_short(op)}")


def _check_getattr(args: List[Any], kwargs: List[Any], where: str) -> None:
    """``getattr`` may only read a plain tensor attribute of a value the graph computed."""
    if kwargs or len(args) != 2 or not (isinstance(args[0], dict) and "node" in args[0]) \
            or args[1] not in allowlist.TENSOR_ATTRIBUTES:
        raise ArtifactError(f"{where}: getattr may only read one of {sorted(allowlist.TENSOR_ATTRIBUTES)} "
                            f"of a computed value, not {_short(args[1:] if len(args) > 1 else args)}")


def _check_spec(spec: Any, path: str, top: bool) -> None:
    if not (isinstance(spec, dict) and set(spec) == _SPEC_KEYS):
        raise ArtifactError(f"modules.json: layer `{path}` must have exactly the keys {sorted(_SPEC_KEYS)}")
    if top:
        allowlist.layer_class(spec["class"])
    elif not isinstance(spec["class"], str):
        raise ArtifactError(f"modules.json: layer `{path}` has a bad class name")
    attrs = spec["attrs"]
    if not (isinstance(attrs, dict) and all(isinstance(k, str) and k.isidentifier() for k in attrs)):
        raise ArtifactError(f"modules.json: layer `{path}` has bad settings")
    for key, value in attrs.items():
        _check_value(value, set(), f"setting {key!r} of layer `{path}`")
    for kind in ("params", "buffers"):
        entries = spec[kind]
        if not (isinstance(entries, list) and all(
                isinstance(e, list) and len(e) == 2 and allowlist.is_identifier(e[0]) and
                (e[1] is None or isinstance(e[1], bool)) for e in entries)):
            raise ArtifactError(f"modules.json: layer `{path}` has a bad list of {kind}")
    children = spec["children"]
    if not isinstance(children, dict):
        raise ArtifactError(f"modules.json: layer `{path}` has bad children")
    for name, child in children.items():
        if not allowlist.is_path(name) or "." in name:
            raise ArtifactError(f"modules.json: layer `{path}` has a child named {_short(name)}")
        _check_spec(child, f"{path}.{name}", top=False)


# --- layers: rebuilt by their own constructor ---------------------------------------
def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _module_spec(module: nn.Module, prefix: str, tensors: Dict[str, torch.Tensor], top: bool = True
                 ) -> Dict[str, Any]:
    cls = type(module)
    name = allowlist.layer_name(cls) if top else _qualname(cls)
    if name is None:
        raise ExportError(f"layer `{prefix}` is a {_qualname(cls)}; the pytorch artifact stores only the torch.nn "
                          "layers on dnnshrink's list (so it loads without your source and runs no code of the "
                          "file's). Export to ONNX instead.")
    attrs, unstorable = {}, {}
    for key, value in vars(module).items():
        if key in _MODULE_BASE_ATTRS:
            continue
        try:
            attrs[key] = _encode(value)
        except ExportError as exc:
            unstorable[key] = ExportError(f"layer `{prefix}` ({cls.__name__}) has attribute {key!r} that cannot "
                                          f"be stored: {exc}")
    params, buffers = [], []
    for pname, p in module._parameters.items():
        if p is not None:
            tensors[f"{prefix}.{pname}"] = p.detach().cpu()
        params.append([pname, None if p is None else p.requires_grad])
    for bname, b in module._buffers.items():
        if b is not None:
            tensors[f"{prefix}.{bname}"] = b.detach().cpu()
        buffers.append([bname, None if b is None else bname not in module._non_persistent_buffers_set])
    children = {cname: _module_spec(child, f"{prefix}.{cname}", tensors, top=False)
                for cname, child in module._modules.items() if child is not None}
    spec = {"class": name, "attrs": attrs, "params": params, "buffers": buffers, "children": children}
    made = _made_attributes(spec, prefix) if top else None
    if made is not None:
        # libraries tag torch.nn layers with attributes of their own (ultralytics: ``f``, ``i``,
        # ``type``…) that a torch.nn layer's forward never reads: they are not stored
        spec["attrs"] = {k: v for k, v in attrs.items() if k in made}
        unstorable = {k: e for k, e in unstorable.items() if k in made}
    if unstorable:
        raise next(iter(unstorable.values()))
    return spec


def _present(spec: Dict[str, Any], name: str) -> bool:
    return any(n == name and flag is not None for n, flag in spec["params"])


# Constructor switches that are not stored as attributes, read off which parameters exist.
_DERIVED_SETTINGS = {
    "bias": lambda spec: _present(spec, "bias") or _present(spec, "in_proj_bias"),
    "add_bias_kv": lambda spec: _present(spec, "bias_k"),
}


def _construct(spec: Dict[str, Any], prefix: str) -> nn.Module:
    """Call the listed class's constructor with the stored settings, on ``meta`` (nothing is
    allocated)."""
    cls = allowlist.layer_class(spec["class"])
    settings = spec["attrs"]
    kwargs: Dict[str, Any] = {}
    for param in list(inspect.signature(cls.__init__).parameters.values())[1:]:
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD) or param.name in ("device", "dtype"):
            continue
        if param.name in settings:
            kwargs[param.name] = _decode(settings[param.name], {})
        elif param.name in _DERIVED_SETTINGS:
            kwargs[param.name] = _DERIVED_SETTINGS[param.name](spec)
        elif param.default is param.empty:
            raise ArtifactError(f"layer `{prefix}` ({spec['class']}) lacks the setting {param.name!r}")
    try:
        with torch.device("meta"):
            return cls(**kwargs)
    except Exception as exc:
        raise ArtifactError(f"layer `{prefix}` ({spec['class']}) has settings its constructor refuses "
                            f"({type(exc).__name__}: {exc})") from exc


def _build_layer(spec: Dict[str, Any], prefix: str, tensors: Dict[str, torch.Tensor]) -> nn.Module:
    """A layer built by its own constructor, every stored setting, parameter and buffer
    checked against it."""
    module = _construct(spec, prefix)
    _fill(module, spec, prefix, tensors, top=True)
    return module


def _made_attributes(spec: Dict[str, Any], prefix: str) -> Optional[Set[str]]:
    """The attributes the layer's constructor makes from ``spec``'s settings (None if it
    refuses them: the check that follows says why)."""
    try:
        return set(vars(_construct(spec, prefix))) - _MODULE_BASE_ATTRS
    except ArtifactError:
        return None


def _fill(module: nn.Module, spec: Dict[str, Any], prefix: str, tensors: Dict[str, torch.Tensor],
          top: bool) -> None:
    """Check ``spec`` against a freshly built ``module`` and put the stored tensors in it."""
    where = f"layer `{prefix}` ({spec['class']})"
    if spec["class"] != (allowlist.layer_name(type(module)) if top else _qualname(type(module))):
        raise ArtifactError(f"{where}: its constructor makes a {_qualname(type(module))} here")
    made = {k: _encode(v) for k, v in vars(module).items() if k not in _MODULE_BASE_ATTRS}
    if set(made) != set(spec["attrs"]):
        raise ArtifactError(f"{where}: its settings {sorted(spec['attrs'])} are not those its constructor makes "
                            f"({sorted(made)})")
    for key, value in spec["attrs"].items():
        if made[key] != value:
            raise ArtifactError(f"{where}: setting {key!r} is {_short(value)}, but its constructor arguments give "
                                f"{_short(made[key])}")
    for kind, table in (("params", module._parameters), ("buffers", module._buffers)):
        entries = dict(spec[kind])
        if list(entries) != list(table) or any((entries[n] is None) != (table[n] is None) for n in table):
            raise ArtifactError(f"{where}: its {kind} {sorted(entries)} do not match the layer's ({sorted(table)})")
        for name, flag in entries.items():
            if flag is None:
                continue
            tensor = _tensor(tensors, f"{prefix}.{name}")
            if tensor.shape != table[name].shape:
                raise ArtifactError(f"{where}: `{name}` has shape {list(tensor.shape)}, but the layer's settings "
                                    f"give {list(table[name].shape)}")
            if kind == "params":
                table[name] = nn.Parameter(tensor, requires_grad=flag)
            else:
                if flag != (name not in module._non_persistent_buffers_set):
                    raise ArtifactError(f"{where}: buffer `{name}` has the wrong persistence")
                table[name] = tensor
    if set(spec["children"]) != set(module._modules):
        raise ArtifactError(f"{where}: its sub-layers {sorted(spec['children'])} are not those its constructor "
                            f"makes ({sorted(module._modules)})")
    for name, child in spec["children"].items():
        _fill(module._modules[name], child, f"{prefix}.{name}", tensors, top=False)


def _tensor(tensors: Dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in tensors:
        raise ArtifactError(f"the artifact's weights miss `{key}`")
    return tensors[key]


def _set_path(root: nn.Module, path: str, module: nn.Module) -> None:
    *parents, leaf = path.split(".")
    for name in parents:
        if name not in root._modules:
            _attach(root, name, nn.Module())
        root = root._modules[name]
    _attach(root, leaf, module)


def _attach(owner: nn.Module, name: str, module: nn.Module) -> None:
    try:
        owner.add_module(name, module)
    except (KeyError, TypeError) as exc:
        raise ArtifactError(f"the artifact places a layer at {name!r}, which is not allowed ({exc})") from exc


def _build_root(module_data: Dict[str, Any], graph_data: Dict[str, Any],
                tensors: Dict[str, torch.Tensor]) -> nn.Module:
    root = nn.Module()
    for target, spec in module_data.items():
        _set_path(root, target, _build_layer(spec, target, tensors))
    for record in graph_data["nodes"]:
        if record["op"] != "get_attr":
            continue
        *parents, leaf = record["target"].split(".")
        owner = root
        for name in parents:
            if name not in owner._modules:
                _attach(owner, name, nn.Module())
            owner = owner._modules[name]
        if leaf in owner._buffers:
            continue
        try:
            owner.register_buffer(leaf, _tensor(tensors, f"attr:{record['target']}"))
        except (KeyError, TypeError) as exc:
            raise ArtifactError(f"the artifact stores a tensor at {record['target']!r}, which is not allowed "
                                f"({exc})") from exc
    return root


def _build_graph(graph_data: Dict[str, Any]) -> fx.Graph:
    graph = fx.Graph()
    nodes: Dict[str, fx.Node] = {}
    for record in graph_data["nodes"]:
        op, target = record["op"], record["target"]
        if op == "call_function":
            target = allowlist.resolve_function(target)
        nodes[record["name"]] = graph.create_node(op, target, _decode(record["args"], nodes),
                                                  _decode(record["kwargs"], nodes), name=record["name"])
    return graph


# --- tensors ------------------------------------------------------------------------
def _tensor_table(tensors: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    return {key: [str(t.dtype).replace("torch.", ""), list(t.shape)] for key, t in tensors.items()}


def _check_tensor_table(table: Any) -> int:
    """The bytes the declared tensors take; refuses a malformed table."""
    if not isinstance(table, dict):
        raise ArtifactError("the manifest's tensor table is malformed")
    total = 0
    for key, entry in table.items():
        ok = (isinstance(key, str) and isinstance(entry, list) and len(entry) == 2 and
              allowlist.is_identifier(entry[0]) and isinstance(getattr(torch, entry[0], None), torch.dtype) and
              isinstance(entry[1], list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                 for d in entry[1]))
        if not ok:
            raise ArtifactError(f"the manifest's tensor table has a bad entry for {_short(key)}")
        total += math.prod(entry[1]) * getattr(torch, entry[0]).itemsize
    return total


def _check_tensors(tensors: Any, table: Dict[str, Any]) -> None:
    if not (isinstance(tensors, dict) and set(tensors) == set(table)):
        raise ArtifactError("the artifact's weights are not the tensors its manifest declares")
    for key, tensor in tensors.items():
        if not (isinstance(tensor, torch.Tensor) and tensor.layout == torch.strided):
            raise ArtifactError(f"the artifact's weight `{key}` is not a dense tensor")
        if _tensor_table({key: tensor})[key] != table[key]:
            raise ArtifactError(f"the artifact's weight `{key}` is not the dtype and shape its manifest declares")


# --- signing ------------------------------------------------------------------------
def _key_bytes(key: Key, what: str) -> bytes:
    if isinstance(key, str):
        key = key.encode()
    if not isinstance(key, (bytes, bytearray)) or not key:
        raise TypeError(f"{what} must be non-empty bytes or str")
    return bytes(key)


def _mac(manifest: Dict[str, Any], key: bytes) -> str:
    body = {k: v for k, v in manifest.items() if k != "signature"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return hmac.new(key, canonical, hashlib.sha256).hexdigest()


# --- save / load --------------------------------------------------------------------
def save_artifact(model: nn.Module, example_inputs: Any, path: Path, sign_key: Optional[Key] = None
                  ) -> Dict[str, Any]:
    """Write ``model`` (its eval-mode graph) as a pytorch artifact at ``path``.

    Everything the loader would refuse is refused here first, with :class:`ExportError`, so a
    written file always loads. With ``sign_key``, the manifest carries an HMAC-SHA256 that
    ``load(..., verify_key=...)`` checks.
    """
    key = None if sign_key is None else _key_bytes(sign_key, "sign_key")
    inputs = normalize_inputs(example_inputs)
    gm = eval_graph_module(model, inputs)  # recorded on the inputs where torch.fx cannot follow forward
    sized = getattr(gm, "dnnshrink_data_sized", [])
    if sized:  # the recorded graph holds the example's data-dependent sizes as numbers
        raise ExportError(f"sizes in {type(model).__name__}'s forward depend on its input's values "
                          f"({', '.join(sized[:3])}), so the graph recorded on the example would be right for that "
                          "input alone; the pytorch artifact cannot hold such a model. Export the part before those "
                          "ops (a detector's backbone and head), or save your own class with torch.save.")
    tensors: Dict[str, torch.Tensor] = {}
    nodes: List[Dict[str, Any]] = []
    modules: Dict[str, Any] = {}
    for node in gm.graph.nodes:
        target = node.target
        if node.op == "call_function":
            target = allowlist.function_name(node.target)
            if target is None:
                raise ExportError(f"the pytorch artifact stores only ops on dnnshrink's list of safe torch, operator "
                                  f"and math functions; `{_function_label(node.target)}` is not one of them. "
                                  "Export to ONNX instead.")
        elif node.op == "call_method" and target not in allowlist.TENSOR_METHODS:
            raise ExportError(f"the pytorch artifact stores only the Tensor methods on dnnshrink's list; "
                              f"`.{target}()` is not one of them. Export to ONNX instead.")
        elif node.op == "call_module" and target not in modules:
            modules[target] = _module_spec(gm.get_submodule(target), target, tensors)
        elif node.op == "get_attr":
            value = _fetch_attr(gm, target)
            if not isinstance(value, torch.Tensor):
                raise ExportError(f"attribute `{target}` is a {type(value).__name__}, not a tensor")
            tensors[f"attr:{target}"] = value.detach().cpu()
        nodes.append({"op": node.op, "name": node.name, "target": target, "args": _encode(node.args),
                      "kwargs": _encode(dict(node.kwargs))})
    graph_data = {"nodes": nodes}
    table = _tensor_table(tensors)
    try:
        check_graph(graph_data, modules, table)
        _build_root(modules, graph_data, tensors)
    except ArtifactError as exc:
        raise ExportError(f"this network cannot be stored as a pytorch artifact: {exc}. Export to ONNX instead.") \
            from exc
    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    payload = {"graph.json": json.dumps(graph_data).encode(), "modules.json": json.dumps(modules).encode(),
               "weights.pt": buffer.getvalue()}
    manifest: Dict[str, Any] = {
        "format": FORMAT, "dnnshrink": __version__, "torch": torch.__version__,
        "class_name": type(model).__name__ if allowlist.is_identifier(type(model).__name__) else "Shrunk",
        "inputs": [list(x.shape) if isinstance(x, torch.Tensor) else None for x in inputs],
        # a graph recorded by running (now, or when the network was generated) holds the inputs'
        # sizes as literals: other shapes are refused
        "specialized": bool(getattr(gm, "dnnshrink_specialized", False)) or any(
            isinstance(hook, InputShapeCheck) for hook in model._forward_pre_hooks.values()),
        "members": {name: {"sha256": sha256_bytes(data), "size": len(data)} for name, data in payload.items()},
        "tensors": table,
    }
    if key is not None:
        manifest["signature"] = {"alg": "hmac-sha256", "mac": _mac(manifest, key)}
    with atomic_write(path) as handle, zipfile.ZipFile(handle, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(MANIFEST, json.dumps(manifest, indent=2))
        for name, data in payload.items():
            # weights are stored, not deflated: float data barely compresses, and a stored member
            # cannot decompress to more than its size in the file
            archive.writestr(name, data, zipfile.ZIP_STORED if name == "weights.pt" else zipfile.ZIP_DEFLATED)
    return manifest


def _function_label(target: Any) -> str:
    return f"{getattr(target, '__module__', None) or '?'}.{getattr(target, '__qualname__', target)}"


def _fetch_attr(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int, path: Path) -> bytes:
    if info.file_size > limit:
        raise ArtifactError(f"{path}: {info.filename} would decompress to {info.file_size} bytes, over the "
                            f"{limit} this member may take: refusing to read it")
    with archive.open(info) as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise ArtifactError(f"{path}: {info.filename} decompresses to more than {limit} bytes: refusing it")
    return data


def _check_manifest(manifest: Any, path: Path) -> Dict[str, Any]:
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path} has a malformed manifest")
    if manifest.get("format") != FORMAT:
        older = " (written by an older dnnshrink, whose loader trusted any torch function: export it again)" \
            if manifest.get("format") == "dnnshrink-graph/1" else ""
        raise ArtifactError(f"{path} has format {_short(manifest.get('format'))}; this dnnshrink reads "
                            f"{FORMAT!r}{older}")
    unknown = set(manifest) - _MANIFEST_KEYS
    if unknown:
        raise ArtifactError(f"{path}: the manifest has unknown entries {sorted(unknown)}")
    members = manifest.get("members")
    if not (isinstance(members, dict) and set(members) == set(MEMBERS)):
        raise ArtifactError(f"{path}: the manifest must give the checksum and size of each of {', '.join(MEMBERS)}")
    for name, entry in members.items():
        ok = (isinstance(entry, dict) and set(entry) == {"sha256", "size"} and isinstance(entry["sha256"], str)
              and len(entry["sha256"]) == 64 and all(c in "0123456789abcdef" for c in entry["sha256"])
              and isinstance(entry["size"], int) and not isinstance(entry["size"], bool) and entry["size"] >= 0)
        if not ok:
            raise ArtifactError(f"{path}: the manifest's entry for {name} needs a SHA-256 and a size")
    inputs = manifest.get("inputs")
    if not (isinstance(inputs, list) and all(x is None or (isinstance(x, list) and all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in x)) for x in inputs)):
        raise ArtifactError(f"{path}: the manifest's input shapes are malformed")
    if not isinstance(manifest.get("specialized", False), bool):
        raise ArtifactError(f"{path}: the manifest's `specialized` must be true or false")
    if not allowlist.is_identifier(manifest.get("class_name")):
        raise ArtifactError(f"{path}: the manifest's class name is not a plain identifier")
    return members


def load_artifact(path: Path, verify_key: Optional[Key] = None) -> fx.GraphModule:
    """Load a pytorch artifact written by :func:`save_artifact`, checking everything first.

    With ``verify_key``, the file must carry an HMAC signature made with that key.
    """
    key = None if verify_key is None else _key_bytes(verify_key, "verify_key")
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path} does not exist" +
                            ("" if path.is_absolute() else f" (looked in {Path.cwd()})"))
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            names = [i.filename for i in infos]
            if len(names) != len(set(names)) or set(names) != {MANIFEST, *MEMBERS}:
                raise ArtifactError(f"{path} is not a dnnshrink artifact: it must hold exactly {MANIFEST}, "
                                    f"{', '.join(MEMBERS)} (it holds {', '.join(sorted(names)[:8])})")
            by_name = {i.filename: i for i in infos}
            manifest = json.loads(_read_member(archive, by_name[MANIFEST], MAX_MANIFEST_BYTES, path))
            members = _check_manifest(manifest, path)
            if key is not None:
                signature = manifest.get("signature")
                if not (isinstance(signature, dict) and signature.get("alg") == "hmac-sha256"):
                    raise ArtifactError(f"{path} is not signed, but a verify_key was given")
                if not hmac.compare_digest(str(signature.get("mac")), _mac(manifest, key)):
                    raise ArtifactError(f"{path}: its signature does not match this key (it was written with "
                                        "another key, or changed since)")
            table = manifest.get("tensors")
            weights_limit = (_check_tensor_table(table) + WEIGHTS_OVERHEAD_PER_TENSOR * len(table)
                             + WEIGHTS_OVERHEAD)
            if by_name["weights.pt"].compress_type != zipfile.ZIP_STORED:
                raise ArtifactError(f"{path}: weights.pt must be stored uncompressed")
            data = {}
            for name in MEMBERS:
                limit = weights_limit if name == "weights.pt" else MAX_JSON_BYTES
                if by_name[name].file_size != members[name]["size"]:
                    raise ArtifactError(f"{path}: {name} is not the size its manifest declares")
                data[name] = _read_member(archive, by_name[name], limit, path)
    except (zipfile.BadZipFile, EOFError, OSError, zlib.error, NotImplementedError, RuntimeError) as exc:
        raise ArtifactError(f"{path} is truncated or not a dnnshrink artifact ({type(exc).__name__}: {exc})") from exc
    except (ValueError, RecursionError) as exc:  # json's errors are ValueErrors
        raise ArtifactError(f"{path} has an unreadable manifest ({type(exc).__name__}: {exc})") from exc
    for name, blob in data.items():
        if sha256_bytes(blob) != members[name]["sha256"]:
            raise ArtifactError(f"{path} is corrupted or was tampered with: the checksum of {name} does not match")
    try:
        graph_data, module_data = json.loads(data["graph.json"]), json.loads(data["modules.json"])
    except (ValueError, RecursionError) as exc:
        raise ArtifactError(f"{path}: its graph cannot be read ({type(exc).__name__}: {exc})") from exc
    check_graph(graph_data, module_data, table)
    try:
        tensors = torch.load(io.BytesIO(data["weights.pt"]), weights_only=True, map_location="cpu")
    except Exception as exc:
        raise ArtifactError(f"{path}: its weights cannot be read safely ({type(exc).__name__}: {exc})") from exc
    _check_tensors(tensors, table)
    try:
        root = _build_root(module_data, graph_data, tensors)
        graph = _build_graph(graph_data)
        graph.lint()
        module = fx.GraphModule(root, graph, class_name=manifest["class_name"])
    except ArtifactError:
        raise
    except Exception as exc:
        raise ArtifactError(f"{path} holds an inconsistent graph ({type(exc).__name__}: {exc})") from exc
    module.eval()
    module.dnnshrink_manifest = manifest
    if manifest.get("specialized") is True:
        module.register_forward_pre_hook(InputShapeCheck(manifest["inputs"]))
    return module
