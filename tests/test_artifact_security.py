"""Hostile pytorch artifacts: each is forged from a good one, checksums and sizes recomputed
(as an attacker would: a checksum proves integrity, not authorship), and must be refused at
load with ArtifactError, before any side effect. Plus the round trip of every model the
exporter tests save, under the allowlist, and the optional HMAC signature."""
from __future__ import annotations

import copy
import io
import json
import pickle
import zipfile
from pathlib import Path
from typing import Callable, Dict

import pytest
import torch
from torch import nn

import dnnshrink_core as ds
from dnnshrink_core.fileio import sha256_bytes
from dnnshrink_plugins.exporters import allowlist
from dnnshrink_plugins.exporters.artifact import MAX_JSON_BYTES, MAX_NODES
from helpers import max_relative_error, shrink_dead_half
from models import HANDWRITTEN

SIDE_EFFECT = "PWNED"


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A good artifact of a shrunk LeNet (literal view rewritten, so a GraphModule) and its input."""
    _, small, x = shrink_dead_half("literal_view")
    path = tmp_path_factory.mktemp("good") / "good.dnnshrink"
    ds.export(small, x, "pytorch", path)
    return path, x


def read(path: Path) -> Dict[str, bytes]:
    with zipfile.ZipFile(path) as archive:
        return {n: archive.read(n) for n in archive.namelist()}


def write(path: Path, contents: Dict[str, bytes], stored=("weights.pt",), fix=True) -> Path:
    """Write ``contents`` as an artifact, recomputing the manifest's sizes and checksums."""
    contents = dict(contents)
    if fix:
        manifest = json.loads(contents["manifest.json"])
        for name, data in contents.items():
            if name in manifest.get("members", {}):
                manifest["members"][name] = {"sha256": sha256_bytes(data), "size": len(data)}
        contents["manifest.json"] = json.dumps(manifest).encode()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in contents.items():
            archive.writestr(name, data, zipfile.ZIP_STORED if name in stored else zipfile.ZIP_DEFLATED)
    return path


def forge_graph(good_path: Path, out: Path, edit: Callable[[list], None]) -> Path:
    contents = read(good_path)
    graph = json.loads(contents["graph.json"])
    edit(graph["nodes"])
    contents["graph.json"] = json.dumps(graph).encode()
    return write(out, contents)


def forge_modules(good_path: Path, out: Path, edit: Callable[[dict], None]) -> Path:
    contents = read(good_path)
    modules = json.loads(contents["modules.json"])
    edit(modules)
    contents["modules.json"] = json.dumps(modules).encode()
    return write(out, contents)


def forge_manifest(good_path: Path, out: Path, edit: Callable[[dict], None], fix=True) -> Path:
    contents = read(good_path)
    manifest = json.loads(contents["manifest.json"])
    edit(manifest)
    contents["manifest.json"] = json.dumps(manifest).encode()
    return write(out, contents, fix=fix)


def insert_call(nodes: list, op: str, target, args, kwargs=(), name="evil") -> None:
    """Insert ``name = target(*args)`` before the output node; ``"<x>"`` stands for the input."""
    first = nodes[0]["name"]
    enc = [{"node": first} if a == "<x>" else a for a in args]
    nodes.insert(len(nodes) - 1, {"op": op, "name": name, "target": target, "args": {"tuple": enc},
                                  "kwargs": {"dict": [list(kv) for kv in kwargs]}})


def getattr_chain(nodes: list) -> None:
    prev = nodes[0]["name"]
    for i, attr in enumerate(["__class__", "__init__", "__globals__"]):
        nodes.insert(len(nodes) - 1, {"op": "call_function", "name": f"g{i}", "target": "builtins.getattr",
                                      "args": {"tuple": [{"node": prev}, attr]}, "kwargs": {"dict": []}})
        prev = f"g{i}"


def rename_input(nodes: list) -> None:
    nodes[0]["target"] = f"x=__import__('os').system('touch {SIDE_EFFECT}')"


