"""GoSGD for a hand-written training loop: plain torch.distributed, no Lightning.

    dist.init_process_group("gloo")
    model = make_model()
    gossip = GossipAverager(model, GossipOptions(p=0.1, topology="random", seed=0))  # broadcasts rank 0's weights
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in my_shard_of_the_data:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
        gossip.step()                 # with probability p, push (weights, weight/2) to a peer; mix what arrives
    gossip.end()                      # messages home, step counts checked, every rank holds the exact average

The averager owns the run's gossip lifecycle: it builds the flat view of the model (:class:`GossipState`), the
schedule and the exchange (which owns every message in flight), runs the step, the exact consensus, checkpoints of
its state, and the end of a run. It gossips over ``group`` (the default process group unless one is given).
"""

from __future__ import annotations

import uuid
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

from lightning_gossip.gossip.counters import GossipCounters
from lightning_gossip.gossip import health
from lightning_gossip.gossip.errors import GossipScheduleError, collective_guard, raise_if_hang_declared
from lightning_gossip.gossip.exchange import Exchange
from lightning_gossip.gossip.invariants import InvariantChecker
from lightning_gossip.gossip.modes import exchange_for
from lightning_gossip.gossip.options import GossipOptions
from lightning_gossip.gossip.outer import OuterGossipState, OuterOptimizer, OuterSchedule, load_outer_state
from lightning_gossip.gossip.schedule import GossipSchedule
from lightning_gossip.gossip.state import GossipState, gossiped_tensors
from lightning_gossip.gossip.step_board import StepBoard
from lightning_gossip.gossip.survival import PeerLossReport, Survivors, ViewChanged
from lightning_gossip.gossip.topology import validate_topology

ExchangeFactory = Callable[[GossipState, GossipOptions, Optional[dist.ProcessGroup], GossipSchedule], Exchange]


def check_same_model_on_all_ranks(
    module: nn.Module, include_buffers: bool, group: Optional[dist.ProcessGroup] = None
) -> str:
    """Fail at setup, naming the first difference, if the ranks' models do not have the same tensors.

    Gossip mixes flat buffers position by position, so a shape mismatch would silently mix unrelated weights. Returns
    a fresh id of this run, rank 0's, the same on every rank (it rides on the same gather: no extra collective).
    """
    named = list(module.named_parameters()) + (list(module.named_buffers()) if include_buffers else [])
    signature = [(name, tuple(t.shape), str(t.dtype)) for name, t in named if t.is_floating_point()]
    everyone: list[Any] = [None] * dist.get_world_size(group)
    with collective_guard("the check that every rank has the same model", group):
        dist.all_gather_object(everyone, (signature, uuid.uuid4().hex), group=group)
    reference, run_id = everyone[0]
    for rank, (other, _) in enumerate(everyone):
        if other == reference:
            continue
        for index in range(max(len(reference), len(other))):
            mine = reference[index] if index < len(reference) else None
            theirs = other[index] if index < len(other) else None
            if mine != theirs:
                raise ValueError(
                    f"Gossip needs the same model on every rank, but tensor #{index} is {mine} on rank 0 and "
                    f"{theirs} on rank {rank} (name, shape, dtype)."
                )
    return run_id


