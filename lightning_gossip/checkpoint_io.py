"""Checkpoint files: atomic writes, and a clear error for a checkpoint written for another model."""

from __future__ import annotations

import os
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
        return self.checkpoint_io.load_checkpoint(path, map_location=map_location, **kwargs)

    @override
    def remove_checkpoint(self, path: Any) -> None:
        self.checkpoint_io.remove_checkpoint(path)

    @override
    def teardown(self) -> None:
        self.checkpoint_io.teardown()


def atomic_local_save(checkpoint: dict[str, Any], path: str) -> None:
    """Write ``checkpoint`` to ``path`` so that a crash leaves either the old file or the new one, never a torn one."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise
    with suppress(OSError):  # make the rename itself durable; not possible on every platform/filesystem
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


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
