"""Several ranks share this machine's cores with the rest of the suite: one thread each."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread_per_rank(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the ranks the engine starts inherit it
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
