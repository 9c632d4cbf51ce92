"""The GitHub Actions workflow: actionlint finds nothing in it (so a typo fails here, not on the first push), a
broken copy is caught, and it runs every command of .ci/run (the script CI runs on this machine)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((REPO / ".github" / "workflows").glob("*.yml"))
CI_WORKFLOW = REPO / ".github" / "workflows" / "ci.yml"


def _tool(name: str) -> str:
    """A binary of the test extra: next to this Python first (the virtual environment), then on PATH."""
    found = shutil.which(name, path=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
    if found is None:
        pytest.fail(f"`{name}` is not installed: pip install -e '.[test]' (it brings actionlint and shellcheck)")
    return found


def actionlint(*files: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=os.pathsep.join([os.path.dirname(_tool("shellcheck")), os.environ.get("PATH", "")]))
    return subprocess.run([_tool("actionlint"), "-no-color", *map(str, files)], capture_output=True, text=True,
                          timeout=120, env=env)


def test_the_workflows_pass_actionlint():
    assert WORKFLOWS, "no workflow under .github/workflows"
    proc = actionlint(*WORKFLOWS)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize(
    "broken, complaint",
    [
        # a misspelt key: GitHub would reject the file on push
        (lambda text: text.replace("runs-on: ubuntu-latest", "runs_on: ubuntu-latest", 1), "runs_on"),
        # a job that needs a job that does not exist
        (lambda text: text.replace("needs: tests", "needs: test", 1), "test"),
        # an expression naming a matrix key that is not defined
        (lambda text: text.replace("${{ matrix.lightning }}", "${{ matrix.lightnin }}", 1), "lightnin"),
        # shell in a run step that shellcheck rejects (an unterminated quote)
        (lambda text: text.replace('run: test "${{ matrix.lightning }}" = "${LIGHTNING_LOWEST}"',
                                   'run: test "${LIGHTNING_LOWEST} = 2', 1), "shellcheck"),
    ],
    ids=["misspelt-key", "unknown-needs", "unknown-matrix-key", "broken-shell"],
)
def test_a_broken_workflow_is_caught(tmp_path, broken, complaint):
    text = CI_WORKFLOW.read_text()
    bad = broken(text)
    assert bad != text, "the mutation did not apply: update this test with the workflow"
    folder = tmp_path / ".github" / "workflows"
    folder.mkdir(parents=True)
    (folder / "ci.yml").write_text(bad)
    proc = actionlint(folder / "ci.yml")
    assert proc.returncode != 0, f"actionlint accepted a broken workflow:\n{bad}"
    assert complaint in proc.stdout, proc.stdout


def _ci_run_commands() -> list[str]:
    lines = (REPO / ".ci" / "run").read_text().splitlines()
    return [line.strip() for line in lines if re.match(r"\s*python -m (pytest|lightning_gossip\.bench)\b", line)]


def test_the_workflow_runs_every_command_of_ci_run():
    workflow = yaml.safe_load(CI_WORKFLOW.read_text())
    runs = "\n".join(step.get("run", "") for job in workflow["jobs"].values() for step in job["steps"])
    commands = _ci_run_commands()
    assert len(commands) >= 4, commands  # default suite, benchmark compare, wheel, lowest Lightning
    missing = [c for c in commands if c not in runs]
    assert not missing, f"commands of .ci/run missing from {CI_WORKFLOW.name}: {missing}"
    lowest = re.search(r"^LIGHTNING_LOWEST=([\d.]+)$", (REPO / ".ci" / "run").read_text(), re.MULTILINE).group(1)
    assert workflow["env"]["LIGHTNING_LOWEST"] == lowest
    assert workflow["jobs"]["lightning-lowest"]["strategy"]["matrix"]["lightning"] == [lowest]
    torch_pin = re.search(r"torch==([\d.]+)", (REPO / ".ci" / "run").read_text()).group(1)
    assert workflow["env"]["TORCH_VERSION"] == torch_pin


def test_the_benchmark_results_are_uploaded_even_when_the_comparison_fails():
    steps = yaml.safe_load(CI_WORKFLOW.read_text())["jobs"]["benchmark"]["steps"]
    compare = next(i for i, s in enumerate(steps) if "--compare" in s.get("run", ""))
    upload = next(i for i, s in enumerate(steps) if s.get("uses", "").startswith("actions/upload-artifact"))
    assert upload > compare and steps[upload]["if"] == "always()"
    assert "BENCH_OUT" in steps[upload]["with"]["path"]
