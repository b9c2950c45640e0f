"""A griffe extension that ``avex docs`` gives mkdocstrings: the docstrings' Sphinx roles
(``:class:`envs.vector.AVEVectorEnv```) become optional cross-references, which mkdocs-autorefs links where
the target is documented and leaves as code where it is not (a relative or private name), so they never
fail the strict build. Loaded by griffe from this file's path: it imports nothing of avex."""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:class|meth|func|attr|data|mod|obj|exc):`(~?)([^`]+)`")


def autoref(match: re.Match[str]) -> str:
    """One role as an optional autorefs tag; ``~a.b.c`` shows ``c``, as in Sphinx."""
    short, target = match.group(1), match.group(2)
    title = target.rpartition(".")[2] if short else target
    return f'<autoref identifier="{target}" optional><code>{title}</code></autoref>'


class SphinxRoles(griffe.Extension):
    """Rewrites every docstring once the object tree is complete."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = ROLE.sub(autoref, obj.docstring.value)

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        self.on_object(obj=pkg)  # a top-level package is no member: on_object does not see it
