"""The plugin's own layer: a fused conv + BatchNorm + ReLU block, kept whole by the tracer."""
import torch
from torch import nn


class FusedConvBNAct(nn.Module):
    """Conv, BatchNorm and ReLU in one module (as fused inference kernels ship them)."""

    def __init__(self, cin: int, cout: int, k: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = FusedConvBNAct(3, 16)
        self.b = FusedConvBNAct(16, 32)
        self.up = nn.Upsample(scale_factor=2.0)
        self.fc = nn.Linear(32, 4)

    def forward(self, x):
        return self.fc(self.up(self.b(self.a(x))).mean((2, 3)))
