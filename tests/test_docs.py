"""The documentation site: every public name has a page, the strict build passes, page code runs."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import pml_protoot

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# A ```python block whose first line starts with this marker shows code that needs data or a GPU.
NOT_RUN_MARKER = "# not run"


class _IgnoreTags(yaml.SafeLoader):
    """mkdocs.yml may hold ``!!python/name:`` tags; the nav does not need them."""


_IgnoreTags.add_multi_constructor("", lambda loader, suffix, node: None)


def nav_pages(nav) -> list[str]:
    """Every page path listed in a mkdocs ``nav`` (nested lists of ``{title: page_or_list}``)."""
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, list):
        return [page for item in nav for page in nav_pages(item)]
    if isinstance(nav, dict):
        return [page for value in nav.values() for page in nav_pages(value)]
    return []


def documented_names(page: Path) -> set[str]:
    """Names rendered by a mkdocstrings ``::: pml_protoot.<name>`` block on ``page``."""
    return set(re.findall(r"^::: pml_protoot\.(\w+)\s*$", page.read_text(), flags=re.M))


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", page.read_text(), flags=re.S | re.M)


def load_nav() -> list[str]:
    config = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=_IgnoreTags)
    return nav_pages(config["nav"])


def test_nav_pages_exist():
    pages = load_nav()
    assert pages, "mkdocs.yml has no nav"
    missing = [page for page in pages if not (DOCS / page).is_file()]
    assert missing == [], f"nav lists pages that do not exist: {missing}"


def test_every_public_name_has_a_page_in_the_nav():
    in_nav = set().union(*(documented_names(DOCS / page) for page in load_nav()))
    anywhere = set().union(*(documented_names(page) for page in DOCS.rglob("*.md")))
    public = set(pml_protoot.__all__)
    assert sorted(public - anywhere) == [], "public names without a ::: block on any docs page"
    assert sorted(public - in_nav) == [], "public names documented only on pages missing from the nav"
    assert sorted(anywhere - public) == [], "docs render names that are not in pml_protoot.__all__"


def test_nav_helpers_against_a_hand_written_nav():
    nav = [{"Home": "index.md"}, {"API": [{"a": "api/a.md"}, "api/b.md"]}, "c.md"]
    assert nav_pages(nav) == ["index.md", "api/a.md", "api/b.md", "c.md"]


@pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("mkdocs", "material", "mkdocstrings_handlers")),
    reason="mkdocs, mkdocs-material and mkdocstrings[python] are needed to build the docs",
)
def test_mkdocs_build_strict(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    # The mkdocstrings blocks rendered (not left as text) and the docstring math was converted.
    loss_page = (tmp_path / "site" / "api" / "ProtoOTLoss" / "index.html").read_text()
    assert 'id="pml_protoot.ProtoOTLoss"' in loss_page
    assert ":math:" not in loss_page and ".. math::" not in loss_page


PAGES_WITH_CODE = sorted(
    str(page.relative_to(DOCS)) for page in DOCS.rglob("*.md") if python_blocks(page)
)


@pytest.mark.parametrize("page", PAGES_WITH_CODE)
def test_page_examples_run(page):
    """Every ```python block of a page runs, in order, in one namespace per page."""
    namespace: dict = {}
    for block in python_blocks(DOCS / page):
        if not block.startswith(NOT_RUN_MARKER):
            exec(compile(block, f"docs/{page}", "exec"), namespace)
