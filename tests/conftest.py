"""Suite-wide markers.

``lightning_compat``: the tests CI also runs against the lowest Lightning version pyproject.toml allows (.ci/run's
second virtual environment): Lightning's private names and the standalone package (tests/compat), real Trainer
runs through the launchers (tests/lightning), and exact resume from checkpoints (tests/reliability/test_resume.py).
Marked here by path so that the files themselves need no change.
"""

from __future__ import annotations

from pathlib import Path

import pytest

_TESTS = Path(__file__).resolve().parent
LIGHTNING_COMPAT = ("compat", "lightning", "reliability/test_resume.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    roots = [_TESTS / p for p in LIGHTNING_COMPAT]
    for item in items:
        path = Path(str(item.path)).resolve()
        if any(path == root or root in path.parents for root in roots):
            item.add_marker(pytest.mark.lightning_compat)
