"""DoRA.ipynb for tests and scripts: its definitions as a module (``nb.DoRALinear``: the reader's
very classes and settings, never copies), its settings as JSON, a headless run."""

import ast
import json
import linecache
import os
import sys
import tempfile
import types
from pathlib import Path
from unittest import mock

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "DoRA.ipynb"


def import_notebook_definitions(path: str | Path = NOTEBOOK, name: str = "dora_notebook"):
    """The imports, functions, classes and UPPER_CASE constants of the code cells (those not
    tagged ``no-import``), executed in order as a module: nothing trains or plots."""
    keep = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef)
    module = types.ModuleType(name)
    module.__file__ = str(path)
    # torch.compile imports a traced function's module by name to guard on its globals
    sys.modules[name] = module
    module.constants = []  # the names of the notebook's settings, in order
    for number, cell in enumerate(nbformat.read(str(path), as_version=4).cells, start=1):
        if cell.cell_type != "code" or "no-import" in cell.metadata.get("tags", []):
            continue
        # magics and shell lines become blank lines, so line numbers stay those of the cell
        source = "\n".join(
            "" if line.lstrip().startswith(("%", "!")) else line
            for line in cell.source.splitlines()
        )
        tree = ast.parse(source)
        constants = {node for node in tree.body if _is_constant(node)}
        body = [node for node in tree.body if isinstance(node, keep) or node in constants]
        module.constants += [node.targets[0].id for node in body if node in constants]
        # tracebacks name the cell ("DoRA.ipynb[cell 14]") and show its line
        filename = f"{Path(path).name}[cell {number}]"
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        exec(compile(ast.Module(body=body, type_ignores=[]), filename, "exec"), module.__dict__)
    return module


def _is_constant(node: ast.AST) -> bool:
    """``UPPER_CASE = <literal or range(<literals>)>``: a notebook-wide setting."""
    match node:
        case ast.Assign(targets=[ast.Name(id=name)], value=value) if name.isupper():
            if isinstance(value, ast.Call) and getattr(value.func, "id", None) == "range":
                return not value.keywords and all(map(_literal, value.args))
            return _literal(value)
    return False


def _literal(node: ast.AST) -> bool:
    try:
        ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError):
        return False
    return True


def protocol(nb=None) -> dict:
    """The notebook's settings as JSON values: scripts save them beside their results, and a
    test compares them with the notebook, so no result outlives a changed setting."""
    nb = nb or import_notebook_definitions()
    settings = {name: getattr(nb, name) for name in nb.constants}
    return json.loads(json.dumps(settings, default=list))  # a range as a list, keys as strings


def execute(path: Path, results: Path | None = None) -> nbformat.NotebookNode:
    """Run all cells in a fresh kernel in the notebook's folder; the summary cell writes its
    results to ``results`` (default: a temporary file, never figures/results.json)."""
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        cell.metadata.pop("execution", None)  # timestamps of an earlier run

    def report(cell, cell_index, **_):  # progress and printed output, as a run takes minutes
        first = (cell.source.strip().splitlines() or [""])[0]
        print(f"[cell {cell_index + 1}/{len(notebook.cells)}] {first[:70]}", flush=True)
        text = "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")
        if text.strip():  # the cell's printed output, as README.md promises
            print("    " + text.rstrip().replace("\n", "\n    "), flush=True)

    client = NotebookClient(
        notebook,
        timeout=1800,
        kernel_name="python3",
        record_timing=False,
        resources={"metadata": {"path": str(path.parent)}},
        on_cell_executed=report,
    )
    with tempfile.TemporaryDirectory() as tmp:
        kernel_env = {"DORA_RESULTS": str(results or Path(tmp) / "results.json")}
        with mock.patch.dict(os.environ, kernel_env):
            client.execute()
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs = coalesce_streams(cell.outputs)
    return notebook


def coalesce_streams(outputs: list) -> list:
    """Join consecutive chunks of one stream, as Jupyter shows them: how a kernel splits them
    depends on timing, joined they are the same from run to run."""
    merged = []
    for out in outputs:
        last = merged[-1] if merged else None
        if out.output_type == "stream" and last and last.get("name") == out.name:
            last.text += out.text
        else:
            merged.append(out)
    return merged
