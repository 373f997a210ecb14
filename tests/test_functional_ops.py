"""Functional ops on a module's own parameters, channels-last blocks, stack/unbind/chunk,
pixel shuffle and einsum, each through the invariant: channels whose BatchNorm scale and
shift are zero are removed and the outputs do not change (tests/test_invariant.py)."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import dnnshrink_core as ds
from dnnshrink_core.cost import CostModel
from dnnshrink_plugins.morphnet import morphnet_flops
from helpers import kill_half, max_relative_error, n_params, state_copy, states_equal
from models import conv_bn

TOLERANCE = 1e-4


class BatchNormAct2d(nn.BatchNorm2d):
    """Like timm's ``BatchNormAct2d``: a BatchNorm2d subclass whose forward calls
    ``F.batch_norm`` with its own parameters, then a fused activation."""

    def __init__(self, num_features: int, act: type = nn.ReLU):
        super().__init__(num_features)
        self.act = act()

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean if not self.training or self.track_running_stats else None,
                         self.running_var if not self.training or self.track_running_stats else None,
                         self.weight, self.bias, self.training, self.momentum, self.eps)
        return self.act(x)


class FunctionalConv2d(nn.Conv2d):
    """A Conv2d subclass that calls ``F.conv2d`` itself (like timm's same-padding convs)."""

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class BNActNet(nn.Module):
    """conv -> BatchNormAct2d (ReLU) -> functional depthwise conv -> BatchNormAct2d (SiLU)
    -> 1x1 functional conv -> BatchNormAct2d -> linear head."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = BatchNormAct2d(16)
        self.dw = FunctionalConv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.bn2 = BatchNormAct2d(16, nn.SiLU)
        self.pw = FunctionalConv2d(16, 24, 1)
        self.bn3 = BatchNormAct2d(24)
        self.fc = nn.Linear(24, 5)

    def forward(self, x):
        x = self.bn2(self.dw(self.bn1(self.conv1(x))))
        return self.fc(self.bn3(self.pw(x)).mean((2, 3)))


class DenseFunctionalNet(nn.Module):
    """Only dense functional convs, so no code constant changes: the result keeps the class."""

    def __init__(self):
        super().__init__()
        self.conv1 = FunctionalConv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = BatchNormAct2d(16)
        self.conv2 = FunctionalConv2d(16, 8, 1)
        self.bn2 = BatchNormAct2d(8, nn.SiLU)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.bn2(self.conv2(self.bn1(self.conv1(x)))))


class ChannelsLastBlock(nn.Module):
    """ConvNeXt-like: permute to NHWC, Linear over the channels, a BatchNorm on the hidden
    width, Linear back, a layer-scale ``gamma`` parameter, permute back, a BatchNorm (so
    that the residual stream's channels can be zero), residual add."""

    def __init__(self, dim: int = 16, hidden: int = 32):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.bn = nn.BatchNorm2d(hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.gamma = nn.Parameter(torch.rand(dim) + 0.5)
        self.bn_out = nn.BatchNorm2d(dim)

    def forward(self, x):
        y = self.fc1(x.permute(0, 2, 3, 1))
        y = F.gelu(self.bn(y.permute(0, 3, 1, 2))).permute(0, 2, 3, 1)
        y = self.gamma * self.fc2(y)
        return x + self.bn_out(y.permute(0, 3, 1, 2))


class ChannelsLastNet(nn.Module):
    """The channels-last block, a root-level NCHW layer scale, and a LayerNorm over the
    channels (channels-last) on a side branch."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.block = ChannelsLastBlock()
        self.side = conv_bn(16, 12)
        self.norm = nn.LayerNorm(12)
        self.scale = nn.Parameter(torch.rand(16) + 0.5)  # a root-level layer scale, NCHW
        self.head = nn.Linear(16 + 12, 5)

    def forward(self, x):
        x = self.block(self.stem(x)) * self.scale.view(1, -1, 1, 1)
        s = self.norm(self.side(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.head(torch.cat([x, s], 1).mean((2, 3)))


class StackUnbindNet(nn.Module):
    """Selective-kernel style: two paths stacked at dim 1 and summed; two more stacked at
    dim 0 and unbound."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.a, self.b = conv_bn(16, 16, 3), conv_bn(16, 16, 1)
        self.c, self.d = conv_bn(16, 8, 3), conv_bn(16, 8, 1)
        self.head = nn.Conv2d(24, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        paths = torch.stack([self.a(x), self.b(x)], dim=1)
        y = paths.sum(1)
        u, v = torch.stack([self.c(x), self.d(x)]).unbind(0)
        return self.head(torch.cat([y, u * v], 1))


class ChunkNet(nn.Module):
    """``chunk`` on the channel dim: the two halves are tied position by position; joined
    again by ``torch.concatenate``, which names its dim ``axis``."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.conv = conv_bn(16, 8)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        a, b = torch.chunk(self.stem(x), 2, dim=1)
        return self.head(self.conv(torch.concatenate([b, a], axis=1)) + a[:, :8])


class ShuffleUpsampleNet(nn.Module):
    """PixelShuffle (blocks of r² channels), PixelUnshuffle, nn.Upsample and F.interpolate."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 32)
        self.shuffle = nn.PixelShuffle(2)
        self.mid = conv_bn(8, 12)
        self.up = nn.Upsample(scale_factor=2)
        self.unshuffle = nn.PixelUnshuffle(2)
        self.head = nn.Conv2d(48, 4, 1)

    def forward(self, x):
        x = self.mid(self.shuffle(self.stem(x)))
        x = F.interpolate(self.up(x), scale_factor=0.5)
        return self.head(self.unshuffle(x))


class EinsumNet(nn.Module):
    """A squeeze-and-excitation gate applied with einsum (channels kept per index)."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.gate = nn.Linear(16, 16)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        s = torch.sigmoid(self.gate(x.mean((2, 3))))
        return self.head(torch.einsum("bchw,bc->bchw", x, s))


class LayerScaleNet(nn.Module):
    """Channels-first layer scales kept as ``(C, 1, 1)`` parameters on a residual stream
    (FastViT, SwiftFormer, PoolFormer), the mixer's output normalised over its channels
    (``F.normalize``, as in additive attention) and over space."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.mixer = conv_bn(16, 16)
        self.scale1 = nn.Parameter(torch.rand(16, 1, 1) + 0.5)
        self.mlp = nn.Sequential(conv_bn(16, 32), nn.Conv2d(32, 16, 1), nn.BatchNorm2d(16))
        self.scale2 = nn.Parameter(torch.rand(1, 16, 1, 1) + 0.5)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.scale1 * F.normalize(self.mixer(x), dim=1)
        x = x + F.normalize(self.mlp(x), dim=-1) * self.scale2
        return self.head(x)


class MatmulNet(nn.Module):
    """Channels-last features times a bare ``nn.Parameter`` (a projection stored as
    ``(in, out)``), as in attention blocks that keep a learned query vector."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.proj = nn.Parameter(torch.randn(16, 12) * 0.3)
        self.norm = nn.BatchNorm1d(12)
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        tokens = self.stem(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        y = tokens @ self.proj  # (B, HW, 12)
        y = torch.relu(self.norm(y.transpose(1, 2)))
        return self.head(y.mean(2))


class MmNet(MatmulNet):
    """The same projection as ``torch.mm`` of pooled features and the bare parameter."""

    def forward(self, x):
        y = torch.relu(self.norm(torch.mm(self.stem(x).mean((2, 3)), self.proj)))  # (B, 12)
        return self.head(y)


class ShapeSizedSE(EinsumNet):
    """The same gate written with sizes read from the input's shape (``b, c, _, _ =
    x.size()`` then ``view(b, c)``): the count follows the channels."""

    def forward(self, x):
        x = self.stem(x)
        b, c, _, _ = x.size()
        y = x.mean((2, 3)).view(b, c)
        y = torch.sigmoid(self.gate(y)).view(b, c, 1, 1)
        return self.head(x * y)


class TokenAttention(nn.Module):
    """Attention on a conv stream, as in hybrid nets: ``B, C, H, W = x.shape``, the heads
    split by a reshape that is not followed, the result reshaped back with ``C`` (so the
    stream must keep its width), an MLP on the tokens after it (its hidden width is free)."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.qkv = nn.Linear(16, 48)
        self.proj = nn.Linear(16, 16)
        self.fc1 = nn.Linear(16, 32)
        self.norm = nn.BatchNorm1d(32)
        self.fc2 = nn.Linear(32, 16)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        B, C, H, W = x.shape
        t = x.flatten(2).transpose(1, 2)  # (B, N, C)
        q, k, v = self.qkv(t).reshape(B, H * W, 3, 2, C // 2).permute(2, 0, 3, 1, 4).unbind(0)
        a = torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v
        t = self.proj(a.transpose(1, 2).reshape(B, H * W, C))
        h = torch.relu(self.norm(self.fc1(t).transpose(1, 2))).transpose(1, 2)
        t = t + self.fc2(h)
        return self.head(x + t.transpose(1, 2).reshape(B, C, H, W))


class PaddedTokens(nn.Module):
    """Channels-last features zero-padded in H and W (as patch-merging blocks do before a
    strided conv), then a Linear over the channels."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.fc = nn.Linear(16, 8)

    def forward(self, x):
        t = F.pad(self.stem(x).permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1))
        return self.fc(t).mean((1, 2))


MODELS = {
    "batchnorm_act": (BNActNet, (2, 3, 8, 8)),
    "channels_last_pad": (PaddedTokens, (2, 3, 8, 8)),
    "shape_sized_se": (ShapeSizedSE, (2, 3, 8, 8)),
    "layer_scale_normalize": (LayerScaleNet, (2, 3, 8, 8)),
    "matmul_parameter": (MatmulNet, (2, 3, 8, 8)),
    "mm_parameter": (MmNet, (2, 3, 8, 8)),
    "dense_functional": (DenseFunctionalNet, (2, 3, 8, 8)),
    "channels_last": (ChannelsLastNet, (2, 3, 8, 8)),
    "stack_unbind": (StackUnbindNet, (2, 3, 8, 8)),
    "chunk": (ChunkNet, (2, 3, 8, 8)),
    "shuffle_upsample": (ShuffleUpsampleNet, (2, 3, 8, 8)),
    "einsum": (EinsumNet, (2, 3, 8, 8)),
}


def shrink_dead_half(name: str, seed: int = 0):
    factory, shape = MODELS[name]
    torch.manual_seed(seed)
    model = kill_half(factory(), seed).eval()
    x = torch.randn(shape)
    before = state_copy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ds.UnknownOpWarning)  # every op here has a handler
        small = ds.generate(model, x, ds.alive_masks(model, x))
    assert states_equal(before, state_copy(model)), "the user's model was modified"
    return model, small, x


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_dead_channels_are_removed_exactly(name, seed):
    model, small, x = shrink_dead_half(name, seed)
    assert n_params(small) < n_params(model)
    with torch.no_grad():
        assert max_relative_error(model(x), small(x)) < TOLERANCE


def test_functional_batchnorm_is_a_source_sliced_in_its_module():
    model, small, x = shrink_dead_half("batchnorm_act")
    graph = ds.trace(model, x)
    assert {"bn1", "bn2", "bn3"} <= set(graph.source_modules)
    assert graph.group_of("conv1") is not None and graph.group_of("conv1").removable.all()
    # the depthwise conv's literal groups changed: a GraphModule (which keeps of a traced-through
    # module only the tensors its code reads) with the new groups in its code
    assert isinstance(small, fx.GraphModule)
    widths = {}
    for name in ("bn1", "bn2", "bn3"):
        weight = small.get_parameter(f"{name}.weight")
        assert weight.shape[0] < model.get_submodule(name).num_features
        assert small.get_buffer(f"{name}.running_mean").shape == small.get_parameter(f"{name}.bias").shape == weight.shape
        widths[name] = weight.shape[0]
    assert small.dw.weight.shape[:2] == (widths["bn1"], 1) and f", {widths['bn1']});" in small.code
    assert small.pw.weight.shape[1] == widths["bn2"] and small.fc.in_features == widths["bn3"]
    # MorphNet sees it: the regularizer, the cost model and the masks
    reg = morphnet_flops(graph, model)
    assert len(reg.source_gradients()) == len(graph.source_modules)
    assert {layer.name for layer in CostModel(graph, model).layers} >= {"conv1", "dw", "pw", "fc"}
    assert ds.alive_masks(model, x)[graph.group_of("conv1").name].sum() == widths["bn1"]


def test_dense_functional_convs_keep_the_users_class():
    model, small, x = shrink_dead_half("dense_functional")
    assert type(small) is DenseFunctionalNet
    assert type(small.conv1) is FunctionalConv2d and small.conv1.out_channels == small.conv1.weight.shape[0] < 16
    assert small.conv2.in_channels == small.conv1.out_channels == small.bn1.num_features
    assert type(small.bn2) is BatchNormAct2d and small.bn2.num_features == small.bn2.running_var.shape[0] < 8


def test_fused_activation_is_compensated():
    """A removed channel with gamma = 0 but beta != 0 carries act(beta) through the
    BatchNormAct2d's fused activation; the 1x1 conv after it gets that folded into its bias."""
    torch.manual_seed(0)
    model = kill_half(DenseFunctionalNet()).eval()
    with torch.no_grad():
        dead = model.bn2.weight == 0
        model.bn2.bias[dead] = 0.7  # SiLU(0.7) != 0
    x = torch.randn(2, 3, 8, 8)
    small = ds.generate(model, x, ds.alive_masks(model, x))
    assert small.head.in_channels < 8
    with torch.no_grad():
        assert max_relative_error(model(x), small(x)) < TOLERANCE
        plain = ds.generate(model, x, ds.alive_masks(model, x), compensate=False)
        assert max_relative_error(model(x), plain(x)) > 1e-2


def test_channels_last_block():
    model, small, x = shrink_dead_half("channels_last")
    graph = ds.trace(model, x)
    assert graph.group_of("block.fc1").removable.all()  # the hidden width, under a BatchNorm
    assert not graph.group_of("side.0").removable.any()  # LayerNorm over channels couples them
    assert graph.group_of("stem.0").removable.all()  # the residual stream with its layer scales
    assert small.block.fc1.out_features == small.block.bn.num_features < 32
    kept = small.stem[0].out_channels
    assert kept < 16 and small.block.gamma.shape == (kept,) and small.scale.shape == (kept,)
    assert small.block.fc2.out_features == small.block.fc1.in_features == kept
    assert type(small) is ChannelsLastNet


def test_pixel_shuffle_removes_whole_blocks():
    model, small, x = shrink_dead_half("shuffle_upsample")
    assert small.stem[0].out_channels % 4 == 0 and small.mid[0].in_channels * 4 == small.stem[0].out_channels
    assert small.head.in_channels == 4 * small.mid[0].out_channels < 48


def test_parameter_read_by_an_unknown_op_is_kept_whole():
    """A conv weight that another op also reads is never sliced (that op would get a
    tensor of the wrong size)."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = conv_bn(3, 8)
            self.conv = FunctionalConv2d(8, 8, 1, bias=False)
            self.bn = nn.BatchNorm2d(8)
            self.head = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            y = self.head(self.bn(self.conv(self.stem(x))))
            return y + torch.linalg.matrix_norm(self.conv.weight.flatten(1))

    torch.manual_seed(0)
    model = kill_half(Net()).eval()
    x = torch.randn(2, 3, 6, 6)
    with pytest.warns(ds.UnknownOpWarning, match="matrix_norm"):
        graph = ds.trace(model, x)
    assert not graph.group_of("conv").removable.any()
    assert not graph.group_of("stem.0").removable.any()
    small = ds.generate(model, x, ds.alive_masks(model, x))
    assert small.conv.weight.shape == model.conv.weight.shape
    with torch.no_grad():
        assert max_relative_error(model(x), small(x)) < TOLERANCE


def test_einsum_that_sums_over_channels_is_frozen():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = conv_bn(3, 8)

        def forward(self, x):
            y = self.stem(x)
            return torch.einsum("bchw,bdhw->bcd", y, y)

    model = kill_half(Net()).eval()
    graph = ds.trace(model, torch.randn(2, 3, 6, 6))
    assert not graph.group_of("stem.0").removable.any()
    assert any("einsum" in reason for reason in graph.group_of("stem.0").frozen_reasons)


def test_unused_root_parameter_is_named():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = conv_bn(3, 4)
            self.unused = nn.Parameter(torch.zeros(3))

        def forward(self, x):
            return self.body(x)

    with pytest.warns(ds.UntracedModuleWarning, match=r"\(<root>\.unused\)"):
        ds.trace(Net(), torch.randn(1, 3, 4, 4))


def test_layer_scales_and_projections_are_sliced_where_they_live():
    model, small, x = shrink_dead_half("layer_scale_normalize")
    kept = small.head.in_channels
    assert kept < 16 and small.scale1.shape == (kept, 1, 1) and small.scale2.shape == (1, kept, 1, 1)
    for name in ("matmul_parameter", "mm_parameter"):
        model, small, x = shrink_dead_half(name)
        assert small.proj.shape[0] < 16 and small.proj.shape[1] == small.norm.num_features < 12, name
    # the bare projection counts as a layer (its MACs are in the cost model)
    graph = ds.trace(model, x)
    assert "proj" in {layer.name for layer in CostModel(graph, model).layers}


def test_normalising_over_channels_keeps_channels_that_are_not_zero():
    """A channel that is not zero changes the norm of the others: it is never removed."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 1)  # no BatchNorm: its channels are never exactly zero
            self.head = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.head(F.normalize(self.conv(x), dim=1))

    model, x = Net().eval(), torch.randn(1, 3, 4, 4)
    graph = ds.trace(model, x)
    assert not graph.group_of("conv").removable.any()


def test_a_channel_count_read_from_a_shape_follows_the_channels_or_keeps_them():
    model, small, x = shrink_dead_half("shape_sized_se")
    assert small.gate.in_features == small.gate.out_features < 16  # view(b, c) follows the kept channels
    torch.manual_seed(0)
    model = kill_half(TokenAttention(), 0).eval()
    x = torch.randn(2, 3, 4, 4)
    graph = ds.trace(model, x)
    assert not graph.group_of("stem.0").removable.any()  # C sizes the attention's output: kept
    assert any("channel count read from" in r for r in graph.group_of("stem.0").frozen_reasons)
    assert graph.group_of("fc1").removable.all()  # the tokens' MLP after the unfollowed reshape
    # arithmetic on a count (the heads' width, C // 2) keeps those channels too

    class Halves(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = conv_bn(3, 16)
            self.head = nn.Conv2d(24, 4, 1)

        def forward(self, x):  # zero channels, half as many as x has, appended to it
            x = self.stem(x)
            b, c, h, w = x.shape
            return self.head(torch.cat([x, x.new_zeros(b, c // 2, h, w)], 1))

    halves = kill_half(Halves(), 0).eval()
    assert not ds.trace(halves, x).group_of("stem.0").removable.any()
    small = ds.generate(model, x, ds.alive_masks(model, x))
    assert small.fc1.out_features < 32 and small.stem[0].out_channels == 16
    with torch.no_grad():
        assert max_relative_error(model(x), small(x)) < TOLERANCE


class PartialResidual(nn.Module):
    """ReXNet's block: the input is added to the first ``in_channels`` outputs and the rest
    are concatenated; the slice bound is an attribute, so the generated code is rewritten."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, 2 * cout, 1, bias=False)
        self.bn1 = BatchNormAct2d(2 * cout)
        self.conv2 = nn.Conv2d(2 * cout, cout, 3, padding=1, bias=False)
        self.bn2 = BatchNormAct2d(cout, nn.Identity)
        self.in_channels = cin

    def forward(self, x):
        y = self.bn2(self.conv2(self.bn1(self.conv1(x))))
        return torch.cat([y[:, :self.in_channels] + x, y[:, self.in_channels:]], 1)


class PartialResidualNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = BatchNormAct2d(8)
        self.block = PartialResidual(8, 12)
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        return self.head(self.block(self.bn(self.stem(x))).mean((2, 3)))


def _both_modes_agree(reference: nn.Module, small: nn.Module, x: torch.Tensor) -> None:
    for training in (False, True, False):  # the training pass updates both networks' statistics
        reference.train(training)
        small.train(training)
        with torch.no_grad():
            assert max_relative_error(reference(x), small(x)) < TOLERANCE, f"training={training}"
    with torch.no_grad():  # in eval mode one image's output does not depend on the rest of the batch
        assert max_relative_error(small(x)[:1], small(x[:1])) < TOLERANCE


def test_a_model_handed_in_training_mode_is_exact_in_both_modes(tmp_path):
    """Code traced through that reads ``self.training`` (timm's BatchNormAct2d) holds the mode
    it was traced in. A network generated as a GraphModule (its code had a constant to
    rewrite) from a model in training mode used batch statistics in eval mode too; it now runs
    each mode's own graph, and survives deepcopy, pickle and the ONNX export's check."""
    import copy
    import pickle

    from dnnshrink_core.export import export

    model = kill_half(PartialResidualNet())  # left in training mode, as models come
    with torch.no_grad():  # three channels dead on both sides of the residual add
        for bn in (model.bn, model.block.bn2):
            bn.weight[:3] = 0.0
            bn.bias[:3] = 0.0
    x = torch.randn(4, 3, 8, 8)
    reference, before = copy.deepcopy(model), state_copy(model)
    small = ds.generate(model, x, ds.alive_masks(model, x))
    # tracing the training-mode graph ran F.batch_norm(training=True): the statistics are put back
    assert states_equal(before, state_copy(model)), "the user's model was modified"
    assert model.training and small.training
    assert n_params(small) < n_params(model)
    _both_modes_agree(reference, small, x)
    for copied in (copy.deepcopy(small), pickle.loads(pickle.dumps(small))):
        _both_modes_agree(copy.deepcopy(reference), copied, x)
    small.eval()
    export(small, x, "onnx", tmp_path / "small.onnx")  # raises ExportError if onnxruntime disagrees


def test_a_flag_read_that_changes_nothing_leaves_one_graph():
    """A model whose code reads ``training`` without changing its graph is traced once more
    to find that out and then keeps one graph (rewrites still allowed)."""
    graph = ds.trace(kill_half(BNActNet()).eval(), torch.randn(2, 3, 8, 8))
    assert len(graph.traces) == 2  # BatchNormAct2d's flag changes F.batch_norm's argument

    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            scale = 1.0 if self.training else 1.0
            return self.bn(self.conv(x)) * scale

    graph = ds.trace(Plain(), torch.randn(2, 3, 8, 8))
    assert len(graph.traces) == 1 and graph.traces[0].allow_rewrite
