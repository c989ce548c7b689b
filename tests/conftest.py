"""Shared fixtures: the notebook's layer classes, imported from DoRA.ipynb (never copied)."""

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import helpers  # noqa: E402


@pytest.fixture(scope="session")
def nb():
    """The notebook's imports, functions, classes and UPPER_CASE constants, as a module."""
    return helpers.import_notebook_definitions(REPO / "DoRA.ipynb")
