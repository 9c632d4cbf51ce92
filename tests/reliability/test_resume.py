"""Exact resume of gossip training, run the real way (Lightning's popen launcher re-runs a script per rank).

``first_runs`` fits, in the same processes, 2 epochs straight ("full") and 1 epoch then stop ("first"), each with a
checkpoint per epoch; ``resumes``, a fresh script run, resumes "first"'s end-of-epoch-1 checkpoint for one more epoch.
Every rank must end exactly where "full" ended: every model tensor, gossip weight, schedule position, counter and
optimizer (momentum) buffer, bitwise (CPU, deterministic). Both blocking and overlapped exchange; the blocking runs
save in ``on_validation_end`` (while evaluation holds the consensus model), the overlapped ones at the end of the
training epoch, with a message in flight. Then a 3-worker checkpoint resumed by 2 workers, and a checkpoint of
another model.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.reliability.conftest import STEPS_PER_EPOCH, STEPS_PER_EPOCH_3, WORKERS


def load(directory: Path, name: str, rank: int) -> dict:
    return torch.load(directory / f"{name}_rank{rank}.pt", weights_only=False)


def rank_parts(path: Path) -> list[dict]:
    """Every rank's own saved state: the parts the main checkpoint file names (``<file>.parts/<id>/rank<r>.pt``)."""
    gossip = torch.load(path, weights_only=True)["gossip"]
    folder = Path(path).parent / gossip["parts"]
    return [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in range(gossip["world_size"])]


def message_weight(message: torch.Tensor) -> float:
    return float(message[:32].view(torch.float64)[0])


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


@pytest.mark.parametrize("prefix", ["", "ov_", "st_"], ids=["blocking", "overlap", "staleness3"])
def test_resume_is_exact(first_runs: Path, resumes, prefix: str) -> None:
    out, _ = resumes
    checkpoint = torch.load(first_runs / f"ck_{prefix}first" / "epoch0.ckpt", weights_only=False)
    # The resumed checkpoint is the one written at the end of epoch 1.
    assert checkpoint["epoch"] == 0 and checkpoint["global_step"] == STEPS_PER_EPOCH
    ranks = rank_parts(first_runs / f"ck_{prefix}first" / "epoch0.ckpt")
    assert [r["gossip"]["step"] for r in ranks] == [STEPS_PER_EPOCH] * WORKERS
    # Only meaningful if the workers' models differ at the save (saving one model for all would then fail).
    assert not torch.equal(ranks[0]["model"]["net.0.weight"], ranks[1]["model"]["net.0.weight"])
    # Total gossip mass in the checkpoint, messages in flight included, is 1.
    in_flight = sum(message_weight(m) for r in ranks for _, _, m in r["gossip"]["in_flight"])
    assert abs(sum(r["gossip"]["weight"] for r in ranks) + in_flight - 1.0) < 1e-12

    for rank in range(WORKERS):
        full = load(first_runs, f"{prefix}full", rank)
        first = load(first_runs, f"{prefix}first", rank)
        resumed = load(out, f"{prefix}resumed", rank)
        assert first["end"]["gossip_step"] == STEPS_PER_EPOCH
        # The resumed run starts where the stopped one was at its checkpoint (Lightning counts a checkpoint written
        # in on_validation_end as inside epoch 1, so compare steps, not epochs)...
        assert resumed["start"]["gossip_step"] == STEPS_PER_EPOCH == resumed["start"]["global_step"]
        assert resumed["start"]["gossip_weight"] == ranks[rank]["gossip"]["weight"]
        for key, value in ranks[rank]["model"].items():
            assert torch.equal(resumed["start"]["state"][key], value), key
        saved_momentum = ranks[rank]["optimizer_states"][0]["state"]
        for index, value in resumed["start"]["optimizer"]["state"].items():
            assert torch.equal(value["momentum_buffer"], saved_momentum[index]["momentum_buffer"])
        # ...and ends exactly where the uninterrupted run ended.
        assert full["end"]["gossip_step"] == 2 * STEPS_PER_EPOCH
        assert_same_rank_state(full, resumed, f"rank {rank}")
        assert not any("workers with" in w for w in resumed["warnings"])
    # Stopping after 1 epoch wrote the same checkpoint as the 2-epoch run did after its first epoch.
    same_epoch = rank_parts(first_runs / f"ck_{prefix}full" / "epoch0.ckpt")
    for rank in range(WORKERS):
        for key, value in ranks[rank]["model"].items():
            assert torch.equal(same_epoch[rank]["model"][key], value), key


