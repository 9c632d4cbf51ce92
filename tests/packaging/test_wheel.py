"""The package as users install it: the Hydra configs ship inside it, built from the repository's conf/.

- fast (default run): pyproject's package list names every package folder and every config group; the app finds
  the checkout's configs from any working directory; a user's --config-dir adds configs.
- ``wheel`` (also ``slow``; its own CI step): build the wheel, install it into a fresh virtual environment (torch
  first, then the wheel and its dependencies from the package index), and run a one-epoch, 2-worker job from an
  empty folder, outside the checkout, with no PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from tests.helpers.processes import run_command

REPO = Path(__file__).resolve().parents[2]
TINY = ["trainer=debug", "extras.print_config=false", "callbacks.progress_bar.refresh_rate=0",
        "strategy.timeout.seconds=60"]
# a user's own strategy config, found through --config-dir, derived from the shipped one
USER_STRATEGY = "defaults:\n  - gossip\n  - _self_\np: 0.5\ntopology: ring\n"


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "LIGHTNING_GOSSIP_WORKER_CONFIG", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT",
                        "MASTER_ADDR", "NODE_RANK", "RANK", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="1", **extra)
    return env


def checked(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"{proc.args}\nexit {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\n" \
                                 f"STDERR:\n{proc.stderr[-6000:]}"
    return proc


def shipped_configs() -> set[str]:
    """Every config file the package must ship: the yaml files of conf/ (personal conf/local/ excepted)."""
    return {p.relative_to(REPO / "conf").as_posix() for p in (REPO / "conf").rglob("*.yaml")
            if p.relative_to(REPO / "conf").parts[0] != "local"}


def test_package_list_names_every_package_folder_and_config_group():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    setuptools_cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools_cfg["packages"])
    assert setuptools_cfg["package-dir"] == {"lightning_gossip.conf": "conf"}
    code = {p.parent.relative_to(REPO).as_posix().replace("/", ".")
            for p in (REPO / "lightning_gossip").rglob("__init__.py")}
    groups = {"lightning_gossip.conf" + "".join("." + part for part in Path(c).parent.parts)
              for c in shipped_configs()}
    missing = (code | groups) - listed
    assert not missing, f"add these to [tool.setuptools] packages in pyproject.toml, or they will not ship: {missing}"
    stale = listed - code - groups
    assert not stale, f"listed in pyproject.toml but not in the tree: {stale}"


def test_checkout_configs_are_found_from_any_directory(tmp_path):
    """A checkout on PYTHONPATH (or an editable install) composes the checkout's conf/, whatever the cwd."""
    from lightning_gossip.app.config_source import config_path

    assert config_path() == str(REPO / "conf")
    user = tmp_path / "my_conf" / "strategy"
    user.mkdir(parents=True)
    (user / "mine.yaml").write_text(USER_STRATEGY)
    work = tmp_path / "work"
    work.mkdir()
    proc = checked(subprocess.run(
        [sys.executable, "-m", "lightning_gossip.train", "--config-dir", str(tmp_path / "my_conf"), "strategy=mine",
         "--cfg", "job", "--resolve"],
        cwd=work, env=clean_env(PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=120))
    assert "_target_: lightning_gossip.GossipStrategy" in proc.stdout
    assert "p: 0.5" in proc.stdout and "topology: ring" in proc.stdout
    assert "final_consensus: true" in proc.stdout  # the rest comes from the shipped strategy/gossip.yaml
    assert not any(work.iterdir()), "--cfg job must not create output folders"


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory) -> Path:
    """Build the wheel and install it (and torch first, the version running these tests) into a fresh venv."""
    root = tmp_path_factory.mktemp("wheel")
    dist = root / "dist"
    checked(subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(REPO)],
                           env=clean_env(), capture_output=True, text=True, timeout=600))
    (wheel,) = dist.glob("lightning_gossip-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = {c for c in shipped_configs() if f"lightning_gossip/conf/{c}" not in names}
    assert not missing, f"configs missing from the wheel: {sorted(missing)}"
    assert not any(n.startswith("lightning_gossip/conf/local/") for n in names), "personal configs shipped"
    venv = root / "venv"
    checked(subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True, timeout=300))
    python = venv / "bin" / "python"
    torch_version = torch.__version__.split("+")[0]
    for args in (["torch==" + torch_version], [str(wheel)]):
        checked(subprocess.run([str(python), "-m", "pip", "install", "--quiet", *args], env=clean_env(),
                               capture_output=True, text=True, timeout=900))
    return python


