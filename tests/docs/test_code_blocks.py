"""Every Python code block of README.md and docs/ runs, as a script of its own, and exits with 0.

Each block is written to a fresh folder and run there with ``python block.py`` (Lightning's and Fabric's launchers
re-run that command for their other processes), or with torchrun where its marker says so (see
:mod:`tests.docs.markdown_blocks`), with a timeout and a check that no process outlives it. Blocks that only include
an example file are run by tests/docs/test_examples.py instead; the few fragments that cannot run are skipped by an
explicit marker with a reason.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.docs.markdown_blocks import PYTHON, ROOT, code_blocks, markdown_files, markers_without_block, python_blocks
from tests.docs.test_examples import EXAMPLES
from tests.helpers.processes import run_command, script_env

# seconds; a block takes 5-60 s on 2 idle cores, but a machine shared with other jobs can be 10x slower
BLOCK_TIMEOUT = 420
MAX_SKIPPED = 3  # fragments are the exception: past this, write the block so that it runs


def _params() -> list:
    params = []
    for block in python_blocks():
        if block.includes:
            continue
        marks = []
        if block.directives.skip:
            marks.append(pytest.mark.skip(reason=f"docs-test marker: {block.directives.skip}"))
        if block.directives.slow:
            marks.append(pytest.mark.slow)
        params.append(pytest.param(block, id=block.id, marks=marks))
    return params


@pytest.mark.timeout(BLOCK_TIMEOUT + 60)
@pytest.mark.parametrize("block", _params())
def test_code_block_runs(block, tmp_path: Path) -> None:
    script = tmp_path / "docs_block.py"
    script.write_text(block.code)
    if block.directives.torchrun is not None:
        command = [sys.executable, "-m", "torch.distributed.run", *block.directives.torchrun, script.name]
    else:
        command = [sys.executable, script.name]
    run = run_command(command, timeout=BLOCK_TIMEOUT, cwd=tmp_path, env=script_env(), linger=20)
    assert run.returncode == 0, f"{block.id} exited with {run.returncode}:\n{run.output[-6000:]}"
    assert not run.survivors, f"{block.id} left processes running: {run.survivors}"


def test_blocks_are_found_and_markers_are_sound() -> None:
    blocks = python_blocks()
    runnable = [b for b in blocks if not b.includes and not b.directives.skip]
    readme = [b for b in runnable if b.path == Path("README.md")]
    assert len(readme) >= 3, "the README's Trainer, Fabric and plain-torch examples should run"
    skipped = [b.id for b in blocks if b.directives.skip]
    assert len(skipped) <= MAX_SKIPPED, f"too many skipped fragments, make them run: {skipped}"
    stray = {str(p): markers_without_block(p) for p in markdown_files() if markers_without_block(p)}
    assert not stray, f"docs-test markers not right before a code block: {stray}"
    for block in blocks:
        if block.includes:
            assert not block.directives.skip and not block.directives.torchrun, f"{block.id}: markers on an include"


def test_included_python_files_are_tested_examples() -> None:
    """A page that shows a whole file (``--8<-- "examples/x.py"``) shows code that tests/docs/test_examples.py runs."""
    included = {path for p in markdown_files() for b in code_blocks(p) for path in b.includes}
    assert included, "the pages include the examples"
    for path in included:
        assert (ROOT / path).is_file(), f"included file {path} does not exist"
    untested = {p for p in included if p.endswith(".py") and p not in EXAMPLES}
    assert not untested, f"included Python files that no example test runs: {untested}"


def test_marker_parsing_rejects_what_it_does_not_know() -> None:
    from tests.docs.markdown_blocks import Directives

    assert Directives.parse("skip: a fragment", "x").skip == "a fragment"
    assert Directives.parse("skip: yours; see below", "x").skip == "yours; see below"
    assert Directives.parse("slow; torchrun --nproc-per-node 2", "x").torchrun == ["--nproc-per-node", "2"]
    for bad in ("skip", "skip:", "sloww", "torchrun", "run twice", "slow; skip: late"):
        with pytest.raises(ValueError):
            Directives.parse(bad, "x")
    assert "python" in PYTHON
