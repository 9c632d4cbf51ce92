"""The datamodules' per-rank shards (equal lengths, IID / label skew), the local-data loader, and the models."""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lightning_gossip.app.data import (
    DigitsDataModule,
    ImageFolderDataModule,
    ShardSampler,
    SyntheticDataModule,
    label_skew_partition,
)
from lightning_gossip.app.models import MLP, ClassifierModule, ResNet, SmallCNN


def fake_trainer(rank: int, world: int, lightning_shards: bool = False) -> SimpleNamespace:
    return SimpleNamespace(global_rank=rank, world_size=world,
                           _accelerator_connector=SimpleNamespace(use_distributed_sampler=lightning_shards))


def setup_rank(dm_factory, rank: int, world: int):
    dm = dm_factory()
    dm.trainer = fake_trainer(rank, world)
    dm.setup("fit")
    return dm


def test_iid_shards_disjoint_equal_and_reshuffled():
    n, world = 103, 4
    samplers = [ShardSampler(n, r, world, seed=7) for r in range(world)]
    shards = [list(s) for s in samplers]
    assert {len(s) for s in shards} == {n // world} and all(len(s) == n // world for s in samplers)
    assert len(set().union(*shards)) == world * (n // world)  # disjoint
    before = list(samplers[0])
    for s in samplers:
        s.set_epoch(1)
    after = [list(s) for s in samplers]
    assert after[0] != before
    assert len(set().union(*after)) == world * (n // world)  # still disjoint in the new epoch


@pytest.mark.parametrize("kwargs", [{"alpha": 0.1}, {"classes_per_worker": 3}])
def test_label_skew_partition(kwargs):
    labels = np.repeat(np.arange(10), 50)
    parts = label_skew_partition(labels, 4, seed=3, **kwargs)
    joined = np.concatenate(parts)
    assert sorted(joined.tolist()) == list(range(len(labels)))  # every sample exactly once
    assert all(len(p) > 0 for p in parts)
    hist = np.stack([np.bincount(labels[p], minlength=10) / len(p) for p in parts])
    assert hist.max(axis=1).min() > 0.2  # every worker is dominated by some classes (IID would be ~0.1 each)
    if "classes_per_worker" in kwargs:
        assert all(len(np.unique(labels[p])) <= 3 for p in parts)
        with pytest.raises(ValueError, match="covers only 8 of 10"):
            label_skew_partition(labels, 4, seed=3, classes_per_worker=2)
    again = label_skew_partition(labels, 4, seed=3, **kwargs)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))  # the same on every rank
    other = label_skew_partition(labels, 4, seed=4, **kwargs)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other)) or "classes_per_worker" in kwargs


def test_label_skew_digits_equal_steps_on_every_rank():
    world = 4
    dms = [setup_rank(lambda: DigitsDataModule(batch_size=16, split="label_skew", alpha=0.2, seed=1), r, world)
           for r in range(world)]
    loaders = [dm.train_dataloader() for dm in dms]
    assert len({len(dl) for dl in loaders}) == 1  # equal number of optimizer steps
    labels = dms[0].train_set.tensors[1].numpy()
    sizes = [len(dm.parts[r]) for r, dm in enumerate(dms)]
    assert len(set(sizes)) > 1  # the partition itself is uneven ...
    for r, dm in enumerate(dms):  # ... and each rank draws only from its own part
        idx = list(dm.train_sampler())
        assert len(idx) == len(labels) // world
        assert set(idx) <= set(dm.parts[r].tolist())
    # validation shards are disjoint and cover the validation set (no padding)
    val = [list(dm.val_dataloader().sampler) for dm in dms]
    assert sorted(sum(val, [])) == list(range(len(dms[0].val_set)))


def test_label_skew_refuses_lightning_sharding():
    dm = DigitsDataModule(split="label_skew")
    dm.trainer = fake_trainer(0, 2, lightning_shards=True)
    with pytest.raises(RuntimeError, match="use_distributed_sampler"):
        dm.setup("fit")


