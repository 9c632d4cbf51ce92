"""The asynchronous straggler suite runs end to end (tiny model and data, 2 workers): a smoke test, not a
measurement."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_async_straggler_suite_smoke(tmp_path):
    cmd = [sys.executable, "-m", "experiments.benchmark.async_straggler", "--quick", "--out", str(tmp_path),
           "--workers", "2", "--epochs", "1", "--emulate-ms", "5", "--configs", "async_p0.1",
           "--scenarios", "none", "straggler2x"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = json.loads((tmp_path / "results.json").read_text())
    assert {(r["config"], r["scenario"]) for r in records} == {
        ("async_p0.1", s) for s in ("none", "straggler2x")
    }
    assert all(r["samples_per_s"] > 0 and 0.0 <= r["test_accuracy"] <= 1.0 for r in records)
    assert "kept vs. no straggler" in (tmp_path / "README.md").read_text()