def inject_kwarg(nodes: list) -> None:
    insert_call(nodes, "call_function", "torch.flatten", ["<x>"],
                [(f"start_dim=__import__('os').system('touch {SIDE_EFFECT}'), end_dim", 1)])


def inject_name(nodes: list) -> None:
    nodes[1]["name"] = f"a = __import__('os').system('touch {SIDE_EFFECT}'); b"


def evil_class(modules: dict) -> None:
    first = next(iter(modules))
    modules[first]["class"] = "subprocess.Popen"


def private_layer(modules: dict) -> None:
    first = next(iter(modules))
    modules[first]["class"] = "torch.nn.parallel.DistributedDataParallel"


def hooks_in_settings(modules: dict) -> None:
    first = next(iter(modules))
    modules[first]["attrs"]["_forward_hooks"] = {"dict": [["0", "os.system"]]}


ATTACKS = {
    # code execution through a private torch helper that runs Python source
    "exec_source": lambda n: insert_call(n, "call_function", "torch.fx.graph_module._forward_from_src",
                                         [f"open('{SIDE_EFFECT}', 'w')", {"dict": []}]),
    "builtin_exec": lambda n: insert_call(n, "call_function", "builtins.exec", [f"open('{SIDE_EFFECT}', 'w')"]),
    "eval_by_module_prefix": lambda n: insert_call(n, "call_function", "operator.methodcaller",
                                                   ["system", f"touch {SIDE_EFFECT}"]),
    "file_write": lambda n: insert_call(n, "call_function", "torch.save", ["<x>", SIDE_EFFECT]),
    "unpickling": lambda n: insert_call(n, "call_function", "torch.load", ["evil.pkl"], [("weights_only", False)]),
    "library_loading": lambda n: insert_call(n, "call_function", "torch.ops.load_library", [f"{SIDE_EFFECT}.so"]),
    "network_fetch": lambda n: insert_call(n, "call_function", "torch.hub.download_url_to_file",
                                           ["http://127.0.0.1:9/model", SIDE_EFFECT]),
    "private_internals": lambda n: insert_call(n, "call_function", "torch._C._nn.gelu", ["<x>"]),
    "numpy_io": lambda n: insert_call(n, "call_function", "numpy.save", [SIDE_EFFECT, "<x>"]),
    "getattr_to_globals": getattr_chain,
    "dunder_method": lambda n: insert_call(n, "call_method", "__reduce_ex__", ["<x>", 2]),
    "callback_method": lambda n: insert_call(n, "call_method", "register_hook", ["<x>", "print"]),
    "storage_method": lambda n: insert_call(n, "call_method", "untyped_storage", ["<x>"]),
    "input_name_injection": rename_input,
    "keyword_injection": inject_kwarg,
    "node_name_injection": inject_name,
    "attribute_target": lambda n: insert_call(n, "get_attr", "__class__", []),
}
def quoted_path(modules: dict) -> None:
    # fx writes a non-identifier path part as getattr(self, "part") without escaping quotes
    key = next(iter(modules))
    modules[f'{key}") or __import__("os").system("touch {SIDE_EFFECT}") or ("'] = modules.pop(key)


MODULE_ATTACKS = {
    "layer_path_injection": quoted_path,
    "class_outside_torch_nn": evil_class,
    "unlisted_torch_nn_class": private_layer,
    "hooks_in_settings": hooks_in_settings,
}


