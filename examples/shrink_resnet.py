"""Shrink a torchvision ResNet-18 whose BatchNorms have half of their channels dead.

This shows the generator on a real network: after ``gamma = beta = 0`` on a random half of
every BatchNorm's channels, ``generate`` removes those channels for real and the outputs
stay the same.

    python examples/shrink_resnet.py [--model resnet18] [--size 224]
"""
from __future__ import annotations

import argparse
import time

import torch
import torchvision
from torch import nn

import dnnshrink_core as ds


def kill_half(model: nn.Module, seed: int = 0) -> None:
    """Zero gamma and beta of a random half of every BatchNorm's channels."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                dead = torch.randperm(m.num_features, generator=g)[: m.num_features // 2]
                m.weight[dead] = 0.0
                m.bias[dead] = 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = torchvision.models.get_model(args.model, weights=None).eval()
    kill_half(model)
    x = torch.randn(1, 3, args.size, args.size)

    start = time.perf_counter()
    graph = ds.trace(model, x)
    masks = ds.alive_masks(model, x)
    small = ds.generate(model, x, masks)
    seconds = time.perf_counter() - start

    print(graph)
    with torch.no_grad():
        a, b = model(x), small(x)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    print(f"\n{args.model}: {n(model):,} -> {n(small):,} parameters "
          f"({masks.fraction_kept():.0%} of channel units kept) in {seconds:.2f} s")
    print(f"relative output difference: {((a - b).norm() / a.norm()).item():.2e}")


if __name__ == "__main__":
    main()
