"""The fenced code blocks of the README and of the documentation pages, with the markers that say how to run them.

A marker is an HTML comment on the line right before a block's opening fence, visible in the Markdown source:

    <!-- docs-test: torchrun --standalone --nproc-per-node 2 -->   run it with torchrun and these arguments
    <!-- docs-test: slow -->                                       only with -m slow
    <!-- docs-test: skip: <reason> -->                             not run (a fragment); the reason is required

``slow`` and ``torchrun`` combine, separated by ";"; ``skip`` takes the rest of the marker as its reason. A block whose lines are all ``--8<-- "path"`` includes (pymdownx.snippets)
shows a file of the repository, which is tested where that file is (the examples' own tests).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[2]
PYTHON = ("python", "py", "python3")

_FENCE = re.compile(r"^(?P<indent>[ ]{0,3})(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`]*)$")
_MARKER = re.compile(r"^\s*<!--\s*docs-test:\s*(?P<body>.*?)\s*-->\s*$")
_INCLUDE = re.compile(r'^\s*--8<--\s+"(?P<path>[^"]+)"\s*$')


def markdown_files() -> list[Path]:
    """The README and every page of the site, repository-relative."""
    return [Path("README.md")] + sorted(p.relative_to(ROOT) for p in (ROOT / "docs").rglob("*.md"))


@dataclass(frozen=True)
class Directives:
    skip: Optional[str] = None  # the reason
    slow: bool = False
    torchrun: Optional[list[str]] = None  # torchrun's arguments

    @classmethod
    def parse(cls, body: str, where: str) -> "Directives":
        skip, slow, torchrun = None, False, None
        skipping = re.match(r"skip\b:?(?P<reason>.*)$", body.strip(), re.DOTALL)
        if skipping:  # the reason is the rest of the marker, whatever it holds
            reason = skipping.group("reason").strip()
            if not reason:
                raise ValueError(f"{where}: 'docs-test: skip' needs a reason ('skip: <why>')")
            return cls(skip=reason)
        for part in filter(None, (p.strip() for p in body.split(";"))):
            word, _, rest = part.partition(" ")
            if word == "slow" and not rest.strip():
                slow = True
            elif word == "torchrun":
                torchrun = shlex.split(rest)
                if not torchrun:
                    raise ValueError(f"{where}: 'docs-test: torchrun' needs torchrun's arguments")
            else:
                raise ValueError(f"{where}: unknown docs-test directive {part!r} (skip: <reason>, slow, torchrun ...)")
        return cls(skip=skip, slow=slow, torchrun=torchrun)


@dataclass(frozen=True)
class CodeBlock:
    path: Path  # repository-relative Markdown file
    line: int  # 1-based line of the opening fence
    language: str
    code: str
    directives: Directives = field(default_factory=Directives)

    @property
    def id(self) -> str:
        return f"{self.path}:{self.line}"

    @property
    def includes(self) -> list[str]:
        """The files a block made only of ``--8<--`` lines includes; [] for a block with code of its own."""
        lines = [line for line in self.code.splitlines() if line.strip()]
        found = [_INCLUDE.match(line) for line in lines]
        return [m.group("path") for m in found if m] if lines and all(found) else []


def code_blocks(path: Path) -> list[CodeBlock]:
    """Every fenced code block of the Markdown file ``path`` (repository-relative), in order."""
    lines = (ROOT / path).read_text().splitlines()
    blocks: list[CodeBlock] = []
    index = 0
    while index < len(lines):
        opening = _FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        fence, indent = opening.group("fence"), len(opening.group("indent"))
        language = opening.group("info").strip().split(" ")[0].lower() if opening.group("info").strip() else ""
        start = index
        body: list[str] = []
        index += 1
        while index < len(lines):
            closing = lines[index].strip()
            if closing.startswith(fence[0] * len(fence)) and set(closing) == {fence[0]}:
                break
            body.append(lines[index][indent:] if lines[index][:indent].strip() == "" else lines[index])
            index += 1
        else:
            raise ValueError(f"{path}:{start + 1}: a code block that is never closed")
        index += 1
        previous = start - 1
        marker = _MARKER.match(lines[previous]) if previous >= 0 else None
        where = f"{path}:{start + 1}"
        directives = Directives.parse(marker.group("body"), where) if marker else Directives()
        blocks.append(CodeBlock(path, start + 1, language, "\n".join(body) + "\n", directives))
    return blocks


def markers_without_block(path: Path) -> list[int]:
    """Lines of ``docs-test`` markers that are not right before a code block (a marker that would do nothing)."""
    lines = (ROOT / path).read_text().splitlines()
    return [i + 1 for i, line in enumerate(lines)
            if _MARKER.match(line) and (i + 1 >= len(lines) or not _FENCE.match(lines[i + 1]))]


def python_blocks() -> list[CodeBlock]:
    return [b for p in markdown_files() for b in code_blocks(p) if b.language in PYTHON]
