"""Griffe extension: Sphinx roles in vijax docstrings read as inline code; "Fields:" as "Attributes:".

The docstrings name other objects with Sphinx roles (``:func:`cavi```, ``:class:`GMMState```,
``:mod:`~vijax.meanfield.normal_gamma```). mkdocstrings renders docstrings as Markdown, where a
role would show as a literal ``:func:`` before the name. This extension rewrites each role to
the inline code it stands for (with ``~``: the last dotted component only), before the
docstrings are parsed. The NamedTuple docstrings list their fields under "Fields:", a title
the Google-style parser does not know (it would show them as one run-on paragraph); it is read
as "Attributes:", the Google-style section for them. Loaded from mkdocs.yml (``plugins.mkdocstrings...options.extensions``).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_FIELDS = re.compile(r"^(\s*)Fields:\s*$", re.M)
_ROLE = re.compile(r":(?:py:)?(?:func|class|mod|meth|attr|data|exc|obj|const):`(~?)([^`]+)`")


def _as_code(match: re.Match) -> str:
    tilde, target = match.group(1), match.group(2).strip()
    if tilde:
        target = target.rsplit(".", 1)[-1]
    return f"`{target}`"


class SphinxRolesAsCode(griffe.Extension):
    """Rewrite ``:role:`target``` to ``target`` in inline code, and "Fields:" to "Attributes:"."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:  # noqa: ARG002
        if obj.docstring is not None:
            value = _ROLE.sub(_as_code, obj.docstring.value)
            obj.docstring.value = _FIELDS.sub(r"\1Attributes:", value)