@pytest.mark.parametrize("attack", sorted(ATTACKS) + sorted(MODULE_ATTACKS))
def test_hostile_artifacts_are_refused_at_load_without_side_effects(attack, good, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open("evil.pkl", "wb") as handle:
        pickle.dump(Exploit(), handle)
    good_path, _ = good
    out = tmp_path / f"{attack}.dnnshrink"
    if attack in ATTACKS:
        forge_graph(good_path, out, ATTACKS[attack])
    else:
        forge_modules(good_path, out, MODULE_ATTACKS[attack])
    with pytest.raises(ds.ArtifactError):
        ds.load(out)
    assert not list(tmp_path.glob(f"{SIDE_EFFECT}*"))


def test_refusals_name_the_op(good, tmp_path):
    good_path, _ = good
    cases = {
        "file_write": "torch.save", "private_internals": "torch._C._nn.gelu", "dunder_method": "__reduce_ex__",
        "getattr_to_globals": "getattr may only read", "input_name_injection": "not a plain identifier",
        "keyword_injection": "keyword argument name", "attribute_target": "not a stored tensor",
    }
    for attack, words in cases.items():
        with pytest.raises(ds.ArtifactError, match="refusing|not|may only") as info:
            ds.load(forge_graph(good_path, tmp_path / f"{attack}.dnnshrink", ATTACKS[attack]))
        assert words in str(info.value), (attack, str(info.value))
    with pytest.raises(ds.ArtifactError, match="subprocess.Popen"):
        ds.load(forge_modules(good_path, tmp_path / "c.dnnshrink", evil_class))


class Exploit:
    def __reduce__(self):
        return (exec, (f"open('{SIDE_EFFECT}', 'w').write('x')",))


def test_pickles_in_the_weights_are_refused(good, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    contents = read(good[0])
    payload = io.BytesIO()
    pickle.dump({"x": Exploit()}, payload, protocol=2)
    contents["weights.pt"] = payload.getvalue()
    with pytest.raises(ds.ArtifactError, match="cannot be read safely|not the size|over the"):
        ds.load(write(tmp_path / "evil.dnnshrink", contents))
    assert not (tmp_path / SIDE_EFFECT).exists()


def test_oversized_members_are_refused_before_they_are_read(good, tmp_path):
    contents = read(good[0])
    # a zip bomb: 33 MiB of spaces deflate to a few dozen KiB
    bomb = dict(contents, **{"graph.json": contents["graph.json"] + b" " * (MAX_JSON_BYTES + (1 << 20))})
    path = write(tmp_path / "bomb.dnnshrink", bomb)
    assert path.stat().st_size < 1 << 20
    with pytest.raises(ds.ArtifactError, match=f"graph.json would decompress to .* over the {MAX_JSON_BYTES}"):
        ds.load(path)
    # weights larger than the tensors the manifest declares
    fat = dict(contents, **{"weights.pt": contents["weights.pt"] + b"\0" * (4 << 20)})
    with pytest.raises(ds.ArtifactError, match="weights.pt would decompress to"):
        ds.load(write(tmp_path / "fat.dnnshrink", fat))
    # deflated weights could hide a bomb: they must be stored
    with pytest.raises(ds.ArtifactError, match="stored uncompressed"):
        ds.load(write(tmp_path / "deflated.dnnshrink", contents, stored=()))


def test_an_absurd_node_count_is_refused(good, tmp_path):
    def flood(nodes):
        first = nodes[0]["name"]
        nodes[1:1] = [{"op": "call_function", "name": f"n{i}", "target": "torch.relu",
                       "args": {"tuple": [{"node": first}]}, "kwargs": {"dict": []}} for i in range(MAX_NODES)]
    with pytest.raises(ds.ArtifactError, match=f"at most {MAX_NODES}"):
        ds.load(forge_graph(good[0], tmp_path / "flood.dnnshrink", flood))


def _drop_checksum(manifest):
    del manifest["members"]["graph.json"]


MALFORMED_MANIFESTS = {
    "member_without_checksum": (_drop_checksum, "checksum and size of each"),
    "empty_checksum_table": (lambda m: m.update(members={}), "checksum and size of each"),
    "old_format": (lambda m: m.update(format="dnnshrink-graph/1"), "older dnnshrink"),
    "unknown_entry": (lambda m: m.update(loader="os.system"), "unknown entries"),
    "bad_class_name": (lambda m: m.update(class_name="A(); import os"), "class name"),
    "bad_tensor_table": (lambda m: m.update(tensors={"x": ["os", [1]]}), "tensor table"),
    "wrong_tensor_table": (lambda m: m["tensors"].update({next(iter(m["tensors"])): ["float32", [1, 2]]}),
                           "not the dtype and shape"),
    "not_an_object": (lambda m: m.clear(), "format"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_MANIFESTS))
def test_malformed_manifests_are_artifact_errors(case, good, tmp_path):
    edit, words = MALFORMED_MANIFESTS[case]
    with pytest.raises(ds.ArtifactError, match=words):
        ds.load(forge_manifest(good[0], tmp_path / "m.dnnshrink", edit, fix=case not in (
            "member_without_checksum", "empty_checksum_table")))


def _dangling(nodes):
    nodes[1]["args"] = {"tuple": [{"node": "nowhere"}]}


def _forward_ref(nodes):
    nodes[1]["args"] = {"tuple": [{"node": nodes[-1]["name"]}]}


def _duplicate(nodes):
    nodes[2]["name"] = nodes[1]["name"]


def _unknown_kind(nodes):
    nodes[1]["args"] = {"tuple": [{"lambda": "x: x"}]}


def _bad_encoding(nodes):
    nodes[1]["args"] = {"tuple": [{"node": "a", "float": "nan"}]}


def _bad_args(nodes):
    nodes[1]["args"] = [1, 2]


def _extra_key(nodes):
    nodes[1]["code"] = "import os"


def _no_output(nodes):
    nodes.pop()


def _two_outputs(nodes):
    nodes.insert(1, dict(nodes[-1], name="output_0"))


def _unknown_op(nodes):
    nodes[1]["op"] = "call_python"


def _missing_layer(nodes):
    call = next(n for n in nodes if n["op"] == "call_module")
    call["target"] = "nowhere"


def _bad_dtype(nodes):
    nodes[1]["args"] = {"tuple": [{"dtype": "save"}]}


MALFORMED_GRAPHS = {
    "node_refers_to_missing_node": (_dangling, "not defined before it"),
    "node_refers_to_later_node": (_forward_ref, "not defined before it"),
    "duplicate_names": (_duplicate, "used twice"),
    "unknown_value_kind": (_unknown_kind, "unknown value kind"),
    "bad_value_encoding": (_bad_encoding, "bad value encoding"),
    "arguments_not_a_tuple": (_bad_args, "must be a tuple"),
    "extra_node_key": (_extra_key, "exactly the keys"),
    "no_output": (_no_output, "must end with its output"),
    "two_outputs": (_two_outputs, "more than one output"),
    "unknown_op_kind": (_unknown_op, "op of kind"),
    "call_of_missing_layer": (_missing_layer, "does not describe"),
    "bad_dtype": (_bad_dtype, "not a torch dtype"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_GRAPHS))
def test_malformed_graphs_are_artifact_errors(case, good, tmp_path):
    edit, words = MALFORMED_GRAPHS[case]
    with pytest.raises(ds.ArtifactError, match=words):
        ds.load(forge_graph(good[0], tmp_path / "g.dnnshrink", edit))


def _first_conv(modules):
    return next(spec for spec in modules.values() if spec["class"] == "torch.nn.Conv2d")


def _wrong_width(modules):
    _first_conv(modules)["attrs"]["out_channels"] += 1


def _derived_setting(modules):
    _first_conv(modules)["attrs"]["_reversed_padding_repeated_twice"] = {"tuple": [9, 9, 9, 9]}


def _missing_setting(modules):
    del _first_conv(modules)["attrs"]["in_channels"]


def _refused_setting(modules):
    _first_conv(modules)["attrs"]["padding_mode"] = "teleport"


def _missing_param(modules):
    _first_conv(modules)["params"] = [p for p in _first_conv(modules)["params"] if p[0] != "weight"]


def _bad_path(modules):
    key = next(iter(modules))
    modules["__class__"] = modules.pop(key)


MALFORMED_LAYERS = {
    "tensor_shape_does_not_fit_settings": (_wrong_width, "shape"),
    "setting_not_from_constructor": (_derived_setting, "constructor arguments give"),
    "missing_setting": (_missing_setting, "in_channels"),
    "setting_refused_by_constructor": (_refused_setting, "constructor refuses"),
    "missing_parameter": (_missing_param, "params"),
    "bad_layer_path": (_bad_path, "plain layer path"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_LAYERS))
def test_malformed_layers_are_artifact_errors(case, good, tmp_path):
    edit, words = MALFORMED_LAYERS[case]
    with pytest.raises(ds.ArtifactError, match=words):
        ds.load(forge_modules(good[0], tmp_path / "l.dnnshrink", edit))


def test_broken_files_are_artifact_errors(good, tmp_path):
    blob = good[0].read_bytes()
    (tmp_path / "half.dnnshrink").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ds.ArtifactError, match="truncated or not a dnnshrink artifact"):
        ds.load(tmp_path / "half.dnnshrink")
    contents = read(good[0])
    with pytest.raises(ds.ArtifactError, match="must hold exactly"):
        ds.load(write(tmp_path / "extra.dnnshrink", dict(contents, **{"run.py": b"import os"})))
    contents_bad_json = dict(contents, **{"graph.json": b"{not json"})
    with pytest.raises(ds.ArtifactError, match="graph cannot be read"):
        ds.load(write(tmp_path / "json.dnnshrink", contents_bad_json))
    tampered = dict(contents, **{"graph.json": contents["graph.json"].replace(b"conv1", b"conv2", 1)})
    with pytest.raises(ds.ArtifactError, match="tampered"):
        ds.load(write(tmp_path / "tampered.dnnshrink", tampered, fix=False))


def test_missing_relative_path_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ds.ArtifactError, match=f"missing.dnnshrink does not exist \\(looked in {tmp_path}\\)"):
        ds.load("missing.dnnshrink")


