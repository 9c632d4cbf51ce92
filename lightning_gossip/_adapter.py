"""The adapter core: what the Trainer strategy and the Fabric strategy share, so each holds only what is its own.

One gossip run seen from a Lightning adapter: building the averager (the seed, resuming a saved run onto the same or
another number of workers), naming lost ranks around collectives, swapping the consensus in for evaluation, and one
checkpoint format (a main file holding the consensus model, written by rank 0, and one part per rank beside it,
written by that rank, so rank 0's bytes do not grow with the number of workers). Plain torch.distributed and the
gossip core, no Lightning import, so both adapters (and their standalone renamings) use it as it is.
"""

from __future__ import annotations

import atexit
import os
import socket
import uuid
import warnings
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext, suppress
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Optional

import torch
import torch.distributed as dist
from torch import nn

from lightning_gossip.checkpoint_format import CHECKPOINT_KEY
from lightning_gossip.gossip import GossipAverager, GossipCounters, GossipOptions
from lightning_gossip.gossip.averager import ExchangeFactory
from lightning_gossip.gossip.errors import GossipPeerError, collective_guard, peer_lost_error
from lightning_gossip.gossip.survival import ViewChanged


def global_seed() -> int:
    """Lightning's global seed (``seed_everything`` sets ``PL_GLOBAL_SEED`` in every process), else 0."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


@dataclass
class ResumePlan:
    """How a rank's gossip state comes back from a checkpoint.

    Same number of workers: ``own`` is this rank's saved gossip state (weight, schedule position, messages in flight,
    counters), loaded as it is, so training goes on exactly. Another number of workers: per-rank states cannot be
    mapped onto other ranks, so every rank starts from the checkpoint's consensus model with gossip weight 1/M' and
    the schedule going on from the saved ``step``.
    """

    own: Optional[Mapping[str, Any]] = None
    step: Optional[int] = None

    def apply(self, averager: GossipAverager) -> None:
        if self.own is not None:
            averager.load_state_dict(dict(self.own))
        else:
            averager.state.weight = 1.0 / averager.world_size
            if self.step is not None:
                averager.continue_schedule_at(self.step)

    @staticmethod
    def warn_other_world_size(saved: int, world_size: int, step: int) -> None:
        """The warning of a resume onto another number of workers (rank 0 only)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
            warnings.warn(
                f"Resuming a gossip checkpoint written by {saved} workers with {world_size} workers: per-rank states "
                f"cannot be mapped onto a different number of workers, so every rank starts from the checkpoint's "
                f"consensus model (the exact weighted average of the {saved} workers, in-flight messages included) "
                f"with gossip weight 1/{world_size}, the optimizer state of the old rank 0 and gossip counters at "
                f"zero; the gossip schedule goes on from step {step}.",
                stacklevel=3,
            )

    @staticmethod
    def warn_lost_ranks(entry: Mapping[str, Any], world_size: int, step: int) -> None:
        """The warning of a resume from a checkpoint saved after ranks were lost (rank 0 only)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
            warnings.warn(
                f"Resuming a gossip checkpoint saved after rank(s) {list(entry['lost_ranks'])} of "
                f"{entry['world_size']} were lost (on_peer_loss='continue'): their states are gone, so every rank "
                f"starts from the checkpoint's consensus model (the weighted average the survivors "
                f"{list(entry.get('survivors', []))} computed at the save) with gossip weight 1/{world_size}, the "
                f"optimizer state of the rank that wrote the file and gossip counters at zero; the gossip schedule "
                f"goes on from step {step}.",
                stacklevel=3,
            )


class AdapterCore:
    """One gossip run of a Lightning adapter (Trainer or Fabric strategy), whatever the mode.

    Args:
        options: the checked gossip options (``seed=None`` takes Lightning's global seed at setup).
        exchange_factory: replaces the mode's exchange (see ``GossipAverager(exchange=...)``), or None.
    """

    def __init__(self, options: GossipOptions, exchange_factory: Optional[ExchangeFactory] = None) -> None:
        self.options = options
        self.exchange_factory = exchange_factory
        self.averager: Optional[GossipAverager] = None
        self._resume: Optional[ResumePlan] = None
        self._eval_stack: Optional[ExitStack] = None
        self._processes: list[tuple[str, int]] = []

    # -- the averager -------------------------------------------------------------------------------------------
    @property
    def seed(self) -> int:
        """The gossip seed, else Lightning's global seed, else 0 (it also seeds the asynchronous data sharing)."""
        return self.options.schedule_seed(fallback=global_seed())

    def build_averager(self, module: nn.Module) -> GossipAverager:
        """Set up the averager for ``module`` (a collective): rank 0's weights broadcast, a_i = 1/M, unless a resume
        was planned (:meth:`resume`), whose state is loaded instead."""
        plan, self._resume = self._resume, None
        # Resuming one's own state: every rank loaded its own weights; broadcasting would erase them.
        self.averager = GossipAverager(
            module,
            self.options.replace(seed=self.seed),
            exchange=self.exchange_factory,
            broadcast=plan is None or plan.own is None,
        )
        if plan is not None:
            plan.apply(self.averager)
        self._register_processes()
        return self.averager

    def resume(self, plan: ResumePlan) -> None:
        """Apply ``plan`` now if the averager exists (Fabric loads after setup), else when it is built (the
        Trainer restores the model before its strategy sets up)."""
        if self.averager is not None:
            plan.apply(self.averager)
        else:
            self._resume = plan

    def gossiping(self) -> bool:
        return self.averager is not None and self.averager.world_size > 1 and dist.is_initialized()

    def surviving(self) -> bool:
        """Whether this run goes on without lost peers (``on_peer_loss="continue"``): collectives then run over the
        ranks still alive (:meth:`among_survivors`)."""
        return self.gossiping() and self.averager is not None and self.averager.survivors is not None

    def among_survivors(self, what: str, fn: Callable[[Any], Any]) -> Any:
        """``fn(group)`` as one collective of the ranks still alive (``group``: a process group of exactly them), on
        every rank the same result; run again over the new survivors if a member is lost during it. ``fn`` must not
        change its inputs (it may run more than once)."""
        assert self.averager is not None and self.averager.survivors is not None
        self.averager.enter_collective(what)
        while True:
            try:
                return self.averager.survivors.run(what, fn)
            except ViewChanged:
                continue

    def abort(self) -> None:
        """After an exception: give back what the exchange holds without any collective (peers may be gone)."""
        if self.averager is not None:
            self.averager.exchange.abort()

    # -- naming a lost rank -------------------------------------------------------------------------------------
    def _register_processes(self) -> None:
        """Every rank's (host, pid), gathered once at setup: a failed collective can then name the ranks that are
        gone (on this host) instead of "one of ranks 1, 2, 3"."""
        self._processes = []
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return
        everyone: list[Any] = [None] * dist.get_world_size()
        with collective_guard("the exchange of every rank's process id at setup"):
            dist.all_gather_object(everyone, (socket.gethostname(), os.getpid()))
        self._processes = [(str(host), int(pid)) for host, pid in everyone]

    def gone_ranks(self) -> list[int]:
        from lightning_gossip.checkpoint_io import _process_alive as process_alive

        host = socket.gethostname()
        me = dist.get_rank() if dist.is_initialized() else 0
        return [rank for rank, (rank_host, pid) in enumerate(self._processes)
                if rank != me and rank_host == host and not process_alive(pid)]

    @contextmanager
    def collective(self, what: str) -> Iterator[None]:
        """Around a collective of the adapter: post it on the step board (a peer waiting for a gossip message can
        then tell this rank left training), and turn a failure into a :class:`GossipPeerError` that names the ranks
        whose processes are gone, where this rank can see them (same host)."""
        if self.averager is not None:
            self.averager.enter_collective(what)
        try:
            with collective_guard(what):
                yield
        except GossipPeerError as error:
            gone = self.gone_ranks()
            if not gone or set(error.peers) == set(gone):
                raise
            # chained to the backend's error, not to the vaguer one ("one of ranks ...") it replaces
            cause = error.__cause__ or error
            me = dist.get_rank() if dist.is_initialized() else 0
            raise peer_lost_error(me, gone, what, cause) from cause

    # -- evaluation ---------------------------------------------------------------------------------------------
    def enter_consensus(self) -> None:
        """Swap the exact consensus in for evaluation (``eval_mode="consensus"``); a collective. Idempotent."""
        if self.options.eval_mode != "consensus" or not self.gossiping() or self._eval_stack is not None:
            return
        assert self.averager is not None
        stack = ExitStack()
        with self.collective("the consensus for evaluation"):
            stack.enter_context(self.averager.consensus_swapped_in())
        self._eval_stack = stack

    def leave_consensus(self, failed: bool = False) -> None:
        """Put this rank's own weights back (and, with ``verify``, check the consensus did not move: a collective).

        ``failed``: an evaluation raised, so other ranks may be elsewhere: restore without any collective.
        """
        if self._eval_stack is None:
            return
        stack, self._eval_stack = self._eval_stack, None
        if failed:
            error = RuntimeError("evaluation failed")
            with suppress(BaseException):
                stack.__exit__(type(error), error, None)  # the averager restores, skips its check, re-raises
            return
        with self.collective("the end of an evaluation on the consensus"):
            stack.close()

    @property
    def evaluating_consensus(self) -> bool:
        return self._eval_stack is not None

    @contextmanager
    def evaluating(self) -> Iterator[None]:
        """Hold the model ``eval_mode`` names (the consensus, or this rank's own) for the duration."""
        self.enter_consensus()
        try:
            yield
        except BaseException:
            self.leave_consensus(failed=True)
            raise
        self.leave_consensus()

    def consensus_swapped_in(self) -> AbstractContextManager:
        """The exact consensus in place for the duration (a collective), or nothing when not gossiping."""
        if not self.gossiping():
            return nullcontext()
        assert self.averager is not None
        return self.averager.consensus_swapped_in()

    # -- checkpoints: one format ---------------------------------------------------------------------------------
    def own_gossip_state(self) -> dict[str, Any]:
        """This rank's gossip state at a consistent cut (first: asynchronous messages on the wire come home, so the
        weights read after this and the gossip weights of all ranks sum to the whole mass)."""
        assert self.averager is not None
        with self.collective("a checkpoint's consistent cut"):
            return self.averager.checkpoint_state_dict()

    def save(
        self,
        path: str,
        own: Mapping[str, Any],
        write_part: Callable[[Mapping[str, Any], str], None],
        write_main: Callable[[dict[str, Any]], None],
        remove_old_parts: Optional[Callable[[str, str], None]] = None,
        remove_leftovers: Optional[Callable[[str], Any]] = None,
    ) -> None:
        """Write a gossip checkpoint: every rank its part ``own`` (``write_part(own, part_path)``), then rank 0 the
        main file (``write_main(entry)``, ``entry`` naming the parts, to store under :data:`CHECKPOINT_KEY`), then
        rank 0 removes the parts of earlier saves. A collective: every rank must call it with the same ``path``.

        A fresh save id per save names the parts' folder and is recorded in the main file, which is replaced last,
        so a crash at any moment leaves the previous checkpoint complete. Assumes, as Lightning's resume does, that
        every rank sees the folder.
        """
        from lightning_gossip.checkpoint_io import parts_entry, write_part_with_header

        assert self.averager is not None
        if self.surviving():
            self._save_among_survivors(path, own, write_part, write_main, remove_old_parts, remove_leftovers)
            return
        save_id = self._fresh_save_id()
        rank, world_size = dist.get_rank(), self.averager.world_size
        # Each part carries a header (save id, rank, world size, digest of its content), checked on resume; a rank
        # that could not write (a full disk) fails every rank, naming it, instead of leaving the others waiting.
        record: Optional[dict[str, Any]] = None
        failure: Optional[str] = None
        try:
            record = write_part_with_header(lambda state, part: write_part(state, part), path, save_id, rank,
                                            world_size, own)
        except Exception as error:  # noqa: BLE001 - reported on every rank below, then raised here with its cause
            failure, failed = f"rank {rank}: {type(error).__name__}: {error}", error
        everyone: list[Any] = [None] * world_size
        with self.collective("the exchange of the checkpoint parts every rank wrote"):
            dist.all_gather_object(everyone, (record, failure))  # every part is on disk before the main file names it
        failures = [entry[1] for entry in everyone if entry[1]]
        if failures:
            text = f"Could not save the checkpoint {path}: a part could not be written ({'; '.join(failures)})."
            if failure is not None:
                raise RuntimeError(text) from failed
            raise RuntimeError(text)
        if rank == 0:
            write_main({**parts_entry(save_id, world_size, [entry[0] for entry in everyone], path),
                        "step": self.averager.step_count})
            if remove_old_parts is not None:
                remove_old_parts(path, save_id)
            if remove_leftovers is not None:
                remove_leftovers(os.path.dirname(os.path.abspath(path)))  # what killed saves left beside it

    def _save_among_survivors(
        self,
        path: str,
        own: Mapping[str, Any],
        write_part: Callable[[Mapping[str, Any], str], None],
        write_main: Callable[[dict[str, Any]], None],
        remove_old_parts: Optional[Callable[[str, str], None]],
        remove_leftovers: Optional[Callable[[str], Any]],
    ) -> None:
        """:meth:`save` with ``on_peer_loss="continue"``: its agreements run over the ranks still alive, and the
        lowest of them writes the main file. While nobody is lost, the save is the usual one (every rank's part, an
        exact resume). Once a rank is lost (before or during the save), its state is gone, so no part is written: the
        main file holds the survivors' consensus, the writer's optimizer state and the loss report, and a resume
        starts every rank from the consensus (:func:`resumes_rank_by_rank`)."""
        from lightning_gossip.checkpoint_io import parts_entry, write_part_with_header

        assert self.averager is not None and self.averager.survivors is not None
        survivors = self.averager.survivors
        rank, world_size = dist.get_rank(), self.averager.world_size
        proposal = uuid.uuid4().hex
        save_id = self.among_survivors("the agreement on a checkpoint's save id",
                                       lambda group: _gather_objects(group, proposal))[0]
        record: Optional[dict[str, Any]] = None
        failure: Optional[str] = None
        if not survivors.any_lost:
            try:
                record = write_part_with_header(lambda state, part: write_part(state, part), path, save_id, rank,
                                                world_size, own)
            except Exception as error:  # noqa: BLE001 - reported on every rank below
                failure = f"rank {rank}: {type(error).__name__}: {error}"
        everyone = self.among_survivors("the exchange of the checkpoint parts every rank wrote",
                                        lambda group: _gather_objects(group, (rank, record, failure)))
        failures = [entry[2] for entry in everyone if entry[2]]
        if failures and not survivors.any_lost:  # after a loss no part is needed: the save goes on without them
            raise RuntimeError(f"Could not save the checkpoint {path}: a part could not be written "
                               f"({'; '.join(failures)}).")
        members = sorted(entry[0] for entry in everyone)
        full = not survivors.any_lost and len(members) == world_size and all(entry[1] for entry in everyone)
        while True:
            wrote = False
            if rank == members[0]:
                if full:
                    entry = parts_entry(save_id, world_size, [entry[1] for entry in everyone], path)
                else:
                    entry = {"world_size": world_size, "lost_ranks": list(survivors.lost), "survivors": members,
                             "loss_report": survivors.report.as_dict()}
                write_main({**entry, "step": self.averager.step_count})
                if not full and remove_old_parts is not None:
                    remove_old_parts(path, "")  # a loss entry names no parts: this save's, if any, are orphans
                elif remove_old_parts is not None:
                    remove_old_parts(path, save_id)
                if remove_leftovers is not None:
                    remove_leftovers(os.path.dirname(os.path.abspath(path)))
                wrote = True
            # The writer may die before its file is complete: every survivor learns whether it finished, and if
            # it did not, the lowest survivor left writes the file again (a loss entry, since the writer is lost).
            confirmations = self.among_survivors("the confirmation that a checkpoint's main file was written",
                                                 lambda group: _gather_objects(group, (rank, wrote)))
            if any(done for _, done in confirmations):
                return
            members, full = sorted(member for member, _ in confirmations), False

    def load_own_part(self, checkpoint_io: Any, path: str, entry: Mapping[str, Any], **load_kwargs: Any
                      ) -> dict[str, Any]:
        """This rank's part, checked in full, and every other rank's part checked for presence and size; a bad part
        of any rank fails every rank, naming the file, before the first step (a collective: every rank resumes)."""
        from lightning_gossip.checkpoint_io import CheckpointPartError, load_part, verify_parts_everywhere

        rank, world_size = dist.get_rank(), dist.get_world_size()
        mine: Optional[dict[str, Any]] = None
        problem: Optional[str] = None
        try:
            mine = load_part(checkpoint_io, path, entry, rank, world_size, **load_kwargs)
        except CheckpointPartError as error:
            problem = str(error)

        def gather(obj: Any) -> list[Any]:
            everyone: list[Any] = [None] * world_size
            with self.collective("the check of every rank's checkpoint part"):
                dist.all_gather_object(everyone, obj)
            return everyone

        verify_parts_everywhere(path, entry, rank, problem, gather)
        assert mine is not None
        return mine

    def _fresh_save_id(self) -> str:
        """A random id from rank 0, the same on every rank (not from torch's generator: training stays bitwise
        the same with or without saving)."""
        assert self.averager is not None
        device = self.averager.state.device
        code = torch.tensor(list(uuid.uuid4().bytes) if dist.get_rank() == 0 else [0] * 16, dtype=torch.uint8,
                            device=device)
        with self.collective("the broadcast of a checkpoint's save id"):
            dist.broadcast(code, src=0)
        return bytes(code.cpu().tolist()).hex()

    def plan_resume(self, entry: Mapping[str, Any], own_part: Optional[Mapping[str, Any]], world_size: int,
                    ) -> ResumePlan:
        """The resume plan of a checkpoint's gossip ``entry``: this rank's part's gossip state with the same number
        of workers, the consensus (and a warning) with another."""
        if resumes_rank_by_rank(entry, world_size):
            assert own_part is not None, "a resume onto the same number of workers needs this rank's part"
            return ResumePlan(own=own_part[CHECKPOINT_KEY])
        step = saved_step(entry)
        if entry.get("lost_ranks"):
            ResumePlan.warn_lost_ranks(entry, world_size, step)
        else:
            ResumePlan.warn_other_world_size(int(entry["world_size"]), world_size, step)
        return ResumePlan(step=step)


def _gather_objects(group: Any, obj: Any) -> list[Any]:
    """Every member's ``obj`` over ``group``, in the group's rank order."""
    everyone: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, obj, group=group)
    return everyone