class GossipAverager:
    """Sum-weight (push-sum) gossip over the ranks of a process group.

    Args:
        module: the local model; its floating-point parameters (and buffers, if ``mix_buffers``) are gossiped.
        options: a :class:`GossipOptions`; or give its fields as keyword arguments (``p=0.1, staleness=2``).
            ``seed=None`` means 0 here (the caller resolves a global seed if it has one).
        group: the process group to gossip in (``None``: the default group). Every rank of it must construct the
            averager at the same point (it runs collectives).
        exchange: a factory ``(state, options, group, schedule) -> exchange`` to replace the mode's exchange
            (see :class:`~lightning_gossip.gossip.exchange.Exchange` for the protocol and
            :mod:`lightning_gossip.gossip.modes` for the modes).
        broadcast: copy rank 0's weights to every rank now (skip when every rank already holds its own state).

    The lifecycle is the same in every mode; what differs (whether ranks must take the same number of steps, what a
    consistent cut costs, how messages move) is the exchange's business. Every collective of the averager first
    posts where this rank stands on the :class:`~lightning_gossip.gossip.step_board.StepBoard`, so a peer that waits
    for a gossip message this rank will never send can tell (lock-step), and, with ``options.verify``, checks the
    invariants there (:mod:`lightning_gossip.gossip.invariants`).
    """

    def __init__(
        self,
        module: nn.Module,
        options: Optional[GossipOptions] = None,
        *,
        group: Optional[dist.ProcessGroup] = None,
        exchange: Optional[ExchangeFactory] = None,
        broadcast: bool = True,
        **option_fields: Any,
    ) -> None:
        if options is None:
            options = GossipOptions(**option_fields)
        elif option_fields:
            options = options.replace(**option_fields)
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("GossipAverager needs an initialised default process group (dist.init_process_group).")
        self.options = options
        self.module = module
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self._health = self._watch_health()
        validate_topology(options.topology, self.world_size)
        self.schedule = GossipSchedule(self.world_size, options.p, options.topology, options.schedule_seed())
        if options.outer_every is not None:  # the outer optimizer's pairings every H steps (outer.py)
            self.schedule = OuterSchedule(self.schedule, options.outer_every)
        # With the outer optimizer, what is mixed into the model is mixed into its slow weights too (outer.py).
        state_type = OuterGossipState if options.outer_every is not None else GossipState
        self.state = state_type(
            gossiped_tensors(module, options.mix_buffers), 1.0 / self.world_size, options.transfer_dtype
        )
        #: An id of this run, the same on every rank and new for every averager: scopes every store key of the run
        #: (work sharing, stop flags, the step board), so a second run in the same process never meets the first's.
        self.run_id = check_same_model_on_all_ranks(module, options.mix_buffers, group)
        self.scope = f"lightning_gossip/run/{self.run_id}"
        self.exchange: Exchange = (exchange or exchange_for(options))(self.state, options, group, self.schedule)
        #: The membership of the run with ``on_peer_loss="continue"`` (who is alive, the report of what was lost), or
        #: None: then a lost peer ends the run.
        self.survivors: Optional[Survivors] = getattr(self.exchange, "survivors", None)
        # After a loss, the default store client may be held up by a group being built (see survival.py): the
        # survivors' own client serves the board too.
        self.board = StepBoard(self.scope, self.rank,
                               store=self.survivors.store() if self.survivors is not None else None)
        if hasattr(self.exchange, "board"):
            self.exchange.board = self.board
        self.verifier: Optional[InvariantChecker] = InvariantChecker(self) if options.verify else None
        self._step = 0
        self.outer: Optional[OuterOptimizer] = None
        if broadcast:
            self.broadcast_from_rank_zero()
        self.outer = OuterOptimizer.for_module(module, options, self.state)  # slow weights = the starting model

    def _watch_health(self) -> Optional[health.HealthMonitor]:
        """Heartbeats and the hang watchdog (see :mod:`~lightning_gossip.gossip.health`), armed while training."""
        monitor = health.start()
        if monitor is not None:
            monitor.arm()
        return monitor

    # -- public read-outs -----------------------------------------------------------------------------------------
    @property
    def weight(self) -> float:
        """This rank's gossip weight a_i (float64); the weights of all ranks plus those in flight sum to 1."""
        return self.state.weight

    @property
    def counters(self) -> GossipCounters:
        return self.exchange.counters

    @property
    def expected_mass(self) -> float:
        """What the gossip weights of all ranks (and of the messages in flight) sum to at a consistent cut: 1, less
        the weight that lost peers took with them (``on_peer_loss="continue"``)."""
        return 1.0 - self.loss_report.weight_lost if self.survivors is not None else 1.0

    @property
    def loss_report(self) -> PeerLossReport:
        """The peers lost in this run and what was lost with them (empty unless ``on_peer_loss="continue"``)."""
        return self.survivors.report if self.survivors is not None else PeerLossReport()

    @property
    def alive_ranks(self) -> list[int]:
        """The ranks of the gossip group believed alive (every rank unless a peer was lost)."""
        return list(self.survivors.alive) if self.survivors is not None else list(range(self.world_size))

    @property
    def step_count(self) -> int:
        """The schedule position: how many gossip steps this rank has taken."""
        return self._step

    @property
    def staleness(self) -> int:
        return self.options.staleness

    @property
    def overlap(self) -> bool:
        """Whether exchanges are mixed in later than they are posted (``staleness >= 1``)."""
        return self.options.overlap

    @property
    def in_flight(self) -> bool:
        """Whether a message has been received and not mixed in yet (overlap / bounded staleness)."""
        return bool(self.exchange.in_flight_messages())

    def in_flight_weight(self) -> float:
        """Weight sent to this rank that it has not mixed in yet (waits for the transfers)."""
        return sum(GossipState.read_header(message)[0] for message in self.exchange.in_flight_messages())

    # -- the algorithm --------------------------------------------------------------------------------------------
    def step(self) -> None:
        """The GoSGD step after an optimizer step: maybe push to a peer, mix in what was sent to this rank."""
        if self._health is not None and self._health.declared():
            raise_if_hang_declared(self.rank)  # a peer hangs: say so now, not at the next wait for it
        if self.outer is not None and self.outer.due(self._step + 1):
            self.outer.step()  # first: this step's pairing then averages the new slow weights (outer.py)
        if self.world_size > 1:
            self.board.back_to_training()
            self.exchange.step(self._step)
        self._step += 1
        if self.world_size > 1 and self.options.average_every and self._step % self.options.average_every == 0:
            self.consensus_()

    def enter_collective(self, what: str) -> None:
        """Post on the step board that this rank now waits in the collective ``what`` (adapters call it around
        their own collectives, so a peer waiting for a gossip message can tell that this rank left training)."""
        if self.world_size > 1:
            self.board.enter_collective(self._step, what)

    def cut(self, what: str = "a consistent cut") -> None:
        """A consistent cut (a collective): afterwards this rank's weights, gossip weight and the messages it holds
        received-but-not-mixed account for every message sent to it, so the exact mean and a checkpoint are whole.

        Lock-step is at a cut after every step (what is in flight is held whole); asynchronous gossip reaches one
        by quiescence. With ``options.verify`` the invariants are checked here.
        """
        if self.world_size == 1:
            return
        self.enter_collective(what)
        if self.survivors is not None:
            self._cut_among_survivors(what)
            return
        self.exchange.cut()
        if self.verifier is not None:
            self.verifier.at_cut(what)

    def _cut_among_survivors(self, what: str) -> None:
        """A consistent cut of the survivors (quiescence through the store), with the invariant checks run over
        exactly its members; a peer lost during the checks means a new cut."""
        assert self.survivors is not None
        while True:
            self.exchange.cut()
            if self.verifier is None:
                return
            try:
                self.survivors.run(f"the invariant check at {what}", lambda group: self.verifier.at_cut(  # type: ignore[union-attr]
                    what, group, self.exchange.cut_members), members=self.exchange.cut_members)
                return
            except ViewChanged:
                continue

    def _at_cut(self, what: str, fn: Callable[[Optional[dist.ProcessGroup]], Any]) -> Any:
        """``fn(group)`` (collectives of the averager) at a consistent cut, as one unit: with survivors, a peer lost
        during it means a new cut (which accounts for the loss) and ``fn`` again, over the new survivors."""
        if self.survivors is None:
            self.cut(what)
            return fn(self.group)
        while True:
            self.cut(what)
            try:
                return self.survivors.run(what, fn, members=self.exchange.cut_members)
            except ViewChanged:
                continue

    def finish(self) -> None:
        """Bring every message in flight home and mix it in, so every rank's weight is back in its own a_i."""
        if self.world_size > 1:
            if self.survivors is not None:
                self.cut("finish() (every gossip message brought home)")
                return
            self.enter_collective("finish() (every gossip message brought home)")
            self.exchange.drain()
            if self.verifier is not None:
                self.verifier.at_cut("finish()")

    def end(self, consensus: Optional[bool] = None) -> None:
        """End a run: check that every rank took as many steps, bring every message home, put the exact consensus on
        every rank (``consensus``, default ``options.final_consensus``), and give back the exchange's buffers.

        A collective: every rank must call it. The averager stays usable (for evaluation, or more steps).
        """
        if self.world_size == 1:
            return
        if self.survivors is not None:
            if self.options.final_consensus if consensus is None else consensus:
                self.consensus_()
            else:
                self.finish()
            self.exchange.close()
            if self._health is not None:
                self._health.disarm()  # the run ended normally: peers may now exit at any moment
            return
        if self.exchange.equal_steps:
            # Before draining: a rank that took fewer steps would otherwise wait for messages never sent.
            self.check_same_step_count()
        if self.options.final_consensus if consensus is None else consensus:
            self.consensus_()
        else:
            self.finish()
        self.exchange.close()
        if self._health is not None:
            self._health.disarm()  # the run ended normally: peers may now exit at any moment

    def check_same_step_count(self) -> None:
        """Raise :class:`GossipScheduleError` on every rank if the ranks took different numbers of steps."""
        self.enter_collective("the check that every rank took the same number of gossip steps")
        steps = torch.tensor([self._step], dtype=torch.int64, device=self.state.device)
        everyone = [torch.zeros_like(steps) for _ in range(self.world_size)]
        with collective_guard("the check that every rank took the same number of steps", self.group):
            dist.all_gather(everyone, steps, group=self.group)
        counts = [int(t.item()) for t in everyone]
        if len(set(counts)) > 1:
            raise GossipScheduleError(
                f"Ranks took different numbers of optimizer steps: {counts}. Gossip pairs ranks by step number, so "
                "every rank must take the same number of steps: equal-length data shards (Lightning's "
                "DistributedSampler pads them; keep `use_distributed_sampler=True` or shard evenly yourself) and no "
                "optimizer steps skipped on some ranks only."
            )

    def broadcast_from_rank_zero(self) -> None:
        """GoSGD's start: every x_i equals rank 0's, a_i = 1/M."""
        flat = self.state.flatten()
        with collective_guard("the broadcast of rank 0's initial weights", self.group):
            dist.broadcast(flat, src=self._global_rank_zero(), group=self.group)
        self.state.load_flat(flat)
        self.state.weight = 1.0 / self.world_size
        if self.outer is not None:
            self.outer.restart()

    def _global_rank_zero(self) -> int:
        return dist.get_global_rank(self.group, 0) if self.group is not None else 0

    def weighted_mean(self) -> tuple[torch.Tensor, float]:
        """The exact consensus x_bar (messages in flight counted, not mixed in) and sum_i a_i. A collective.

        Taken at a consistent cut (:meth:`cut`): in asynchronous mode messages still on the wire are brought home
        first, since no rank can count them there.
        """
        if self.survivors is not None:
            return self._at_cut("the exact consensus (weighted mean)", self._exact_mean)
        self.cut("the exact consensus (weighted mean)")
        return self.exact_mean()

    def exact_mean(self) -> tuple[torch.Tensor, float]:
        """The weighted mean of what every rank holds now (its weights and the messages it received and has not
        mixed in) and sum_i a_i: the exact consensus at a consistent cut (call :meth:`cut` first). A collective.

        With ``on_peer_loss="continue"`` it runs over the members of the last cut and raises
        :class:`~lightning_gossip.gossip.survival.ViewChanged` if one was lost since (:meth:`weighted_mean` takes a new
        cut and tries again by itself).
        """
        if self.survivors is not None:
            return self.survivors.run("the exact consensus (weighted mean)", self._exact_mean,
                                      members=self.exchange.cut_members)
        return self._exact_mean(self.group)

    def _exact_mean(self, group: Optional[dist.ProcessGroup]) -> tuple[torch.Tensor, float]:
        return self.state.weighted_mean(
            group=group, in_flight=self.exchange.in_flight_messages(), on_nonfinite=self.options.on_nonfinite
        )

    @torch.no_grad()
    def consensus_(self) -> float:
        """Put the exact weighted average on every rank and reset a_i = 1/M; returns the pre-average distance.

        A collective: every rank must call it. With ``on_peer_loss="continue"``, over the survivors: each takes
        a_i = (their total) / (their number), so the weight the lost peers took stays lost.
        """
        if self.survivors is not None:
            def average(group: Optional[dist.ProcessGroup]) -> tuple[torch.Tensor, float, float, int]:
                mean, total = self.state.weighted_mean(group=group, on_nonfinite=self.options.on_nonfinite)
                return mean, total, self.state.consensus_distance(mean, group), dist.get_world_size(group)

            mean, total, distance, members = self._at_cut("consensus_() (the exact average on every rank)", average)
            self.state.load_flat(mean)
            self.state.weight = total / members
            self.exchange.weights_reset(self.state.weight, self.exchange.cut_members)
            return distance
        self.finish()
        mean, total = self.state.weighted_mean(group=self.group, on_nonfinite=self.options.on_nonfinite)
        distance = self.state.consensus_distance(mean, self.group)
        if self.outer is not None:  # the outer state's a-weighted means too, so every rank holds one state
            self.outer.consensus_(self.state.weight, self.group, self.options.on_nonfinite)
        self.state.load_flat(mean)
        self.state.weight = total / self.world_size
        return distance

    @torch.no_grad()
    def consensus_distance(self) -> float:
        """(1/M) sum_i ||x_i - x_bar||^2, the spread of the workers' models (a collective; M: the survivors)."""
        if self.survivors is not None:
            return self._at_cut("the consensus distance", lambda group: self.state.consensus_distance(
                self._exact_mean(group)[0], group))
        return self.state.consensus_distance(self.weighted_mean()[0], self.group)

    @contextmanager
    def consensus_swapped_in(self) -> Iterator[float]:
        """Temporarily hold the exact consensus (to evaluate or save it), then restore this rank's own weights.

        The cut comes first and this rank's weights are copied after it: in asynchronous mode the cut mixes in what
        was on the wire, and the copy must hold it (a copy taken before would put the messages' values back out
        while their weight stays). Lock-step counts the messages in flight without mixing them, so looking at the
        consensus never changes the course of training. Yields the consensus distance. A collective: every rank
        must enter it (and, for the check of ``options.verify``, leave it without an error).
        """
        what = "the consensus swapped in (evaluation or checkpoint)"
        with torch.no_grad():
            if self.survivors is not None:
                def look(group: Optional[dist.ProcessGroup]) -> tuple[torch.Tensor, float]:
                    mean = self._exact_mean(group)[0]
                    return mean, self.state.consensus_distance(mean, group)

                mean, distance = self._at_cut(what, look)  # the weights copied below are those of this cut
                local = self.state.flatten()
            else:
                self.cut(what)
                local = self.state.flatten()
                mean, _ = self.exact_mean()
                distance = self.state.consensus_distance(mean, self.group)
            self.state.load_flat(mean)
        try:
            yield distance
        except BaseException:
            self.state.load_flat(local)
            raise
        self.state.load_flat(local)
        if self.verifier is not None:
            with torch.no_grad():
                try:
                    self.verifier.mean_unchanged(mean, "the consensus swapped in and back (evaluation or checkpoint)")
                except ViewChanged:
                    pass  # a peer was lost meanwhile: the survivors' mean moved with it; the next cut accounts for it

    def refresh_tensors(self) -> None:
        """Re-collect the module's tensors (after ``module.to()``, which replaces buffer tensors)."""
        tensors = gossiped_tensors(self.module, self.options.mix_buffers)
        if [t.numel() for t in tensors] != self.state.numels:
            raise RuntimeError("The model's floating-point tensors changed shape since gossip was set up.")
        self.state.tensors = tensors
        self.state.device = tensors[0].device

    # -- resume ---------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """This rank's gossip state: weight, schedule position, counters and the messages received but not mixed
        in yet (``in_flight``, ``(step, sender, message)``), each waited for so the checkpoint holds it whole."""
        return {
            "weight": self.state.weight,
            "step": self._step,
            "seed": self.schedule.seed,
            "world_size": self.world_size,
            "staleness": self.options.staleness,
            **self.exchange.state_dict(),
            **({"outer": self.outer.state_dict()} if self.outer is not None else {}),
        }

    def checkpoint_state_dict(self) -> dict[str, Any]:
        """:meth:`state_dict` at a consistent cut, for a checkpoint: read the module's weights *after* this call.

        Asynchronous mode brings every message on the wire home first (a collective there), so what a checkpoint
        holds, every rank's weights and gossip weights, sums to the whole mass; the lock-step exchange is at a cut
        after every step already and saves its messages in flight.
        """
        self.cut("a checkpoint's consistent cut")
        return self.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["world_size"] != self.world_size:
            raise ValueError(
                f"This gossip state was saved with {state['world_size']} workers; it cannot be loaded into a run "
                f"with {self.world_size}."
            )
        saved_seed = self.schedule.seed if state.get("seed") is None else int(state["seed"])
        if saved_seed != self.schedule.seed:
            # The schedule is part of the saved run: going on with its draws is what makes the resume exact.
            if self.rank == 0:
                warnings.warn(
                    f"Resuming the gossip schedule with the checkpoint's seed {saved_seed} instead of this run's "
                    f"{self.schedule.seed}, so that training goes on as the saved run would have.",
                    stacklevel=2,
                )
            self.schedule.seed = saved_seed
        self.state.weight = float(state["weight"])
        self._step = int(state["step"])
        self.exchange.load_state_dict(state)
        load_outer_state(self.outer, state.get("outer"), self.rank)

    def continue_schedule_at(self, step: int) -> None:
        """Start counting gossip steps at ``step`` (resuming onto another number of workers: the old position).

        The outer optimizer starts afresh there: slow weights = the model now (the consensus), momentum zero."""
        self._step = int(step)
        if self.outer is not None:
            self.outer.restart()
