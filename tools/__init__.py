"""Maintainers' scripts, each run from the repository root as ``python -m tools.NAME``."""
