"""A finished fit exits cleanly: exit code 0 every time over repeated short runs (a gloo process group left alive
at interpreter exit ended about 1 run in 20 with ``terminate called without an active exception``, code -6)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.reliability import SCRIPTS
from tests.helpers.processes import run_script

RUNS = 10


@pytest.mark.slow
def test_finished_fits_exit_with_zero_every_time(tmp_path: Path) -> None:
    codes = []
    for attempt in range(RUNS):
        out = tmp_path / f"run{attempt}"
        plan = [{"name": "short", "epochs": 1}]
        run = run_script(SCRIPTS / "gossip_fit.py", [str(out), "--devices", "2", "--n", "32", "--p", "0.5", "--plan",
                                           json.dumps(plan)], timeout=240)
        codes.append(run.returncode)
        assert not run.survivors, run.survivors
        assert "terminate called" not in run.output, run.output[-4000:]
        assert sorted(p.name for p in out.glob("short_rank*.pt")) == ["short_rank0.pt", "short_rank1.pt"]
    assert codes == [0] * RUNS, codes
