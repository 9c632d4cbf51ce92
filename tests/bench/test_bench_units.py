"""lightning_gossip.bench without worker processes: options, specs, the strategy registry, rows, ratios and the
comparison with a baseline (which must fail on a slowdown, name the row and the ratio, and pass within tolerance)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from lightning_gossip.bench import cli, results, spec, strategies

USER_PROJECT = Path(__file__).resolve().parent / "user_project"
MODEL = "acme_models.tiny:BlobClassifier"
DATA = "acme_models.tiny:Blobs"


@pytest.fixture
def user_project(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(USER_PROJECT))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def settings(*argv: str) -> dict:
    return cli.settings_from(cli.build_parser().parse_args(list(argv)))


# -- specs ----------------------------------------------------------------------------------------------------------
def test_spec_forms_import_path_yaml_file_and_inline(tmp_path):
    assert spec.parse_spec("pkg.mod:Net", "--model") == {"_target_": "pkg.mod.Net"}
    assert spec.parse_spec("pkg.mod.Net", "--model") == {"_target_": "pkg.mod.Net"}
    inline = spec.parse_spec("{_target_: pkg.mod.Net, hidden: 64}", "--model")
    assert inline == {"_target_": "pkg.mod.Net", "hidden": 64}
    f = tmp_path / "model.yaml"
    f.write_text("_target_: pkg.mod:Net\nlayers: [1, 2]\n")
    assert spec.parse_spec(str(f), "--model") == {"_target_": "pkg.mod.Net", "layers": [1, 2]}
    assert spec.parse_assignments(["hidden=64", "lr=0.1", "name=abc", "x=null"], "--model-arg") == \
        {"hidden": 64, "lr": 0.1, "name": "abc", "x": None}


@pytest.mark.parametrize("value, message", [
    ("not a path", "expected package.module:Class"),
    ("missing.yaml", "no such file"),
    ("{hidden: 64}", "needs _target_"),
    ("{_target_: 'a b'}", "needs _target_"),
])
def test_bad_specs_name_the_option_and_the_value(value, message):
    with pytest.raises(spec.SpecError, match=message) as error:
        spec.parse_spec(value, "--model")
    assert "--model" in str(error.value)


def test_the_users_classes_are_checked_before_any_worker_starts(user_project):
    s = settings("--model", MODEL, "--datamodule", DATA)
    rows, notes, package = cli.check_environment(s)
    assert package == "lightning.pytorch" and "ddp" in [r.name for r in rows]
    with pytest.raises(cli.BenchError, match="has no attribute 'Nope'"):
        cli.check_environment(settings("--model", "acme_models.tiny:Nope"))
    with pytest.raises(cli.BenchError, match="which is not a LightningModule"):
        cli.check_environment(settings("--model", DATA))
    with pytest.raises(cli.BenchError, match="which is not a LightningDataModule"):
        cli.check_environment(settings("--model", MODEL, "--datamodule", MODEL))
    with pytest.raises(cli.BenchError, match="no module of that name"):
        cli.check_environment(settings("--model", "acme_nothing.models:Net"))


def test_a_module_of_the_standalone_pytorch_lightning_package_gets_its_strategies(user_project):
    import pytorch_lightning

    rows, _, package = cli.check_environment(settings("--model", "acme_models.standalone:StandaloneBlobClassifier"))
    assert package == "pytorch_lightning"
    for entry in rows:
        built = entry.build(strategies.BuildContext(backend="gloo", seed=0, world_size=2, package=package))
        assert isinstance(built, pytorch_lightning.strategies.Strategy), (entry.name, type(built))


def test_bad_options_exit_2_with_the_option_named(user_project, capsys):
    cases = [
        (["--model", MODEL, "--workers", "1"], "--workers 1: expected an integer >= 2"),
        (["--model", MODEL, "--epochs", "2", "--steps", "10"], "give one of --epochs, --steps, --time"),
        (["--model", MODEL, "--target", "0.9"], "--target needs --metric"),
        (["--model", MODEL, "--metric", "val_acc", "--target", "ddp+1"], "--target 'ddp+1'"),
        (["--model", MODEL, "--trainer-arg", "max_epochs=3"], "max_epochs is set by the benchmark (use --epochs)"),
        (["--model", MODEL, "--straggler", "2", "--straggler-rank", "5"], "--straggler-rank 5"),
        (["--model", MODEL, "--straggler", "0.5"], "--straggler 0.5: expected a number >= 1"),
        (["--model", MODEL, "--strategy-arg", "p=0.5"], "expected ROW.KEY=VALUE"),
        (["--model", MODEL, "--strategy-arg", "nosuch.p=0.5"], "--strategy-arg for ['nosuch']"),
        (["--model", MODEL, "--strategies", "gossip,bogus"], "unknown 'bogus'"),
        (["--model", MODEL, "--strategy-arg", "gossip.p=1.5"], "--strategy-arg for gossip ({'p': 1.5})"),
        (["--model", MODEL, "--strategy-arg", "gossip.pp=0.5"], "unexpected keyword argument 'pp'"),
        (["--model", MODEL, "--strategies", "gossip", "--compare", __file__], "--compare needs the ddp row"),
        (["--model", MODEL, "--rate", "100,abc"], "--rate '100,abc'"),
        (["--model", MODEL, "--compare", "nope.json"], "--compare 'nope.json': no such file"),
        (["--workers", "2"], "--model is required"),
    ]
    for argv, message in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err, (argv, err)


def test_a_config_file_holds_the_options_and_the_command_line_wins(user_project):
    config = user_project / "bench.yaml"
    config.write_text(
        f"model: {{_target_: {MODEL.replace(':', '.')}, hidden: 8}}\n"
        f"datamodule: {DATA}\n"
        "workers: 3\nsteps: 50\nmetric: val_acc\ntarget: ddp-0.02\n"
        "strategy_args: {gossip: {p: 0.5}}\nrate: [100, 1000]\nstraggler: 2\n")
    s = settings("--config", str(config), "--model-arg", "lr=0.2", "--strategy-arg", "gossip.topology=ring",
                 "--workers", "4")
    assert s["model"] == {"_target_": "acme_models.tiny.BlobClassifier", "hidden": 8, "lr": 0.2}
    assert s["datamodule"] == {"_target_": "acme_models.tiny.Blobs"}
    assert s["workers"] == 4 and s["budget"] == {"kind": "steps", "value": 50}
    assert s["strategy_args"] == {"gossip": {"p": 0.5, "topology": "ring"}}
    assert s["straggler"] == {"rank": 3, "factor": 2.0}
    assert [sc["name"] for sc in s["scenarios"]] == ["100mbit_straggler2x", "1000mbit_straggler2x"]
    assert all(sc["network"] == "netns" for sc in s["scenarios"])
    (user_project / "bad.yaml").write_text("modle: x\n")
    with pytest.raises(cli.BenchError, match="unknown option"):
        settings("--config", str(user_project / "bad.yaml"))


# -- the strategy registry ------------------------------------------------------------------------------------------
def test_default_rows_are_gossip_async_outer_ddp_and_local_sgd():
    rows, notes = strategies.resolve(None, strategies.registered_names())
    assert {"ddp", "gossip", "gossip_async", "local_sgd", "gossip_outer", "gossip_outer_async"} <= {r.name for r in rows}


def test_a_mode_joins_the_run_when_its_strategy_name_is_registered_and_is_refused_by_name_when_not():
    """A row of the registry is one line: registering the name in Lightning is all it takes, and a row whose name
    is not registered is left out of the default run with a note (and refused, naming it, when asked for)."""
    from lightning.pytorch.strategies import StrategyRegistry

    from lightning_gossip import GossipStrategy

    name = "gossip_outer"
    saved = StrategyRegistry.pop(name)
    try:
        rows, notes = strategies.resolve(None, strategies.registered_names())
        assert name not in [r.name for r in rows] and any(n.startswith(name + ":") for n in notes)
        with pytest.raises(ValueError, match="registered in Lightning as 'gossip_outer'"):
            strategies.resolve([name], strategies.registered_names())
    finally:
        StrategyRegistry[name] = saved
    rows, _ = strategies.resolve(None, strategies.registered_names())
    assert name in [r.name for r in rows]
    built = strategies.REGISTRY[name].build(strategies.BuildContext(backend="gloo", seed=3, world_size=2,
                                                                    args={"topology": "ring"}))
    # the registered (recommended) outer settings, the row's own defaults and the user's --strategy-arg
    assert isinstance(built, GossipStrategy)
    assert built.p == 0.0 and built.options.outer_every == 8 and built.options.outer_lr == 0.3
    assert built.options.topology.__class__.__name__ == "Ring" and built.monitor is False


def test_local_sgd_is_gossip_with_p0_and_a_periodic_average():
    built = strategies.REGISTRY["local_sgd"].build(strategies.BuildContext(backend="gloo", seed=0, world_size=2))
    assert built.p == 0.0 and built.options.average_every == strategies.LOCAL_SGD_EVERY
    sizes = {"param_bytes": 4000, "gossip_numel": 1000}
    assert strategies.REGISTRY["ddp"].uncounted_bytes_per_step(sizes, 4, {}) == pytest.approx(1.5 * 4000)
    assert strategies.REGISTRY["local_sgd"].uncounted_bytes_per_step(sizes, 2, {"average_every": 4}) == \
        pytest.approx(8 * 1001 / 4)


# -- rows, ratios, the table and the comparison -----------------------------------------------------------------------
def _record(rank: int, step_s: float, steps: int = 40, bytes_sent: int = 0, metric=(0.5, 0.9), async_=False,
            wait_s: float = 0.0) -> dict:
    ends = [step_s * (i + 1) for i in range(steps)]
    return {"rank": rank, "steps": steps, "batches": steps, "samples": 16 * steps, "ends": ends,
            "waits": [wait_s * (i + 1) for i in range(steps)], "train_end": ends[-1], "asynchronous": async_,
            "evals": [[ends[steps // 2 - 1], steps // 2, metric[0]], [ends[-1], steps, metric[1]]],
            "final_eval": [ends[-1], steps, metric[1]],
            "counters": {"bytes_sent": bytes_sent, "messages_sent": bytes_sent // 880},
            "sizes": {"param_bytes": 848, "gossip_numel": 212}, "message_bytes": 880,
            "cpu_s": (step_s - wait_s) * steps,  # busy whenever it is not waiting for a CPU
            "tx_bytes": None, "sleep_s": 0.0}


def _results(step_ms: dict, metric: dict | None = None, bytes_sent: dict | None = None,
             wait_ms: dict | None = None) -> dict:
    rows = []
    for name, ms in step_ms.items():
        entry = strategies.REGISTRY[name]
        recs = [_record(r, ms / 1e3, bytes_sent=(bytes_sent or {}).get(name, 0),
                        metric=(metric or {}).get(name, (0.5, 0.9)), wait_s=(wait_ms or {}).get(name, 0.0) / 1e3)
                for r in range(2)]
        row = {"scenario": "loopback", "strategy": name, "status": "ok",
               **results.summarize_run(recs, 5, entry.uncounted_bytes_per_step, {})}
        rows.append(row)
    s = {"metric": "val_acc", "mode": "max", "target": 0.8, "workers": 2}
    results.finish_rows(rows, s)
    return {"schema": results.SCHEMA, "settings": s, "rows": rows, "ratios": results.ratios(rows),
            "machine": results.machine_stamp(), "scenarios": [{"name": "loopback", "network": "loopback"}]}


def test_rows_ratios_and_time_to_target():
    res = _results({"ddp": 10.0, "gossip": 5.0}, bytes_sent={"gossip": 880 * 20})
    ddp, gossip = res["rows"]
    assert ddp["step_ms"] == pytest.approx(10.0) and gossip["step_ms"] == pytest.approx(5.0)
    assert ddp["bytes_per_step"] == pytest.approx(848)  # ring all-reduce of the gradients, 2(M-1)/M = 1 at M = 2
    assert gossip["bytes_per_step"] == pytest.approx(880 * 20 / 40)
    assert gossip["step_vs_ddp"] == pytest.approx(0.5) and gossip["throughput_vs_ddp"] == pytest.approx(2.0)
    assert gossip["time_to_target_s"] == pytest.approx(0.2) and ddp["time_to_target_s"] == pytest.approx(0.4)
    assert res["ratios"]["loopback/gossip/step_vs_ddp"] == pytest.approx(0.5)
    assert not any(k.startswith("loopback/ddp/") for k in res["ratios"])
    text = results.render_text(results.table(res))
    assert "1 (ref)" in text and "0.50" in text and "time to val_acc 0.8 (s)" in text


def test_compare_passes_within_tolerance_and_fails_on_a_slowdown_naming_row_and_ratio():
    base = _results({"ddp": 10.0, "gossip": 5.0, "gossip_async": 4.0})
    noisy = _results({"ddp": 10.0, "gossip": 7.0, "gossip_async": 4.0})  # 1.4x: within the default tolerance 0.5
    problems, lines = results.compare(noisy, base, tolerance=0.5, metric_tolerance=0.05, bytes_tolerance=0.1)
    assert problems == [], problems
    slow = _results({"ddp": 10.0, "gossip": 11.0, "gossip_async": 4.0})  # 2.2x, +0.6 DDP steps
    problems, lines = results.compare(slow, base, tolerance=0.5, metric_tolerance=0.05, bytes_tolerance=0.1)
    # the active step time (wall-clock minus the rank's own wait for a CPU) is the ratio checked where measured
    assert problems == ["loopback/gossip: active_step_vs_ddp_cpu 0.500 -> 1.100 (x2.20, +0.60; allowed up to x1.50 or "
                        "+0.50)"]
    assert any("loopback/gossip" in line and "REGRESSION" in line for line in lines)
    # a row much faster than DDP may jitter by more than 1.5x, as long as it stays within half a DDP step
    problems, _ = results.compare(_results({"ddp": 10.0, "gossip": 5.0, "gossip_async": 6.0}),
                                  _results({"ddp": 10.0, "gossip": 5.0, "gossip_async": 3.0}), 0.5, 0.05, 0.1)
    assert problems == []
    # a machine twice as slow moves DDP too: the ratios, and so the verdict, do not change
    problems, _ = results.compare(_results({"ddp": 20.0, "gossip": 10.0, "gossip_async": 8.0}), base, 0.5, 0.05, 0.1)
    assert problems == []


def test_waiting_for_a_cpu_is_taken_out_of_the_checked_ratio_but_not_a_sleep():
    base = _results({"ddp": 10.0, "gossip": 5.0})
    # other jobs took the CPU from gossip's ranks for 6 ms of every step: the wall-clock ratio more than doubles,
    # the active one (what the code did) does not move
    busy = _results({"ddp": 10.0, "gossip": 11.0}, wait_ms={"gossip": 6.0})
    assert busy["rows"][1]["active_step_ms"] == pytest.approx(5.0)
    assert busy["ratios"]["loopback/gossip/step_vs_ddp"] == pytest.approx(1.1)
    problems, lines = results.compare(busy, base, 0.5, 0.05, 0.1)
    assert problems == []
    assert any("step_vs_ddp" in line and "info (worse)" in line for line in lines)
    # without a runqueue measurement (no schedstat) the wall-clock ratio is the one checked
    for res in (base, busy):
        res["ratios"] = {k: v for k, v in res["ratios"].items() if "active" not in k}
    problems, _ = results.compare(busy, base, 0.5, 0.05, 0.1)
    assert problems == ["loopback/gossip: step_vs_ddp 0.500 -> 1.100 (x2.20, +0.60; allowed up to x1.50 or +0.50)"]


def test_compare_fails_on_bytes_metric_missing_rows_and_other_settings():
    base = _results({"ddp": 10.0, "gossip": 5.0}, bytes_sent={"gossip": 880 * 20})
    more_bytes = _results({"ddp": 10.0, "gossip": 5.0}, bytes_sent={"gossip": 880 * 30})
    problems, _ = results.compare(more_bytes, base, 0.5, 0.05, 0.1)
    assert len(problems) == 1 and problems[0].startswith("loopback/gossip: bytes_vs_ddp")
    worse = _results({"ddp": 10.0, "gossip": 5.0}, metric={"gossip": (0.5, 0.8)}, bytes_sent={"gossip": 880 * 20})
    problems, _ = results.compare(worse, base, 0.5, 0.05, 0.1)
    assert problems == ["loopback/gossip: final val_acc 0.9000 -> 0.8000 (worse by more than 5% of the baseline)"]
    gone = copy.deepcopy(base)
    gone["rows"][1]["status"] = "failed: RuntimeError: boom"
    gone["ratios"] = results.ratios(gone["rows"])
    problems, _ = results.compare(gone, base, 0.5, 0.05, 0.1)
    assert any("loopback/gossip: failed: RuntimeError: boom now" in p for p in problems)
    other = copy.deepcopy(base)
    other["settings"]["workers"] = 4
    problems, _ = results.compare(other, base, 0.5, 0.05, 0.1)
    assert problems and "workers is 4 here but 2 in the baseline" in problems[0]


def test_from_results_compares_without_running(tmp_path, capsys):
    base = _results({"ddp": 10.0, "gossip": 5.0})
    slow = _results({"ddp": 10.0, "gossip": 12.0})
    (tmp_path / "base.json").write_text(json.dumps(base))
    (tmp_path / "slow.json").write_text(json.dumps(slow))
    assert cli.main(["--from-results", str(tmp_path / "base.json"), "--compare", str(tmp_path / "base.json")]) == 0
    assert "no regression" in capsys.readouterr().out
    assert cli.main(["--from-results", str(tmp_path / "slow.json"), "--compare", str(tmp_path / "base.json")]) == 1
    out = capsys.readouterr().out
    assert "REGRESSION" in out and "loopback/gossip: active_step_vs_ddp_cpu 0.500 -> 1.200" in out
    # a looser tolerance lets the same numbers pass
    assert cli.main(["--from-results", str(tmp_path / "slow.json"), "--compare", str(tmp_path / "base.json"),
                     "--tolerance", "1.5"]) == 0


def test_targets_relative_to_ddp():
    assert results.parse_target("ddp") == (None, 0.0)
    assert results.parse_target("ddp-0.01") == (None, 0.01)
    assert results.parse_target(0.9) == (0.9, None) and results.parse_target("0.9") == (0.9, None)
    res = _results({"ddp": 10.0, "gossip": 5.0}, metric={"ddp": (0.6, 0.9), "gossip": (0.86, 0.88)})
    res["settings"]["target"] = "ddp-0.05"
    results.finish_rows(res["rows"], res["settings"])
    assert res["rows"][0]["target"] == pytest.approx(0.85)
    assert res["rows"][1]["time_to_target_s"] == pytest.approx(0.1)  # gossip's first validation: 0.86 >= 0.85


def test_plots_are_skipped_with_a_note_without_matplotlib(tmp_path, monkeypatch):
    res = _results({"ddp": 10.0, "gossip": 5.0})
    written, note = results.write_plots(res, str(tmp_path))
    assert note is None and {Path(p).name for p in written} == {"val_acc_vs_time_loopback.png", "step_vs_ddp.png"}
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # as if it were not installed
    written, note = results.write_plots(res, str(tmp_path / "none"))
    assert written == [] and "pip install 'lightning-gossip[plots]'" in note
