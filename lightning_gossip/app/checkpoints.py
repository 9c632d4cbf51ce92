"""The job's checkpoint folders: where a restarted worker group resumes from, and what a dead writer left there."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig

log = logging.getLogger("lightning_gossip.train")


def checkpoint_dirs(cfg: DictConfig) -> list[Path]:
    """The folders the configured ModelCheckpoint callbacks write to."""
    dirs = []
    for callback in (cfg.get("callbacks") or {}).values():
        if isinstance(callback, DictConfig) and "ModelCheckpoint" in str(callback.get("_target_", "")) \
                and callback.get("dirpath"):
            dirs.append(Path(str(callback.dirpath)))
    return list(dict.fromkeys(dirs))


def remove_stale_temporary_files(cfg: DictConfig) -> None:
    """Before the workers start nobody writes checkpoints: a temporary file left there is a dead writer's."""
    for folder in checkpoint_dirs(cfg):
        for stale in folder.glob(".*.tmp") if folder.is_dir() else ():
            log.warning("removing %s, left by a checkpoint save that did not finish", stale)
            stale.unlink(missing_ok=True)


def resume_path(cfg: DictConfig) -> Optional[str]:
    """The checkpoint this worker starts from.

    A worker group restarted by the elastic agent (``TORCHELASTIC_RESTART_COUNT`` > 0) resumes from the newest
    ``last*.ckpt`` in the job's checkpoint folders (Lightning's ``ckpt_path="last"``); when the job wrote none yet,
    from the configured ``ckpt_path``, like the first attempt.
    """
    configured = cfg.get("ckpt_path")
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0:
        found = [p for d in checkpoint_dirs(cfg) if d.is_dir() for p in d.glob("last*.ckpt")]
        if found:
            log.warning("restart %s of the worker group: resuming from the job's last checkpoint (%s)",
                        os.environ["TORCHELASTIC_RESTART_COUNT"], max(found, key=lambda p: p.stat().st_mtime))
            return "last"
    return None if configured is None else str(configured)
