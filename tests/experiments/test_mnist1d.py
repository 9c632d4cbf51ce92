"""MNIST-1D (data=mnist1d): generated offline by the mnist1d package, cached on disk once for all workers, sharded
IID and label-skewed like the other datamodules; the paper's MLP and 1-D CNN; the configs and a real run."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("mnist1d")

from lightning_gossip.app.data import Mnist1dDataModule  # noqa: E402
from lightning_gossip.app.mnist1d_cache import mnist1d_arrays  # noqa: E402
from lightning_gossip.app.models import MLP, Conv1dNet  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SMALL = 600  # samples: enough for shapes and splits, generated in well under a second


def fake_trainer(rank: int, world: int) -> SimpleNamespace:
    return SimpleNamespace(global_rank=rank, world_size=world,
                           _accelerator_connector=SimpleNamespace(use_distributed_sampler=False))


def test_generated_offline_split_and_cached(tmp_path, monkeypatch):
    dm = Mnist1dDataModule(num_samples=SMALL, cache_dir=str(tmp_path), batch_size=8)
    dm.setup("fit")
    n_test = SMALL - int(SMALL * 0.8)
    assert len(dm.test_set) == n_test and len(dm.train_set) + len(dm.val_set) == SMALL - n_test
    assert len(dm.val_set) == pytest.approx(0.1 * (SMALL - n_test), abs=1)
    x, y = dm.train_set[0]
    assert x.shape == (40,) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert set(np.unique(dm.train_set.tensors[1].numpy())) == set(range(10))
    (cached,) = tmp_path.glob("mnist1d-*.npz")
    assert not list(tmp_path.glob(".*tmp*"))  # the temporary file was renamed into place

    # a second datamodule reads the cache: generating again would fail here
    def no_generation(*args, **kwargs):
        raise AssertionError("regenerated although the cache exists")

    import mnist1d.data

    monkeypatch.setattr(mnist1d.data, "make_dataset", no_generation)
    again = Mnist1dDataModule(num_samples=SMALL, cache_dir=str(tmp_path), batch_size=8)
    again.setup("fit")
    assert torch.equal(again.train_set.tensors[0], dm.train_set.tensors[0])
    # other generator arguments: another file (the key covers them), so it must generate
    with pytest.raises(AssertionError, match="regenerated"):
        Mnist1dDataModule(num_samples=SMALL, data_seed=7, cache_dir=str(tmp_path)).setup("fit")


def test_concurrent_writers_leave_one_whole_file(tmp_path):
    """Three processes generate the same dataset into one cache folder at once (as 16 workers would)."""
    code = textwrap.dedent(f"""
        from lightning_gossip.app.mnist1d_cache import mnist1d_arrays
        a = mnist1d_arrays({SMALL}, 42, 0.8, {str(tmp_path)!r})
        print(float(a["x"].sum()))
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs) and len(set(outs)) == 1
    (cached,) = tmp_path.glob("mnist1d-*.npz")
    assert not list(tmp_path.glob(".*tmp*"))
    with np.load(cached) as f:
        assert float(f["x"].sum()) == float(outs[0])


def test_corrupt_cache_is_regenerated(tmp_path):
    a = mnist1d_arrays(SMALL, 42, 0.8, str(tmp_path))
    (cached,) = tmp_path.glob("mnist1d-*.npz")
    cached.write_bytes(b"not an npz")
    b = mnist1d_arrays(SMALL, 42, 0.8, str(tmp_path))
    assert np.array_equal(a["x"], b["x"])


