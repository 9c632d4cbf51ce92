"""The Lightning side of the gossip modes: one small object per mode, used by the Trainer and the Fabric strategy.

* :class:`LockStep`: every rank takes the same number of steps, so the training data stays in Lightning's (or
  Fabric's) equal-length shards.
* :class:`Asynchronous`: ranks take as many steps as their speed allows, so the training data is shared out
  dynamically (:class:`~lightning_gossip.gossip.work_sharing.WorkSharingSampler`): fast ranks take more batches, and
  every sample is still used exactly once per epoch over all ranks.

The Trainer adds what only it has (SIGTERM, ``max_time``, callbacks, refusals of per-step collectives) in
:mod:`lightning_gossip.trainer_modes`, as subclasses of these. Imports only ``lightning.fabric``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, RandomSampler, SequentialSampler

from lightning_gossip._lightning_compat import update_dataloader
from lightning_gossip.gossip.options import GossipOptions
from lightning_gossip.gossip.work_sharing import WorkSharingSampler

# Batches claimed at a time: one store call per this many steps, and at an epoch's end a slow rank holds at most
# this many batches that a fast rank could otherwise have taken.
CHUNK_BATCHES = 4

WHY_NO_STEP_COLLECTIVES = (
    "asynchronous gossip lets ranks take different numbers of optimizer steps within an epoch, so nothing may need "
    "every rank at the same training step"
)


class AsynchronousModeError(ValueError):
    """A setting that needs every rank at the same training step, refused in asynchronous mode."""


# Why the Trainer strategy refuses on_peer_loss="continue" (the plain-torch averager and the Fabric strategy support
# it; see lightning_gossip.gossip.survival and docs/reliability.md for what the Trainer would need).
WHY_NO_TRAINER_PEER_LOSS_SURVIVAL = (
    "the Trainer runs collectives over every rank of the original world that the gossip algorithm does not own: "
    "barriers and broadcasts of its checkpoint callbacks and loops, self.log(sync_dist=True), torchmetrics' process "
    "groups, and the strategy's SIGTERM agreement; each would wait for the lost rank or fail"
)


def refuse_trainer_peer_loss_survival(on_peer_loss: Any) -> None:
    """Raise a clear error for ``GossipStrategy(on_peer_loss="continue")`` (before any worker starts); a value that
    is neither "fail" nor "continue" gets GossipOptions' error naming the allowed values."""
    GossipOptions(asynchronous=True, on_peer_loss=on_peer_loss)  # validates the value itself
    if on_peer_loss == "continue":
        raise ValueError(
            f"GossipStrategy(on_peer_loss='continue') is not supported: {WHY_NO_TRAINER_PEER_LOSS_SURVIVAL}. Surviving "
            "a lost peer works with GossipFabricStrategy(asynchronous=True, on_peer_loss='continue') and with the "
            "plain-torch GossipAverager(asynchronous=True, on_peer_loss='continue') and a "
            "WorkSharingSampler(survivors=averager.survivors); under the Trainer keep on_peer_loss='fail' (the run "
            "stops naming the lost rank and can restart from its last checkpoint)."
        )


class LockStep:
    """Lock-step gossip: ranks pair up by step number, so every rank keeps its equal-length shard."""

    name = "lock-step"

    def __init__(self, options: GossipOptions) -> None:
        self.options = options

    def training_dataloader(
        self, dataloader: Any, seed: int, world_size: int, stop: Optional[Callable[[], bool]] = None,
        survivors: Optional[Callable[[], Any]] = None,
    ) -> Any:
        """The training dataloader as this mode needs it (here: as it is). ``survivors``: the run's membership, for
        ``on_peer_loss="continue"`` (a callable, since the averager is built after the dataloader may be)."""
        return dataloader

    def share_work(self, dataloader: Any, seed: int, world_size: int,
                   survivors: Optional[Callable[[], Any]] = None) -> Any:
        raise AsynchronousModeError(
            "Work sharing lets fast ranks take more batches than slow ones, but lock-step gossip pairs ranks by step "
            "number, so every rank must take the same number of steps: use GossipFabricStrategy(asynchronous=True) "
            "(strategy='gossip_async') to share work, or keep Fabric's equal shards."
        )


