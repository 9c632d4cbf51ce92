"""Checkpoint files: errors name the file (a truncated checkpoint, a write that hits a file-size limit as a full disk
would), and temporary files of writers that were killed mid-save are removed at the next save."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lightning_gossip.strategy  # noqa: F401  (first: checkpoint_io alone is a circular import via the hook)
from lightning_gossip.checkpoint_io import _HOST, AtomicCheckpointIO, atomic_local_save


def test_truncated_checkpoint_names_the_file(tmp_path: Path) -> None:
    whole = tmp_path / "whole.ckpt"
    torch.save({"state_dict": {"w": torch.randn(2000)}}, whole)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(whole.read_bytes()[:3000])
    with pytest.raises(RuntimeError) as info:
        AtomicCheckpointIO().load_checkpoint(truncated)
    assert f"Could not read the checkpoint {truncated} (3000 bytes)" in str(info.value), str(info.value)


def _write_over_the_limit(path: str) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG, as a full disk fails with ENOSPC
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    try:
        atomic_local_save({"w": torch.randn(100_000)}, path)
    except (OSError, RuntimeError) as error:  # torch's zip writer reports a failed write as a RuntimeError
        print(f"{type(error).__name__}: {error}")
        sys.exit(0)
    sys.exit(1)


def test_failed_write_names_the_file_and_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "last.ckpt"
    target.write_bytes(b"previous")
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r}); "
            f"from tests.reliability.test_checkpoint_files import _write_over_the_limit; "
            f"_write_over_the_limit({str(target)!r})")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"Could not write the checkpoint {target} (nothing was replaced" in proc.stdout, proc.stdout
    assert target.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temporary file left


def test_temporary_files_of_dead_writers_removed_at_the_next_save(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=60)
    stale = tmp_path / f".last.ckpt.{_HOST}.{dead.pid}.0123abcd.tmp"  # a writer killed mid-save
    live = tmp_path / f".last.ckpt.{_HOST}.{os.getppid()}.0123abcd.tmp"  # a writer still running
    other = tmp_path / f".epoch0.ckpt.{_HOST}.{dead.pid}.0123abcd.tmp"  # another file's: left to its next save
    for path in (stale, live, other):
        path.write_bytes(b"partial")
    atomic_local_save({"w": torch.zeros(3)}, str(tmp_path / "last.ckpt"))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["last.ckpt", live.name, other.name])
    assert torch.equal(torch.load(tmp_path / "last.ckpt", weights_only=True)["w"], torch.zeros(3))


def _write_part_until_killed(main: str, save_id: str, rank: int) -> None:
    """Write ``rank``'s part of ``main`` but stop in the middle of the write (the temporary file open and partly
    written), so that the test can SIGKILL this process there."""
    import time

    from lightning_gossip.checkpoint_io import save_part

    def stuck(obj, f, *args, **kwargs):
        f.write(b"partial")
        f.flush()
        print("WRITING", flush=True)
        time.sleep(600)

    torch.save = stuck
    save_part(AtomicCheckpointIO(), main, save_id, rank, 2, {"model": {"w": torch.zeros(4)}})


def _killed_while_writing_a_part(main: Path, save_id: str, rank: int) -> int:
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r}); "
            "import lightning_gossip.strategy; "
            "from tests.reliability.test_checkpoint_files import _write_part_until_killed; "
            f"_write_part_until_killed({str(main)!r}, {save_id!r}, {rank})")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "WRITING"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        proc.kill()
        proc.wait()
    return proc.pid


def test_leftovers_of_a_kill_during_a_part_write_are_removed_by_the_next_save(tmp_path: Path) -> None:
    """A writer SIGKILLed in the middle of its part of ``epoch1.ckpt`` leaves a temporary file in an orphaned save
    folder (the main file, written last, never came): the sweep the strategy runs after its next save, whatever file
    that save writes, removes them (before, only a later save of that same file name did). The last good checkpoint,
    its parts and a live writer's temporary file stay."""
    from lightning_gossip.checkpoint_io import leftovers, parts_entry, remove_leftovers, save_part

    good = tmp_path / "epoch0.ckpt"
    records = [save_part(AtomicCheckpointIO(), str(good), "a" * 32, r, 2, {"model": {"w": torch.full((4,), r)}})
               for r in range(2)]
    torch.save({"state_dict": {}, "gossip": parts_entry("a" * 32, 2, records, str(good))}, good)
    # the save of epoch1.ckpt: rank 0's part is complete, rank 1 is killed while writing its own
    crashed = tmp_path / "epoch1.ckpt"
    save_part(AtomicCheckpointIO(), str(crashed), "b" * 32, 0, 2, {"model": {"w": torch.zeros(4)}})
    dead = _killed_while_writing_a_part(crashed, "b" * 32, 1)
    orphan = tmp_path / "epoch1.ckpt.parts"
    part_tmp = [p.name for p in (orphan / ("b" * 32)).iterdir() if p.name.endswith(".tmp")]
    assert part_tmp == [f".rank1.pt.{_HOST}.{dead}." + part_tmp[0].split(".")[-2] + ".tmp"], part_tmp
    # an interrupted overwrite of the good checkpoint: a save folder its main file does not name
    (tmp_path / "epoch0.ckpt.parts" / ("c" * 32)).mkdir()
    main_tmp = tmp_path / f".epoch1.ckpt.{_HOST}.{dead}.0123abcd.tmp"  # rank 0's main file, killed mid-write
    main_tmp.write_bytes(b"partial")
    live = tmp_path / f".last.ckpt.{_HOST}.{os.getpid()}.0123abcd.tmp"  # a writer still running: not a leftover
    live.write_bytes(b"partial")

    expected = sorted([str(orphan), str(main_tmp), str(tmp_path / "epoch0.ckpt.parts" / ("c" * 32))])
    assert sorted(leftovers(str(tmp_path))) == expected
    assert sorted(remove_leftovers(str(tmp_path))) == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["epoch0.ckpt", "epoch0.ckpt.parts", live.name])
    assert [p.name for p in (tmp_path / "epoch0.ckpt.parts").iterdir()] == ["a" * 32]
    assert leftovers(str(tmp_path)) == []


