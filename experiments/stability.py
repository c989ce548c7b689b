"""Do the notebook's conclusions hold on seeds it never ran, and under other float rounding?

    .venv/bin/python -m experiments.stability

Runs DoRA.ipynb headless (on the CPU) in variants of the committed run (seeds 0-9):

* three other, disjoint seed sets of ten (``SEEDS = range(10, 20)``, 20-29, 30-39): other
  initialisations and batch orders, so with the committed run four seed sets in all;
* one thread instead of the machine's two: other summation orders, as on another machine;
* another instruction set: PyTorch's AVX2 kernels instead of AVX-512 (``ATEN_CPU_CAPABILITY``,
  and the same for oneDNN and MKL), which moves every number a little, as another CPU type
  does; on the committed seeds and on seeds 10-19, so that two kernel choices see two seed sets.

The notebook itself is not modified: the script replaces its SEEDS line in memory. Each run's
summary cell writes its results (``helpers.write_results``): verdicts, sentences and the
per-seed values behind every comparison. This script saves them all in
experiments/stability.json; ``tools/update_readme.py`` then states a conclusion as a result only
if its verdict is the same in every run and in no run its interval touches zero (at the level
the verdict is decided at; ``helpers.Comparison.near_threshold``), and gives the estimate
pooled over the four disjoint seed sets (``helpers.pooled``). Takes about six notebook runs.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import nbformat

from dora_tutorial.files import write_json
from dora_tutorial.notebook import execute, protocol

REPO = Path(__file__).resolve().parents[1]

RESULTS = Path(__file__).with_name("stability.json")
AVX2 = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
}
SEEDS_LINE = "SEEDS = range(10)"
VARIANTS = {  # name: (what the SEEDS line becomes, environment)
    "seeds 10-19": ("SEEDS = range(10, 20)", {}),
    "seeds 20-29": ("SEEDS = range(20, 30)", {}),
    "seeds 30-39": ("SEEDS = range(30, 40)", {}),
    "1 thread": (SEEDS_LINE, {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}),
    "AVX2 kernels": (SEEDS_LINE, AVX2),
    "AVX2, seeds 10-19": ("SEEDS = range(10, 20)", AVX2),
}
# the disjoint seed sets, besides the committed run, whose per-seed values are pooled
POOLED = ["seeds 10-19", "seeds 20-29", "seeds 30-39"]


def variant(name: str) -> nbformat.NotebookNode:
    """The notebook with its SEEDS line replaced (in memory: DoRA.ipynb is not modified)."""
    notebook = nbformat.read(REPO / "DoRA.ipynb", as_version=4)
    cell = next(c for c in notebook.cells if SEEDS_LINE in c.source.splitlines())
    lines = cell.source.splitlines()
    lines[lines.index(SEEDS_LINE)] = VARIANTS[name][0]
    cell.source = "\n".join(lines)
    return notebook


def run(name: str) -> dict:
    """One variant's conclusions, as its summary cell wrote them."""
    path = REPO / f".stability-{re.sub(r'[^a-z0-9]+', '-', name)}.ipynb"
    written = path.with_suffix(".json")
    nbformat.write(variant(name), path)  # beside DoRA.ipynb: it runs in the repository
    saved_env = dict(os.environ)
    os.environ.update(VARIANTS[name][1])  # the kernel inherits this process's environment
    try:
        execute(path, written)
        return json.loads(written.read_text())["conclusions"]
    finally:
        path.unlink(missing_ok=True)
        written.unlink(missing_ok=True)
        os.environ.clear()
        os.environ.update(saved_env)


def main() -> None:
    os.environ["DORA_DEVICE"] = "cpu"
    conclusions = {}
    for name in VARIANTS:
        print(f"== {name}", flush=True)
        start = time.perf_counter()
        conclusions[name] = run(name)
        print(f"   {time.perf_counter() - start:.0f} s", flush=True)
    saved = {
        "protocol": protocol(),
        "pooled": POOLED,
        "variants": {n: {k: c["verdict"] for k, c in cs.items()} for n, cs in conclusions.items()},
        "sentences": {
            n: {k: c["sentence"] for k, c in cs.items()} for n, cs in conclusions.items()
        },
        "comparisons": {
            n: {k: c["comparisons"] for k, c in cs.items()} for n, cs in conclusions.items()
        },
    }
    write_json(RESULTS, saved)
    committed = json.loads((REPO / "figures" / "results.json").read_text())["conclusions"]
    for key, c in committed.items():
        others = [saved["variants"][name].get(key) for name in VARIANTS]
        mark = "agree" if all(v == c["verdict"] for v in others) else "DIFFER"
        print(f"{mark:<7}{key}: committed {c['verdict']!r}; " + "; ".join(map(repr, others)))
    print(f"saved {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
