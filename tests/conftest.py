"""Settings shared by every test: one torch thread per process (the machines have 2 cores and the tests run many
processes), and the harness in ``tests/helpers`` (``distributed.run_distributed`` for a function on several gloo ranks,
``processes.run_command`` / ``run_script`` for whole process trees)."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread_per_process() -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # for the processes the tests start