class Asynchronous(LockStep):
    """Asynchronous gossip: the training data is shared out dynamically (work sharing)."""

    name = "asynchronous"

    def __init__(self, options: GossipOptions) -> None:
        super().__init__(options)
        #: The sampler of the training dataloader this mode made last (its progress feeds LR schedules).
        self.sampler: Optional[WorkSharingSampler] = None

    def training_dataloader(
        self, dataloader: Any, seed: int, world_size: int, stop: Optional[Callable[[], bool]] = None,
        survivors: Optional[Callable[[], Any]] = None,
    ) -> Any:
        shared = work_sharing_dataloader(dataloader, seed, world_size, stop, survivors)
        if isinstance(shared, DataLoader) and isinstance(shared.sampler, WorkSharingSampler):
            self.sampler = shared.sampler
        return shared

    def share_work(self, dataloader: Any, seed: int, world_size: int,
                   survivors: Optional[Callable[[], Any]] = None) -> Any:
        return self.training_dataloader(dataloader, seed, world_size, survivors=survivors)


def mode_for(options: GossipOptions) -> LockStep:
    """The mode object of ``options.mode``."""
    return Asynchronous(options) if options.mode == "asynchronous" else LockStep(options)


def work_sharing_dataloader(
    dataloader: Any, seed: int, world_size: int, stop: Optional[Callable[[], bool]] = None,
    survivors: Optional[Callable[[], Any]] = None,
) -> Any:
    """The training dataloader with its (distributed) sampler replaced by a :class:`WorkSharingSampler`.

    Every sample is used once per epoch over all ranks; shuffling follows the user's dataloader, seeded by ``seed``
    and the epoch (Lightning and Fabric call ``set_epoch``). Anything that is not a plain map-style dataloader with a
    random or sequential order (an IterableDataset, a custom sampler or batch sampler) is refused with a clear error.
    """
    if not isinstance(dataloader, DataLoader):
        return dataloader
    sampler = dataloader.sampler
    if isinstance(sampler, WorkSharingSampler):
        return dataloader
    if isinstance(getattr(sampler, "dataset", None), WorkSharingSampler):
        # Fabric wrapped a WorkSharingSampler the user made into its DistributedSamplerWrapper: use it as it is.
        return update_dataloader(dataloader, sampler.dataset)
    if isinstance(dataloader.dataset, IterableDataset):
        raise AsynchronousModeError(
            "Asynchronous gossip shares a map-style dataset out between ranks, but the training dataloader holds an "
            f"IterableDataset ({type(dataloader.dataset).__name__}), which it cannot index. Use a map-style Dataset "
            "(with __getitem__ and __len__), or the lock-step mode."
        )
    if type(sampler) is DistributedSampler:
        shuffle = sampler.shuffle
    elif type(sampler) in (RandomSampler, SequentialSampler):  # no DistributedSampler was added
        shuffle = isinstance(sampler, RandomSampler)
    else:
        raise AsynchronousModeError(
            "Asynchronous gossip shares the training data out between ranks itself (every sample once per epoch, in "
            f"seeded shuffled or natural order), so it cannot use the sampler {type(sampler).__name__} (a "
            "DistributedSamplerWrapper means a custom sampler was given). Use shuffle=True/False in the DataLoader."
        )
    if dataloader.batch_size is None:
        raise AsynchronousModeError(
            "Asynchronous gossip needs the training DataLoader's batch_size (a custom batch_sampler cannot be shared "
            "out between ranks)."
        )
    shared = WorkSharingSampler(
        dataloader.dataset,
        batch_size=dataloader.batch_size,
        chunk_batches=CHUNK_BATCHES,
        shuffle=shuffle,
        seed=seed,
        world_size=world_size,
        stop=stop,
        survivors=survivors,
    )
    return update_dataloader(dataloader, shared)
