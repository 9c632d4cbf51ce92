"""The combination matrix, Fabric side (issue 17): a user's Fabric loop in lock-step and asynchronous mode (work
shared out with ``fabric.strategy.share_work``), with the unified ``lightning`` and the standalone
``lightning_fabric`` package: evaluation on the consensus every epoch, a save as per-rank parts (the Trainer's
format), a second training loop in the same process, and a load that gives every rank its own state back, all with
gossip's invariant checks on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers.distributed import free_port
from tests.helpers.processes import run_script, script_env

SCRIPT = Path(__file__).parent / "scripts" / "fabric_cells.py"
N = 96
# the default run keeps the asynchronous column with the unified package (lock-step Fabric saves and resumes in
# tests/fabric); the others are the slow run's
COLUMNS = [pytest.param("lockstep", "lightning", marks=pytest.mark.slow), ("async", "lightning"),
           pytest.param("async", "lightning_fabric", marks=pytest.mark.slow)]


def _phase(out: Path, mode: str, package: str, phase: str) -> list[dict]:
    run = run_script(SCRIPT, [str(out), "--mode", mode, "--phase", phase, "--package", package], timeout=600,
                     cwd=out, env=script_env(MASTER_PORT=str(free_port()), LIGHTNING_GOSSIP_VERIFY="1"))
    assert run.returncode == 0 and not run.survivors, run.output[-8000:]
    return [torch.load(out / f"{phase}_rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("mode,package", COLUMNS, ids=["lockstep-lightning", "async-lightning", "async-lightning_fabric"])
def test_fabric_loop_in_every_mode_with_evaluation_save_second_loop_and_resume(tmp_path, mode, package):
    pytest.importorskip(package)
    trained = _phase(tmp_path, mode, package, "train")
    standalone = package == "lightning_fabric"
    for rank in trained:
        assert rank["package"] == ("lightning_gossip.standalone.fabric" if standalone else "lightning_gossip.fabric")
        assert rank["verified"] > 0 and len(rank["accuracy"]) == 3
    for epoch in range(3):  # two epochs, then the second loop's epoch: every sample once each time
        assert sorted(i for r in trained for i in r["seen"][epoch]) == list(range(N)), epoch
    assert torch.equal(trained[0]["params"], trained[1]["params"])  # end(): the exact consensus everywhere
    assert abs(sum(r["gossip_weight"] for r in trained) - 1.0) < 1e-12
    assert abs(sum(r["gossip_weight_at_save"] for r in trained) - 1.0) < 1e-12  # a consistent cut
    assert sum(r["counters"]["messages_sent"] for r in trained) == sum(
        r["counters"]["messages_received"] for r in trained) > 0
    # the file: the consensus model for anyone, every rank's own state in its part (rank 0's bytes stay one model)
    checkpoint = torch.load(tmp_path / "gossip.ckpt", weights_only=False)
    assert set(checkpoint["gossip"]) >= {"parts", "save_id", "world_size", "step"} and checkpoint["epoch"] == 2
    resumed = _phase(tmp_path, mode, package, "resume")
    for before, after in zip(trained, resumed):
        assert torch.equal(after["own_after_load"], before["own_at_save"])
        assert after["gossip_weight_after_load"] == before["gossip_weight_at_save"]
        assert after["step_after_load"] == before["step_at_save"] and after["loaded_epoch"] == 2
    assert sorted(i for r in resumed for i in r["seen"][2]) == list(range(N))
    if mode == "lockstep":  # deterministic: the resumed epoch is the straight run's, bit for bit
        assert torch.equal(resumed[0]["params"], trained[0]["params"])
