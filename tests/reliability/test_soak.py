"""The soak run, shortened (opt-in: ``pytest -m soak``): 4 gloo workers, 2,000 gossip steps per mode, blocking,
overlapped and with staleness 8; mass within 1e-12 of 1 after every step, no growth in open file descriptors, RSS
growth within 4 MiB.
The full run (10,000 steps) is ``python experiments/soak.py``; its figures are in experiments/results/soak/."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.processes import run_script

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.soak
@pytest.mark.timeout(1200)
def test_short_soak(tmp_path: Path) -> None:
    args = ["--workers", "4", "--steps", "2000", "--warmup", "400", "--sample-every", "400", "--out", str(tmp_path)]
    run = run_script(ROOT / "experiments" / "soak.py", args, 1100)
    report = json.loads((tmp_path / "soak.json").read_text()) if (tmp_path / "soak.json").exists() else None
    assert run.returncode == 0 and not run.survivors, run.output[-5000:]
    assert report is not None and report["passed"]
    for mode in ("blocking", "overlap", "stale8"):
        summary = report["modes"][mode]["summary"]
        assert summary["max_mass_error"] <= 1e-12
        assert summary["mass_checks"] == 2001
        assert summary["max_fd_growth"] <= 0
        assert summary["max_rss_growth_kib"] <= 4 * 1024
        assert summary["messages_sent"] > 0 and summary["messages_rejected"] == 0
