"""Shapes worked out without running (dnnshrink_core.shapes) against torch's own kernels.

The shortcut must never disagree with a real run: where the real op refuses its input, the
rules must give up (None), and where it runs, they must give its exact shapes."""
from __future__ import annotations

import operator

import pytest
import torch
import torchvision
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import fx, nn

import dnnshrink_core as ds
from dnnshrink_core import api, tracing
from dnnshrink_core.plugin_api import OpHandler, get_plugin_manager, hookimpl
from dnnshrink_core.shapes import infer_specs

from helpers import kill_half, max_relative_error


def real_specs(model: nn.Module, *inputs):
    """The specs of a real run, or None when the model does not run on ``inputs``."""
    graph = fx.symbolic_trace(model).graph
    specs = {}
    try:
        with torch.no_grad():
            tracing._Recorder(model, graph, specs).run(*inputs)
    except Exception:
        return graph, None
    return graph, specs


def assert_agrees(model: nn.Module, *inputs) -> bool:
    """Inferred specs equal the real run's, or inference gives up; True when it did not."""
    model.eval()
    graph, real = real_specs(model, *inputs)
    with torch.no_grad():
        inferred = infer_specs(graph, dict(model.named_modules(remove_duplicate=False)), inputs)
    if real is None:
        assert inferred is None, "the rules accepted an input the real op refuses"
        return False
    if inferred is None:
        return False
    for node in graph.nodes:
        assert repr(inferred[node]) == repr(real[node]), f"{node.format_node()}: {inferred[node]} vs {real[node]}"
    return True


@pytest.mark.filterwarnings("ignore:Using padding='same'")  # torch's note on even kernels, not ours
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dims=st.sampled_from([1, 2]), channels=st.integers(1, 6), groups=st.sampled_from([1, 2, 3]),
       kernel=st.integers(1, 4), stride=st.integers(1, 3), padding=st.integers(0, 3), dilation=st.integers(1, 2),
       size=st.integers(1, 9), wrong_channels=st.booleans(), same=st.booleans())
def test_convolution_shapes_match_the_kernel(dims, channels, groups, kernel, stride, padding, dilation, size,
                                             wrong_channels, same):
    conv = (nn.Conv1d, nn.Conv2d)[dims - 1]
    out = groups * 2
    try:
        layer = conv(channels * groups, out, kernel, stride=stride, padding="same" if same else padding,
                     dilation=dilation, groups=groups)
    except ValueError:
        return  # torch refuses the settings themselves
    x = torch.randn((1, channels * groups + (1 if wrong_channels else 0)) + (size,) * dims)
    assert_agrees(nn.Sequential(layer), x)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(["max", "avg"]), kernel=st.integers(1, 4), stride=st.integers(1, 3),
       padding=st.integers(0, 3), dilation=st.integers(1, 2), ceil=st.booleans(), size=st.integers(1, 9),
       functional=st.booleans())
def test_pooling_shapes_match_the_kernel(kind, kernel, stride, padding, dilation, ceil, size, functional):
    if kind == "max":
        layer = nn.MaxPool2d(kernel, stride, padding, dilation=dilation, ceil_mode=ceil)
        call = lambda x: torch.nn.functional.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode=ceil)
    else:
        layer = nn.AvgPool2d(kernel, stride, padding, ceil_mode=ceil)
        call = lambda x: torch.nn.functional.avg_pool2d(x, kernel, stride, padding, ceil_mode=ceil)

    class Functional(nn.Module):
        def forward(self, x):
            return call(x)

    assert_agrees(Functional() if functional else nn.Sequential(layer), torch.randn(1, 2, size, size + 1))


