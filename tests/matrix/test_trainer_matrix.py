"""The combination matrix, Trainer side (issue 17): {lock-step, asynchronous} x the Lightning features users combine
(validation with and without the monitor, top-k/last checkpoints and ``test(ckpt_path="best")``, resume from "last",
EarlyStopping, OneCycleLR from ``estimated_stepping_batches``, ``max_time`` and a fit after it, gradient accumulation
with bf16-mixed, manual optimization, BatchNorm, ``fast_dev_run``, several fits in one process), for the unified
``lightning`` package and (asynchronous) the standalone ``pytorch_lightning``.

One script runs every cell of a column in one process tree (tests/matrix/scripts/trainer_cells.py), with gossip's
invariant checks on: every cell is also checked at every consistent cut, evaluation and checkpoint for mass,
messages and (asynchronous) every sample once per epoch, and the consensus must not move when it is looked at. The
assertions here add what a user sees: the right number of epochs, the data used, identical final models, the
estimate Lightning gives, the same best checkpoint on every rank.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers.distributed import free_port
from tests.helpers.processes import run_script, script_env

SCRIPT = Path(__file__).parent / "scripts" / "trainer_cells.py"
N = 96
RANKS = 2
# The default run keeps one column per mode (the asynchronous one with the standalone package, whose renamed
# modules are the likelier to break); the unified package's asynchronous column is the slow run's.
COLUMNS = [("lockstep", "lightning"), pytest.param(("async", "lightning"), marks=pytest.mark.slow),
           ("async", "pytorch_lightning")]
_COLUMN_IDS = ["lockstep-lightning", "async-lightning", "async-pytorch_lightning"]


@pytest.fixture(scope="module", params=COLUMNS, ids=_COLUMN_IDS)
def column(request, tmp_path_factory) -> tuple[str, str, list[dict]]:
    mode, package = request.param
    pytest.importorskip(package)
    out = tmp_path_factory.mktemp(f"{mode}-{package}")
    run = run_script(SCRIPT, [str(out), "--mode", mode, "--package", package, "--devices", str(RANKS)],
                     timeout=900, cwd=out, env=script_env(MASTER_PORT=str(free_port()), LIGHTNING_GOSSIP_VERIFY="1"))
    assert run.returncode == 0 and not run.survivors, run.output[-8000:]
    return mode, package, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(RANKS)]


TRAINING_CELLS = ["full", "second_fit_no_monitor", "resume_last", "max_time", "after_max_time", "accumulation_bf16",
                  "manual", "fast_dev_run"]


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("cell", TRAINING_CELLS)
def test_every_cell_ends_on_one_consensus_with_the_invariants_checked(column, cell):
    _, _, ranks = column
    records = [rank[cell] for rank in ranks]
    for record in records[1:]:
        assert torch.equal(record["params"], records[0]["params"]), "the ranks did not end on the same consensus"
    assert abs(sum(r["gossip_weight"] for r in records) - 1.0) < 1e-12
    assert sum(r["counters"]["messages_sent"] for r in records) == sum(r["counters"]["messages_received"] for r in records)
    assert all(r["verified"] > 0 for r in records), "the invariant checks did not run"


def _used(records: list[dict], epoch: int) -> list[int]:
    return sorted(i for r in records for i in r["seen"].get(epoch, []))


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("cell", ["full", "second_fit_no_monitor", "after_max_time", "accumulation_bf16", "manual"])
def test_every_sample_once_per_epoch_in_every_fit_of_the_process(column, cell):
    mode, _, ranks = column
    records = [rank[cell] for rank in ranks]
    assert records[0]["epochs"] == (1 if cell in ("accumulation_bf16", "manual") else 2)  # no leftover stop flag
    for epoch in range(records[0]["epochs"]):
        assert _used(records, epoch) == list(range(N)), (cell, epoch)
    if mode == "async":  # nobody waits: the split follows the speeds, not a fixed shard
        assert all(len(r["seen"][0]) % 8 == 0 for r in records)


@pytest.mark.timeout(1200)
def test_estimate_schedules_and_the_best_checkpoint(column):
    mode, _, ranks = column
    full = [rank["full"] for rank in ranks]
    for record in full:
        assert record["estimated"] == 12  # 2 epochs x 96 samples / batch 8 / 2 ranks: never -1
        # OneCycleLR(total_steps=estimate) was never stepped past its total (it raises); asynchronous ranks follow
        # the run's global progress, so a fast rank steps less than once per batch
        assert 0 < record["scheduler_steps"] <= record["estimated"]
        assert record["best"] == full[0]["best"] and Path(record["best"]).exists()
    if mode == "lockstep":
        assert all(record["scheduler_steps"] == 12 for record in full)
    tested = [rank["test_best"]["test_acc"] for rank in ranks]
    assert tested[0] == tested[1] and 0.0 <= tested[0] <= 1.0


@pytest.mark.timeout(1200)
def test_resume_max_time_and_fast_dev_run(column):
    mode, _, ranks = column
    resumed = [rank["resume_last"] for rank in ranks]
    assert resumed[0]["epochs"] == 3 and _used(resumed, 2) == list(range(N))
    stopped = [rank["max_time"] for rank in ranks]
    assert len({r["epochs"] for r in stopped}) == 1 and stopped[0]["epochs"] < 1000
    assert all(r["seconds"] < 120 for r in stopped)
    cut_short = _used(stopped, stopped[0]["epochs"] - 1)
    assert len(cut_short) == len(set(cut_short))  # an epoch cut short still used no sample twice
    fast = [rank["fast_dev_run"] for rank in ranks]
    assert [len(r["seen"][0]) for r in fast] == [8, 8]  # one batch on every rank, as fast_dev_run asks


@pytest.mark.timeout(1200)
def test_a_run_imports_only_its_own_lightning_package(column):
    _, package, ranks = column
    for rank in ranks:
        if package == "pytorch_lightning":  # the standalone adapters, renamed: nothing of the unified package
            assert rank["modules"] == [], rank["modules"][:10]
        else:  # the probe sees the unified package where it is used
            assert "lightning.pytorch" in rank["modules"]