@pytest.mark.slow
@pytest.mark.wheel
@pytest.mark.timeout(1500)
def test_installed_wheel_runs_the_app_from_an_empty_directory(installed_wheel, tmp_path):
    python = installed_wheel
    work = tmp_path / "empty"
    work.mkdir()
    where = checked(subprocess.run(
        [str(python), "-c", "import lightning_gossip, lightning_gossip.app.config_source as c; "
                            "print(lightning_gossip.__file__); print(c.config_path())"],
        cwd=work, env=clean_env(), capture_output=True, text=True, timeout=300)).stdout.split()
    assert "site-packages" in where[0] and not where[0].startswith(str(REPO)), where
    assert where[1] == "pkg://lightning_gossip.conf"

    # the app starts its worker processes: run it as a process group that is waited for and never left behind
    run = run_command([str(python), "-m", "lightning_gossip.train", *TINY], timeout=600, env=clean_env(), cwd=work)
    assert run.returncode == 0, run.output[-8000:]
    assert not run.survivors, f"processes left behind: {run.survivors}"
    (results,) = work.glob("logs/train/runs/*/results.json")
    result = json.loads(results.read_text())
    assert result["world_size"] == 2 and result["epochs"] == 1 and result["gossip"] is True
    assert 0.0 <= result["metrics"]["test/acc"] <= 1.0
    assert "Test accuracy of the consensus model" in run.output

    # a user's config folder on top of the shipped configs
    user = tmp_path / "my_conf" / "strategy"
    user.mkdir(parents=True)
    (user / "mine.yaml").write_text(USER_STRATEGY)
    proc = checked(subprocess.run(
        [str(python), "-m", "lightning_gossip.train", "--config-dir", str(tmp_path / "my_conf"), "strategy=mine",
         "--cfg", "job"], cwd=work, env=clean_env(), capture_output=True, text=True, timeout=300))
    assert "p: 0.5" in proc.stdout and "topology: ring" in proc.stdout


@pytest.mark.slow
@pytest.mark.wheel
@pytest.mark.timeout(1500)
def test_installed_wheel_benchmarks_someone_elses_model_with_one_command(installed_wheel, tmp_path):
    """The console script from the wheel, a model from another project (on PYTHONPATH only), from an empty folder."""
    bench = installed_wheel.parent / "lightning-gossip-bench"
    assert bench.exists(), "the wheel installs no lightning-gossip-bench console script"
    work = tmp_path / "empty"
    work.mkdir()
    user_project = REPO / "tests" / "bench" / "user_project"
    args = ["--model", "acme_models.tiny:BlobClassifier", "--datamodule", "acme_models.tiny:Blobs", "--strategies",
            "ddp,gossip", "--workers", "2", "--steps", "12", "--metric", "val_acc", "--out", "out"]
    run = run_command([str(bench), *args], timeout=600, env=clean_env(PYTHONPATH=str(user_project)), cwd=work)
    assert run.returncode == 0, run.output[-8000:]
    assert not run.survivors, f"processes left behind: {run.survivors}"
    rows = json.loads((work / "out" / "results.json").read_text())["rows"]
    assert [(r["strategy"], r["status"]) for r in rows] == [("ddp", "ok"), ("gossip", "ok")]
    assert "final val_acc" in run.output


def test_ci_tests_the_lowest_lightning_that_pyproject_allows():
    import re

    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    (spec,) = [d for d in project["dependencies"] if re.match(r"lightning\s*[<>=]", d)]
    lower = re.search(r">=\s*([\d.]+)", spec).group(1)
    ci = (REPO / ".ci" / "run").read_text()
    tested = re.search(r"^LIGHTNING_LOWEST=([\d.]+)$", ci, re.MULTILINE).group(1)

    def normalise(version: str) -> tuple[int, ...]:
        parts = [int(x) for x in version.split(".")]
        return tuple(parts + [0] * (3 - len(parts)))

    assert normalise(tested) == normalise(lower), f"pyproject allows {spec!r} but CI tests lightning=={tested}"
    assert '-m "lightning_compat and not slow and not soak"' in ci and "pytest -m wheel" in ci
    assert "python -m lightning_gossip.bench --config experiments/benchmark/quick.yaml --compare" in ci