@pytest.mark.slow
def test_lightning_run_killed_in_a_part_write_then_the_next_save_cleans_up(tmp_path: Path) -> None:
    """Two real Trainer runs in one checkpoint folder: rank 1 is SIGKILLed while writing its part of epoch1.ckpt; the
    run is resumed from epoch0.ckpt under another file name pattern, and its first save removes what the kill left."""
    import json

    from lightning_gossip.checkpoint_io import leftovers
    from tests.helpers.processes import run_script
    from tests.reliability import SCRIPTS

    ck = tmp_path / "ck"
    common = ["--devices", "2", "--n", "80", "--p", "0.4", "--timeout-s", "60"]
    plan = [{"name": "killed", "epochs": 3, "ckpt_dir": str(ck)}]
    killed = run_script(SCRIPTS / "gossip_fit.py", [str(tmp_path / "a"), *common, "--plan", json.dumps(plan),
                                                    "--kill-in-save", "2", "--kill-in-save-rank", "1"],
                        timeout=300, linger=90)
    assert "FAULT: rank 1 killed while writing" in killed.output and killed.returncode != 0, killed.output[-4000:]
    assert not killed.survivors
    left = leftovers(str(ck))
    assert any(p.endswith("epoch1.ckpt.parts") for p in left), (left, sorted(p.name for p in ck.iterdir()))
    assert list(ck.rglob("*.tmp")), list(ck.rglob("*"))
    plan = [{"name": "resumed", "epochs": 2, "ckpt_dir": str(ck), "filename": "resumed-{epoch}",
             "resume": str(ck / "epoch0.ckpt")}]
    resumed = run_script(SCRIPTS / "gossip_fit.py", [str(tmp_path / "b"), *common, "--plan", json.dumps(plan)],
                         timeout=300)
    assert resumed.returncode == 0, resumed.output[-4000:]
    assert leftovers(str(ck)) == [] and not list(ck.rglob("*.tmp")), sorted(str(p) for p in ck.rglob("*"))
    assert sorted(p.name for p in ck.iterdir()) == ["epoch0.ckpt", "epoch0.ckpt.parts", "resumed-1.ckpt",
                                                    "resumed-1.ckpt.parts"]
