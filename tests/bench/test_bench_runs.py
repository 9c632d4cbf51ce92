"""``python -m lightning_gossip.bench`` end to end, on a model written as someone else's project would write it
(tests/bench/user_project/acme_models: imported by path, from a folder that is not the checkout).

Default suite: one run of every default strategy on 2 CPU workers (a few dozen steps), its table and files; the
same command with a slowdown injected into ``GossipAverager.step`` in the workers (tests/bench/inject_slowdown, a
``sitecustomize`` that only this harness puts on PYTHONPATH) must fail ``--compare`` on exactly that ratio; a metric
the model does not log is refused with the names it does log. Slow: the project's quick benchmark against its
committed baseline (pass) and with the slowdown (fail), network namespaces with a tc-limited link, a straggler, a
time budget.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

import pytest

from lightning_gossip.bench import netns
from tests.helpers.processes import run_command, script_env

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
USER_PROJECT = HERE / "user_project"
INJECT = HERE / "inject_slowdown"
MODEL = "acme_models.tiny:BlobClassifier"
DATA = "acme_models.tiny:Blobs"
# every run: 2 workers, the user's model; lock-step rows 24 steps, validation every 12 (and at the end)
# (4096 samples: an epoch of 128 steps per rank, so the step budget, not the end of the data, stops every row)
COMMON = ["--model", MODEL, "--datamodule", DATA, "--datamodule-arg", "n=4096", "--workers", "2", "--steps", "24",
          "--val-every", "12",
          "--metric", "val_acc", "--target", "0.6", "--warmup", "3", "--timeout", "240", "--pg-timeout", "120"]
# the slowdown the comparison must catch: 60 ms in every gossip step, several times a step of this tiny model
INJECTED_MS = "60"


def bench(args: list[str], cwd: Path, inject: bool = False, timeout: float = 280):
    """Run the benchmark as a user would (console module, from their own folder, their package on PYTHONPATH)."""
    path = [str(USER_PROJECT)] + ([str(INJECT)] if inject else [])
    env = script_env(PYTHONPATH=os.pathsep.join(path + [str(REPO)]), PYTHONWARNINGS="ignore")
    if inject:
        env["LG_TEST_INJECT_STEP_SLEEP_MS"] = INJECTED_MS
    run = run_command([sys.executable, "-m", "lightning_gossip.bench", *args], timeout, env=env, cwd=cwd)
    assert not run.survivors, f"processes left behind: {run.survivors}\n{run.output[-4000:]}"
    return run


@pytest.fixture(scope="module")
def user_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("user_project_run")
    run = bench([*COMMON, "--out", str(work / "out")], cwd=work)
    assert run.returncode == 0, run.output[-8000:]
    return run, work / "out", json.loads((work / "out" / "results.json").read_text())


def test_a_users_model_runs_under_every_default_strategy(user_run):
    run, out, results = user_run
    rows = {r["strategy"]: r for r in results["rows"]}
    assert {"ddp", "gossip", "gossip_async", "local_sgd"} <= set(rows)
    for name, r in rows.items():
        assert r["status"] == "ok", r
        assert r["step_ms"] > 0 and r["samples_per_s"] > 0 and r["active_step_ms"] > 0
        assert 0.0 <= r["final_metric"] <= 1.0
        # lock-step: validation every 12 steps (and so at the end); asynchronous: at the end of the epoch
        assert len(r["evals"]) >= (1 if r["asynchronous"] else 2) and r["evals"][-1][2] is not None
        if name != "ddp":
            assert r["step_vs_ddp"] == pytest.approx(r["step_ms"] / rows["ddp"]["step_ms"])
    # --steps 24: every lock-step rank takes 24 steps; the asynchronous ranks take about 2 x 24 together
    for name in ("ddp", "gossip", "local_sgd"):
        assert rows[name]["per_rank_steps"] == [24, 24]
    assert rows["gossip_async"]["asynchronous"] is True
    # (every rank adds its count to the store every 8 steps and stops itself once the total is reached; the data
    # then stops at the next chunk of 4 batches, plus the one batch Lightning fetches ahead): far from the 256 of
    # the epoch
    assert 48 <= sum(rows["gossip_async"]["per_rank_steps"]) <= 48 + 2 * (8 + 4 + 2)
    # bytes: DDP's ring all-reduce of the gradients (2(M-1)/M = 1 at M = 2), gossip's own counters
    param_bytes = sum(4 * n for n in (8 * 16, 16, 16 * 4, 4))
    assert rows["ddp"]["bytes_per_step"] == pytest.approx(param_bytes)
    assert rows["gossip"]["bytes_per_step"] == pytest.approx(
        rows["gossip"]["messages_per_step"] * rows["gossip"]["message_bytes"])
    assert rows["local_sgd"]["counted_bytes_per_step"] == 0 and rows["local_sgd"]["computed_bytes_per_step"] > 0
    # one table on stdout, the files beside it
    table = run.output[run.output.index("scenario  strategy"):]
    for header in ("step ms", "vs DDP", "bytes/step", "samples/s", "time to val_acc 0.6 (s)", "final val_acc"):
        assert header in table
    assert "1 (ref)" in table and all(name in table for name in rows)
    with open(out / "results.csv") as f:
        assert {r["strategy"] for r in csv.DictReader(f)} == set(rows)
    assert "| loopback | gossip |" in (out / "results.md").read_text()
    for png in ("val_acc_vs_time_loopback.png", "step_vs_ddp.png"):
        assert (out / png).stat().st_size > 1000
    assert "runs done" in run.output  # the progress display (one line per finished run when not on a terminal)


def test_the_comparison_passes_on_the_same_numbers(user_run, tmp_path):
    _, out, _ = user_run
    env = script_env()
    rerun = run_command([sys.executable, "-m", "lightning_gossip.bench", "--from-results", str(out / "results.json"),
                         "--compare", str(out / "results.json")], 120, env=env, cwd=tmp_path)
    assert rerun.returncode == 0 and "no regression" in rerun.output, rerun.output[-3000:]


def test_an_injected_slowdown_in_the_gossip_step_fails_the_comparison(user_run, tmp_path):
    _, out, results = user_run
    # the baseline: the run above, restricted to the two rows this run measures
    keep = ("ddp", "gossip")
    baseline = dict(results, rows=[r for r in results["rows"] if r["strategy"] in keep],
                    ratios={k: v for k, v in results["ratios"].items() if k.split("/")[1] in keep})
    (tmp_path / "baseline.json").write_text(json.dumps(baseline))
    run = bench([*COMMON, "--strategies", ",".join(keep), "--out", str(tmp_path / "out"), "--no-plots",
                 "--compare", str(tmp_path / "baseline.json")], cwd=tmp_path, inject=True)
    assert run.returncode == 1, run.output[-6000:]
    regressions = run.output[run.output.index("REGRESSION against"):].splitlines()[1:]
    # exactly the slowed row's step-time ratio: the same bytes and the same final accuracy (same seed, same steps)
    assert len(regressions) == 1, regressions
    assert regressions[0].startswith("  - loopback/gossip: active_step_vs_ddp_cpu"), regressions


@pytest.mark.slow
def test_a_metric_the_model_does_not_log_is_refused_naming_what_it_logs(tmp_path):
    run = bench(["--model", MODEL, "--datamodule", DATA, "--workers", "2", "--steps", "4", "--strategies", "ddp",
                 "--metric", "val_accuracy", "--no-plots", "--out", str(tmp_path / "out")], cwd=tmp_path)
    assert run.returncode == 2, run.output[-4000:]
    assert "--metric 'val_accuracy'" in run.output and "'val_acc'" in run.output and "'val_loss'" in run.output


# -- slow ----------------------------------------------------------------------------------------------------------
QUICK = ["--config", "experiments/benchmark/quick.yaml", "--compare",
         "experiments/results/benchmark/quick/baseline.json"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_quick_benchmark_passes_its_committed_baseline(tmp_path):
    run = bench([*QUICK, "--out", str(tmp_path / "out")], cwd=REPO, timeout=600)
    assert run.returncode == 0, run.output[-6000:]
    assert "no regression against" in run.output


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_quick_benchmark_fails_with_a_slowdown_in_the_gossip_step(tmp_path):
    run = bench([*QUICK, "--out", str(tmp_path / "out")], cwd=REPO, inject=True, timeout=600)
    assert run.returncode == 1, run.output[-6000:]
    regressions = run.output[run.output.index("REGRESSION against"):]
    for row in ("gossip", "gossip_async", "local_sgd"):  # every row that runs GossipAverager.step
        assert f"loopback/{row}: active_step_vs_ddp_cpu" in regressions, regressions


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.skipif(not netns.probe()[0], reason="network namespaces need root and iproute2")
def test_a_tc_limited_link_and_a_straggler(tmp_path):
    run = bench(["--model", MODEL, "--datamodule", DATA, "--workers", "2", "--steps", "40", "--strategies",
                 "ddp,gossip,gossip_async", "--rate", "50", "--straggler", "3", "--metric", "val_acc",
                 "--out", str(tmp_path / "out")], cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.output[-6000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    (scenario,) = results["scenarios"]
    assert scenario["name"] == "50mbit_straggler3x" and scenario["network"] == "netns"
    assert scenario["measured_mbit"] and scenario["measured_mbit"] < 60
    rows = {r["strategy"]: r for r in results["rows"]}
    for r in rows.values():
        assert r["status"] == "ok" and r["wire_bytes_per_step"] > 0 and r["straggler_sleep_ms"] > 0
    # asynchronous gossip lets the fast rank take more of the steps; lock-step ranks take the same number
    fast, slow = rows["gossip_async"]["per_rank_steps"]
    assert fast > slow
    assert rows["gossip"]["per_rank_steps"][0] == rows["gossip"]["per_rank_steps"][1]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_time_budget(tmp_path):
    run = bench(["--model", MODEL, "--datamodule", DATA, "--workers", "2", "--time", "3", "--strategies",
                 "ddp,gossip,gossip_async", "--metric", "val_acc", "--out", str(tmp_path / "out")], cwd=tmp_path,
                timeout=600)
    assert run.returncode == 0, run.output[-6000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    for r in results["rows"]:
        assert r["status"] == "ok"
        # stopped by the budget (checked every 25 lock-step steps; asynchronous ranks at their next chunk of data)
        assert 3.0 <= r["train_s"] < 30, r["train_s"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_strategy_that_fails_is_reported_and_the_others_still_run(tmp_path):
    run = bench(["--model", "acme_models.tiny:BlobClassifierNoAsync", "--datamodule", DATA, "--workers", "2",
                 "--steps", "10", "--strategies", "ddp,gossip_async,gossip", "--repeats", "2",
                 "--out", str(tmp_path / "out")], cwd=tmp_path, timeout=600)
    assert run.returncode == 1, run.output[-6000:]
    rows = {r["strategy"]: r for r in json.loads((tmp_path / "out" / "results.json").read_text())["rows"]}
    assert rows["gossip_async"]["status"].startswith("failed: RuntimeError: this model does not support")
    assert rows["ddp"]["status"] == rows["gossip"]["status"] == "ok"
    assert len(rows["gossip"]["repeats_step_ms"]) == 2  # the runs after the failed one ran in a fresh launch
    assert "the gossip_async run failed" in run.output
