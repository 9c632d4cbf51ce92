"""Exact resume of gossip training, run the real way (Lightning's popen launcher re-runs a script per rank).

One script run fits, in the same processes, 2 epochs straight ("full") and 1 epoch then stop ("first"), each with a
checkpoint per epoch; a second, fresh script run resumes "first"'s end-of-epoch-1 checkpoint for one more epoch.
Every rank must end exactly where "full" ended: every model tensor, gossip weight, schedule position, counter and
optimizer (momentum) buffer, with bitwise equality (CPU, deterministic). Both plain and overlapped exchange; the plain
runs save in ``on_validation_end`` (while evaluation holds the consensus model), the overlapped ones at the end of
the training epoch, with a message in flight. A third run resumes onto 3 workers instead of 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.reliability.procs import run_script

WORKERS = 2
# 80 samples, batch 8, 2 workers: 5 optimizer steps per epoch. With p=0.4 and the script's seed the last step of
# epoch 1 has exactly one message (rank 0 -> rank 1): the workers' models differ at the save, and in overlap mode that
# message is in flight when the checkpoint is written.
COMMON = ["--devices", str(WORKERS), "--n", "80", "--p", "0.4", "--timeout-s", "60"]
STEPS_PER_EPOCH = 5


def load(directory: Path, name: str, rank: int) -> dict:
    return torch.load(directory / f"{name}_rank{rank}.pt", weights_only=False)


def fit(out: Path, plan: list[dict], extra: list[str] = (), timeout: float = 240.0):
    run = run_script("gossip_fit.py", [str(out), *COMMON, *extra, "--plan", json.dumps(plan)], timeout=timeout)
    assert run.returncode == 0, run.output[-5000:]
    assert not run.survivors
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("resume")
    ck = lambda name: str(out / f"ck_{name}")  # noqa: E731
    fit(
        out,
        [
            {"name": "full", "epochs": 2, "ckpt_dir": ck("full"), "save_on_train_epoch_end": False},
            {"name": "first", "epochs": 1, "ckpt_dir": ck("first"), "save_on_train_epoch_end": False},
            {"name": "ov_full", "epochs": 2, "ckpt_dir": ck("ov_full"), "overlap": True},
            {"name": "ov_first", "epochs": 1, "ckpt_dir": ck("ov_first"), "overlap": True},
        ],
    )
    fit(
        out,
        [
            {"name": "resumed", "epochs": 2, "resume": f"{ck('first')}/epoch0.ckpt"},
            {"name": "ov_resumed", "epochs": 2, "resume": f"{ck('ov_first')}/epoch0.ckpt", "overlap": True},
        ],
    )
    return out


def assert_same_rank_state(a: dict, b: dict, what: str) -> None:
    assert a["end"]["state"].keys() == b["end"]["state"].keys()
    for key in a["end"]["state"]:
        assert torch.equal(a["end"]["state"][key], b["end"]["state"][key]), f"{what}: {key} differs"
    for field in ("gossip_weight", "gossip_step", "global_step", "counters"):
        assert a["end"][field] == b["end"][field], f"{what}: {field} {a['end'][field]} != {b['end'][field]}"
    state_a, state_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert state_a.keys() == state_b.keys() and state_a, f"{what}: optimizer state keys differ or are empty"
    for index in state_a:
        assert torch.equal(state_a[index]["momentum_buffer"], state_b[index]["momentum_buffer"]), (
            f"{what}: momentum of parameter {index} differs"
        )


@pytest.mark.parametrize("prefix", ["", "ov_"], ids=["blocking", "overlap"])
def test_resume_is_exact(runs: Path, prefix: str) -> None:
    checkpoint = torch.load(runs / f"ck_{prefix}first" / "epoch0.ckpt", weights_only=False)
    # The resumed checkpoint is the one written at the end of epoch 1.
    assert checkpoint["epoch"] == 0 and checkpoint["global_step"] == STEPS_PER_EPOCH
    ranks = checkpoint["gossip"]["ranks"]
    assert [r["gossip"]["step"] for r in ranks] == [STEPS_PER_EPOCH] * WORKERS
    # The test is only meaningful if the workers' models differ at the save (so saving one model for all would fail).
    assert not torch.equal(ranks[0]["model"]["net.0.weight"], ranks[1]["model"]["net.0.weight"])
    # Total gossip mass in the checkpoint, messages in flight included, is 1.
    in_flight = sum(float(m[:32].view(torch.float64)[0]) for r in ranks for _, m in r["gossip"]["in_flight"])
    assert abs(sum(r["gossip"]["weight"] for r in ranks) + in_flight - 1.0) < 1e-12

    for rank in range(WORKERS):
        full = load(runs, f"{prefix}full", rank)
        resumed = load(runs, f"{prefix}resumed", rank)
        first = load(runs, f"{prefix}first", rank)
        # The resumed run starts where the stopped one was at its checkpoint...
        # (Lightning counts a checkpoint written in on_validation_end as inside epoch 0: compare steps, not epochs.)
        assert resumed["start"]["gossip_step"] == STEPS_PER_EPOCH == resumed["start"]["global_step"]
        assert resumed["start"]["gossip_weight"] == ranks[rank]["gossip"]["weight"]
        saved_momentum = ranks[rank]["optimizer_states"][0]["state"]
        for index, value in resumed["start"]["optimizer"]["state"].items():
            assert torch.equal(value["momentum_buffer"], saved_momentum[index]["momentum_buffer"])
        for key, value in ranks[rank]["model"].items():
            assert torch.equal(resumed["start"]["state"][key], value), key
        # ...and ends exactly where the uninterrupted run ended.
        assert_same_rank_state(full, resumed, f"rank {rank}")
        assert full["end"]["gossip_step"] == 2 * STEPS_PER_EPOCH
        assert not any("world" in w and "workers" in w for w in resumed["warnings"])
        assert first["end"]["gossip_step"] == STEPS_PER_EPOCH
    # Stopping after 1 epoch wrote the same checkpoint as the 2-epoch run did after its first epoch.
    same_epoch = torch.load(runs / f"ck_{prefix}full" / "epoch0.ckpt", weights_only=False)["gossip"]["ranks"]
    for rank in range(WORKERS):
        for key, value in ranks[rank]["model"].items():
            assert torch.equal(same_epoch[rank]["model"][key], value), key


def test_overlap_checkpoint_stores_in_flight_message_with_receiver(runs: Path) -> None:
    checkpoint = torch.load(runs / "ck_ov_first" / "epoch0.ckpt", weights_only=False)
    gossip = [r["gossip"] for r in checkpoint["gossip"]["ranks"]]
    # Step 4 (the last of epoch 1): rank 0 pushed to rank 1; overlap mixes it in after step 5's update.
    assert gossip[0]["in_flight"] == [] and gossip[0]["in_flight_step"] == STEPS_PER_EPOCH - 1
    assert [src for src, _ in gossip[1]["in_flight"]] == [0]
    message = gossip[1]["in_flight"][0][1]
    weight, step, sender = message[:32].view(torch.float64)[:3].tolist()
    assert (step, sender) == (STEPS_PER_EPOCH - 1, 0)
    assert weight == gossip[0]["weight"]  # the sender halved its weight and sent the other half
    # The resumed rank 1 holds that message, unmixed, when training starts again.
    resumed = load(runs, "ov_resumed", 1)["start"]["in_flight"]
    assert resumed["sources"] == [0] and resumed["weights"] == [weight] and resumed["step"] == STEPS_PER_EPOCH - 1
    assert torch.equal(resumed["messages"][0], message)


def test_resume_onto_different_world_size_and_checkpoint_from_another_model(runs: Path, tmp_path: Path) -> None:
    """2 workers' checkpoint resumed by 3: the consensus model, a_i = 1/3, schedule going on; then another model."""
    checkpoint_path = runs / "ck_first" / "epoch0.ckpt"
    checkpoint = torch.load(checkpoint_path, weights_only=False)
    plan = [
        {"name": "three", "epochs": 2, "resume": str(checkpoint_path)},
        {"name": "other_model", "epochs": 2, "resume": str(checkpoint_path), "hidden": 32},
    ]
    args = [str(tmp_path), "--devices", "3", "--n", "80", "--p", "0.4", "--timeout-s", "60", "--plan", json.dumps(plan)]
    run = run_script("gossip_fit.py", args, timeout=240)
    assert not run.survivors

    records = [load(tmp_path, "three", rank) for rank in range(3)]
    for record in records:
        start = record["start"]
        assert start["gossip_weight"] == pytest.approx(1 / 3, abs=0)
        assert start["gossip_step"] == STEPS_PER_EPOCH == start["global_step"]
        assert all(v == 0 for k, v in start["counters"].items()), start["counters"]
        for key, value in checkpoint["state_dict"].items():  # the consensus model, on every rank
            assert torch.equal(start["state"][key], value), key
        # The schedule position goes on with Lightning's global step.
        assert record["end"]["gossip_step"] == record["end"]["global_step"] > STEPS_PER_EPOCH
    warning = [w for w in records[0]["warnings"] if "workers" in w]
    assert len(warning) == 1, records[0]["warnings"]
    for part in ("written by 2 workers with 3 workers", "consensus model", "gossip weight 1/3",
                 "optimizer state of the old rank 0", "goes on from step 5"):
        assert part in warning[0], warning[0]
    # Every rank got the old rank 0's optimizer state.
    old = checkpoint["optimizer_states"][0]["state"]
    for record in records:
        new = record["start"]["optimizer"]["state"]
        assert new.keys() == old.keys()
        assert all(torch.equal(new[i]["momentum_buffer"], old[i]["momentum_buffer"]) for i in old)

    # The checkpoint of a 16-unit model does not fit a 32-unit one: a clear error on every rank, non-zero exit.
    assert run.returncode != 0
    assert "This checkpoint does not fit the model Net" in run.output
    assert "net.0.weight has shape (16, 8) in the checkpoint but (32, 8) in the model" in run.output
    assert "Traceback" in run.output
