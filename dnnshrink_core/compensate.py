"""Fold what removed channels still carried into the next layer's bias.

A channel whose BatchNorm scale is zero is not silent: it carries the constant
``act(beta)``. Removing it shifts every conv or linear layer that read it by
``sum_k W[o, c, k] · act(beta_c)``. This module measures the mean each removed input
channel has at such a layer (one forward pass of the original model, in eval mode, on the
example inputs) and adds the shift to the shrunk layer's bias, creating a bias where the
layer had none. Only channels whose scales are all at most ``max_gamma`` (MorphNet's alive
threshold, 1e-2 by default) count: they are constant up to that scale, so the example
inputs tell their value well; a channel cut for another reason (a magnitude ranking) is
not constant, and one batch of example inputs would be a poor estimate of its mean. For a
constant channel the fold is exact wherever the kernel does not overlap zero padding
(always for 1×1 convs and linear layers). Channels that carried exact zeros change
nothing.
"""
from __future__ import annotations

from typing import Any, Dict, List

import numpy as np
import torch
from torch import nn

from . import branches
from .graph import ChannelGraph, LayerCost
from .masks import DEFAULT_THRESHOLD
from .tracing import model_mode

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _candidates(model: nn.Module, graph: ChannelGraph, folded: np.ndarray) -> Dict[str, LayerCost]:
    """Conv/linear modules called once that read ``folded`` units (not depthwise, not transposed)."""
    layers = graph.layers()
    calls: Dict[str, int] = {}
    for layer in layers:
        calls[layer.name] = calls.get(layer.name, 0) + 1
    chosen = {}
    for layer in layers:
        if calls[layer.name] != 1 or layer.kind == "depthwise" or not folded[layer.in_units].any():
            continue
        if layer.weight != (f"{layer.name}.weight" if layer.name else "weight"):
            continue  # a function reads another parameter of the module: its input is not the module's
        try:
            module = model.get_submodule(layer.name)
        except AttributeError:
            continue
        if isinstance(module, nn.Linear) or (isinstance(module, _CONV) and module.padding_mode == "zeros"):
            chosen[layer.name] = layer
    return chosen


def _exactly_zero(model: nn.Module, graph: ChannelGraph, folded: np.ndarray) -> bool:
    """Whether every folded unit's sources have gamma = beta = 0 exactly: a removable unit
    reaches its consumers only through zero-preserving ops, so its channels then carry exact
    zeros and nothing is to be folded (no forward pass needed to measure it)."""
    if not folded.any():
        return True
    for idx, name in enumerate(graph.source_modules):
        sources = graph.src_module == idx
        channels = graph.src_channel[sources][folded[graph.src_unit[sources]]]
        if not len(channels):
            continue
        try:
            module = model.get_submodule(name)
        except AttributeError:
            return False  # a scale reached functionally: its shift lives elsewhere, measure instead
        for tensor in (getattr(module, "weight", None), getattr(module, "bias", None)):
            if isinstance(tensor, torch.Tensor) and tensor.detach()[torch.from_numpy(channels)].any():
                return False
    return True


