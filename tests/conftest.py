"""Fixtures shared by several test modules."""

import pytest
import torch

from tests.helpers import tiny_run


@pytest.fixture(scope="module")
def one_thread():
    """Small tensors: threads only contend with each other (and with anything else running)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory):
    """A tiny iterative and a tiny amortized run trained on the same 48 images."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("tiny-runs")
    runs = {kind: tiny_run(root, steps=3, guide=kind) for kind in ("iterative", "amortized")}
    torch.set_num_threads(threads)
    return runs
