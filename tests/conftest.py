"""Shared test fixtures."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """Run a test with one PyTorch thread, then restore the setting.

    Tiny per-step tensors gain nothing from intra-op threads, and on a busy 2-core machine OpenMP
    spin-waiting makes two threads 10-100x slower than one.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
