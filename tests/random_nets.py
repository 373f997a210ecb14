"""Random CNNs for property tests: a program of channel-changing steps, run by one module."""
from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn


def conv_bn(cin: int, cout: int, k: int, groups: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU())


class Program(nn.Module):
    """Runs ``steps`` in order on one tensor; each step may hold modules in ``layers``.

    Steps: ``("conv", cout, k, groups)``, ``("depthwise", k)``, ``("residual", k)``,
    ``("concat", extra)``, ``("slice", keep)``, ``("pad", front, back)``, ``("pool", kind)``.
    The head is ``flatten`` (or a literal ``view``) then a linear layer.
    """

    def __init__(self, steps: List[Tuple], channels: int, literal_view: bool, size: int = 8):
        super().__init__()
        self.steps = steps
        self.literal_view = literal_view
        self.layers = nn.ModuleList()
        c, s = channels, size
        for step in steps:
            kind = step[0]
            if kind == "conv":
                _, cout, k, groups = step
                self.layers.append(conv_bn(c, cout, k, groups))
                c = cout
            elif kind == "depthwise":
                self.layers.append(conv_bn(c, c, step[1], c))
            elif kind == "residual":
                self.layers.append(nn.Sequential(nn.Conv2d(c, c, step[1], padding=step[1] // 2, bias=False),
                                                 nn.BatchNorm2d(c)))
            elif kind == "concat":
                self.layers.append(conv_bn(c, step[1], 3, 1))
                c += step[1]
            elif kind == "slice":
                self.layers.append(nn.Identity())
                c = step[1]
            elif kind == "pad":
                self.layers.append(nn.Identity())
                c += step[1] + step[2]
            elif kind == "pool":
                self.layers.append(nn.Identity())
                s = s // 2
        self.features = c * s * s
        self.fc = nn.Linear(self.features, 5)

    def forward(self, x):
        for step, layer in zip(self.steps, self.layers):
            kind = step[0]
            if kind in ("conv", "depthwise"):
                x = layer(x)
            elif kind == "residual":
                x = F.relu(x + layer(x))
            elif kind == "concat":
                x = torch.cat([x, layer(x)], 1)
            elif kind == "slice":
                x = x[:, : step[1]]
            elif kind == "pad":
                x = F.pad(x, (0, 0, 0, 0, step[1], step[2]))
            elif kind == "pool":
                x = F.max_pool2d(x, 2) if step[1] == "max" else F.avg_pool2d(x, 2)
        x = x.view(-1, self.features) if self.literal_view else torch.flatten(x, 1)
        return self.fc(x)


@st.composite
def programs(draw, max_steps: int = 6):
    """A random :class:`Program` (its steps, input channels and head)."""
    channels = draw(st.integers(2, 6))
    c, size, steps = channels, 8, []
    # the first step makes channels with a BatchNorm, so there is something to prune
    first = draw(st.sampled_from([4, 6, 8, 12]))
    steps.append(("conv", first, 3, 1))
    c = first
    for _ in range(draw(st.integers(0, max_steps))):
        kind = draw(st.sampled_from(["conv", "grouped", "depthwise", "residual", "concat", "slice", "pad", "pool"]))
        if kind == "conv":
            cout = draw(st.sampled_from([4, 6, 8, 12]))
            steps.append(("conv", cout, draw(st.sampled_from([1, 3])), 1))
            c = cout
        elif kind == "grouped":
            groups = draw(st.sampled_from([g for g in (2, 3, 4) if c % g == 0] or [1]))
            cout = groups * draw(st.integers(1, 4))
            steps.append(("conv", cout, 3, groups))
            c = cout
        elif kind == "depthwise":
            steps.append(("depthwise", draw(st.sampled_from([1, 3]))))
        elif kind == "residual":
            steps.append(("residual", draw(st.sampled_from([1, 3]))))
        elif kind == "concat":
            extra = draw(st.integers(2, 6))
            steps.append(("concat", extra))
            c += extra
        elif kind == "slice" and c > 2:
            keep = draw(st.integers(1, c - 1))
            steps.append(("slice", keep))
            c = keep
        elif kind == "pad":
            front, back = draw(st.integers(0, 3)), draw(st.integers(1, 3))
            steps.append(("pad", front, back))
            c += front + back
        elif kind == "pool" and size > 2:
            steps.append(("pool", draw(st.sampled_from(["max", "avg"]))))
            size //= 2
    return steps, channels, draw(st.booleans())
