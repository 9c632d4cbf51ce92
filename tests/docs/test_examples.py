"""Every example under examples/ runs as its documentation says, small enough for CI.

Each example has a run in the default suite: the Trainer script, the Fabric loop (and its resume from the
checkpoint), the plain-torch loop (spawning its own processes, and under torchrun in the asynchronous mode), the
multi-node launcher (torchrun.sh with one node and 2 processes) and the app's --config-dir with a user's model. The
longer variants (the Trainer script asynchronous, 2 nodes x 1 process through torchrun.sh, the sbatch file's srun
line under a simulated SLURM allocation) are marked slow.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.distributed import free_port
from tests.helpers.processes import ROOT, AppRun, kill_group, run_command, script_env

EXAMPLES_DIR = ROOT / "examples"
# every file under examples/ that a test here runs (or, for configs, composes); test_every_example_is_tested checks it
EXAMPLES = {
    "examples/trainer.py",
    "examples/fabric_loop.py",
    "examples/fabric_survival.py",
    "examples/torch_loop.py",
    "examples/multinode/train.py",
    "examples/multinode/torchrun.sh",
    "examples/multinode/slurm.sbatch",
    "examples/my_model/my_classifier.py",
    "examples/my_model/model/my_model.yaml",
    "examples/my_model/strategy/my_gossip.yaml",
    "examples/my_model/experiment/my_model.yaml",
    "examples/my_model/README.md",
}
# seconds per command: each takes 10-60 s on 2 idle cores, but a machine shared with other jobs can be 10x slower
TIMEOUT = 420
pytestmark = pytest.mark.timeout(TIMEOUT + 60)


def _run(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = TIMEOUT):
    run = run_command(args, timeout=timeout, cwd=cwd, env=env or script_env(), linger=20)
    assert run.returncode == 0, f"{args} exited with {run.returncode}:\n{run.output[-6000:]}"
    assert not run.survivors, f"{args} left processes running: {run.survivors}"
    return run


def _accuracies(pattern: str, output: str) -> list[float]:
    return [float(a) for a in re.findall(pattern, output)]


def test_every_example_is_tested() -> None:
    present = {str(p.relative_to(ROOT)) for p in EXAMPLES_DIR.rglob("*")
               if p.is_file() and "__pycache__" not in p.parts}
    assert present == EXAMPLES, f"untested: {present - EXAMPLES}; gone: {EXAMPLES - present}"


def test_trainer_example(tmp_path: Path) -> None:
    run = _run([sys.executable, str(EXAMPLES_DIR / "trainer.py"), "--devices", "2", "--epochs", "2"], tmp_path)
    (accuracy,) = _accuracies(r"consensus test accuracy (\d\.\d+)", run.output)
    assert accuracy > 0.7, run.output[-3000:]  # digits, 2 epochs of 21 steps per worker: about 0.9
    assert re.search(r"rank 0 sent \d+ messages", run.output)


@pytest.mark.slow
def test_fabric_loop_example_asynchronous(tmp_path: Path) -> None:
    run = _run([sys.executable, str(EXAMPLES_DIR / "fabric_loop.py"), "--devices", "2", "--epochs", "2",
                "--strategy", "gossip_async"], tmp_path)
    (accuracy,) = _accuracies(r"epoch 1: consensus accuracy (\d\.\d+)", run.output)
    assert accuracy > 0.7, run.output[-3000:]


@pytest.mark.slow
def test_trainer_example_asynchronous(tmp_path: Path) -> None:
    run = _run([sys.executable, str(EXAMPLES_DIR / "trainer.py"), "--devices", "2", "--epochs", "2", "--asynchronous"],
               tmp_path)
    (accuracy,) = _accuracies(r"consensus test accuracy (\d\.\d+)", run.output)
    assert accuracy > 0.7, run.output[-3000:]


@pytest.mark.slow
@pytest.mark.timeout(2 * TIMEOUT + 60)
def test_fabric_loop_example_saves_and_resumes(tmp_path: Path) -> None:
    import torch
    from torch import nn

    script = [sys.executable, str(EXAMPLES_DIR / "fabric_loop.py"), "--devices", "2"]
    first = _run([*script, "--epochs", "1"], tmp_path)
    assert "epoch 0: consensus accuracy" in first.output and "resumed" not in first.output
    # the checkpoint's model entry is the consensus: it loads into a plain model, without gossip
    checkpoint = torch.load(tmp_path / "gossip.ckpt", weights_only=False)
    plain = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    plain.load_state_dict(checkpoint["model"])
    assert checkpoint["epoch"] == 1 and checkpoint["gossip"]["world_size"] == 2
    parts = sorted(p.name for p in (tmp_path / "gossip.ckpt.parts").glob("*/rank*.pt"))
    assert parts == ["rank0.pt", "rank1.pt"]  # every rank's own state, beside the file
    second = _run([*script, "--epochs", "2"], tmp_path)
    assert "resumed from gossip.ckpt after epoch 1" in second.output
    assert "epoch 0:" not in second.output
    (accuracy,) = _accuracies(r"epoch 1: consensus accuracy (\d\.\d+)", second.output)
    assert accuracy > 0.7, second.output[-3000:]
    assert torch.load(tmp_path / "gossip.ckpt", weights_only=False)["epoch"] == 2


@pytest.mark.slow
def test_fabric_survival_example_survives_its_own_kill(tmp_path: Path) -> None:
    args = [sys.executable, "-m", "lightning_gossip.gossip.launch", "--nproc", "4",
            str(EXAMPLES_DIR / "fabric_survival.py"), "--kill-rank", "2", "--kill-step", "30"]
    run = _run(args, tmp_path)
    finals = re.findall(r"rank (\d): consensus test accuracy (\d\.\d+); lost rank 2 .*; survivors' weights sum to "
                        r"(\d\.\d+)", run.output)
    assert sorted(r for r, _, _ in finals) == ["0", "1", "3"], run.output[-3000:]
    assert len({(a, w) for _, a, w in finals}) == 1 and float(finals[0][1]) > 0.7  # one consensus on the survivors
    assert "the run finished without rank(s) [2]" in run.output
    assert "epoch 3: 1437 samples trained by ranks [0, 1, 3]" in run.output


def test_torch_loop_example_spawns_its_processes(tmp_path: Path) -> None:
    run = _run([sys.executable, str(EXAMPLES_DIR / "torch_loop.py"), "--nproc", "2", "--epochs", "2"], tmp_path)
    finals = re.findall(r"rank (\d): (\d+) steps, \d+ messages sent, consensus test accuracy (\d\.\d+)", run.output)
    assert sorted(r for r, _, _ in finals) == ["0", "1"], run.output[-3000:]
    assert len({steps for _, steps, _ in finals}) == 1  # lock-step: the same number of steps on every rank
    assert len({acc for _, _, acc in finals}) == 1 and float(finals[0][2]) > 0.7  # one consensus on both ranks


def test_torch_loop_example_under_torchrun_asynchronous(tmp_path: Path) -> None:
    run = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                str(EXAMPLES_DIR / "torch_loop.py"), "--epochs", "2", "--asynchronous"], tmp_path)
    finals = re.findall(r"rank (\d): (\d+) steps, \d+ messages sent, consensus test accuracy (\d\.\d+)", run.output)
    assert sorted(r for r, _, _ in finals) == ["0", "1"], run.output[-3000:]
    assert len({acc for _, _, acc in finals}) == 1 and float(finals[0][2]) > 0.5
    # work sharing: the ranks' steps add up to the epochs' batches (1437 training samples, 44 batches of 32 per epoch)
    assert sum(int(steps) for _, steps, _ in finals) == 2 * (1437 // 32)


def _multinode_lines(output: str) -> list[tuple[str, str, str]]:
    return re.findall(r"rank (\d+)/(\d+) on \S+ \(node \d+, local rank \d+\): (\d+) steps, consensus checksum (\S+)",
                      output)


def _torchrun_env(**extra: str) -> dict[str, str]:
    env = script_env(**extra)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])  # torchrun of this Python
    for key in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "WORLD_SIZE", "RANK", "NNODES", "NPROC_PER_NODE"):
        env.pop(key, None)
    env.update(extra)
    return env


def test_multinode_torchrun_script_on_one_node(tmp_path: Path) -> None:
    env = _torchrun_env(MASTER_PORT=str(free_port()), NPROC_PER_NODE="2")
    run = _run(["bash", str(EXAMPLES_DIR / "multinode" / "torchrun.sh"), "--epochs", "1"], tmp_path, env=env)
    lines = _multinode_lines(run.output)
    assert sorted(rank for rank, _, _, _ in lines) == ["0", "1"], run.output[-3000:]
    assert len({(world, steps, checksum) for _, world, steps, checksum in lines}) == 1  # one consensus, same steps
    assert lines[0][1] == "2" and int(lines[0][2]) > 0


@pytest.mark.slow
def test_multinode_torchrun_script_two_nodes(tmp_path: Path) -> None:
    """Two 'nodes' of one process each on this machine, each started by its own torchrun.sh, as on two hosts."""
    port = str(free_port())
    procs = []
    try:
        for node in range(2):
            env = _torchrun_env(MASTER_PORT=port, NNODES="2", NODE_RANK=str(node), NPROC_PER_NODE="1",
                                MASTER_ADDR="127.0.0.1")
            log = open(tmp_path / f"node{node}.log", "wb")
            procs.append(subprocess.Popen(["bash", str(EXAMPLES_DIR / "multinode" / "torchrun.sh"), "--epochs", "1"],
                                          cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))
        codes = [p.wait(timeout=TIMEOUT) for p in procs]
    finally:
        for p in procs:
            kill_group(p.pid)
    output = "\n".join((tmp_path / f"node{n}.log").read_text(errors="replace") for n in range(2))
    assert codes == [0, 0], output[-6000:]
    lines = _multinode_lines(output)
    assert sorted(rank for rank, _, _, _ in lines) == ["0", "1"] and lines[0][1] == "2", output[-3000:]
    assert len({checksum for _, _, _, checksum in lines}) == 1


def _srun_command() -> list[str]:
    """The command the sbatch file gives srun (one task per process), with this Python."""
    (line,) = [line for line in (EXAMPLES_DIR / "multinode" / "slurm.sbatch").read_text().splitlines()
               if line.startswith("srun ")]
    words = line.split()[1:]
    assert words[0] == "python"
    return [sys.executable, *words[1:]]


def test_sbatch_file_is_valid_bash_and_names_the_script() -> None:
    sbatch = EXAMPLES_DIR / "multinode" / "slurm.sbatch"
    subprocess.run(["bash", "-n", str(sbatch)], check=True, timeout=30)
    command = _srun_command()
    assert (ROOT / command[1]).is_file(), f"the sbatch file runs {command[1]}, which does not exist"
    assert re.search(r"^#SBATCH --ntasks-per-node=\d+", sbatch.read_text(), re.MULTILINE)


@pytest.mark.slow
def test_sbatch_srun_line_under_a_simulated_slurm_allocation(tmp_path: Path) -> None:
    """The sbatch file's srun line, started as srun would start 2 tasks on one node (SLURM_* environment)."""
    port = str(free_port())
    procs = []
    try:
        for task in range(2):
            env = script_env(MASTER_PORT=port)
            for key in [k for k in env if k.startswith(("SLURM_", "TORCHELASTIC_"))] + ["WORLD_SIZE", "RANK",
                                                                                       "LOCAL_WORLD_SIZE"]:
                env.pop(key, None)
            env.update(SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="2", SLURM_NNODES="1", SLURM_PROCID=str(task),
                       SLURM_LOCALID=str(task), SLURM_NODEID="0", SLURM_JOB_ID="4243", SLURM_JOB_NAME="gossip",
                       SLURM_NODELIST="localhost", SLURM_CPUS_PER_TASK="1")
            log = open(tmp_path / f"task{task}.log", "wb")
            command = [*_srun_command()]
            command[command.index("--epochs") + 1] = "1"
            procs.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))
        codes = [p.wait(timeout=TIMEOUT) for p in procs]
    finally:
        for p in procs:
            kill_group(p.pid)
    output = "\n".join((tmp_path / f"task{t}.log").read_text(errors="replace") for t in range(2))
    assert codes == [0, 0], output[-6000:]
    lines = _multinode_lines(output)
    assert sorted(rank for rank, _, _, _ in lines) == ["0", "1"], output[-3000:]
    assert len({checksum for _, _, _, checksum in lines}) == 1


