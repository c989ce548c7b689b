"""Maintainers' scripts: run the notebook, write the README's results, check determinism, what
JupyterLab shows and the version floors. No reader's kernel imports this folder; run each from
the repository root as ``python -m tools.NAME`` (its docstring says how)."""
