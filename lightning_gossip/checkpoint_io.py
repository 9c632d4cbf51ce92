"""Checkpoint files: atomic writes, per-rank parts beside the main file, errors that name the file, and a clear error
for a checkpoint written for another model."""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import shutil
import socket
import uuid
from contextlib import suppress
from typing import Any, Callable, Mapping, Optional

import torch
from lightning.fabric.plugins import CheckpointIO, TorchCheckpointIO
from typing_extensions import override

from lightning_gossip.checkpoint_format import CHECKPOINT_KEY, PART_FORMAT, PART_HEADER_KEY
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

    def writes_local_files_at_once(self, path: Any, storage_options: Optional[Any] = None) -> bool:
        """Whether a save to ``path`` is a plain local file written before ``save_checkpoint`` returns (so the folder
        can be swept of what killed saves left: no write of another plugin may still be under way)."""
        plain = type(self.checkpoint_io) is TorchCheckpointIO and storage_options is None
        return plain and _is_local_file_protocol(path)

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
        if isinstance(error, RuntimeError):  # torch.save's zip writer reports a failed write (full disk) this way
            raise RuntimeError(f"Could not write the checkpoint {path} (nothing was replaced; a full disk?): "
                               f"{error}") from error
        raise
    with suppress(OSError):  # make the rename itself durable; not possible on every platform/filesystem
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_TEMPORARY = re.compile(rf"^\..+\.{re.escape(_HOST)}\.(\d+)\.[0-9a-f]+\.tmp$")


def _stale_temporary(entry: str) -> bool:
    """Whether ``entry`` is a temporary file of :func:`atomic_local_save` whose writer, on this host, is gone."""
    match = _TEMPORARY.match(entry)
    return bool(match) and not _process_alive(int(match.group(1)))


def remove_stale_temporary_files(directory: str, name: Optional[str] = None) -> list[str]:
    """Remove the temporary files in ``directory`` whose writer (a process on this host) is gone: those of
    ``<name>`` (``.<name>.<host>.<pid>.*.tmp``), or of any file when ``name`` is None."""
    prefix = f".{name}." if name is not None else "."
    removed = []
    with suppress(OSError):
        for entry in os.listdir(directory):
            if entry.startswith(prefix) and _stale_temporary(entry):
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
#
# A part carries what it belongs to under PART_HEADER_KEY (save id, rank, world size, a digest of its content), and
# the main file records every part's size and digest, so a resume refuses, naming the file and what is wrong, a part
# that is truncated, corrupted, another rank's, another save's or from another number of workers, on every rank and
# before the first step (see verify_parts_everywhere). The functions below are what both adapters call.


class CheckpointPartError(RuntimeError):
    """A per-rank checkpoint part is missing, unreadable, or not the part the main file names."""


def parts_root(path: str) -> str:
    return f"{path}.parts"


def part_path(main_path: str, relative_dir: str, rank: int) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(main_path)), relative_dir, f"rank{rank}.pt")


def parts_dir(main_path: str, save_id: str) -> str:
    """The folder of one save's parts, relative to the main file's folder (what the main file records)."""
    return os.path.join(os.path.basename(parts_root(main_path)), save_id)