def test_synthetic_scales():
    easy = SyntheticDataModule(num_samples=600, input_shape=[20], num_classes=3, class_sep=3.0, label_noise=0.0)
    hard = SyntheticDataModule(num_samples=600, input_shape=[20], num_classes=3, class_sep=0.3, label_noise=0.2)
    from sklearn.linear_model import LogisticRegression

    scores = []
    for dm in (easy, hard):
        dm.setup("fit")
        x, y = (t.numpy() for t in dm.train_set.tensors)
        xt, yt = (t.numpy() for t in dm.test_set.tensors)
        assert len(x) + len(dm.val_set) + len(xt) == 600 and x.shape[1:] == (20,)
        scores.append(LogisticRegression(max_iter=500).fit(x, y).score(xt, yt))
    assert scores[0] > scores[1] + 0.2


def test_image_folder_tree_and_cifar_batches(tmp_path):
    from PIL import Image

    root = tmp_path / "tree"
    rng = np.random.default_rng(0)
    for c, name in enumerate(["cat", "dog", "eel"]):
        (root / name).mkdir(parents=True)
        for i in range(8):
            arr = rng.integers(0, 255, size=(10, 12, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / name / f"{i}.png")
    dm = ImageFolderDataModule(path=str(root), image_size=[8, 8], num_classes=3, batch_size=4)
    dm.setup("fit")
    assert dm.class_names == ["cat", "dog", "eel"]
    assert tuple(dm.train_set[0][0].shape) == (3, 8, 8)
    assert len(dm.train_set) + len(dm.val_set) + len(dm.test_set) == 24
    assert abs(float(dm.train_set.tensors[0].mean())) < 0.1  # normalised with the training statistics

    cifar = tmp_path / "cifar-10-batches-py"
    cifar.mkdir()
    for name, n in (("data_batch_1", 40), ("data_batch_2", 40), ("test_batch", 20)):
        batch = {b"data": rng.integers(0, 255, size=(n, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, n))}
        with open(cifar / name, "wb") as f:
            pickle.dump(batch, f)
    dm = ImageFolderDataModule(path=str(cifar), num_classes=10)
    dm.setup("fit")
    assert len(dm.test_set) == 20 and len(dm.train_set) + len(dm.val_set) == 80
    assert tuple(dm.train_set[0][0].shape) == (3, 32, 32)

    with pytest.raises(FileNotFoundError, match="not a directory"):
        ImageFolderDataModule(path=str(tmp_path / "missing")).setup("fit")
    with pytest.raises(FileNotFoundError, match="data.path"):
        ImageFolderDataModule(path=None).setup("fit")
    with pytest.raises(FileNotFoundError, match="not a directory"):  # the entry point's check before launching
        ImageFolderDataModule(path=str(tmp_path / "missing")).check()
    DigitsDataModule().check()  # nothing to check


def test_networks():
    x = torch.randn(5, 1, 8, 8)
    for net in (MLP([1, 8, 8], 10), SmallCNN([1, 8, 8], 10), ResNet([1, 8, 8], 10, depth=20)):
        assert net(x).shape == (5, 10)
    resnet = ResNet([3, 32, 32], 10, depth=20, width=16)
    assert 0.26e6 < sum(p.numel() for p in resnet.parameters()) < 0.28e6  # ResNet-20's 0.27 M
    assert any(name.endswith("running_mean") for name, _ in resnet.named_buffers())
    with pytest.raises(ValueError, match="6n\\+2"):
        ResNet([3, 32, 32], 10, depth=21)


def test_classifier_logs_template_metric_names(tmp_path):
    import lightning.pytorch as pl

    pl.seed_everything(0)
    model = ClassifierModule(MLP([1, 8, 8], 10), num_classes=10)
    dm = DigitsDataModule(batch_size=64)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=2, limit_train_batches=6, limit_val_batches=2,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    metrics = trainer.callback_metrics
    for key in ("train/loss", "train/acc", "val/loss", "val/acc", "val/acc_best"):
        assert key in metrics, key
    assert float(metrics["val/acc_best"]) >= float(metrics["val/acc"])
    assert float(metrics["train/acc"]) > 0.1  # learned something in 12 steps (chance is 0.1)
    (result,) = trainer.test(model, datamodule=dm, verbose=False)
    assert set(result) == {"test/loss", "test/acc"} and 0 <= result["test/acc"] <= 1
