"""What the ImageNet-sized benches share: one quiet, reproducible torch set-up."""
from __future__ import annotations

import warnings

import torch


def imagenet_setup(threads: int = 2, seed: int = 0) -> torch.Tensor:
    """Fix torch's threads (the same as the ONNX Runtime sessions, so both sides compare
    fairly) and seed, silence library warnings, and return one 224×224 RGB example."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    warnings.simplefilter("ignore")
    return torch.randn(1, 3, 224, 224)
