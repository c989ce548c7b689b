"""The layout keeps its promises: the reader's kernel and the maintainers' scripts apart, one
import convention, test modules that share through tests/support.py, requirements by audience."""

import ast
import re
import subprocess
import traceback

import pytest
import torch

import helpers
from dora_tutorial.notebook import import_notebook_definitions

REPO = helpers.REPO
PYTHON_FILES = [
    REPO / path
    for path in subprocess.run(
        ["git", "ls-files", "*.py"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
]
READER_TOOLS = {"pytest", "nbval", "ruff", "hypothesis", "nbstripout", "selenium"}


def imported_modules(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


def test_the_python_files_are_found():
    names = {p.relative_to(REPO).as_posix() for p in PYTHON_FILES}
    assert {"helpers.py", "dora_tutorial/check_dora/__init__.py", "tools/run_notebook.py"} <= names


def test_no_code_edits_sys_path_or_waives_import_order():
    path_edit = re.compile(r"sys\.path\.(insert|append)|setattr\(sys, .path.")
    for path in PYTHON_FILES:
        text = path.read_text()
        assert not path_edit.search(text), f"{path.name} edits sys.path"
        assert "noqa: " + "E402" not in text, f"{path.name} waives E402"


def test_test_modules_never_import_each_other():
    for path in (REPO / "tests").glob("*.py"):
        bad = [m for m in imported_modules(path) if m.split(".")[0].startswith("test_")]
        assert not bad, f"{path.name} imports {bad}: share through tests/support.py"


def test_the_readers_package_never_imports_the_maintainers_scripts():
    for path in [REPO / "helpers.py", *(REPO / "dora_tutorial").rglob("*.py")]:
        bad = [m for m in imported_modules(path) if m.split(".")[0] in {"tools", "tests"}]
        assert not bad, f"{path.name} imports {bad}"


def requirement_names(path):
    names = set()
    for line in path.read_text().splitlines():
        text = line.split("#")[0].strip()
        if text and not text.startswith("-r"):
            names.add(re.split(r"[<>=!~\[; ]", text)[0].lower())
    return names


def test_requirements_by_audience():
    reader, dev = (
        requirement_names(REPO / f) for f in ("requirements.txt", "requirements-dev.txt")
    )
    assert not reader & READER_TOOLS, "a maintainers' tool in requirements.txt"
    assert READER_TOOLS <= dev and not reader & dev
    assert "-r requirements.txt" in (REPO / "requirements-dev.txt").read_text()


def test_pre_commit_uses_the_ruff_of_requirements_dev():
    pin = re.search(r"^ruff==(\S+)", (REPO / "requirements-dev.txt").read_text(), re.M)
    hooks = re.findall(r'"ruff([^"]*)"', (REPO / ".pre-commit-config.yaml").read_text())
    assert pin and hooks and set(hooks) == {f"=={pin[1]}"}


def test_helpers_interface_is_what_the_notebook_calls(nb):
    """helpers.__all__ names exactly the helpers the notebook uses (in code cells)."""
    import nbformat

    notebook = nbformat.read(REPO / "DoRA.ipynb", as_version=4)
    code = "\n".join(c.source for c in notebook.cells if c.cell_type == "code")
    used = set(re.findall(r"\bhelpers\.([A-Za-z_]\w*)", code)) - {"__version__", "py"}
    assert all(hasattr(helpers, name) for name in helpers.__all__)
    assert used == set(helpers.__all__), (
        f"called but not exported: {sorted(used - set(helpers.__all__))}; "
        f"exported but not called: {sorted(set(helpers.__all__) - used)}"
    )


def test_a_traceback_names_the_notebook_cell_and_shows_its_line():
    nb = import_notebook_definitions(REPO / "DoRA.ipynb", name="dora_notebook_traceback")
    with pytest.raises(ValueError) as info:
        nb.LoRALinear(torch.nn.Linear(3, 2), rank=0, alpha=1)
    frames = traceback.extract_tb(info.value.__traceback__)
    cells = [f for f in frames if f.filename.startswith("DoRA.ipynb[cell ")]
    assert cells, [f.filename for f in frames]
    number = int(cells[-1].filename.removeprefix("DoRA.ipynb[cell ").rstrip("]"))
    import nbformat

    cell = nbformat.read(REPO / "DoRA.ipynb", as_version=4).cells[number - 1]
    assert cells[-1].line and cells[-1].line in cell.source  # the line shown is the cell's own
