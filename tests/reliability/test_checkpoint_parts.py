"""Per-rank checkpoint parts check themselves: a part carries its save id, rank, world size and a digest of its
content, the main file records every part's size and digest, and a resume refuses, on every rank and before the
first step, a part that is truncated, corrupted, another rank's or another save's, naming the file and what is wrong.

Real processes (3 gloo ranks on 127.0.0.1): each rank writes its part with the library's writer, and every rank checks
the parts with the same all-gather of verdicts the strategies use. ``test_lightning_resume_refuses_a_misplaced_part``
does it through a real Trainer resume.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

import lightning_gossip.strategy  # noqa: F401  (first: checkpoint_io alone is a circular import via the hook)
from lightning_gossip.checkpoint_io import (
    AtomicCheckpointIO,
    CheckpointPartError,
    load_part,
    parts_entry,
    part_path,
    save_part,
    verify_parts_everywhere,
)
from tests.helpers.distributed import run_distributed
from tests.helpers.processes import run_script
from tests.reliability import SCRIPTS

WORLD = 3


def _state(rank: int) -> dict:
    g = torch.Generator().manual_seed(rank)
    return {
        "model": {"w": torch.randn(64, 32, generator=g), "b": torch.randn(32, generator=g)},
        "optimizer_states": [{"state": {0: {"momentum_buffer": torch.randn(64, 32, generator=g)}}}],
        "gossip": {"weight": 1.0 / 3 + rank * 1e-3, "step": 17, "in_flight": []},
    }


def _write(rank: int, world_size: int, main: str, save_id: str) -> dict:
    record = save_part(AtomicCheckpointIO(), main, save_id, rank, world_size, _state(rank))
    everyone: list = [None] * world_size
    dist.all_gather_object(everyone, record)
    entry = parts_entry(save_id, world_size, everyone, main)
    if rank == 0:
        torch.save({"gossip": entry}, main)
    dist.barrier()
    return entry


def _write_two_saves(rank: int, world_size: int, folder: str) -> dict:
    _write(rank, world_size, f"{folder}/first.ckpt", "a" * 32)
    return _write(rank, world_size, f"{folder}/last.ckpt", "b" * 32)


def _resume(rank: int, world_size: int, main: str) -> dict:
    entry = torch.load(main, weights_only=True)["gossip"]
    mine, problem = None, None
    try:
        mine = load_part(AtomicCheckpointIO(), main, entry, rank, world_size, weights_only=True)
    except CheckpointPartError as error:
        problem = str(error)

    def gather(obj):
        everyone: list = [None] * world_size
        dist.all_gather_object(everyone, obj)
        return everyone

    try:
        verify_parts_everywhere(main, entry, rank, problem, gather)
    except CheckpointPartError as error:
        return {"error": str(error)}
    return {"state": mine}


def _resume_each(rank: int, world_size: int, mains: list[str]) -> list[dict]:
    """Small results only: the harness sends them back through a pipe it reads after the ranks have ended."""
    results = []
    for main in mains:
        result = _resume(rank, world_size, main)
        if "state" in result:
            state = result["state"]
            result = {"own_weights": torch.equal(state["model"]["w"], _state(rank)["model"]["w"]),
                      "gossip_weight": state["gossip"]["weight"], "keys": sorted(state)}
        results.append(result)
    return results


def _truncate(main: Path, entry: dict) -> tuple[Path, tuple[str, ...]]:
    part = Path(part_path(str(main), entry["parts"], 2))
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    return part, ("truncated",)


def _corrupt(main: Path, entry: dict) -> tuple[Path, tuple[str, ...]]:
    part = Path(part_path(str(main), entry["parts"], 1))
    data = bytearray(part.read_bytes())
    for offset in range(len(data) // 3, len(data) // 3 + 64):  # inside the tensors' data; the size is unchanged
        data[offset] ^= 0xFF
    part.write_bytes(bytes(data))
    assert part.stat().st_size == entry["part_bytes"][1]
    return part, ("corrupted",)


def _misplace(main: Path, entry: dict) -> tuple[Path, tuple[str, ...]]:
    rank1, rank2 = (Path(part_path(str(main), entry["parts"], r)) for r in (1, 2))
    shutil.copyfile(rank1, rank2)  # the same size: only the header can tell
    return rank2, ("it is rank 1's part, not rank 2's",)


def _other_save(main: Path, entry: dict) -> tuple[Path, tuple[str, ...]]:
    first = torch.load(main.parent / "first.ckpt", weights_only=True)["gossip"]
    ours = Path(part_path(str(main), entry["parts"], 0))
    shutil.copyfile(part_path(str(main.parent / "first.ckpt"), first["parts"], 0), ours)
    return ours, (f"belongs to save {'a' * 32}",)


def _remove(main: Path, entry: dict) -> tuple[Path, tuple[str, ...]]:
    part = Path(part_path(str(main), entry["parts"], 2))
    part.unlink()
    return part, ("does not exist",)


TAMPERING = {"truncated": _truncate, "corrupted": _corrupt, "another_ranks": _misplace,
             "another_saves": _other_save, "missing": _remove}


def test_bad_parts_are_refused_on_every_rank_naming_the_file(tmp_path: Path) -> None:
    """One good checkpoint and five copies, each with one bad part: every rank resumes the good one with its own
    state and refuses each bad one, naming the bad file and what is wrong with it (before, a truncated part gave
    ``OSError: [Errno 22]`` without a path on one rank, a corrupted one a raw unpickling error, and another rank's
    part was not noticed at all)."""
    written = tmp_path / "written"
    written.mkdir()
    entry = run_distributed(_write_two_saves, WORLD, str(written))[0]
    assert entry["world_size"] == WORLD and len(entry["part_digests"]) == WORLD and min(entry["part_bytes"]) > 0
    mains, expected = [], {}
    for case in ["good", *TAMPERING]:
        shutil.copytree(written, tmp_path / case)
        main = tmp_path / case / "last.ckpt"
        mains.append(str(main))
        if case in TAMPERING:
            expected[case] = TAMPERING[case](main, entry)
    results = run_distributed(_resume_each, WORLD, mains)
    for rank in range(WORLD):
        good, *bad = results[rank]
        assert "error" not in good, good
        assert good["own_weights"] and good["gossip_weight"] == _state(rank)["gossip"]["weight"]
        assert good["keys"] == ["gossip", "model", "optimizer_states"]  # the header is not part of the state
        for case, result in zip(TAMPERING, bad):
            path, needles = expected[case]
            assert "error" in result, f"rank {rank} resumed from a {case} part"
            for needle in (str(path), *needles):
                assert needle in result["error"], (case, rank, needle, result["error"])


def test_lightning_resume_refuses_a_misplaced_part(first_runs: Path, tmp_path: Path) -> None:
    """Rank 1's part copied over rank 0's (2 workers): before, the resume finished with exit code 0, rank 0 training
    on rank 1's weights and gossip weight; now both ranks refuse before the first step, naming the file."""
    ck = tmp_path / "ck"
    shutil.copytree(first_runs / "ck_first", ck)
    main = ck / "epoch0.ckpt"
    gossip = torch.load(main, weights_only=True)["gossip"]
    rank0, rank1 = (Path(part_path(str(main), gossip["parts"], r)) for r in (0, 1))
    shutil.copyfile(rank1, rank0)
    out = tmp_path / "out"
    plan = [{"name": "misplaced", "epochs": 2, "resume": str(main)}]
    run = run_script(SCRIPTS / "gossip_fit.py", [str(out), "--devices", "2", "--n", "80", "--p", "0.4",
                                                 "--plan", json.dumps(plan)], timeout=300)
    assert run.returncode != 0, run.output[-4000:]
    assert not run.survivors, run.survivors
    assert "CheckpointPartError" in run.output and str(rank0) in run.output, run.output[-6000:]
    assert "it is rank 1's part, not rank 0's" in run.output, run.output[-6000:]
    assert not list(out.glob("misplaced_rank*.pt"))  # no rank trained
