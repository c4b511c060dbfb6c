"""Shared pytest set-up."""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # The default run uses one pytest-xdist worker per core: one torch thread each, so the
    # workers do not oversubscribe the cores.
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests (``pytestmark = pytest.mark.usefixtures(...)``):
    tiny tensors gain nothing from a second thread, and on a busy machine OpenMP threads waiting
    for each other cost far more than they compute (30x seen under ``-n 0``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
