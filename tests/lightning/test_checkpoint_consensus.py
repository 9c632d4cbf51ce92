"""Checkpoints hold the consensus model and what is needed to resume; the launching process ends with the consensus.

These use the fork launcher (``gossip_fork``) so the Trainer runs inside pytest without re-running ``sys.argv``.
"""

import lightning as L
import torch
from torch.utils.data import DataLoader

import lightning_gossip
from tests.lightning.scripts.fit_and_record import IndexedBlobs, Recorder


def _fit(tmp_path, **strategy_kwargs):
    torch.set_num_threads(1)
    L.seed_everything(3)
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    strategy = lightning_gossip.GossipStrategy(start_method="fork", **strategy_kwargs)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_epochs=1,
        callbacks=[checkpoint],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = Recorder()
    data = IndexedBlobs(n=128)
    trainer.fit(model, DataLoader(data, batch_size=8, shuffle=True))
    return trainer, model, checkpoint


def test_checkpoint_is_the_consensus_and_carries_every_ranks_state(tmp_path):
    initial = torch.nn.utils.parameters_to_vector(Recorder().parameters())
    trainer, model, checkpoint = _fit(tmp_path, p=0.3, final_consensus=False)
    last = tmp_path / "last.ckpt"  # the fork launcher does not hand last_model_path back
    ckpt = torch.load(last, weights_only=False)

    # the launching process holds the consensus model, which is what the checkpoint's state_dict is
    restored = Recorder.load_from_checkpoint(last)
    for name, value in model.state_dict().items():
        assert torch.equal(value, ckpt["state_dict"][name]), name
        assert torch.equal(value, restored.state_dict()[name]), name
    assert not torch.equal(torch.nn.utils.parameters_to_vector(model.parameters()), initial)

    # and what is needed to resume: each rank's own weights, optimizer state, gossip weight and schedule position
    # (per-rank parts beside the main file, named by it: the main file holds one model, whatever the world size)
    gossip = ckpt["gossip"]
    assert gossip["world_size"] == 2 and gossip["step"] == 8 and "ranks" not in gossip
    parts = [torch.load(tmp_path / gossip["parts"] / f"rank{r}.pt", weights_only=True) for r in range(2)]
    rank_states = [r["model"] for r in parts]
    assert any(not torch.equal(rank_states[0][k], rank_states[1][k]) for k in rank_states[0])
    weights = [r["gossip"]["weight"] for r in parts]
    assert abs(sum(weights) - 1.0) < 1e-12
    assert {r["gossip"]["step"] for r in parts} == {8}  # 128 samples / 2 ranks / batch 8
    assert all(len(r["optimizer_states"]) == 1 for r in parts)

    # the consensus is the gossip-weighted mean of the ranks' models
    for name in rank_states[0]:
        expected = sum(w * s[name].double() for w, s in zip(weights, rank_states)) / sum(weights)
        assert torch.allclose(ckpt["state_dict"][name].double(), expected, atol=1e-6), name
