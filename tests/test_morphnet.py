"""MorphNet: the regularizer's gradient against autograd, its hooks, the width rules."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import dnnshrink_core as ds
from dnnshrink_plugins.morphnet import HeldScales, enforce_widths, expand_to_budget, morphnet_flops, morphnet_size
from models import HANDWRITTEN


def bn_weights(model):
    return [m.weight for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def autograd_penalty_grads(reg, graph, model):
    """The penalty written with torch ops (alive counts held constant), differentiated by autograd."""
    weights = torch.from_numpy(reg.unit_weights(reg.alive()))
    values, units = [], []
    for idx, name in enumerate(graph.source_modules):
        mask = graph.src_module == idx
        values.append(model.get_submodule(name).weight.abs()[torch.from_numpy(graph.src_channel[mask])])
        units.append(torch.from_numpy(graph.src_unit[mask]))
    unit_gamma = torch.zeros(graph.num_units, dtype=values[0].dtype).scatter_reduce(
        0, torch.cat(units), torch.cat(values), reduce="amax", include_self=False)
    penalty = (weights.to(unit_gamma.dtype) * unit_gamma).sum()
    params = [model.get_submodule(n).weight for n in graph.source_modules]
    return penalty, torch.autograd.grad(penalty, params)


@pytest.mark.parametrize("name", ["channel_pad_shortcut", "concat", "depthwise", "grouped", "literal_view",
                                  "squeeze_excitation", "slice_split_chunk"])
@pytest.mark.parametrize("init", ["random", "ones"])
def test_gradient_matches_autograd_of_the_penalty(name, init):
    factory, shape = HANDWRITTEN[name]
    model, x = factory().train(), torch.randn(shape)
    if init == "random":  # "ones" is PyTorch's init: every tied source is a maximum
        with torch.no_grad():
            for w in bn_weights(model):
                w.copy_(torch.randn_like(w))
                w[0] = 1e-3  # below the threshold: dead
    graph = ds.trace(model, x)
    reg = morphnet_flops(graph, model, strength=1.0)
    penalty, expected = autograd_penalty_grads(reg, graph, model)
    got = reg.source_gradients()
    assert reg.last_penalty == pytest.approx(penalty.item(), rel=1e-5)
    for i, g in enumerate(expected):
        torch.testing.assert_close(got[i], g, rtol=1e-5, atol=1e-6)


def test_cost_model_equals_counted_macs_and_size():
    for name in ("channel_pad_shortcut", "depthwise", "grouped", "concat"):
        factory, shape = HANDWRITTEN[name]
        model, x = factory().eval(), torch.randn(shape[0] // shape[0], *shape[1:])
        graph = ds.trace(model, x)
        macs = ds.layer_report(model, x).totals["macs_before"]
        assert morphnet_flops(graph, model).initial_cost == macs
        weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
        assert morphnet_size(graph, model).initial_cost == weights


def test_hook_adds_the_gradient_at_each_optimizer_step_and_is_removed():
    factory, shape = HANDWRITTEN["depthwise"]
    model, x = factory().eval(), torch.randn(shape)  # eval: no dropout noise between the passes
    graph = ds.trace(model, x)
    reg = morphnet_flops(graph, model, strength=1e-3)
    params = [model.get_submodule(n).weight for n in graph.source_modules]

    def step():
        """One SGD step (lr 1) from the same weights; returns how far each scale moved."""
        state = {k: v.clone() for k, v in model.state_dict().items()}
        before = [p.detach().clone() for p in params]
        model.zero_grad()
        model(x).square().mean().backward()
        torch.optim.SGD(model.parameters(), lr=1.0).step()
        moved = [b - p.detach() for b, p in zip(before, params)]
        model.load_state_dict(state)  # every weight back, for the next step
        return moved

    plain = step()
    expected = reg.source_gradients()
    with reg.attach() as handle:
        assert handle.active == 1
        hooked = step()
    assert handle.active == 0 and reg.steps == 1
    for i, (a, b) in enumerate(zip(plain, hooked)):
        torch.testing.assert_close(b - a, expected[i])
    after = step()
    for a, b in zip(plain, after):
        torch.testing.assert_close(a, b)


def test_held_scales_stay_at_zero_through_momentum_and_weight_decay():
    factory, shape = HANDWRITTEN["depthwise"]
    model, x = factory(), torch.randn(shape)
    graph = ds.trace(model, x)
    holder = HeldScales(graph, model)
    held = np.zeros(graph.num_units, dtype=bool)
    for group in graph.groups:  # half of every removable group
        units = group.units[graph.unit_removable[group.units]]
        held[units[: len(units) // 2]] = True
    assert held.any()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-2)
    for _ in range(3):  # momentum built up before the hold, so a one-off zeroing would not last
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    with holder.attach():
        holder.hold(held)
        assert (graph.unit_gammas(model)[held] == 0).all()
        before = graph.unit_gammas(model)
        for _ in range(4):
            optimizer.zero_grad()
            model(x).square().mean().backward()
            optimizer.step()
            gammas = graph.unit_gammas(model)
            assert (gammas[held] == 0).all()
        assert not np.allclose(gammas[~held & graph.unit_removable], before[~held & graph.unit_removable])
    optimizer.zero_grad()
    model(x).square().mean().backward()
    optimizer.step()  # detached: the momentum moves them again
    assert (graph.unit_gammas(model)[held] != 0).any()


def test_mixed_precision_loss_scaling_does_not_dilute_the_penalty():
    factory, shape = HANDWRITTEN["depthwise"]
    x = torch.randn(shape)
    moved = []
    for scaled in (False, True):
        torch.manual_seed(0)
        model = factory().eval()
        graph = ds.trace(model, x)
        reg = morphnet_flops(graph, model, strength=1e-3)
        params = [model.get_submodule(n).weight for n in graph.source_modules]
        before = [p.detach().clone() for p in params]
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        scaler = torch.amp.GradScaler("cpu", enabled=scaled)
        with reg.attach():
            loss = 0.0 * model(x).sum()  # only the penalty moves the scales
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        moved.append(torch.cat([(b - p.detach()).flatten() for b, p in zip(before, params)]))
    assert moved[0].abs().max() > 0
    torch.testing.assert_close(moved[1], moved[0])


def test_default_strength_follows_initial_cost():
    factory, shape = HANDWRITTEN["concat"]
    model, x = factory(), torch.randn(shape)
    reg = morphnet_flops(ds.trace(model, x), model)
    assert reg.strength == pytest.approx(1.0 / reg.initial_cost)
    assert morphnet_flops(ds.trace(model, x), model, strength_scale=3.0).strength == pytest.approx(3.0 * reg.strength)


def test_width_rules_never_collapse_and_round():
    factory, shape = HANDWRITTEN["concat"]
    model, x = factory(), torch.randn(shape)
    graph = ds.trace(model, x)
    gammas = np.random.default_rng(0).random(graph.num_units)
    keep = ~graph.unit_removable  # everything removable is dead
    widened = enforce_widths(graph, keep, gammas, min_width=2, multiple=4)
    for g in graph.groups:
        n = int(widened[g.units].sum())
        assert n >= min(2, g.size) and (n % 4 == 0 or n == g.size)


def test_expand_step_meets_the_budget():
    factory, shape = HANDWRITTEN["channel_pad_shortcut"]
    model, x = factory(), torch.randn(shape)
    graph = ds.trace(model, x)
    reg = morphnet_flops(graph, model)
    gammas = np.random.default_rng(1).random(graph.num_units)
    keep = ~graph.unit_removable | (gammas > 0.8)
    budget = 0.6 * reg.initial_cost
    assert reg.cost(keep) < budget
    grown = expand_to_budget(graph, keep, gammas, reg.cost, budget)
    assert reg.cost(keep) < reg.cost(grown) <= budget
    assert reg.cost(grown) > 0.5 * reg.initial_cost  # close to the budget, not just under it
    assert (grown | keep).sum() == grown.sum()  # nothing alive was dropped


def test_gradient_share_measures_the_penalty_against_the_data_gradient():
    factory, shape = HANDWRITTEN["depthwise"]
    model, x = factory().eval(), torch.randn(shape)
    graph = ds.trace(model, x)
    reg = morphnet_flops(graph, model, strength=1e-3)
    params = [model.get_submodule(n).weight for n in graph.source_modules]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the gradients, not the step, matter
    with reg.attach():
        model.zero_grad()
        model(x).square().mean().backward()
        data = sum(float(p.grad.pow(2).sum()) for p in params) ** 0.5
        penalty = sum(float(g.pow(2).sum()) for g in reg.source_gradients().values()) ** 0.5
        optimizer.step()
    assert reg.gradient_share() == pytest.approx(penalty / (data + penalty), rel=1e-5)
    assert 0 < penalty / (data + penalty) < 1
    assert reg.gradient_share() is None  # read and reset
