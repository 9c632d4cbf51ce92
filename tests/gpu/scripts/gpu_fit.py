"""A Lightning fit on GPUs with gossip: ``python gpu_fit.py OUT --devices N`` (the popen launcher re-runs it per rank).
Each rank writes ``OUT/rank{r}.json``: its device, backend, steps, counters and a checksum of its final weights."""

import argparse
import json
import os

import lightning as L
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_gossip


class Net(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(32, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 4))

    def on_train_start(self) -> None:
        # Where training ran (Lightning moves the module back to the CPU when fit ends).
        averager = self.trainer.strategy.averager
        self.train_device = str(self.device)
        self.gossip_device = str(averager.state.device) if averager is not None else None

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--devices", type=int, default=2)
    args = parser.parse_args()
    L.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(2048, 32, generator=g), torch.randint(0, 4, (2048,), generator=g))
    trainer = L.Trainer(accelerator="gpu", devices=args.devices, max_epochs=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        strategy=lightning_gossip.GossipStrategy(p=0.5, transfer_dtype="bfloat16"))
    model = Net()
    trainer.fit(model, DataLoader(data, batch_size=32, shuffle=True))
    final = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    record = {
        "device": model.train_device,
        "gossip_device": model.gossip_device,
        "backend": dist.get_backend() if dist.is_initialized() else None,
        "steps": trainer.global_step,
        "counters": trainer.strategy.counters.as_dict(),
        "final_checksum": float(final.double().sum().item()),
    }
    with open(os.path.join(args.out, f"rank{trainer.global_rank}.json"), "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    main()