@pytest.mark.parametrize("split", ["iid", "label_skew"])
def test_sixteen_worker_shards(tmp_path, split):
    world = 16
    dms = []
    for rank in range(world):
        dm = Mnist1dDataModule(num_samples=4000, cache_dir=str(tmp_path), batch_size=32, split=split, alpha=0.3,
                               seed=1)
        dm.trainer = fake_trainer(rank, world)
        dm.setup("fit")
        dms.append(dm)
    n_train = len(dms[0].train_set)
    shards = [list(dm.train_sampler()) for dm in dms]
    assert {len(s) for s in shards} == {n_train // world}  # equal steps on every rank
    assert len({len(dm.train_dataloader()) for dm in dms}) == 1
    labels = dms[0].train_set.tensors[1].numpy()
    if split == "iid":
        assert len(set().union(*shards)) == world * (n_train // world)  # disjoint
    else:
        for rank, dm in enumerate(dms):
            assert set(shards[rank]) <= set(dm.parts[rank].tolist())
        top_share = [np.bincount(labels[dm.parts[r]], minlength=10).max() / len(dm.parts[r])
                     for r, dm in enumerate(dms)]
        assert np.median(top_share) > 0.25  # skewed (IID would be ~0.1)
    val = [set(dm.val_dataloader().sampler) for dm in dms]
    assert sum(len(v) for v in val) == len(set().union(*val)) == len(dms[0].val_set)  # disjoint, no padding


def test_paper_models():
    x = torch.randn(7, 40)
    cnn = Conv1dNet([40], 10)
    assert cnn(x).shape == (7, 10)
    assert sum(p.numel() for p in cnn.parameters()) == 25 * 5 + 25 + 2 * (25 * 25 * 3 + 25) + 125 * 10 + 10
    assert Conv1dNet([1, 8, 8], 10)(torch.randn(2, 1, 8, 8)).shape == (2, 10)  # any shape: one channel of 64
    mlp = MLP([40], 10, hidden=[100, 100])
    assert mlp(x).shape == (7, 10) and sum(p.numel() for p in mlp.parameters()) == 15210
    with pytest.raises(ValueError, match="at least 3"):
        Conv1dNet([2], 10)


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="num_samples must be >= 100, got 5"):
        Mnist1dDataModule(num_samples=5)
    with pytest.raises(ValueError, match="train_split must be in \\(0, 1\\), got 1.5"):
        Mnist1dDataModule(train_split=1.5)


@pytest.mark.parametrize("model", ["mnist1d_mlp", "mnist1d_cnn"])
def test_configs_compose_and_instantiate(tmp_path, model):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["data=mnist1d", f"model={model}", f"paths.root_dir={tmp_path}",
                                          "data.num_samples=600"])
    assert cfg.data.cache_dir == f"{tmp_path}/data/mnist1d"
    dm = instantiate(cfg.data)
    dm.setup("fit")
    net = instantiate(cfg.model)
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (32, 40) and net(xb).shape == (32, 10)
    assert list((tmp_path / "data" / "mnist1d").glob("mnist1d-600-*.npz"))
    GlobalHydra.instance().clear()


def run_train(args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="1")
    for key in ("LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR", "NODE_RANK", "RANK",
                "LIGHTNING_GOSSIP_WORKER_CONFIG"):
        env.pop(key, None)
    return subprocess.run([sys.executable, "-m", "lightning_gossip.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_train_entry_two_workers(tmp_path):
    proc = run_train(["data=mnist1d", "model=mnist1d_cnn", "data.num_samples=1000", "trainer=debug",
                      "trainer.devices=2", "extras.print_config=false", "callbacks.progress_bar.refresh_rate=0",
                      f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, timeout=480)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "2 worker(s)" in proc.stdout
    assert list((tmp_path / "data" / "mnist1d").glob("mnist1d-1000-*.npz"))


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["gossip", "ddp"])
def test_train_entry_eight_workers_one_epoch(tmp_path, strategy):
    """The issue's check: python -m lightning_gossip.train data=mnist1d trainer.devices=8 (and strategy=ddp)."""
    import json

    proc = run_train(["data=mnist1d", "trainer.devices=8", "trainer.max_epochs=1", f"strategy={strategy}",
                      "extras.print_config=false", "callbacks.progress_bar.refresh_rate=0",
                      f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads((tmp_path / "run" / "results.json").read_text())
    # ceil: the last batch is partial
    assert result["world_size"] == 8 and result["global_step"] == -(-(14400 // 8) // 32)
    assert result["metrics"]["test/acc"] > 0.15  # learned something in one epoch (chance: 0.1)
