"""Shared pytest set-up."""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # The default run uses one pytest-xdist worker per core: one torch thread each, so the
    # workers do not oversubscribe the cores.
    torch.set_num_threads(1)


#: Files of a minute or more of the default run, scheduled first: pytest-xdist (``--dist
#: loadfile``) hands files to workers in collection order, so a long file collected last would run
#: alone at the end while the other worker idles.
LONGEST_FIRST = (
    "tests/zoo/test_sweep.py",
    "tests/passes/test_find_attention.py",
    "tests/decode/test_generate.py",
    "tests/backends/test_onnx.py",
    "tests/fuzz/test_fuzz_matcher.py",
    "tests/zoo/test_hf_zoo.py",
    "tests/decode/test_onnx_decode.py",
    "tests/calibrate/test_decoder.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        path = item.nodeid.split("::", 1)[0]
        return LONGEST_FIRST.index(path) if path in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order within a file and among the rest is kept


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests (``pytestmark = pytest.mark.usefixtures(...)``):
    tiny tensors gain nothing from a second thread, and on a busy machine OpenMP threads waiting
    for each other cost far more than they compute (30x seen under ``-n 0``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