# --- the exporter refuses at save what the loader would refuse -------------------------
class UnlistedMethod(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)).sigmoid().logit()


class MyConv(nn.Conv2d):
    """A subclass of a listed layer is not the listed layer: fx traces into its forward."""


def test_the_exporter_refuses_what_the_loader_would(tmp_path):
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(ds.ExportError, match=r"`\.logit\(\)` is not one of them.*ONNX"):
        ds.export(UnlistedMethod().eval(), x, "pytorch", tmp_path / "a.dnnshrink")
    with pytest.raises(ds.ExportError, match="LPPool2d.*ONNX"):
        ds.export(nn.Sequential(nn.LPPool2d(2, 2)).eval(), x, "pytorch", tmp_path / "c.dnnshrink")
    assert not list(tmp_path.iterdir())
    # a subclass of a listed layer is stored as the listed ops its forward calls, never by its class
    model = nn.Sequential(MyConv(3, 4, 1)).eval()
    ds.export(model, x, "pytorch", tmp_path / "b.dnnshrink")
    loaded = ds.load(tmp_path / "b.dnnshrink")
    assert not any(isinstance(m, MyConv) for m in loaded.modules())
    with torch.no_grad():
        assert max_relative_error(model(x), loaded(x)) < 1e-6


def test_every_listed_name_exists_and_none_is_private():
    for name in allowlist.FUNCTIONS:
        assert not any(part.startswith("_") for part in name.split(".")), name
        if not name.startswith("torchvision."):
            assert callable(allowlist.resolve_function(name)), name
    for name in allowlist.TENSOR_METHODS:
        assert not name.startswith("_") and hasattr(torch.Tensor, name), name
    for name, cls in allowlist.LAYER_CLASSES.items():
        assert issubclass(cls, nn.Module) and name == f"torch.nn.{cls.__name__}"


