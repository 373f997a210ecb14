"""Models torch.fx cannot trace symbolically (control flow on shapes, iteration over tensors,
``x.shape`` arithmetic): they are recorded by running them on the example input, and go
through the invariant like every other model (killed channels -> exact outputs, the input
model untouched)."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import dnnshrink_core as ds
from dnnshrink_core.recording import SpecializedTraceWarning
from helpers import kill_half, max_relative_error, n_params, state_copy, states_equal

TOLERANCE = 1e-4


def conv_bn(cin: int, cout: int, k: int = 3, **kw) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False, **kw), nn.BatchNorm2d(cout), nn.ReLU())


class SamePadConv(nn.Conv2d):
    """TensorFlow's "same" padding, computed from the input size (like timm's Conv2dSame)."""

    def forward(self, x):
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        ph = max((math.ceil(ih / self.stride[0]) - 1) * self.stride[0] + kh - ih, 0)
        pw = max((math.ceil(iw / self.stride[1]) - 1) * self.stride[1] + kw - iw, 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class ShapeControlFlow(nn.Module):
    """Branches on the input's size, "same" padding from the input size, a view whose
    channel count comes from ``x.shape``: the user's class still works after shrinking."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(SamePadConv(3, 16, 3, stride=2, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.dw = nn.Sequential(SamePadConv(16, 16, 3, stride=2, groups=16, bias=False), nn.BatchNorm2d(16),
                                nn.ReLU())
        self.big = conv_bn(16, 24)
        self.head = nn.Linear(24, 5)

    def forward(self, x):
        x = self.dw(self.stem(x))
        if x.shape[-1] >= 8:  # control flow on a shape
            x = F.max_pool2d(x, 2)
        x = self.big(x)
        b, c = x.shape[:2]
        x = x.view(b, c, -1).mean(-1)  # the channel count read from the shape
        return self.head(x)


class IterateTensors(nn.Module):
    """Iterates over a tensor (``for t in x.unbind(1)``), over a list of chunks and over the
    modules a shape picks; stacks and sums the results."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 32)
        self.branches = nn.ModuleList([conv_bn(16, 16) for _ in range(2)])
        self.mix = conv_bn(16, 24, 1)
        self.head = nn.Linear(24, 3)

    def forward(self, x):
        x = self.stem(x)
        parts = [branch(p) for branch, p in zip(self.branches, x.chunk(len(self.branches), 1))]
        y = sum(parts[1:], parts[0])
        for _ in range(x.shape[-1] // 8):  # a loop whose count comes from the input size
            y = y + parts[0]
        y = self.mix(y)
        pooled = torch.stack([t.mean((1, 2)) for t in y.unbind(1)], 1)  # iteration over a tensor
        return self.head(pooled)


class LiteralChannelSplit(nn.Module):
    """Holds a channel count in a Python attribute (``split((self.c, self.c))``, like
    YOLO's C2f) behind shape control flow: the shrunk user's class would split wrongly, so
    a GraphModule is returned, exact on the example's shape and refusing other shapes."""

    def __init__(self):
        super().__init__()
        self.c = 16
        self.cv1 = conv_bn(3, 2 * self.c, 1)
        self.cv2 = conv_bn(self.c, self.c)
        self.cv3 = conv_bn(2 * self.c, 8, 1)

    def forward(self, x):
        if x.shape[-1] > 4:
            x = F.avg_pool2d(x, 2)
        a, b = self.cv1(x).split((self.c, self.c), 1)
        return self.cv3(torch.cat([a, self.cv2(b)], 1))


def _not_symbolic(model: nn.Module) -> None:
    with pytest.raises(Exception):
        fx.symbolic_trace(model)


def _shrink(model: nn.Module, x: torch.Tensor):
    before = state_copy(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graph = ds.trace(model, x)
        small = ds.generate(model, x, ds.alive_masks(model, x))
    assert any(issubclass(w.category, SpecializedTraceWarning) for w in caught)
    assert not [w for w in caught if issubclass(w.category, ds.UnknownOpWarning)], \
        [str(w.message) for w in caught if issubclass(w.category, ds.UnknownOpWarning)]
    assert graph.traces[0].specialized
    assert states_equal(before, state_copy(model)), "the input model was changed"
    assert n_params(small) < n_params(model)
    with torch.no_grad():
        assert max_relative_error(model(x), small(x)) < TOLERANCE
    return small


@pytest.mark.parametrize("cls", [ShapeControlFlow, IterateTensors])
def test_shape_dependent_code_keeps_the_users_class(cls):
    torch.manual_seed(0)
    model = kill_half(cls()).eval()
    _not_symbolic(model)
    x = torch.randn(2, 3, 32, 32)
    small = _shrink(model, x)
    assert type(small) is cls
    # the user's own forward is general: another input size still gives the original's output
    other = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert max_relative_error(model(other), small(other)) < TOLERANCE


def test_literal_channel_count_gives_a_specialised_graph_module():
    torch.manual_seed(0)
    model = kill_half(LiteralChannelSplit()).eval()
    _not_symbolic(model)
    x = torch.randn(1, 3, 16, 16)
    small = _shrink(model, x)
    assert isinstance(small, fx.GraphModule)
    assert small.dnnshrink_specialized_to == [(1, 3, 16, 16)]
    with pytest.raises(ValueError, match="specialised to the example input"):
        small(torch.randn(1, 3, 8, 8))


def test_training_mode_model_is_recorded_without_changing_its_statistics():
    torch.manual_seed(0)
    model = kill_half(ShapeControlFlow()).train()
    before = state_copy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = ds.trace(model, torch.randn(2, 3, 32, 32))
    assert states_equal(before, state_copy(model))
    assert model.training and graph.summary()["removable"] > 0


def test_failing_model_names_both_failures():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = conv_bn(3, 4)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent, then a real error
                pass
            return self.conv(x).view(7, -1)

    with pytest.raises(ds.TraceError, match=r"running the model on example_inputs failed at `forward`.*\[7, -1\]"
                                            r".*torch.fx could not trace"):
        ds.trace(Broken(), torch.randn(1, 3, 8, 8))
