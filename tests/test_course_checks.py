"""Run the numeric checks of the docs section "The course, checked" (docs/course/*.md).

Every page states identities from the course texts and checks each one with a short Python
block. A check block is a ```python fence immediately preceded by an HTML comment naming the
identities it checks::

    <!-- check: 3, 17 -->
    ```python
    ...
    ```

Each block runs with ``exec`` in a fresh namespace (one test per block, id ``page-N``); it
passes when it raises nothing (the blocks ``assert`` their identities). The comments are the
machine-readable map from identities to checks: ``test_every_identity_has_an_executed_check``
fails if one of the identities 1..25 has no block (or a block asserts nothing), and
``test_index_maps_every_identity`` fails if the index table does not send each identity to a
page and anchor that exist. Blocks are independent, so the module runs under pytest-xdist.

Blocks may switch on float64 (``jax.config.update("jax_enable_x64", True)``); the setting is
restored after each block so that the rest of the test session is unaffected.
"""

from __future__ import annotations

import pathlib
import re

import jax
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
COURSE = ROOT / "docs" / "course"
IDENTITIES = set(range(1, 26))
PAGES = sorted(COURSE.glob("*.md"))

_CHECK = re.compile(r"^<!-- check: ([0-9][0-9,\s]*) -->\n```python\n(.*?)^```", re.M | re.S)
_MARKER = re.compile(r"<!-- check:")


def _blocks():
    """``(page name, identities, first code line, code)`` for every check block."""
    out = []
    for page in PAGES:
        text = page.read_text()
        for match in _CHECK.finditer(text):
            ids = tuple(int(n) for n in re.split(r"[,\s]+", match.group(1).strip()) if n)
            line = text[: match.start(2)].count("\n") + 1
            out.append((page.name, ids, line, match.group(2)))
    return out


BLOCKS = _blocks()


def _params():
    """One ``pytest.param`` per block, id ``page-N`` (``page-N-M`` for a block checking N and
    M; a second block with the same id gets ``#2``)."""
    params, seen = [], {}
    for name, ids, line, code in BLOCKS:
        base = f"{name}-{'-'.join(map(str, ids))}"
        seen[base] = seen.get(base, 0) + 1
        block_id = base if seen[base] == 1 else f"{base}#{seen[base]}"
        params.append(pytest.param(name, ids, line, code, id=block_id))
    return params


@pytest.mark.parametrize("page, ids, line, code", _params())
def test_course_check(page, ids, line, code):
    """Execute one block in a fresh namespace (tracebacks carry the page's line numbers) and
    restore the float64 setting afterwards."""
    compiled = compile("\n" * (line - 1) + code, f"docs/course/{page}", "exec")
    x64 = jax.config.jax_enable_x64
    try:
        exec(compiled, {"__name__": f"course_check_{page[:-3].replace('-', '_')}"})
    finally:
        jax.config.update("jax_enable_x64", x64)


def test_every_check_marker_is_followed_by_a_python_block():
    for page in PAGES:
        text = page.read_text()
        assert len(_CHECK.findall(text)) == len(_MARKER.findall(text)), (
            f"{page.name}: a '<!-- check: N -->' comment is not directly followed by ```python")


def test_every_identity_has_an_executed_check():
    """Every identity 1..25 is named by the marker of at least one check block, and every such
    block is a test of this module (``test_course_check``), so the suite executes it and fails
    if it fails. The map is read from the ``<!-- check: N -->`` comments."""
    assert PAGES, "no pages under docs/course"
    checked = {i for _, ids, _, _ in BLOCKS for i in ids}
    assert checked <= IDENTITIES, f"unknown identity numbers {sorted(checked - IDENTITIES)}"
    assert IDENTITIES <= checked, f"identities without a check: {sorted(IDENTITIES - checked)}"
    collected = {(p.values[0], p.values[2]) for p in _params()}
    for page, ids, line, code in BLOCKS:
        assert (page, line) in collected, f"{page}:{line} is not collected as a test"
        assert re.search(r"^\s*assert\b|np\.testing\.assert_", code, re.M), (
            f"{page}:{line}: the check block for identities {ids} asserts nothing")
        compile(code, f"docs/course/{page}", "exec")  # a syntax error fails here too


_ROW = re.compile(r"^\|\s*(\d+)\s*\|.*\]\(([\w.-]+\.md)#(identity-\d+)\)", re.M)


def test_index_maps_every_identity():
    """index.md has one table row per identity, linking to ``page.md#identity-N`` where the
    page has that anchor and a check block for identity N."""
    rows = {int(n): (page, anchor) for n, page, anchor in _ROW.findall(
        (COURSE / "index.md").read_text())}
    assert set(rows) == IDENTITIES, sorted(IDENTITIES ^ set(rows))
    checks = {}
    for name, ids, _, _ in BLOCKS:
        for i in ids:
            checks.setdefault(i, set()).add(name)
    for n, (page, anchor) in sorted(rows.items()):
        assert anchor == f"identity-{n}", (n, anchor)
        text = (COURSE / page).read_text()
        assert f'<a id="{anchor}"></a>' in text, f"{page} has no anchor {anchor}"
        assert page in checks.get(n, set()), f"identity {n}: {page} has no check block for it"
