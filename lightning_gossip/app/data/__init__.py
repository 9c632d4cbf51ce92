"""The app's data: LightningDataModules whose ranks build their own training shards, one module per concern.

- :mod:`.module`: :class:`ShardedDataModule`, the base (how the training set is sharded over the ranks, how the
  evaluation sets are sliced); read its docstring for IID, label skew and the asynchronous mode.
- :mod:`.partition`: the label-skew partition (which worker holds which samples).
- :mod:`.sampler`: the per-rank samplers, on the library's permutation core
  (:mod:`lightning_gossip.gossip.permutation`).
- :mod:`.holdout`: train/validation/test holdout of in-memory arrays.
- the datasets: :mod:`.digits`, :mod:`.synthetic`, :mod:`.mnist1d`, :mod:`.image_folder`.

The configs name the datamodules through this package (``_target_: lightning_gossip.app.data.DigitsDataModule``),
which is the stable path for your own configs too.
"""

from lightning_gossip.app.data.digits import DigitsDataModule
from lightning_gossip.app.data.image_folder import ImageFolderDataModule
from lightning_gossip.app.data.mnist1d import Mnist1dDataModule
from lightning_gossip.app.data.module import ShardedDataModule
from lightning_gossip.app.data.partition import SPLITS, label_skew_partition
from lightning_gossip.app.data.sampler import RankSliceSampler, ShardSampler
from lightning_gossip.app.data.synthetic import SyntheticDataModule

__all__ = [
    "SPLITS",
    "DigitsDataModule",
    "ImageFolderDataModule",
    "Mnist1dDataModule",
    "RankSliceSampler",
    "ShardSampler",
    "ShardedDataModule",
    "SyntheticDataModule",
    "label_skew_partition",
]