class Arithmetic(nn.Module):
    """Shape arithmetic, views, broadcasting, cat and chunks, as CNN code writes them."""

    def __init__(self, view_after_transpose: bool = False, cat_dim: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear((6 if cat_dim == 1 else 3) * 4, 5)
        self.view_after_transpose, self.cat_dim = view_after_transpose, cat_dim

    def forward(self, x, scale):
        b, c, h, w = x.shape
        y = torch.relu(self.bn(self.conv(x))) * scale + x.mean((2, 3), keepdim=True).sum(1, keepdim=True)
        a, b2 = y.chunk(2, 1)
        y = torch.cat([a, b2, a], self.cat_dim)[:, :6] if self.cat_dim == 1 else torch.cat([a, b2], self.cat_dim)
        t = y.transpose(1, 2)
        t = t.view(b, -1) if self.view_after_transpose else t.contiguous().view(b, h, -1)
        pooled = nn.functional.adaptive_avg_pool2d(y, (2, 2)).flatten(1)
        return self.fc(pooled) + t.sum(), c * h


def test_shape_arithmetic_views_and_broadcasting_match_a_real_run():
    x = torch.randn(2, 4, 5, 5)
    # tensor indexing (the [:, :6]) has no rule: the whole graph is left to the real run
    assert not assert_agrees(Arithmetic(), x, 0.5)
    model = Arithmetic(cat_dim=-1)
    assert assert_agrees(model, x, 0.5)
    # a view of a transposed tensor fails for real, and the rules give up on it
    assert not assert_agrees(Arithmetic(view_after_transpose=True, cat_dim=-1), x, 0.5)
    # wrong input channels: the real conv refuses them, and so do the rules
    assert not assert_agrees(model, torch.randn(2, 3, 5, 5), 0.5)


class AttentionAndFriends(nn.Module):
    """The ops timm's blocks add: shape checks, splits, softmax over a matmul, padding,
    normalisation, broadcasts, stack and unbind."""

    def __init__(self, channels: int = 4):
        super().__init__()
        self.conv, self.channels = nn.Conv2d(3, 6, 1), channels

    def forward(self, x):
        torch._assert(x.dim() == self.channels, "expected a batch of images")
        y = self.conv(x)
        a, b = y.split([2, 4], 1)
        tokens = y.flatten(2)
        attention = torch.softmax(tokens @ tokens.transpose(1, 2), -1)
        padded = nn.functional.pad(b, (1, 1, 0, 2))
        pooled = y.mean((2, 3)).unsqueeze(-1).unsqueeze(-1).expand_as(y)
        return attention, padded, nn.functional.normalize(y, dim=1) + pooled, torch.stack([a, a], 2), y.unbind(1)[0]


def test_attention_style_ops_match_a_real_run():
    x = torch.randn(2, 3, 5, 4)
    assert assert_agrees(AttentionAndFriends(), x)
    assert not assert_agrees(AttentionAndFriends(channels=3), x)  # the model's own check fails: a real run says so


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "shufflenet_v2_x0_5", "googlenet",
                                  "efficientnet_b0", "convnext_tiny", "densenet121", "regnet_x_400mf"])
def test_torchvision_shapes_match_a_real_run(name):
    extra = {"aux_logits": False, "init_weights": False} if name == "googlenet" else {}
    model = getattr(torchvision.models, name)(weights=None, **extra)
    assert assert_agrees(model, torch.randn(1, 3, 64, 64)), f"{name}: no shape rule for one of its ops"


class Widening(nn.Module):
    """A forward hook makes the layer return twice its channels: the graph does not show it."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1)
        self.conv.register_forward_hook(lambda module, args, out: torch.cat([out, out], 1)[:, :4])

    def forward(self, x):
        return self.head(self.bn(self.conv(x)))


def test_hooks_make_the_trace_run_the_model_for_real(monkeypatch):
    calls = []
    original = tracing._Recorder.run
    monkeypatch.setattr(tracing._Recorder, "run", lambda self, *a: calls.append(1) or original(self, *a))
    model, x = kill_half(Widening()).eval(), torch.randn(1, 3, 4, 4)
    ds.trace(model, x)
    assert calls, "a model with hooks was traced without running it"
    calls.clear()
    plain = kill_half(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))).eval()
    small = ds.generate(plain, x, ds.alive_masks(plain, x))
    assert not calls and max_relative_error(small(x), plain(x)) < 1e-5


def test_a_layer_whose_forward_was_replaced_is_run_for_real():
    layer = nn.Conv2d(3, 4, 1)
    layer.forward = lambda x: torch.cat([nn.Conv2d.forward(layer, x)] * 2, 1)  # 8 channels, not 4
    model = nn.Sequential(layer, nn.Flatten())
    graph = fx.symbolic_trace(model).graph
    assert infer_specs(graph, dict(model.named_modules(remove_duplicate=False)), (torch.randn(1, 3, 2, 2),)) is None


class SumOfTwo(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8))
        self.b = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8))
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(self.a(x) + self.b(x))


class UntiedAdd(OpHandler):
    """A buggy handler: says ``+`` passes its first input's channels and ignores the second."""

    name = "untied-add"

    def propagate(self, ctx):
        ctx.output(ctx.chan(ctx.node.args[0]))


class UntiedAddPlugin:
    @hookimpl
    def dnnshrink_op_handler(self, node, module):
        return UntiedAdd() if node.op == "call_function" and node.target is operator.add else None


def test_the_generated_network_is_checked_without_running_it(fresh_manager, monkeypatch):
    """The network a buggy handler builds is refused by the shape rules' check, and the
    error then comes from a real run, with torch's own message."""
    model, x = SumOfTwo().eval(), torch.randn(1, 3, 4, 4)
    with torch.no_grad():
        model.a[1].weight[:4] = 0
        model.a[1].bias[:4] = 0
        model.b[1].weight[2:] = 0  # b keeps 2 channels, a keeps 4: the add cannot take them
        model.b[1].bias[2:] = 0
    get_plugin_manager().register(UntiedAddPlugin(), name="untied-add")
    answers = []
    monkeypatch.setattr(api, "infer_specs", lambda *a: answers.append(infer_specs(*a)) or answers[-1])
    with pytest.raises(ds.GenerationError, match=r"does not run on the example input \(RuntimeError: The size"):
        ds.generate(model, x, ds.alive_masks(model, x))
    assert answers == [None], "the check did not work out the new network's shapes first"
