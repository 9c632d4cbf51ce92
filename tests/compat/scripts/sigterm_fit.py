"""Two ranks fit 10 steps with ``GossipStrategy(sigterm_sync_every=3)``; each writes what happened to SIGTERM's sync.

``python sigterm_fit.py OUT`` (Lightning's popen launcher re-runs it for rank 1). Records, per rank, how many times
Lightning's own per-step SIGTERM broadcast ran (counted at ``torch.distributed.broadcast`` as called from the
training-epoch loop: never, gossip replaced it), how many SIGTERM agreements gossip ran instead, and how many training
steps there were.
"""

import json
import os
import sys

import lightning as L
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_gossip

calls = {"sigterm_broadcasts": 0}
_broadcast = dist.broadcast


def counting_broadcast(*args, **kwargs):
    caller = sys._getframe(1)
    if "training_epoch_loop" in caller.f_code.co_filename and "sigterm" in caller.f_code.co_name:
        calls["sigterm_broadcasts"] += 1
    return _broadcast(*args, **kwargs)


dist.broadcast = counting_broadcast  # the loop calls torch.distributed.broadcast(...) by attribute


class Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 2)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def main() -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(40, 4, generator=g), torch.randint(0, 2, (40,), generator=g))
    trainer = L.Trainer(accelerator="cpu", devices=2, max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        strategy=lightning_gossip.GossipStrategy(p=0.5, sigterm_sync_every=3, monitor=False))
    trainer.fit(Tiny(), DataLoader(data, batch_size=2))
    loop = trainer.fit_loop.epoch_loop
    record = {
        "steps": trainer.global_step,
        "sigterm_broadcasts": calls["sigterm_broadcasts"],
        "sigterm_agreements": trainer.strategy.mode.sigterm.syncs,
        "loop_has_method": hasattr(type(loop), "_broadcast_sigterm_tensor"),
        "replaced_on_instance": "_broadcast_sigterm_tensor" in vars(loop),
    }
    with open(os.path.join(sys.argv[1], f"rank{trainer.global_rank}.json"), "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    main()
