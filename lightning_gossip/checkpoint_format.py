"""The names a gossip checkpoint is written with, in one place for the adapters and the part files.

A Lightning-free leaf module: :mod:`lightning_gossip._adapter` (plain torch) and :mod:`lightning_gossip.checkpoint_io`
(Lightning's ``CheckpointIO`` side) both import it, so neither has to import the other for a constant.
"""

#: Where a checkpoint keeps the gossip state: in the main file, the entry naming the parts (or every rank's state, in
#: checkpoints written before per-rank parts); in a part, this rank's gossip state.
CHECKPOINT_KEY = "gossip"
#: The key of a part's header (save id, rank, world size, digest of its content), checked on resume.
PART_HEADER_KEY = "gossip_part"
#: The version of the part header's layout.
PART_FORMAT = 1
