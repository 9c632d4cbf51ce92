"""Settings shared by every test: one torch thread per process (the machines have 2 cores and the tests run many
processes), and the harness in ``tests/helpers`` (``distributed.run_distributed`` for a function on several gloo ranks,
``processes.run_command`` / ``run_script`` for whole process trees).

``lightning_compat``: the tests CI also runs against the lowest Lightning version pyproject.toml allows (.ci/run's
second virtual environment): tests/compat (a popen-launched fit with per-rank checkpoints and an exact resume with each
Lightning package), tests/fabric (the Fabric strategy: a user's loop, save/load round trip),
tests/lightning/test_lightning_compat.py (Lightning's private names, the SIGTERM throttle), the spawn/fork launchers'
checkpoint test and the torchrun launch. Marked here by path or test name so that those files
need no change; chosen to keep that run to a few minutes.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread_per_process() -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # for the processes the tests start


# Gossip's invariant checks (GossipOptions(verify=None) reads this) are on in every test and every process a test
# starts: a lost message, created mass or a sample used twice fails the test that caused it, whatever it asserts.
os.environ.setdefault("LIGHTNING_GOSSIP_VERIFY", "1")
# A mismatched collective becomes an error at once instead of a hang until the timeout.
os.environ.setdefault("TORCH_DISTRIBUTED_DEBUG", "DETAIL")

_TESTS = Path(__file__).resolve().parent
# folders, files, or file::test-function (every parametrization of it)
LIGHTNING_COMPAT = (
    "compat",
    "fabric",
    "lightning/test_lightning_compat.py",
    "lightning/test_checkpoint_consensus.py",
    "lightning/test_trainer_runs.py::test_torchrun_launch",
    "lightning/test_trainer_runs.py::test_strategy_names_are_registered_on_import",
)


def _selected(item: pytest.Item) -> bool:
    path = Path(str(item.path)).resolve()
    for entry in LIGHTNING_COMPAT:
        where, _, function = entry.partition("::")
        root = _TESTS / where
        if (path == root or root in path.parents) and (not function or item.originalname == function):
            return True
    return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _selected(item):
            item.add_marker(pytest.mark.lightning_compat)
