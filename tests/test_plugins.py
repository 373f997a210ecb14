"""Plugins: the defaults load through entry points, can be listed, blocked and overridden."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import dnnshrink_core as ds
from dnnshrink_core import Chan, OpHandler, hookimpl
from dnnshrink_core.plugins import get_plugin_manager, list_plugins
from helpers import kill_half, max_relative_error
from models import conv_bn


def test_defaults_come_from_entry_points():
    infos = {i.name: i for i in list_plugins()}
    assert infos["generators"].hooks == ("dnnshrink_op_handler",)
    assert infos["morphnet"].hooks == ("dnnshrink_algorithm", "dnnshrink_algorithm_names",
                                       "dnnshrink_mask_extractor", "dnnshrink_mask_extractor_names",
                                       "dnnshrink_regularizer", "dnnshrink_regularizer_names")
    assert infos["exporters"].hooks == ("dnnshrink_export_formats", "dnnshrink_exporter")
    assert infos["generators"].distribution.startswith("dnnshrink ")


@pytest.mark.parametrize("command", [["dnnshrink"], [sys.executable, "-m", "dnnshrink_core"]])
def test_cli_lists_plugins(command):
    out = subprocess.run(command + ["plugins"], capture_output=True, text=True, check=True).stdout
    assert "generators" in out and "dnnshrink_op_handler" in out and "morphnet" in out


def test_cli_blocks_by_name_and_environment():
    out = subprocess.run(["dnnshrink", "plugins", "--block", "morphnet"], capture_output=True, text=True,
                         check=True).stdout
    assert "blocked: morphnet" in out and "dnnshrink_mask_extractor" not in out
    env = dict(os.environ, DNNSHRINK_BLOCK_PLUGINS="generators")
    out = subprocess.run(["dnnshrink", "plugins"], capture_output=True, text=True, check=True, env=env).stdout
    assert "blocked: generators" in out and "dnnshrink_op_handler" not in out


def test_blocked_generator_is_a_clear_error(fresh_manager):
    get_plugin_manager(blocked=["generators"])
    with pytest.raises(ds.PluginError, match="no channel handler plugin is loaded"):
        ds.trace(nn.Sequential(conv_bn(3, 4)), torch.randn(1, 3, 4, 4))


def test_blocked_extractor_is_a_clear_error(fresh_manager):
    get_plugin_manager(blocked=["morphnet"])
    with pytest.raises(ds.PluginError, match="no mask extractor called 'threshold'"):
        ds.alive_masks(nn.Sequential(conv_bn(3, 4)), torch.randn(1, 3, 4, 4))


class Scale(nn.Module):
    """A layer the defaults do not know: multiplies each channel by a learned factor."""

    def __init__(self, c: int):
        super().__init__()
        self.factor = nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x):
        return x * self.factor.view(1, -1, 1, 1)


class ScaleHandler(OpHandler):
    name = "scale"

    def propagate(self, ctx):
        chan = ctx.chan(ctx.arg(0, "x"))
        labels = ctx.module_labels("features", len(chan))
        ctx.tie(labels, chan.labels)
        ctx.info["labels"] = labels
        ctx.output(Chan(chan.labels, chan.guard))

    def rebuild(self, ctx):
        keep = ctx.keep(ctx.info["labels"])
        new = Scale(int(keep.sum()))
        new.factor.data = ctx.module.factor.data[torch.from_numpy(np.flatnonzero(keep))].clone()
        ctx.replace_module(new)


class ScalePlugin:
    @hookimpl
    def dnnshrink_leaf_module(self, module, qualname):
        return True if isinstance(module, Scale) else None

    @hookimpl
    def dnnshrink_op_handler(self, node, module):
        return ScaleHandler() if isinstance(module, Scale) else None


def test_runtime_plugin_handles_its_own_layer(fresh_manager):
    model = kill_half(nn.Sequential(conv_bn(3, 8), Scale(8), nn.Conv2d(8, 2, 1))).eval()
    x = torch.randn(1, 3, 6, 6)
    # traced through by default: its per-channel parameter is followed and sliced in place
    assert ds.trace(model, x).group_of("0.0").removable.all()
    small = ds.generate(model, x, ds.alive_masks(model, x))
    assert type(small[1]) is Scale and small[1].factor.numel() == small[0][0].out_channels < 8
    with torch.no_grad():
        assert max_relative_error(model(x), small(x)) < 1e-4
    pm = get_plugin_manager()
    pm.register(ScalePlugin(), name="scale")
    assert "scale" in {i.name for i in list_plugins()}
    graph = ds.trace(model, x)
    assert graph.group_of("0.0").removable.all()
    small = ds.generate(model, x, ds.alive_masks(model, x))
    assert small[1].factor.numel() == small[0][0].out_channels < 8
    with torch.no_grad():
        assert max_relative_error(model(x), small(x)) < 1e-4


class FreezeReLU:
    """Overrides a default: every ReLU becomes a barrier (first result wins)."""

    @hookimpl
    def dnnshrink_op_handler(self, node, module):
        if isinstance(module, nn.ReLU):
            return FrozenRelu()
        return None


class FrozenRelu(OpHandler):
    name = "frozen-relu"

    def propagate(self, ctx):
        ctx.unknown("frozen by a plugin", warn=False)


def test_third_party_handler_wins_over_default(fresh_manager):
    model, x = nn.Sequential(conv_bn(3, 8), conv_bn(8, 4)).eval(), torch.randn(1, 3, 6, 6)
    assert ds.trace(model, x).group_of("0.0").removable.all()
    get_plugin_manager().register(FreezeReLU(), name="freeze-relu")
    assert not ds.trace(model, x).group_of("0.0").removable.any()


class PicksEight(nn.Module):
    """Reads channels 0..7 by index: its code cannot take fewer channels."""

    def forward(self, x):
        return torch.index_select(x, 1, torch.arange(8))


class WrongPassThrough:
    """A buggy third-party handler: says channels pass through ``index_select`` unchanged."""

    @hookimpl
    def dnnshrink_op_handler(self, node, module):
        if node.op == "call_function" and node.target is torch.index_select:
            return PassAlong()
        return None


class PassAlong(OpHandler):
    name = "pass-along"

    def propagate(self, ctx):
        ctx.passthrough()


def test_a_network_that_cannot_run_is_never_returned(fresh_manager):
    model = kill_half(nn.Sequential(conv_bn(3, 8), PicksEight(), nn.Conv2d(8, 2, 1))).eval()
    x = torch.randn(1, 3, 6, 6)
    get_plugin_manager().register(WrongPassThrough(), name="wrong")
    with pytest.raises(ds.GenerationError, match=r"does not run on the example input \((RuntimeError|IndexError)"):
        ds.generate(model, x, ds.alive_masks(model, x))


def test_plugins_import_only_the_plugin_api():
    """dnnshrink's own plugins and the documented example use the declared plugin-author
    surface (dnnshrink_core.plugin_api, or the package root), never another core module."""
    import ast
    from pathlib import Path

    import dnnshrink_core.plugin_api as api

    root = Path(__file__).parent.parent
    files = [*sorted((root / "plugins").rglob("*.py")),
             *sorted((root / "tests" / "example_plugin" / "dnnshrink_example").rglob("*.py"))]
    assert len(files) > 20
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dnnshrink_core"):
                assert node.module in ("dnnshrink_core", "dnnshrink_core.plugin_api"), (path, node.module)
                if node.module == "dnnshrink_core.plugin_api":
                    missing = [a.name for a in node.names if a.name not in api.__all__]
                    assert not missing, (path, missing)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    assert not alias.name.startswith("dnnshrink_core.") or alias.name == "dnnshrink_core.plugin_api", \
                        (path, alias.name)
    assert all(hasattr(api, name) and getattr(api, name).__doc__ for name in api.__all__
               if name not in ("LAYER_TYPES", "LEARNING_ADVICE", "__version__"))


def test_docs_describe_every_handler_context_member():
    from pathlib import Path

    from dnnshrink_core.plugin_api import PropagateContext, RebuildContext

    docs = (Path(__file__).parent.parent / "docs" / "plugins.md").read_text()
    section = docs[docs.index("## The handler contexts, in full"):]
    for cls in (PropagateContext, RebuildContext):
        for name in vars(cls):
            if not name.startswith("_") and name != "LAYER_KINDS":
                assert f"`ctx.{name}" in section, f"{cls.__name__}.{name} is not in docs/plugins.md"


@pytest.mark.parametrize("kind, name, listed", [
    ("algorithm", "prune", ["magnitude", "morphnet", "slimming"]),
    ("cost model", "joules", ["activations", "flops", "latency", "params"]),
    ("exporter", "tflite", ["graph", "onnx", "pytorch"]),
    ("mask extractor", "top", ["threshold"]),
    ("regularizer", "l0", ["morphnet_flops", "morphnet_latency", "slimming_l1"]),
])
def test_every_lookup_kind_lists_its_names_and_fails_the_same_way(kind, name, listed):
    from dnnshrink_core.plugin_api import lookup, plugin_names

    assert set(listed) <= set(plugin_names(kind))
    assert lookup(kind, listed[0]) is not None
    with pytest.raises(ds.PluginError, match=f"no {kind} called '{name}' is loaded; choose one of: .*{listed[0]}"):
        lookup(kind, name)
