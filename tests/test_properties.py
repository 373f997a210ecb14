"""Property test: on random CNNs (conv, grouped, depthwise, BatchNorm, add, concat, channel
slices and padding, pooling, flatten or a literal view, linear), removing the channels whose
BatchNorm sources are all zero never changes the output."""
from __future__ import annotations

import os
import warnings

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dnnshrink_core as ds
from helpers import kill_half, max_relative_error, n_params, state_copy, states_equal
from random_nets import Program, programs


# bounded for the suite; `DNNSHRINK_PROPERTY_EXAMPLES=1000 python -m pytest tests/test_properties.py` runs longer
EXAMPLES = int(os.environ.get("DNNSHRINK_PROPERTY_EXAMPLES", "30"))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(programs(), st.integers(0, 2**16))
def test_generator_keeps_outputs_on_random_networks(program, seed):
    steps, channels, literal_view = program
    torch.manual_seed(seed)
    model = kill_half(Program(steps, channels, literal_view), seed=seed).eval()
    x = torch.randn(2, channels, 8, 8)
    before = state_copy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ds.DnnshrinkWarning)
        small = ds.generate(model, x, ds.alive_masks(model, x))
    assert states_equal(before, state_copy(model))
    assert n_params(small) <= n_params(model)
    with torch.no_grad():
        assert max_relative_error(model(x), small(x)) < 1e-4, steps