def test_overlap_checkpoint_stores_in_flight_message_with_receiver(first_runs: Path, resumes) -> None:
    gossip = [r["gossip"] for r in rank_parts(first_runs / "ck_ov_first" / "epoch0.ckpt")]
    # Step 4 (the last of epoch 1): rank 0 pushed to rank 1; overlap mixes it in after step 5's update.
    assert gossip[0]["in_flight"] == [] and gossip[0]["staleness"] == gossip[1]["staleness"] == 1
    assert [(step, src) for step, src, _ in gossip[1]["in_flight"]] == [(STEPS_PER_EPOCH - 1, 0)]
    message = gossip[1]["in_flight"][0][2]
    weight, step, sender = message[:32].view(torch.float64)[:3].tolist()
    assert (step, sender) == (STEPS_PER_EPOCH - 1, 0)
    assert weight == gossip[0]["weight"]  # the sender halved its weight and sent the other half
    # The resumed rank 1 holds that message, unmixed, when training starts again.
    [resumed] = load(resumes[0], "ov_resumed", 1)["start"]["in_flight"]
    assert resumed["sources"] == [0] and resumed["weights"] == [weight] and resumed["step"] == STEPS_PER_EPOCH - 1
    assert torch.equal(resumed["messages"][0], message)


def test_resume_onto_a_different_number_of_workers(dead_worker_run, resumes) -> None:
    """A 3-worker checkpoint resumed by 2 workers: the consensus model, a_i = 1/2, the schedule going on."""
    checkpoint = torch.load(dead_worker_run[0] / "ck" / "epoch0.ckpt", weights_only=False)
    assert checkpoint["gossip"]["world_size"] == 3 and checkpoint["global_step"] == STEPS_PER_EPOCH_3
    records = [load(resumes[0], "three_to_two", rank) for rank in range(2)]
    old_momentum = checkpoint["optimizer_states"][0]["state"]
    for record in records:
        start = record["start"]
        assert start["gossip_weight"] == 0.5
        assert start["gossip_step"] == STEPS_PER_EPOCH_3 == start["global_step"]
        assert all(v == 0 for v in start["counters"].values()), start["counters"]
        for key, value in checkpoint["state_dict"].items():  # the consensus model, on every rank
            assert torch.equal(start["state"][key], value), key
        # Every rank gets the old rank 0's optimizer state.
        new_momentum = start["optimizer"]["state"]
        assert new_momentum.keys() == old_momentum.keys()
        for index in old_momentum:
            assert torch.equal(new_momentum[index]["momentum_buffer"], old_momentum[index]["momentum_buffer"])
        # Training goes on, the schedule position with Lightning's global step.
        assert record["end"]["gossip_step"] == record["end"]["global_step"] > STEPS_PER_EPOCH_3
    warning = [w for w in records[0]["warnings"] if "workers with" in w]
    assert len(warning) == 1, records[0]["warnings"]
    for part in (
        "written by 3 workers with 2 workers",
        "the checkpoint's consensus model",
        "gossip weight 1/2",
        "the optimizer state of the old rank 0",
        f"the gossip schedule goes on from step {STEPS_PER_EPOCH_3}",
    ):
        assert part in warning[0], warning[0]
    assert not any("workers with" in w for w in load(resumes[0], "three_to_two", 1)["warnings"])  # rank 0 only


def test_checkpoint_from_another_model_fails_clearly(resumes) -> None:
    """A 16-unit model's checkpoint resumed into a 32-unit model: every rank stops with the first mismatch named."""
    out, run = resumes
    assert not (out / "other_model_rank0.pt").exists()
    assert run.returncode != 0
    assert "RuntimeError: This checkpoint does not fit the model Net" in run.output
    assert "net.0.weight has shape (16, 8) in the checkpoint but (32, 8) in the model" in run.output


def test_staleness_checkpoint_stores_the_exchanges_of_the_last_k_steps(first_runs: Path, resumes) -> None:
    gossip = [r["gossip"] for r in rank_parts(first_runs / "ck_st_first" / "epoch0.ckpt")]
    assert [g["staleness"] for g in gossip] == [3, 3]
    saved = [[(step, src) for step, src, _ in g["in_flight"]] for g in gossip]
    steps = {step for per_rank in saved for step, _ in per_rank}
    # Mixing happens 3 steps after posting: at the save (after step 4) the exchanges of steps 2-4 are pending, and
    # with this seed more than one of those steps carried a message.
    assert len(steps) > 1 and steps <= {STEPS_PER_EPOCH - 3, STEPS_PER_EPOCH - 2, STEPS_PER_EPOCH - 1}
    for rank, per_rank in enumerate(saved):
        for step, src, message in gossip[rank]["in_flight"]:
            assert message[:32].view(torch.float64)[1:3].tolist() == [step, src]  # header: step, sender
        # the resumed rank holds the same messages, unmixed, grouped by step, when training starts again
        resumed = load(resumes[0], "st_resumed", rank)["start"]["in_flight"]
        assert [(p["step"], src) for p in resumed for src in p["sources"]] == sorted(per_rank)
