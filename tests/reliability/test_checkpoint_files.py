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
