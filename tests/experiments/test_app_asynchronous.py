"""The app in asynchronous mode, for real: ``python -m lightning_gossip.train strategy=gossip_async`` with 3 CPU
workers shares the training data out (every sample once per epoch over all ranks, a slow rank takes less), keeps
evaluation per rank, and ends with the consensus model's test accuracy; what it cannot do is refused before any
worker starts."""

from __future__ import annotations

import json

from tests.experiments.test_train_entry import check, run_train

WORLD = 3
EPOCHS = 2
# synthetic rows are distinct (the probe recognises samples by content); 700 samples give 490 / 70 / 140 for
# train / val / test, none divisible by 3, so equal static shards or padded evaluation would show in the counts
ASYNC_RUN = ["strategy=gossip_async", f"trainer.devices={WORLD}", f"trainer.max_epochs={EPOCHS}", "data=synthetic",
             "data.num_samples=700", "data.input_shape=[16]", "data.batch_size=8", "extras.print_config=false",
             "callbacks.progress_bar.refresh_rate=0", "strategy.timeout.seconds=120", "logger=csv"]


def test_asynchronous_app_shares_every_sample_once_per_epoch(tmp_path):
    run_dir, probe = tmp_path / "run", tmp_path / "probe"
    proc = run_train([*ASYNC_RUN, "+callbacks.samples._target_=tests.experiments.app_probes.SampleRecorder",
                      f"+callbacks.samples.out_dir={probe}", "+callbacks.samples.slow_rank=0",
                      "+callbacks.samples.delay_s=0.1", f"hydra.run.dir={run_dir}",
                      f"paths.log_dir={tmp_path / 'logs'}"], cwd=tmp_path, timeout=400)
    check(proc)
    assert f"Test accuracy of the consensus model (GossipStrategy, {WORLD} worker(s))" in proc.stdout
    assert "on rank 0 (asynchronous: each rank its own)" in proc.stdout
    result = json.loads((run_dir / "results.json").read_text())
    assert result["asynchronous"] is True and result["epochs"] == EPOCHS and 0.0 <= result["metrics"]["test/acc"] <= 1
    assert result["config"]["trainer"]["use_distributed_sampler"] is True  # follows strategy.asynchronous

    records = [json.loads((probe / f"rank{rank}.json").read_text()) for rank in range(WORLD)]
    n_train, n_val, n_test = (records[0][k] for k in ("num_train", "num_val", "num_test"))
    assert n_train % WORLD and n_val % WORLD and n_test % WORLD
    assert all(r["samplers"] == ["WorkSharingSampler"] for r in records)
    for epoch in range(EPOCHS):
        used = sorted(i for r in records for i in r["train"][str(epoch)])
        assert used == list(range(n_train)), f"epoch {epoch}: not every training sample exactly once over all ranks"
    # dynamic sharing: the straggler (rank 0, 0.1 s per batch) took less of the data than the fastest rank
    taken = [sum(len(v) for v in r["train"].values()) for r in records]
    assert taken[0] < max(taken[1:]), taken
    # evaluation stays per rank: disjoint, unpadded slices rank::WORLD (padding or re-sharding would change them)
    for rank, r in enumerate(records):
        assert r["evaluated"]["val"] == [len(range(rank, n_val, WORLD))] * EPOCHS
        assert r["evaluated"]["test"] == [len(range(rank, n_test, WORLD))]


def test_label_skew_with_work_sharing_refused_before_any_worker(tmp_path):
    proc = run_train([*ASYNC_RUN, "data.split=label_skew", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path,
                     timeout=180)
    assert proc.returncode != 0
    assert "Invalid config for asynchronous gossip (strategy.asynchronous=true; nothing was started)" in proc.stderr
    assert "data.split=label_skew" in proc.stderr and "trainer.use_distributed_sampler=false" in proc.stderr
    assert "starting 3 worker processes" not in proc.stdout + proc.stderr
    assert not (tmp_path / "run" / ".worker_config.yaml").exists()
