"""The documentation site (mkdocs.yml, docs/) builds with ``mkdocs build --strict`` and no warning.

The build renders the user guide, the course pages and the API reference (mkdocstrings reads the
Google-style docstrings of vijax), and validates every internal link and image. A warning of
any kind fails the test: a broken link, a page missing from the nav, or a docstring that the
parser cannot read, except the known docstring problems listed (with why) in
docs/hooks/docstring_warnings.py, which the build logs as INFO. Broken anchors are INFO in
mkdocs.yml, because the course pages link to anchors of course pages that may not be written
yet; this test fails on a broken anchor in any page outside docs/course/.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

pytest.importorskip("mkdocs", reason="the docs dependencies come with the dev extra")
pytest.importorskip("material", reason="the docs dependencies come with the dev extra")
pytest.importorskip("mkdocstrings", reason="the docs dependencies come with the dev extra")


@pytest.fixture(scope="module")
def built_site(tmp_path_factory):
    site = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
         str(ROOT / "mkdocs.yml"), "--site-dir", str(site)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    return site, result.returncode, result.stdout + result.stderr


def test_site_builds_in_strict_mode_without_warnings(built_site):
    site, returncode, output = built_site
    problems = [line for line in output.splitlines() if re.search(r"\b(WARNING|ERROR)\b", line)]
    assert returncode == 0, output[-4000:]
    assert not problems, "\n".join(problems)
    anchors = [line for line in output.splitlines() if "does not contain an anchor" in line
               and not re.search(r"Doc file 'course/", line)]
    assert not anchors, "\n".join(anchors)
    assert (site / "index.html").is_file()
    assert (site / "api" / "elbo" / "index.html").is_file()


def test_math_is_served_locally_and_figures_are_embedded(built_site):
    site, returncode, output = built_site
    assert returncode == 0, output[-4000:]
    em_page = (site / "em" / "index.html").read_text()
    assert 'class="arithmatex"' in em_page  # formulas reach MathJax as arithmatex spans
    assert "javascripts/mathjax/tex-chtml-full.js" in em_page
    assert (site / "javascripts" / "mathjax" / "tex-chtml-full.js").is_file()
    assert (site / "javascripts" / "mathjax" / "output" / "chtml" / "fonts" / "woff-v2").is_dir()
    for page in site.rglob("*.html"):
        assert "cdn.jsdelivr.net/npm/mathjax" not in page.read_text(), page
        assert "unpkg.com/mathjax" not in page.read_text(), page
    for figure in re.findall(r'<img[^>]+src="([^"]+\.png)"', em_page):
        assert (site / "em" / figure).resolve().is_file(), figure
    assert "figures/gmm_em/old_faithful_em.png" in em_page
