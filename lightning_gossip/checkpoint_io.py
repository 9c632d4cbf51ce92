"""Checkpoint files: atomic writes, per-rank parts beside the main file, errors that name the file, and a clear error
for a checkpoint written for another model."""

from __future__ import annotations

import os
import pickle
import re
import shutil
import socket
import uuid
from contextlib import suppress
from typing import Any, Mapping, Optional

import torch
from lightning.fabric.plugins import CheckpointIO, TorchCheckpointIO
from typing_extensions import override

from lightning_gossip._lightning_compat import _is_local_file_protocol


class AtomicCheckpointIO(CheckpointIO):
    """Wraps a ``CheckpointIO`` so that a local checkpoint is written atomically.

    Lightning's ``TorchCheckpointIO`` writes to a file in the system temporary directory and moves it into place: a
    rename only when both are on one filesystem (a copy into the target otherwise, e.g. with /tmp on tmpfs), and
    without fsync. For a plain ``TorchCheckpointIO`` and a local path this writes a temporary file next to the
    target, fsyncs it, ``os.replace``\\ s it and fsyncs the directory, so a crash at any moment leaves either the old
    file or the new one, never a torn one. Any other ``CheckpointIO`` (remote storage, async saving, your own) or
    ``storage_options`` are passed through untouched: that plugin decides how it writes.
    """

    def __init__(self, checkpoint_io: Optional[CheckpointIO] = None) -> None:
        self.checkpoint_io = checkpoint_io if checkpoint_io is not None else TorchCheckpointIO()

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        plain = type(self.checkpoint_io) is TorchCheckpointIO and storage_options is None
        if plain and _is_local_file_protocol(path):
            atomic_local_save(checkpoint, os.fspath(path))
        else:
            self.checkpoint_io.save_checkpoint(checkpoint, path, storage_options=storage_options)

    @override
    def load_checkpoint(self, path: Any, map_location: Optional[Any] = None, **kwargs: Any) -> dict[str, Any]:
        try:
            return self.checkpoint_io.load_checkpoint(path, map_location=map_location, **kwargs)
        except (FileNotFoundError, pickle.UnpicklingError):
            raise  # these name the file, or say what to do about weights_only
        except (OSError, RuntimeError, EOFError, ValueError) as error:
            raise _unreadable(path, error) from error

    @override
    def remove_checkpoint(self, path: Any) -> None:
        self.checkpoint_io.remove_checkpoint(path)
        parts = parts_root(os.fspath(path))
        if _is_local_file_protocol(path) and os.path.isdir(parts):
            shutil.rmtree(parts, ignore_errors=True)

    @override
    def teardown(self) -> None:
        self.checkpoint_io.teardown()


def _unreadable(path: Any, error: BaseException) -> RuntimeError:
    size = ""
    with suppress(OSError, TypeError):
        size = f" ({os.path.getsize(path)} bytes)"
    return RuntimeError(
        f"Could not read the checkpoint {os.fspath(path)}{size}: {type(error).__name__}: {error}. The file is "
        "truncated (a copy or a save that did not finish, a full disk) or not a checkpoint; resume from an earlier one."
    )


_HOST = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:40] or "host"


def atomic_local_save(checkpoint: Any, path: str) -> None:
    """Write ``checkpoint`` to ``path`` so that a crash leaves either the old file or the new one, never a torn one.

    The temporary file is ``.<name>.<host>.<pid>.<random>.tmp`` beside the target; temporary files of this name left
    by writers on this host that are gone (killed while saving) are removed first, so they do not pile up. An error
    while writing (a full disk, say) names the file.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    name = os.path.basename(path)
    remove_stale_temporary_files(directory, name)
    tmp = os.path.join(directory, f".{name}.{_HOST}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        with suppress(OSError):
            os.unlink(tmp)
        if isinstance(error, OSError) and not isinstance(error, FileNotFoundError):
            raise OSError(error.errno, f"Could not write the checkpoint {path} (nothing was replaced): "
                                       f"{error.strerror or error}") from error
        if isinstance(error, RuntimeError) and "write" in str(error).lower():  # torch.save's own writer
            raise RuntimeError(f"Could not write the checkpoint {path} (nothing was replaced): {error}") from error
        raise
    with suppress(OSError):  # make the rename itself durable; not possible on every platform/filesystem
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_stale_temporary_files(directory: str, name: str) -> list[str]:
    """Remove ``.<name>.<host>.<pid>.*.tmp`` files in ``directory`` whose writer (a process on this host) is gone."""
    pattern = re.compile(rf"^\.{re.escape(name)}\.{re.escape(_HOST)}\.(\d+)\.[0-9a-f]+\.tmp$")
    removed = []
    with suppress(OSError):
        for entry in os.listdir(directory):
            match = pattern.match(entry)
            if match and not _process_alive(int(match.group(1))):
                with suppress(OSError):
                    os.unlink(os.path.join(directory, entry))
                    removed.append(entry)
    return removed


def _process_alive(pid: int) -> bool:
    """Whether process ``pid`` on this host is running (a zombie, dead but not yet reaped by its parent, is not)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with suppress(OSError, IndexError):
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        return stat[stat.rfind(")") + 2 :].split()[0] != "Z"
    return True


# -- per-rank parts ------------------------------------------------------------------------------------------------
# A gossip checkpoint is the main file (a plain Lightning checkpoint of the consensus model, written by rank 0) and
# one part per rank (that rank's own weights, optimizer state and gossip state, written by that rank) in
# <main file>.parts/<save id>/rank<r>.pt. The save id is fresh for every save and recorded in the main file, which is
# replaced last: a crash at any moment leaves the previous main file and the parts it names complete.
def parts_root(path: str) -> str:
    return f"{path}.parts"


def part_path(main_path: str, relative_dir: str, rank: int) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(main_path)), relative_dir, f"rank{rank}.pt")


def remove_old_parts(main_path: str, keep_id: str) -> None:
    """After the main file names ``keep_id``: remove the parts of earlier saves (and of saves that crashed)."""
    root = parts_root(main_path)
    with suppress(OSError):
        for entry in os.listdir(root):
            if entry != keep_id:
                shutil.rmtree(os.path.join(root, entry), ignore_errors=True)


def check_checkpoint_fits(module: torch.nn.Module, state_dict: Mapping[str, Any], strict: bool) -> None:
    """A clear error, naming the first mismatching key and shapes, for a checkpoint written for another model."""
    own = module.state_dict()
    mismatched = [
        f"{key} has shape {tuple(value.shape)} in the checkpoint but {tuple(own[key].shape)} in the model"
        for key, value in state_dict.items()
        if key in own and isinstance(value, torch.Tensor) and value.shape != own[key].shape
    ]
    missing = [key for key in own if key not in state_dict] if strict else []
    unexpected = [key for key in state_dict if key not in own] if strict else []
    if not (mismatched or missing or unexpected):
        return
    problems = mismatched[:3]
    if len(mismatched) > 3:
        problems.append(f"{len(mismatched) - 3} more shape mismatches")
    if missing:
        problems.append(f"missing from the checkpoint: {missing[:5]}" + (" ..." if len(missing) > 5 else ""))
    if unexpected:
        problems.append(f"not in the model: {unexpected[:5]}" + (" ..." if len(unexpected) > 5 else ""))
    raise RuntimeError(
        f"This checkpoint does not fit the model {type(module).__name__}; was it written for another model? "
        + "; ".join(problems)
        + "."
    )
