"""Hand-written models, one per depth-change handler, used by the invariant tests."""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class LiteralView(nn.Module):
    """LeNet with the classic literal ``x.view(-1, 16 * 5 * 5)``."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 6, 5), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 16, 5), nn.BatchNorm2d(16)
        self.fc1, self.bn3 = nn.Linear(16 * 5 * 5, 120), nn.BatchNorm1d(120)
        self.fc2 = nn.Linear(120, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = x.view(-1, 16 * 5 * 5)
        return self.fc2(F.relu(self.bn3(self.fc1(x))))


class LambdaLayer(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class BasicBlockA(nn.Module):
    """CIFAR ResNet block with the parameter-free "option A" shortcut (channel zero-pad)."""

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False), nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != planes:
            pad = planes // 4
            self.shortcut = LambdaLayer(lambda x: F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, pad, pad), "constant", 0))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ChannelPadResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.layer1 = nn.Sequential(BasicBlockA(16, 16), BasicBlockA(16, 16))
        self.layer2 = nn.Sequential(BasicBlockA(16, 32, 2), BasicBlockA(32, 32))
        self.layer3 = nn.Sequential(BasicBlockA(32, 64, 2))
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class PadModuleNet(nn.Module):
    """Channel padding with ``nn.ConstantPad3d`` (pads W, H and C of a 4-D input)."""

    def __init__(self):
        super().__init__()
        self.a = conv_bn(3, 8)
        self.pad = nn.ConstantPad3d((0, 0, 0, 0, 2, 6), 0.0)
        self.b = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16))
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = self.a(x)
        return self.head(F.relu(self.pad(x) + self.b(x)))


class ConcatNet(nn.Module):
    """Inception-style branches joined by ``torch.cat`` and a DenseNet-style growing concat."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 12)
        self.b1 = conv_bn(12, 8, 1)
        self.b2 = nn.Sequential(conv_bn(12, 6, 1), conv_bn(6, 10))
        self.b3 = nn.Sequential(nn.MaxPool2d(3, 1, 1), conv_bn(12, 4, 1))
        self.dense1 = nn.Sequential(nn.BatchNorm2d(22), nn.ReLU(), nn.Conv2d(22, 6, 3, padding=1, bias=False))
        self.dense2 = nn.Sequential(nn.BatchNorm2d(28), nn.ReLU(), nn.Conv2d(28, 6, 3, padding=1, bias=False))
        self.final = nn.Sequential(nn.BatchNorm2d(34), nn.ReLU())
        self.fc = nn.Linear(34, 5)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([self.b1(x), self.b2(x), self.b3(x)], 1)
        x = torch.cat([x, self.dense1(x)], dim=1)
        x = torch.cat([x, self.dense2(x)], dim=1)
        return self.fc(self.final(x).mean((2, 3)))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, expand: int, stride: int = 1, multiplier: int = 1):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.block = nn.Sequential(
            conv_bn(cin, hidden, 1),
            nn.Conv2d(hidden, hidden * multiplier, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden * multiplier), nn.ReLU6(inplace=True),
            nn.Conv2d(hidden * multiplier, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return x + self.block(x) if self.use_res else self.block(x)


class DepthwiseNet(nn.Module):
    """MobileNetV2-style inverted residuals (depthwise convs), one with a depth multiplier."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 16, stride=2)
        self.blocks = nn.Sequential(InvertedResidual(16, 16, 4), InvertedResidual(16, 24, 3, 2, multiplier=2),
                                    InvertedResidual(24, 24, 4))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(24, 7))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


class GroupedNet(nn.Module):
    """ResNeXt-style bottlenecks with grouped 3x3 convs."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 32)
        self.reduce = conv_bn(32, 32, 1)
        self.grouped = conv_bn(32, 32, 3, groups=4)
        self.expand = nn.Sequential(nn.Conv2d(32, 32, 1, bias=False), nn.BatchNorm2d(32))
        self.grouped2 = nn.Sequential(nn.Conv2d(32, 48, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(48))
        self.fc = nn.Linear(48, 3)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.expand(self.grouped(self.reduce(x))))
        x = F.relu(self.grouped2(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, squeeze: int):
        super().__init__()
        self.fc1 = nn.Conv2d(c, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, c, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        s = torch.sigmoid(self.fc2(F.silu(self.fc1(s))))
        return x * s


class SENet(nn.Module):
    """Channel gating (squeeze-and-excitation) inside a residual block."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 24)
        self.body = nn.Sequential(nn.Conv2d(24, 24, 3, padding=1, bias=False), nn.BatchNorm2d(24), nn.SiLU())
        self.se = SqueezeExcite(24, 6)
        self.proj = nn.Sequential(nn.Conv2d(24, 24, 1, bias=False), nn.BatchNorm2d(24))
        self.fc = nn.Linear(24, 4)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.proj(self.se(self.body(x)))
        return self.fc(x.mean([2, 3]))


class DictOutputNet(nn.Module):
    """Returns a dict of a classification and a dense output (like a detector)."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(conv_bn(3, 16), conv_bn(16, 32, stride=2))
        self.cls = nn.Linear(32, 5)
        self.dense = nn.Conv2d(32, 2, 1)

    def forward(self, x):
        f = self.backbone(x)
        return OrderedDict(logits=self.cls(f.mean((2, 3))), heatmap=self.dense(f), features=[f.sum((1,))])


class BackboneOnlyNet(nn.Module):
    """The manual's ``back_bone_only``: True makes forward return the backbone's output."""

    def __init__(self):
        super().__init__()
        self.back_bone_only = False
        self.backbone = nn.Sequential(conv_bn(3, 16), conv_bn(16, 24), conv_bn(24, 32))
        self.up = nn.Sequential(nn.Upsample(scale_factor=2.0), conv_bn(32, 16), nn.Conv2d(16, 3, 1))
        self.lateral = conv_bn(24, 16, 1)

    def forward(self, x):
        f1 = self.backbone[1](self.backbone[0](x))
        y = self.backbone[2](f1)
        if self.back_bone_only:
            return y
        heat = self.up(y)
        return heat, self.lateral(f1)


class GenerateGraphNet(nn.Module):
    """The manual's ``generate_graph``: True makes forward return one tensor; a second head
    (``aux``) is only called in full mode."""

    def __init__(self):
        super().__init__()
        self.generate_graph = False
        self.body = nn.Sequential(conv_bn(3, 16), conv_bn(16, 32))
        self.main = nn.Conv2d(32, 4, 1)
        self.aux = nn.Sequential(conv_bn(32, 8), nn.Conv2d(8, 2, 1))

    def forward(self, x):
        f = self.body(x)
        out = self.main(f)
        if self.generate_graph:
            return out
        return {"main": out, "aux": self.aux(f)}


class ThreeConvNet(nn.Module):
    """Three convs and a head; subclasses put an op between the first two."""

    def __init__(self):
        super().__init__()
        self.a = conv_bn(3, 16)
        self.b = conv_bn(16, 16)
        self.c = conv_bn(16, 8)
        self.fc = nn.Linear(8, 3)


class UnknownOpNet(ThreeConvNet):
    """A cumulative sum over the channels (`torch.cumsum`) that no default handler understands."""

    def forward(self, x):
        x = torch.cumsum(self.a(x), dim=1)
        return self.fc(self.c(self.b(x)).mean((2, 3)))


class ChannelAttentionNet(ThreeConvNet):
    """Attention over the channels with batched matrix products (`torch.bmm`, `baddbmm`)."""

    def forward(self, x):
        x = self.a(x)
        n, c, h, w = x.shape
        flat = x.flatten(2)
        scores = torch.baddbmm(flat.new_zeros(n, c, c), flat, flat.transpose(1, 2), alpha=1.0 / h)
        x = torch.bmm(torch.softmax(scores, dim=-1), flat).view(n, c, h, w)  # (n, c, c) @ (n, c, hw)
        return self.fc(self.c(self.b(x)).mean((2, 3)))


class SliceSplitChunkNet(nn.Module):
    """Literal channel slices, literal ``split`` sizes and a ``chunk`` (GLU-style gate)."""

    def __init__(self):
        super().__init__()
        self.a = conv_bn(3, 24)
        self.left = conv_bn(16, 8)
        self.right = conv_bn(8, 8)
        self.gate = nn.Sequential(nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.s1, self.s2 = conv_bn(6, 4), conv_bn(10, 4)
        self.fc = nn.Linear(8 + 8, 2)

    def forward(self, x):
        x = self.a(x)
        y = self.left(x[:, :16]) + self.right(x[:, 16:])
        p, q = torch.chunk(self.gate(torch.cat([y, y], 1)), 2, dim=1)
        g = p * torch.sigmoid(q)
        u, v = g.split([6, 2], dim=1)
        w = torch.cat([self.s1(torch.cat([u, g[:, 6:]], 1)[:, :6]), self.s2(torch.cat([u, v, v], 1))], 1)
        return self.fc(torch.cat([w, g], 1).amax((2, 3)))


class MixedConvNet(nn.Module):
    """A conv split over channel pieces whose outputs are concatenated and joined to a
    residual (timm's ``MixedConv2d`` in MixNet): each piece's layer is only part of a group."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.pieces = nn.ModuleList([nn.Conv2d(4, 6, 1, bias=False), nn.Conv2d(4, 6, 3, padding=1, bias=False)])
        self.bn = nn.BatchNorm2d(12)
        self.proj = conv_bn(8, 12, 1)
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        x = self.stem(x)
        parts = torch.split(x, [4, 4], 1)
        y = self.bn(torch.cat([conv(parts[i]) for i, conv in enumerate(self.pieces)], 1)) + self.proj(x)
        return self.fc(y.mean((2, 3)))


class TransposedNet(nn.Module):
    """Encoder-decoder with transposed convs (dense and depthwise) and 1-D convs."""

    def __init__(self):
        super().__init__()
        self.enc = conv_bn(3, 16, stride=2)
        self.dec = nn.Sequential(nn.ConvTranspose2d(16, 12, 2, 2, bias=False), nn.BatchNorm2d(12), nn.ReLU())
        self.dw = nn.Sequential(nn.ConvTranspose2d(12, 12, 3, 1, 1, groups=12, bias=False), nn.BatchNorm2d(12),
                                nn.PReLU(12))
        self.seq = nn.Sequential(nn.Conv1d(12, 10, 3, padding=1, bias=False), nn.BatchNorm1d(10), nn.GELU())
        self.out = nn.Conv1d(10, 3, 1)

    def forward(self, x):
        x = self.dw(self.dec(self.enc(x)))
        return self.out(self.seq(x.flatten(2)))


class SharedAndAuxNet(nn.Module):
    """A conv called twice, and an auxiliary head that only runs in training mode."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.shared = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.aux = nn.Linear(16, 3)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        x = self.stem(x)
        y = self.shared(self.shared(x))
        out = self.fc(y.mean((2, 3)))
        if self.training:
            return out, self.aux(x.mean((2, 3)))
        return out


# name -> (factory, input shape)
HANDWRITTEN = {
    "literal_view": (LiteralView, (2, 3, 32, 32)),
    "channel_pad_shortcut": (ChannelPadResNet, (2, 3, 16, 16)),
    "pad_module": (PadModuleNet, (2, 3, 8, 8)),
    "concat": (ConcatNet, (2, 3, 12, 12)),
    "depthwise": (DepthwiseNet, (2, 3, 16, 16)),
    "grouped": (GroupedNet, (2, 3, 10, 10)),
    "squeeze_excitation": (SENet, (2, 3, 10, 10)),
    "dict_output": (DictOutputNet, (2, 3, 12, 12)),
    "backbone_only": (BackboneOnlyNet, (2, 3, 8, 8)),
    "generate_graph": (GenerateGraphNet, (2, 3, 8, 8)),
    "unknown_op": (UnknownOpNet, (2, 3, 6, 6)),
    "channel_attention": (ChannelAttentionNet, (2, 3, 6, 6)),
    "slice_split_chunk": (SliceSplitChunkNet, (2, 3, 8, 8)),
    "transposed_and_1d": (TransposedNet, (2, 3, 8, 8)),
    "shared_and_aux": (SharedAndAuxNet, (2, 3, 8, 8)),
    "mixed_conv": (MixedConvNet, (2, 3, 8, 8)),
}
