"""A griffe extension for the API reference: Sphinx roles in docstrings become Markdown code spans.

The library's docstrings cross-reference with reStructuredText roles (``:class:`~lightning_gossip.GossipStrategy```),
which mkdocstrings would print as they are. This turns each into a code span (``~`` keeps the last name only, as in
Sphinx). Loaded by mkdocs.yml (``extensions:``) from this file; offline, no dependency.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|meth|func|mod|attr|exc|data|obj|const):`(~?)([^`]+)`")


def _code_span(match: re.Match[str]) -> str:
    short, target = match.group(1), match.group(2).strip()
    if short:
        target = target.rsplit(".", 1)[-1]
    return f"`{target}`"


def rewrite_roles(text: str) -> str:
    return _ROLE.sub(_code_span, text)


class SphinxRoles(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rewrite_roles(obj.docstring.value)