def input_means(model: nn.Module, names: List[str], inputs: tuple) -> Dict[str, torch.Tensor]:
    """The mean of every input column (conv channel or linear feature) of each named layer,
    over batch and positions, from one eval-mode forward pass of ``model`` on ``inputs``."""
    means: Dict[str, torch.Tensor] = {}
    handles = []

    def hook(name: str):
        def record(module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            if isinstance(module, nn.Linear):
                means[name] = x.reshape(-1, x.shape[-1]).double().mean(0)
            else:
                means[name] = x.transpose(0, 1).reshape(x.shape[1], -1).double().mean(1)
        return record

    for name in names:
        handles.append(model.get_submodule(name).register_forward_pre_hook(hook(name)))
    try:
        with torch.no_grad(), model_mode(model, False):
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return means


def bias_shifts(model: nn.Module, graph: ChannelGraph, keep: np.ndarray, inputs: tuple,
                max_gamma: float = DEFAULT_THRESHOLD) -> Dict[str, torch.Tensor]:
    """Per layer name, the shift of every kept output that removing the dropped near-constant
    input channels causes; layers whose shift is exactly zero are left out."""
    # a unit no BatchNorm scales, or one a layer reads before its BatchNorm (which only a
    # weight ranking removes), is live where it is read: nothing to fold
    folded = ~keep & graph.unit_has_source & ~graph.unit_unguarded & (graph.unit_gammas(model) <= max_gamma)
    chosen = _candidates(model, graph, folded)
    if not chosen or _exactly_zero(model, graph, folded):
        return {}
    means = input_means(model, list(chosen), inputs)
    shifts = {}
    for name, layer in chosen.items():
        if name not in means:
            continue
        module = model.get_submodule(name)
        weight = module.weight.detach().double()
        groups = getattr(module, "groups", 1)
        removed = torch.from_numpy(folded[layer.in_units])
        if removed.numel() != weight.shape[1] * groups:
            continue  # the handler described the input differently from the weight's columns
        mean = torch.where(removed, means[name].cpu(), torch.zeros((), dtype=torch.float64))
        if not mean.any():
            continue
        per_column = weight.flatten(2).sum(2).cpu() if weight.dim() > 2 else weight.cpu()
        out_per_group, in_per_group = per_column.shape[0] // groups, per_column.shape[1]
        shift = torch.cat([per_column[g * out_per_group:(g + 1) * out_per_group]
                           @ mean[g * in_per_group:(g + 1) * in_per_group] for g in range(groups)])
        kept = torch.from_numpy(keep[layer.out_units])
        if kept.numel() == shift.numel():
            shift = shift[kept]
        if shift.any():
            shifts[name] = shift
    return shifts


def apply_shifts(shrunk: nn.Module, shifts: Dict[str, torch.Tensor]) -> None:
    """Add each shift to the shrunk layer's bias, creating the bias if needed."""
    for name, delta in shifts.items():
        try:
            module = shrunk.get_submodule(name)
        except AttributeError:  # in a residual branch that was dropped whole
            continue
        if delta.numel() != module.weight.shape[0]:
            continue
        with torch.no_grad():
            delta = delta.to(dtype=module.weight.dtype, device=module.weight.device)
            if module.bias is None:
                module.bias = nn.Parameter(delta.clone(), requires_grad=module.weight.requires_grad)
            else:
                module.bias.add_(delta)


def compensate(original: nn.Module, shrunk: nn.Module, graph: ChannelGraph, keep: np.ndarray,
               inputs: Any, max_gamma: float = DEFAULT_THRESHOLD) -> List[str]:
    """Fold the removed near-constant channels' means into ``shrunk``'s biases; returns the
    layers changed."""
    shifts = bias_shifts(original, graph, keep, tuple(inputs), max_gamma)
    apply_shifts(shrunk, shifts)
    return sorted(shifts) + _dropped_constants(original, shrunk, graph, keep, max_gamma)


def _dropped_constants(original: nn.Module, shrunk: nn.Module, graph: ChannelGraph, keep: np.ndarray,
                       max_gamma: float) -> List[str]:
    """A residual branch dropped whole (:mod:`.branches`) whose cut channels were near-constant
    rather than zero leaves what they carried: its constant becomes the branch's output with
    the model's own scales (the mean over positions). Returns the constants changed."""
    hit = branches.dropped(graph, keep)
    if not hit:
        return []
    settled = branches.settle(graph, keep)
    gammas = graph.unit_gammas(original)
    chosen = [b for b in hit if hasattr(shrunk, branches.parameter_name(b))
              and any(graph.unit_has_source[graph.groups[g].units].all()
                      and (gammas[graph.groups[g].units] <= max_gamma).all() for g in b.own)]
    if not chosen:
        return []
    values, _ = branches.constants(graph, original, settled, zero=False)
    changed = []
    for b in chosen:
        if b in values:
            target = getattr(shrunk, branches.parameter_name(b))
            with torch.no_grad():
                target.copy_(values[b].to(target))
            changed.append(branches.parameter_name(b))
    return changed