@pytest.mark.timeout(TIMEOUT + 60)
def test_my_model_config_dir_with_the_app(tmp_path: Path) -> None:
    """The documented command, with the documented relative paths: a user's LightningModule through --config-dir.

    It runs in a folder of its own (logs and checkpoints land there) that holds ``examples`` as a link to the
    repository's, so ``--config-dir examples/my_model`` and ``PYTHONPATH=examples/my_model`` are the README's.
    """
    (tmp_path / "examples").symlink_to(EXAMPLES_DIR, target_is_directory=True)
    args = ["--config-dir", "examples/my_model", "experiment=my_model", "trainer.devices=2", "trainer.max_epochs=1",
            "logger=none", "extras.print_config=false"]
    env = {"PYTHONPATH": os.pathsep.join(["examples/my_model", str(ROOT)])}
    with AppRun(args, cwd=tmp_path, extra_env=env) as app:
        code = app.wait(timeout=TIMEOUT)
        assert code == 0, app.output[-6000:]
        assert not app.survivors(), "the app left worker processes running"
        (results,) = (tmp_path / "logs" / "my_model" / "runs").glob("*/results.json")
        result = json.loads(results.read_text())
    assert result["config"]["model"]["_target_"] == "my_classifier.MyClassifier"
    assert result["config"]["strategy"]["p"] == 0.5 and result["config"]["strategy"]["topology"] == "ring"
    assert result["world_size"] == 2 and result["gossip"] and result["epochs"] == 1
    assert result["metrics"]["test/acc"] > 0.5, result["metrics"]