def saved_step(entry: Mapping[str, Any]) -> int:
    """The schedule position a checkpoint's gossip entry was saved at (checkpoints from before per-rank parts kept
    it in every rank's state)."""
    if "step" in entry:
        return int(entry["step"])
    return int(entry["ranks"][0][CHECKPOINT_KEY]["step"])


def resumes_rank_by_rank(entry: Mapping[str, Any], world_size: int) -> bool:
    """Whether a checkpoint's gossip ``entry`` resumes every rank from its own part: the same number of workers, and
    no rank lost before the save (after a loss, ``on_peer_loss="continue"``, the lost ranks' states are gone, so every
    rank starts from the survivors' consensus, as onto another number of workers)."""
    return int(entry["world_size"]) == world_size and not entry.get("lost_ranks")


class AveragerReadouts:
    """``gossip_weight``, ``counters`` and ``gossip_step`` of a strategy's ``averager`` (defaults before setup)."""

    averager: Optional[GossipAverager]
    world_size: int

    @property
    def gossip_weight(self) -> float:
        """This rank's gossip weight a_i (float64). Over all ranks (and messages in flight) they sum to 1."""
        return self.averager.weight if self.averager is not None else 1.0 / max(1, self.world_size)

    @property
    def counters(self) -> GossipCounters:
        """Messages and bytes this rank sent and received, rejected messages, gossip steps taken."""
        return self.averager.counters if self.averager is not None else GossipCounters()

    @property
    def gossip_step(self) -> int:
        """The schedule position: how many gossip steps (optimizer steps) this rank has taken."""
        return self.averager.step_count if self.averager is not None else 0


_AT_EXIT_REGISTERED = False


def destroy_process_group_at_exit() -> None:
    """Destroy the default process group when the interpreter exits, before the C++ runtime tears it down.

    A gloo process group still alive at interpreter exit is destroyed by static destructors in no particular order,
    which now and then ends a finished run with ``terminate called without an active exception`` (exit code -6).
    Neither Lightning's Trainer teardown (a ``test`` after ``fit`` reuses the group) nor a Fabric script (Fabric has no
    end of run) destroys it, so it is destroyed at exit.
    """
    global _AT_EXIT_REGISTERED
    if _AT_EXIT_REGISTERED:
        return
    _AT_EXIT_REGISTERED = True

    def destroy() -> None:
        if dist.is_available() and dist.is_initialized():
            with suppress(Exception):
                dist.destroy_process_group()

    atexit.register(destroy)
