"""The documentation site builds offline with ``mkdocs build --strict``, and the strictness catches broken links.

The build renders the API reference from the docstrings (mkdocstrings' python handler, static analysis: nothing is
imported), includes the examples and ARCHITECTURE.md / CHANGELOG.md (pymdownx.snippets), and fails on any warning:
a broken link or anchor, a page missing from the nav, a docstring the handler cannot parse, a missing include.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.processes import ROOT, script_env

pytest.importorskip("mkdocs", reason="the docs extra (pip install -e '.[docs]'; the test extra includes it)")
pytest.importorskip("mkdocstrings_handlers.python", reason="mkdocstrings[python] (the docs extra)")

BUILD_TIMEOUT = 240


def _build(config_dir: Path, site: Path) -> subprocess.CompletedProcess:
    env = script_env(NO_MKDOCS_2_WARNING="1")  # Material's banner about MkDocs 2, printed on every build
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                          cwd=config_dir, env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT)


def _nav_pages() -> list[str]:
    return re.findall(r":\s+([\w/.-]+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.MULTILINE)


def test_site_builds_strict_and_offline(tmp_path: Path) -> None:
    site = tmp_path / "site"
    build = _build(ROOT, site)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-6000:]
    pages = _nav_pages()
    assert len(pages) >= 20, pages
    for page in pages:  # every page of the nav was rendered
        stem = page[: -len(".md")]
        rendered = site / (stem[: -len("index")] if stem == "index" or stem.endswith("/index") else stem) / "index.html"
        assert rendered.is_file(), f"{page} was not rendered ({rendered})"
    api = (site / "api" / "strategies" / "index.html").read_text()
    assert 'id="lightning_gossip.strategy.GossipStrategy"' in api and "sigterm_sync_every" in api
    assert ":class:" not in api  # Sphinx roles in docstrings became code spans
    trainer = (site / "trainer" / "index.html").read_text()
    assert "DigitsClassifier" in trainer  # examples/trainer.py, included
    assert "fonts.googleapis.com" not in (site / "index.html").read_text()  # nothing fetched, even by the browser


def test_a_broken_link_or_anchor_fails_the_build(tmp_path: Path) -> None:
    """The same configuration and pages, with one broken link and one broken anchor added: the build must fail."""
    copy = tmp_path / "repo"
    copy.mkdir()
    shutil.copy(ROOT / "mkdocs.yml", copy / "mkdocs.yml")
    shutil.copytree(ROOT / "docs", copy / "docs")
    for name in ("lightning_gossip", "examples", "ARCHITECTURE.md", "CHANGELOG.md"):
        (copy / name).symlink_to(ROOT / name)
    page = copy / "docs" / "getting-started.md"
    page.write_text(page.read_text() + "\nSee [nowhere](no-such-page.md) and [there](trainer.md#no-such-section).\n")
    build = _build(copy, tmp_path / "site")
    output = build.stdout + build.stderr
    assert build.returncode != 0, output[-3000:]
    assert "no-such-page.md" in output and "no-such-section" in output, output[-3000:]


def test_api_reference_covers_every_public_name() -> None:
    import lightning_gossip
    import lightning_gossip.gossip

    documented = set()
    for page in (ROOT / "docs" / "api").glob("*.md"):
        documented |= set(re.findall(r"^:::\s+([\w.]+)", page.read_text(), re.MULTILINE))
    short = {identifier.rsplit(".", 1)[-1] for identifier in documented}
    public = (set(lightning_gossip.__all__) - {"__version__"}) | set(lightning_gossip.gossip.__all__)
    missing = sorted(name for name in public if name not in short)
    assert not missing, f"add these public names to the API reference (docs/api/*.md): {missing}"
    assert {"WorkSharingSampler", "AsyncGossipExchange", "standalone"} <= short


def test_readme_keeps_the_setup_commands_and_its_links_resolve() -> None:
    readme = (ROOT / "README.md").read_text()
    head = "\n".join(readme.splitlines()[:12])
    assert ("    python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -e . && "
            "python -m lightning_gossip.train") in head
    assert "    bash .ci/run" in head and (ROOT / ".ci" / "run").is_file()
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    local = [link for link in links if "://" not in link]
    assert len(local) >= 10, local
    broken = [link for link in local if not (ROOT / link).exists()]
    assert not broken, f"README links to files that do not exist: {broken}"