# --- round trips under the allowlist ----------------------------------------------------
@pytest.mark.parametrize("name", sorted(HANDWRITTEN))
def test_every_handwritten_model_round_trips(name, tmp_path):
    _, small, x = shrink_dead_half(name)
    path = tmp_path / "m.dnnshrink"
    ds.export(small, x, "pytorch", path)
    loaded = ds.load(path)
    small.eval()
    with torch.no_grad():
        assert max_relative_error(small(x), loaded(x)) < 1e-6


class Attention(nn.Module):
    """Layers with sub-layers and derived settings: MultiheadAttention, LayerNorm, PReLU."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding="same", padding_mode="reflect"), nn.BatchNorm2d(8)
        self.attn, self.norm, self.act = nn.MultiheadAttention(8, 2, batch_first=True), nn.LayerNorm(8), nn.PReLU()

    def forward(self, x):
        x = self.act(self.bn(self.conv(x))).flatten(2).transpose(1, 2)
        out, _ = self.attn(x, x, x, need_weights=False)
        return self.norm(out + x)


def test_layers_with_sub_layers_round_trip(tmp_path):
    model, x = Attention().eval(), torch.randn(2, 3, 4, 4)
    ds.export(model, x, "pytorch", tmp_path / "a.dnnshrink")
    loaded = ds.load(tmp_path / "a.dnnshrink")
    with torch.no_grad():
        assert max_relative_error(model(x), loaded(x)) < 1e-6
    assert type(loaded.attn) is nn.MultiheadAttention and loaded.attn.out_proj.weight.shape == (8, 8)


# --- signatures -------------------------------------------------------------------------
def test_signed_artifacts(tmp_path):
    _, small, x = shrink_dead_half("concat")
    path = tmp_path / "s.dnnshrink"
    assert ds.export(small, x, "pytorch", path, sign_key=b"team secret")["signed"]
    with torch.no_grad():
        assert max_relative_error(small(x), ds.load(path, verify_key="team secret")(x)) < 1e-6
    with pytest.raises(ds.ArtifactError, match="signature does not match"):
        ds.load(path, verify_key=b"other key")
    # forged after signing, checksums recomputed: only the signature can tell
    forged = forge_graph(path, tmp_path / "f.dnnshrink",
                         lambda nodes: insert_call(nodes, "call_function", "torch.relu", ["<x>"], name="extra"))
    ds.load(forged)  # without a key nothing vouches for the author
    with pytest.raises(ds.ArtifactError, match="signature does not match"):
        ds.load(forged, verify_key=b"team secret")
    unsigned = tmp_path / "u.dnnshrink"
    ds.export(small, x, "pytorch", unsigned)
    with pytest.raises(ds.ArtifactError, match="not signed"):
        ds.load(unsigned, verify_key=b"team secret")
    with pytest.raises(TypeError, match="sign_key"):
        ds.export(small, x, "pytorch", tmp_path / "e.dnnshrink", sign_key=b"")


def test_forged_files_load_nothing_from_the_original_model(good):
    """The loaded network is built only of listed layers and plain containers."""
    loaded = ds.load(good[0])
    kinds = {type(m) for m in loaded.modules()} - {type(loaded), nn.Module}
    assert kinds <= set(allowlist.LAYER_CLASSES.values()), kinds
    assert copy.deepcopy(loaded) is not None


class ShapeDependent(nn.Module):
    """forward reads the input's size into Python (timm's "same" padding): fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)
        self.up = nn.Upsample(scale_factor=2.0)
        # a library's own tags on a torch.nn layer (as ultralytics does), one not even storable
        self.up.f, self.up.i, self.up.type, self.up.hook = -1, 7, "torch.nn.Upsample", print

    def forward(self, x):
        if x.shape[-1] % 2:  # Python control flow on a size
            x = torch.nn.functional.pad(x, (0, 1, 0, 1))
        return self.up(self.bn(self.conv(x)))


def test_a_network_fx_cannot_trace_is_recorded_on_its_example_and_keeps_that_shape(tmp_path):
    model, x = ShapeDependent().eval(), torch.randn(2, 3, 9, 9)
    with pytest.raises(Exception):
        torch.fx.symbolic_trace(model)
    result = ds.export(model, x, "pytorch", tmp_path / "s.dnnshrink")
    loaded = ds.load(result["path"])
    assert loaded.dnnshrink_manifest["specialized"] is True
    with torch.no_grad():
        assert max_relative_error(model(x), loaded(x)) < 1e-6
    with pytest.raises(ValueError, match=r"specialised to the example input .*\(2, 3, 9, 9\)"):
        loaded(torch.randn(2, 3, 12, 12))
    assert not hasattr(loaded.up, "hook") and loaded.up.scale_factor == 2.0  # the library's tags stay behind
