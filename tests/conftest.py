"""Shared pytest set-up."""

from __future__ import annotations

import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # The default run uses one pytest-xdist worker per core: one torch thread each, so the
    # workers do not oversubscribe the cores.
    torch.set_num_threads(1)
