"""Shared test settings.

The suite runs on two pytest-xdist workers (``-n 2`` in pyproject.toml): each worker's torch
gets one thread, and so do the commands a worker runs, so the two workers share the
machine's two cores instead of fighting over them. Tests marked ``heavy`` are started first, so the long ones do not end up last on a
single worker while the other idles.
"""
import os

import pytest
import torch

torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)
if os.environ.get("PYTEST_XDIST_WORKER"):  # the commands tests run (the demo) share the cores alike
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.get_closest_marker("heavy") is None)  # stable: heavy ones first


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def fresh_manager():
    """For tests that register plugins: the process-wide plugin manager is rebuilt afterwards."""
    yield
    from dnnshrink_core.plugins import get_plugin_manager

    get_plugin_manager(blocked=[])
