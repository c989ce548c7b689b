"""Check that re-running DoRA.ipynb on this machine reproduces every stored text output.

Stricter than nbval: every code cell is compared, those nbval ignores too, with only the timings
masked (tests/nbval_sanitize.cfg). It holds on the machine that made the stored outputs.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from pathlib import Path

import nbformat
from nbval.plugin import get_sanitize_patterns

from dora_tutorial.notebook import execute

REPO = Path(__file__).resolve().parents[1]
_TEXTS = ("text", "ename", "evalue")  # of a stream, an error


def sanitizers() -> list[tuple[str, str]]:
    """The (regex, replacement) pairs of tests/nbval_sanitize.cfg, read by nbval's own parser."""
    return get_sanitize_patterns((REPO / "tests" / "nbval_sanitize.cfg").read_text())


def cell_texts(notebook, rules) -> list[str]:
    """Every code cell's text outputs (streams, text/plain, errors), with timings masked."""
    texts = []
    for cell in (c for c in notebook.cells if c.cell_type == "code"):
        text = "".join(
            o.get("data", {}).get("text/plain", "") + "".join(o.get(k, "") for k in _TEXTS)
            for o in cell.get("outputs", [])
        )
        for regex, replace in rules:
            text = re.sub(regex, replace, text)
        texts.append(text)
    return texts


def main() -> int:
    path = REPO / "DoRA.ipynb"
    os.environ["DORA_DEVICE"] = "cpu"  # the stored outputs come from the CPU
    rules = sanitizers()
    stored = cell_texts(nbformat.read(path, as_version=4), rules)
    fresh = cell_texts(execute(path), rules)
    differ = [i for i, (a, b) in enumerate(zip(stored, fresh, strict=True)) if a != b]
    for i in differ:
        diff = difflib.unified_diff(stored[i].splitlines(), fresh[i].splitlines(), lineterm="")
        print(f"code cell {i} differs:", *list(diff)[2:22], sep="\n")
    verdict = "FAILED" if differ else "passed"
    print(f"determinism check {verdict}: {len(differ)} of {len(stored)} code cells differ")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
