"""Models torch.fx cannot trace symbolically (control flow on shapes, iteration over tensors,
``x.shape`` arithmetic): they are recorded by running them on the example input, and go
through the invariant like every other model (killed channels -> exact outputs, the input
model untouched)."""
from __future__ import annotations

import copy
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


class DetectionHead(nn.Module):
    """A detector's tail in miniature: shape control flow (so torch.fx fails), then scores
    above a threshold and the best ``min(k, n)`` of them, sizes set by the values."""

    def __init__(self, select=lambda s: s[s > 0.5], literal: bool = False):
        super().__init__()
        self.body = conv_bn(3, 16)
        self.head = nn.Conv2d(16, 4, 1)
        self.select, self.literal = select, literal

    def forward(self, x):
        y = self.body(x)
        if self.literal:  # channel counts held in the code, as LiteralChannelSplit's
            a, b = y.split((8, 8), 1)
            y = torch.cat([b, a], 1)
        s = self.head(y).flatten()
        if s.shape[0] == 0:
            return s
        s = self.select(s)
        return s.topk(min(50, s.shape[0])).values


def test_sizes_set_by_the_values_give_the_users_class_recorded_again_for_new_weights(tmp_path):
    """torchvision's detection post-processing in miniature: the recorded graph holds the
    example's count of boxes, right for that input and those weights alone. The graph is
    recorded again once the weights change (a graph cached before the channels were killed
    is not reused), and the generated network is the user's own class, right on any input."""
    torch.manual_seed(0)
    model, x = DetectionHead().eval(), torch.randn(1, 3, 8, 8)
    with pytest.warns(SpecializedTraceWarning, match=r"depend on the example's values \(`boolean mask`\)"):
        first = ds.trace(model, x)
    assert first.data_sized == ["`boolean mask`"]
    kill_half(model)  # as training would: the scores, and so the count of them, change
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SpecializedTraceWarning)
        masks = ds.alive_masks(model, x)
        assert masks.graph is not first  # recorded again for the new weights
        small = ds.generate(model, x, masks)
    assert type(small) is DetectionHead and n_params(small) < n_params(model)
    with torch.no_grad():
        for other in (x, torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(5))):
            expected, got = model(other), small(other)
            assert got.shape == expected.shape and max_relative_error(expected, got) < TOLERANCE
    with pytest.raises(ds.ExportError, match="depend on its input's values"):
        ds.export(small, x, "pytorch", tmp_path / "head.dnnshrink")
    assert not list(tmp_path.iterdir())  # refused before anything was written


@pytest.mark.parametrize("select, words", [
    (lambda s: s[torch.nonzero(s > 0.5).flatten()], "`nonzero`"),
    (lambda s: s[torch.where(s > 0.5)[0]], "`where`"),
    (lambda s: torch.masked_select(s, s > 0.5), "`masked_select`"),
    (lambda s: s.repeat_interleave((s > 0.5).long()), "`repeat_interleave`"),
    (lambda s: s[torch.repeat_interleave((s > 0.5).long())], "`repeat_interleave`"),  # the counts alone
])
def test_every_op_that_sizes_by_values_is_noticed(select, words):
    model, x = kill_half(DetectionHead(select)).eval(), torch.randn(1, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SpecializedTraceWarning)
        graph = ds.trace(model, x)
    assert words in graph.data_sized[0]


def test_a_value_sized_model_whose_class_cannot_take_the_new_widths_is_refused():
    """Neither network would be right: the recorded graph only for the example, the user's
    class not at all (its forward holds a channel count). A clear error, nothing returned."""
    model, x = kill_half(DetectionHead(literal=True)).eval(), torch.randn(1, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SpecializedTraceWarning)
        with pytest.raises(ds.GenerationError, match=r"depend on its input's values \(`boolean mask`\).*"
                                                     r"only your model's own class can be generated.*RuntimeError"):
            ds.generate(model, x, ds.alive_masks(model, x))


def test_a_three_argument_where_does_not_size_by_values():
    model, x = DetectionHead(lambda s: torch.where(s > 0.5, s, 0.0)).eval(), torch.randn(1, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SpecializedTraceWarning)
        assert ds.trace(model, x).data_sized == []


def test_removing_channels_whose_scales_are_small_but_not_zero_still_gives_the_users_class():
    """MorphNet leaves small scales, not zeros: cutting them moves scores across the
    threshold, so the recording (and its count of scores) is no reference; the user's class
    is generated, and equals the model with exactly those channels zeroed, on any input."""
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    others = [torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(s)) for s in range(2, 5)]
    for seed in range(12):
        torch.manual_seed(seed)
        model = DetectionHead().eval()
        with torch.no_grad():
            model.body[1].weight.copy_(torch.rand(16))  # scales spread over (0, 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SpecializedTraceWarning)
            masks = ds.alive_masks(model, x, threshold=0.3)
            # (compensate would fold the mean of what the live channels carried on the example)
            small = ds.generate(model, x, masks, compensate=False)
        assert type(small) is DetectionHead
        cut = ~torch.as_tensor(masks[ds.trace(model, x).group_of("body.0").name])
        killed = copy.deepcopy(model)
        with torch.no_grad():
            killed.body[1].weight[cut] = 0.0
            killed.body[1].bias[cut] = 0.0
            for other in [x] + others:
                expected, got = killed(other), small(other)
                assert got.shape == expected.shape and max_relative_error(expected, got) < TOLERANCE


def test_a_value_sized_graph_is_recorded_again_for_what_its_sizes_depend_on():
    """Its weights (written through .data too, which bumps no version), the example's values,
    and the plain settings its modules hold (a detector's score threshold)."""
    model, x = kill_half(DetectionHead()).eval(), torch.randn(1, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SpecializedTraceWarning)
        first = ds.trace(model, x)
        assert ds.trace(model, x) is first  # nothing changed: cached
        model.head.weight.data.mul_(-3)
        second = ds.trace(model, x)
        assert second is not first
        assert ds.trace(model, x) is second
        assert ds.trace(model, x + 1) is not second  # another example of the same shape
        third = ds.trace(model, x)
        model.threshold = 0.25  # a setting held on the model
        assert ds.trace(model, x) is not third
