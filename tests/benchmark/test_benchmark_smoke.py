"""The benchmark's smallest run end to end (loopback, 2 workers, tiny model; about 30-60 s on 2 cores), and the
pieces of the harness that need no processes: comparison against a baseline, target checks, network fallback."""

from __future__ import annotations

import copy
import json
import os
import sys

import pytest

from experiments.benchmark import report
from experiments.benchmark.configs import full_mode, smoke_mode
from lightning_gossip.bench import netns
from tests.helpers.processes import run_command

# The harness of the suites (experiments/benchmark); CI's own benchmark step runs lightning_gossip.bench (.ci/run).
pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOP_KEYS = {"schema", "mode", "machine", "settings", "scenarios", "rows", "ratios", "targets"}
MACHINE_KEYS = {"cpu_model", "nproc", "torch", "date"}
ROW_KEYS = {
    "scenario", "config", "kind", "status", "samples_per_s", "time_per_step_ms", "median_step_ms", "epoch_s",
    "bytes_per_step", "bytes_source", "final_acc", "time_to_target_s", "target_acc", "train_s", "curve", "workers",
}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("benchmark")
    cmd = [sys.executable, "-m", "experiments.benchmark", "--smoke", "--network", "loopback", "--out", str(out)]
    run = run_command(cmd, 280, cwd=REPO)
    assert run.returncode == 0 and not run.survivors, run.output[-8000:]
    with open(out / "results.json") as f:
        return json.load(f), out


def test_smoke_writes_results_with_the_schema(smoke):
    results, out = smoke
    assert TOP_KEYS <= set(results) and results["schema"] == report.SCHEMA
    assert MACHINE_KEYS <= set(results["machine"])
    configs = {(r["scenario"], r["config"]) for r in results["rows"]}
    assert {("single", "single"), ("loopback", "ddp"), ("loopback", "floor"), ("loopback", "gossip_p0"),
            ("loopback", "gossip_p0.5_random_blocking")} <= configs
    for row in results["rows"]:
        assert row["status"] == "ok", row
        assert ROW_KEYS <= set(row), ROW_KEYS - set(row)
        assert row["samples_per_s"] > 0 and row["time_per_step_ms"] > 0 and 0 <= row["final_acc"] <= 1
        assert row["curve"][-1][1] == "final"
    assert results["ratios"]
    assert all(v > 0 for k, v in results["ratios"].items() if not k.endswith("collectives_per_step"))
    md = (out / "results.md").read_text()
    assert "ddp" in md and results["machine"]["cpu_model"] in md and results["machine"]["torch"] in md
    # (the plots against p need a sweep over p, which the smoke run does not have)
    for png in ("throughput_vs_bandwidth.png", "tta_vs_bandwidth.png", "accuracy_vs_time_loopback.png"):
        assert (out / png).stat().st_size > 1000


def test_smoke_bytes_per_step_match_p_times_the_message(smoke):
    results, _ = smoke
    rows = {r["config"]: r for r in results["rows"] if r["scenario"] == "loopback"}
    gossip = rows["gossip_p0.5_random_blocking"]
    # 200 steps x 2 workers x p=0.5: 200 messages expected, so the binomial spread is about 7%.
    assert gossip["bytes_source"] == "counters"
    assert gossip["bytes_per_step"] == pytest.approx(0.5 * gossip["message_bytes"], rel=0.2)
    for name in ("gossip_p0", "gossip_p0_nosync"):
        assert rows[name]["bytes_per_step"] == 0 and rows[name]["messages_per_step"] == 0
    assert rows["ddp"]["bytes_source"].startswith("computed")
    assert rows["ddp"]["bytes_per_step"] == pytest.approx(rows["ddp"]["model_bytes"])  # 2(M-1)/M = 1 for M=2


def test_compare_passes_against_itself_and_flags_regressions(smoke):
    results, _ = smoke
    problems, _ = report.compare(results, results)
    assert problems == []
    baseline = copy.deepcopy(results)
    key = next(k for k in baseline["ratios"] if k.endswith("cpu_vs_floor") and "gossip" in k)
    baseline["ratios"][key] = results["ratios"][key] / 4  # the baseline was 4x cheaper: now a regression
    wall = next(k for k in baseline["ratios"] if k.endswith("step_vs_floor") and "gossip" in k)
    baseline["ratios"][wall] = results["ratios"][wall] / 2.5  # within the wall-clock tolerance: noise, not a failure
    ckey = "loopback/gossip_p0_nosync/collectives_per_step"
    assert results["ratios"][ckey] == 0  # gossip itself needs no collective per step
    baseline["ratios"]["loopback/gossip_p0.5_random_blocking/collectives_per_step"] -= 1  # one barrier/step added
    bkey = next(k for k in baseline["ratios"] if k.endswith("bytes_vs_p_message"))
    baseline["ratios"][bkey] = results["ratios"][bkey] + 0.5
    problems, lines = report.compare(results, baseline)
    assert any(key in p for p in problems) and any(bkey in p for p in problems)
    assert any("gossip_p0.5_random_blocking/collectives_per_step" in p for p in problems)
    assert not any(wall in p for p in problems)
    assert any("REGRESSION" in line for line in lines)


def test_compare_cli_exit_code(smoke, tmp_path):
    """--compare exits 1 on a regression: checked through main() with the run itself replaced by the smoke's."""
    from experiments.benchmark import run

    results, _ = smoke
    bad = copy.deepcopy(results)
    for key in bad["ratios"]:
        if key.endswith("cpu_vs_floor") and "gossip" in key:
            bad["ratios"][key] /= 10
    (tmp_path / "base.json").write_text(json.dumps(bad))
    (tmp_path / "same.json").write_text(json.dumps(results))
    original = run.run_benchmark
    run.run_benchmark = lambda args: results
    try:
        assert run.main(["--smoke", "--compare", str(tmp_path / "same.json")]) == 0
        assert run.main(["--smoke", "--compare", str(tmp_path / "base.json")]) == 1
    finally:
        run.run_benchmark = original


def test_network_fallback_is_loopback_with_a_message(monkeypatch, capsys):
    from experiments.benchmark import run

    monkeypatch.setattr(netns, "probe", lambda: (False, "not running as root"))
    ok, reason = run.choose_network("auto", smoke=False)
    assert not ok and reason == "not running as root"
    assert "plain loopback" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        run.choose_network("netns", smoke=False)
    mode = full_mode(4, False, [1000, 100], 2.0)
    assert mode.scenarios and not any(s.netns for s in mode.scenarios)
    assert any(s.netns for s in full_mode(4, True, [1000, 100], 2.0).scenarios)
    assert not any(s.netns for s in smoke_mode(2).scenarios)


def test_tbf_burst_fits_a_gso_packet():
    assert "100mbit" in netns.tbf_args(100) and int(netns.tbf_args(100)[4]) >= 64 * 1024
    assert int(netns.tbf_args(1000)[4]) >= 1000e6 / 8 * 0.005