def content_digest(state: Any) -> str:
    """A digest of everything in ``state``: every tensor's dtype, shape and bytes, and every other value's repr, in
    the structure's order. Detects a part changed after it was written (a bit flip, a partial overwrite)."""
    digest = hashlib.blake2b(digest_size=16)

    def visit(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            tensor = obj.detach()
            digest.update(f"T{tensor.dtype}{tuple(tensor.shape)}".encode())
            if tensor.numel():
                flat = tensor.cpu().contiguous().reshape(-1).view(torch.uint8)
                digest.update(memoryview(flat.numpy()))
        elif isinstance(obj, Mapping):
            digest.update(f"M{len(obj)}".encode())
            for key, value in obj.items():
                digest.update(repr(key).encode())
                visit(value)
        elif isinstance(obj, (list, tuple)):
            digest.update(f"L{len(obj)}".encode())
            for value in obj:
                visit(value)
        else:
            digest.update(f"V{obj!r}".encode())

    visit(state)
    return digest.hexdigest()


def save_part(
    checkpoint_io: CheckpointIO, main_path: str, save_id: str, rank: int, world_size: int, state: dict[str, Any]
) -> dict[str, Any]:
    """Write this rank's part of save ``save_id`` of ``main_path`` (atomically, through ``checkpoint_io``) with its
    header. Returns the record the main file keeps of it: ``{"rank", "bytes", "digest"}`` (``bytes`` -1 when the file
    is not local)."""
    return write_part_with_header(checkpoint_io.save_checkpoint, main_path, save_id, rank, world_size, state)


def write_part_with_header(
    write: Callable[[dict[str, Any], str], None], main_path: str, save_id: str, rank: int, world_size: int,
    state: Mapping[str, Any],
) -> dict[str, Any]:
    """:func:`save_part` with the writer ``write(state, path)`` (the adapters' ``write_part``)."""
    if PART_HEADER_KEY in state:
        raise ValueError(f"A checkpoint part's state may not use the key {PART_HEADER_KEY!r} (the part's header).")
    digest = content_digest(state)
    header = {"format": PART_FORMAT, "save_id": save_id, "rank": rank, "world_size": world_size, "digest": digest}
    path = part_path(main_path, parts_dir(main_path, save_id), rank)
    write({**state, PART_HEADER_KEY: header}, path)
    size = -1
    if _is_local_file_protocol(path):
        with suppress(OSError):
            size = os.path.getsize(path)
    return {"rank": rank, "bytes": size, "digest": digest}


def parts_entry(save_id: str, world_size: int, records: list[dict[str, Any]], main_path: str) -> dict[str, Any]:
    """What the main file records of a save's parts (the adapters add their own keys, e.g. the step)."""
    ordered = sorted(records, key=lambda record: record["rank"])
    if [record["rank"] for record in ordered] != list(range(world_size)):
        raise RuntimeError(f"A save needs one part per rank 0..{world_size - 1}, got ranks "
                           f"{[record['rank'] for record in ordered]}.")
    return {
        "world_size": world_size,
        "save_id": save_id,
        "parts": parts_dir(main_path, save_id),
        "part_bytes": [record["bytes"] for record in ordered],
        "part_digests": [record["digest"] for record in ordered],
    }


def _part_problem_on_disk(main_path: str, entry: Mapping[str, Any], rank: int) -> Optional[str]:
    """What is wrong with rank ``rank``'s part as seen from outside (missing, wrong size), or None."""
    path = part_path(main_path, entry["parts"], rank)
    if not _is_local_file_protocol(path):
        return None
    if not os.path.exists(path):
        return (
            f"rank {rank}'s part {path} does not exist: copy the folder {parts_root(main_path)} along with the file "
            "(without parts, resuming onto a different number of workers starts from the consensus model)"
        )
    expected = (entry.get("part_bytes") or [None] * (rank + 1))[rank]
    size = os.path.getsize(path)
    if expected is not None and expected >= 0 and size != expected:
        return (
            f"rank {rank}'s part {path} has {size} bytes but the save wrote {expected}: it was truncated (an "
            "interrupted copy, a full disk) or replaced by another file"
        )
    return None


def load_part(
    checkpoint_io: CheckpointIO, main_path: str, entry: Mapping[str, Any], rank: int, world_size: int, **load_kwargs: Any
) -> dict[str, Any]:
    """Read and check rank ``rank``'s part of the checkpoint ``main_path`` whose gossip entry is ``entry``.

    Raises :class:`CheckpointPartError` naming the file and what is wrong: missing, truncated, unreadable, another
    rank's, another save's, written by another number of workers, or corrupted (its content does not match its
    digest). Returns the part's state without its header.
    """
    main_path = os.fspath(main_path)
    path = part_path(main_path, entry["parts"], rank)
    problem = _part_problem_on_disk(main_path, entry, rank)
    if problem is not None:
        raise CheckpointPartError(f"The checkpoint {main_path}: {problem}.")
    inner = getattr(checkpoint_io, "checkpoint_io", checkpoint_io)  # the plugin itself: errors are named here
    try:
        part = inner.load_checkpoint(path, **load_kwargs)
    except Exception as error:  # noqa: BLE001 - whatever the reader says, the file is unusable: name it
        size = ""
        with suppress(OSError):
            size = f" ({os.path.getsize(path)} bytes)"
        raise CheckpointPartError(
            f"The checkpoint {main_path}: rank {rank}'s part {path}{size} cannot be read ({type(error).__name__}: "
            f"{str(error).strip().splitlines()[0] if str(error).strip() else ''}): it is corrupted or truncated. "
            "Resume from an earlier checkpoint."
        ) from error
    header = part.pop(PART_HEADER_KEY, None) if isinstance(part, dict) else None
    expected_digests = entry.get("part_digests")
    if header is None:
        if expected_digests is None:
            return part  # a part written before parts carried headers: nothing to check it against
        raise CheckpointPartError(
            f"The checkpoint {main_path}: rank {rank}'s part {path} has no part header: it is not a part written "
            "by lightning-gossip for this checkpoint."
        )
    wrong = []
    if header.get("rank") != rank:
        wrong.append(f"it is rank {header.get('rank')}'s part, not rank {rank}'s (a part copied or moved into place?)")
    if header.get("save_id") != entry.get("save_id"):
        wrong.append(f"it belongs to save {header.get('save_id')}, but the main file names save {entry.get('save_id')}")
    if header.get("world_size") != entry.get("world_size") or header.get("world_size") != world_size:
        wrong.append(f"it was written by {header.get('world_size')} workers, the main file by "
                     f"{entry.get('world_size')}, and this run has {world_size}")
    if not wrong:
        digest = content_digest(part)
        recorded = expected_digests[rank] if expected_digests is not None else header.get("digest")
        if digest != header.get("digest") or digest != recorded:
            wrong.append("its content does not match the checksum written with it: the file is corrupted")
    if wrong:
        raise CheckpointPartError(f"The checkpoint {main_path}: rank {rank}'s part {path} is not usable: "
                                  + "; ".join(wrong) + ". Resume from an earlier checkpoint.")
    return part


def verify_parts_everywhere(
    main_path: str, entry: Mapping[str, Any], rank: int, own_problem: Optional[str], gather: Callable[[Any], list[Any]]
) -> None:
    """Before the first step, fail on every rank if any rank's part is not usable, naming each bad file.

    Each rank has read and checked its own part in full (``own_problem``: what :func:`load_part` raised, or None);
    here it also checks every other part's presence and size, then ``gather`` (an all-gather of one Python object
    over the ranks, e.g. ``torch.distributed.all_gather_object``) shares the verdicts, so that a bad part of any rank
    stops every rank at once instead of one rank failing and the others waiting for it.
    """
    problems = [own_problem] if own_problem else []
    for other in range(int(entry["world_size"])):
        if other != rank:
            problem = _part_problem_on_disk(os.fspath(main_path), entry, other)
            if problem is not None:
                problems.append(f"The checkpoint {os.fspath(main_path)}: {problem}.")
    verdicts = gather(problems)
    seen: list[str] = []
    for verdict in verdicts:
        for problem in verdict or []:
            if problem not in seen:
                seen.append(problem)
    if seen:
        raise CheckpointPartError(
            "Not resuming: " + " ".join(seen) + (" (seen from every rank)" if len(verdicts) > 1 else "")
        )


def remove_old_parts(main_path: str, keep_id: str) -> None:
    """After the main file names ``keep_id``: remove the parts of earlier saves (and of saves that crashed)."""
    root = parts_root(main_path)
    with suppress(OSError):
        for entry in os.listdir(root):
            if entry != keep_id:
                shutil.rmtree(os.path.join(root, entry), ignore_errors=True)


def save_id_of(main_path: str) -> Optional[str]:
    """The save id a main checkpoint file names (read without loading its tensors), or None if it names none or
    cannot be read."""
    try:
        checkpoint = torch.load(main_path, map_location="cpu", mmap=True, weights_only=True)
    except Exception:  # noqa: BLE001 - unreadable (or needs a full unpickler): its parts are not ours to judge
        return None
    gossip = checkpoint.get(CHECKPOINT_KEY) if isinstance(checkpoint, dict) else None
    return gossip.get("save_id") if isinstance(gossip, dict) else None


def leftovers(directory: str) -> list[str]:
    """What interrupted saves left in the checkpoint folder ``directory``, safe to delete while no save runs there:

    - temporary files ``.<name>.<host>.<pid>.<random>.tmp`` whose writer (a process on this host) is gone;
    - save folders ``<file>.parts/<id>/`` that the main file ``<file>`` does not name, and whole ``<file>.parts/``
      folders whose ``<file>`` does not exist (a save killed before its main file was written).
    """
    found: list[str] = []
    with suppress(OSError):
        entries = os.listdir(directory)
        found += [os.path.join(directory, e) for e in entries if _stale_temporary(e)]
        for entry in entries:
            root = os.path.join(directory, entry)
            if not entry.endswith(".parts") or not os.path.isdir(root):
                continue
            main = root[: -len(".parts")]
            folders = sorted(os.listdir(root))
            if not os.path.exists(main):
                found.append(root)
                continue
            if len(folders) <= 1:
                continue  # the one folder is the main file's (or an older layout): nothing to read
            keep = save_id_of(main)
            if keep is None or keep not in folders:
                continue  # cannot tell which folder the main file names: leave them all
            found += [os.path.join(root, folder) for folder in folders if folder != keep]
    return found


def remove_leftovers(directory: str) -> list[str]:
    """Remove :func:`leftovers` of ``directory`` (after a save completed there; never during one)."""
    removed = []
    for path in leftovers(directory):
        with suppress(OSError):
            if os.path.isdir(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
            removed.append(path)
    return removed


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
