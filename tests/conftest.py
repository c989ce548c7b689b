"""Shared fixtures: the notebook's layer classes, imported from DoRA.ipynb (never copied).

The whole test command runs on the CPU, even on a GPU machine: the stored outputs that
`pytest --nbval` compares come from the CPU, and the kernel nbval starts inherits this setting
(read by helpers.pick_device)."""

import os
from pathlib import Path

import pytest

from tools.notebook_definitions import import_notebook_definitions

os.environ["DORA_DEVICE"] = "cpu"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def nb():
    """The notebook's imports, functions, classes and UPPER_CASE constants, as a module."""
    return import_notebook_definitions(REPO / "DoRA.ipynb")
