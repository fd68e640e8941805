"""The documentation site: every public name has a page, the strict build passes, page code runs."""
from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
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


UNSET = object()


def parameter_table(page: Path) -> list[tuple[list[str], str]]:
    """Rows ``(parameter names, default cell)`` of the page's ``| parameter | default | meaning |`` table."""
    lines = page.read_text().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("| parameter | default |")), None)
    rows = []
    for line in lines[start + 2:] if start is not None else []:
        if not line.startswith("|"):
            break
        name_cell, default_cell = (cell.strip() for cell in line.strip("|").split("|")[:2])
        rows.append((re.findall(r"`\*{0,2}(\w+)`", name_cell), default_cell))
    return rows


def stated_default(cell: str):
    """The value of a default cell that starts with a backticked expression of constants (`0.2`, `(1, 5, 15)`,
    `2**28`, `None` (uniform)); ``UNSET`` for prose ("required", "ImageNet")."""
    match = re.match(r"`([^`]+)`", cell)
    if match is None:
        return UNSET
    tree = ast.parse(match.group(1), mode="eval")
    if not all(isinstance(node, (ast.Expression, ast.Constant, ast.Tuple, ast.List, ast.BinOp, ast.UnaryOp,
                                 ast.operator, ast.unaryop, ast.Load)) for node in ast.walk(tree)):
        return UNSET
    return eval(compile(tree, "<cell>", "eval"), {"__builtins__": {}})


def test_stated_default_reads_constant_expressions_only():
    assert stated_default("`(1, 5, 15)`") == (1, 5, 15) and stated_default("`2**28`") == 2**28
    assert stated_default("`None` (uniform)") is None and stated_default("`-0.5`") == -0.5
    assert stated_default("ImageNet") is UNSET and stated_default("`CosineSimilarity()`") is UNSET


API_PAGES = sorted((DOCS / "api").glob("*.md"))


@pytest.mark.parametrize("page", [page for page in API_PAGES if parameter_table(page)], ids=lambda page: page.name)
def test_parameter_tables_match_the_signature(page):
    """Every parameter of the page's class or function (the page is named after it) has a row, no row names
    another, and a default written as a constant is the signature's (drift the strict build cannot see)."""
    name = page.stem
    parameters = inspect.signature(getattr(pml_protoot, name)).parameters
    rows = parameter_table(page)
    documented = [parameter for names, _ in rows for parameter in names]
    assert sorted(documented) == sorted(parameters), f"{page.name}: table rows vs {name}'s signature"
    for names, cell in rows:
        for parameter in names:
            default = parameters[parameter].default
            if cell == "required":
                assert default is inspect.Parameter.empty, f"{page.name}: {parameter} has a default, {default!r}"
            elif stated_default(cell) is not UNSET:
                assert stated_default(cell) == default, f"{page.name}: {parameter} is {default!r}, not {cell}"


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
    blocks = [block for block in python_blocks(DOCS / page) if not block.startswith(NOT_RUN_MARKER)]
    missing = sorted(name for name in imported_modules(blocks) & OPTIONAL_MODULES
                     if importlib.util.find_spec(name) is None)
    if missing:  # where only the package's own needs are installed; any other missing import fails
        pytest.skip(f"docs/{page} imports {', '.join(missing)}, not installed (pip install -e '.[test]')")
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, f"docs/{page}", "exec"), namespace)


#: Test extras a docs example may import; the page is skipped where they are not installed.
OPTIONAL_MODULES = {"record_keeper"}


def imported_modules(blocks) -> set[str]:
    """The top-level modules that ``import`` statements of the code blocks name."""
    names = set()
    for node in ast.walk(ast.Module(body=[statement for block in blocks for statement in ast.parse(block).body])):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_imported_modules_lists_the_top_level_names():
    blocks = ["import record_keeper\nimport torch.nn as nn", "from pml_protoot.memory import x\nfrom . import y"]
    assert imported_modules(blocks) == {"record_keeper", "torch", "pml_protoot"}


@pytest.mark.parametrize("path", ["README.md", *(f"docs/{page}" for page in PAGES_WITH_CODE)])
def test_every_block_compiles_and_imports_what_exists(path):
    """The blocks that do not run (README's, "# not run") still parse, and what they import from
    pml_protoot exists: a renamed name would otherwise stay in them unnoticed."""
    for block in python_blocks(ROOT / path):
        tree = ast.parse(block, filename=path)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pml_protoot"):
                module = importlib.import_module(node.module)
                missing = [alias.name for alias in node.names if not hasattr(module, alias.name)]
                assert missing == [], f"{path} imports {missing} from {node.module}, which has no such names"
