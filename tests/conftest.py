"""The notebook's classes as a fixture (imported from DoRA.ipynb, never copied). Tests run on the
CPU (nbval's kernel inherits it), notebook runs write their results to a temporary file, and
``DORA_BLOCK_PEFT=1`` makes ``import peft`` fail: the suite as on a machine without PEFT."""

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


@pytest.fixture(scope="session")
def nb():
    """The notebook's imports, functions, classes and UPPER_CASE constants, as a module."""
    return import_notebook_definitions()


def pytest_collection_modifyitems(items):
    """Tests marked after_notebook run last: they read what the notebook's run wrote."""
    items.sort(key=lambda item: item.get_closest_marker("after_notebook") is not None)
