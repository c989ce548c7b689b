"""Shared fixtures: the notebook's layer classes, imported from DoRA.ipynb (never copied).

The whole test command runs on the CPU, even on a GPU machine: the stored outputs that
`pytest --nbval` compares come from the CPU, and the kernel nbval starts inherits this setting
(read by helpers.pick_device). Likewise every notebook run inside the tests writes its results
to a temporary file (DORA_RESULTS, read by helpers.write_results), never figures/results.json.

``DORA_BLOCK_PEFT=1`` runs the suite as on a machine without PEFT: ``import peft`` then raises
ImportError, the PEFT comparisons skip, and every other test must still catch the bugs that
matter (``DORA_BLOCK_PEFT=1 python -m pytest tests -q``).

Markers (pyproject.toml): slow, browser, multiprocess, network. The README's test command runs
them all; ``-m "not slow"`` is a quick pass. Helpers that several test files share live in
tests/support.py: test modules never import each other."""

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from dora_tutorial.notebook import import_notebook_definitions

os.environ["DORA_DEVICE"] = "cpu"
if os.environ.get("DORA_BLOCK_PEFT") == "1":
    sys.modules["peft"] = None  # import peft -> ImportError, before any test module imports it
_RESULTS_DIR = tempfile.mkdtemp(prefix="dora-test-results-")
atexit.register(shutil.rmtree, _RESULTS_DIR, ignore_errors=True)
os.environ["DORA_RESULTS"] = str(Path(_RESULTS_DIR) / "results.json")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def nb():
    """The notebook's imports, functions, classes and UPPER_CASE constants, as a module."""
    return import_notebook_definitions(REPO / "DoRA.ipynb")


def pytest_collection_modifyitems(items):
    """Tests marked after_notebook run last: they read what the notebook's run wrote."""
    items.sort(key=lambda item: item.get_closest_marker("after_notebook") is not None)
