"""Training tests run on one CPU thread: tiny matmuls are much faster without thread hand-offs on a busy CI
machine, and float32 results are then the same from run to run."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
