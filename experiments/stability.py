"""Do the notebook's conclusions survive other seeds and other float rounding?

    .venv/bin/python -m experiments.stability

Runs DoRA.ipynb headless (on the CPU) in variants of the committed run, changing one thing at a
time, and reads the verdicts each run's summary cell writes (``helpers.write_results``):

* ten other seeds (``SEEDS = range(10, 20)``): another draw of initialisations and batch orders;
* one thread instead of the machine's default (``torch.set_num_threads(1)``);
* another instruction set: PyTorch's AVX2 kernels instead of AVX-512 (``ATEN_CPU_CAPABILITY``,
  and the same for oneDNN and MKL), the same seeds with the float rounding of a CPU without
  AVX-512, which moves every number a little, as another CPU type does.

The notebook itself is not modified: the script replaces one line of it in memory (a setting
is replaced where it is defined, so everything that uses it sees the new value). It writes
experiments/stability.json (the protocol, and each variant's verdicts and sentences), which
``tools/update_readme.py`` compares with the committed notebook's verdicts: the README states as
results only the conclusions that held in every run, and marks the others "not settled".
Takes about three times the notebook's run time.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import nbformat

from dora_tutorial.files import write_json
from tools.notebook_definitions import protocol
from tools.run_notebook import execute

REPO = Path(__file__).resolve().parents[1]


RESULTS = Path(__file__).with_name("stability.json")
AVX2 = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
}
VARIANTS = {  # name: (a line of the notebook, what it becomes in this variant, environment)
    "seeds 10-19": ("SEEDS = range(10)", "SEEDS = range(10, 20)", {}),
    "1 thread": ("import helpers", "import helpers\ntorch.set_num_threads(1)", {}),
    "AVX2 kernels": (
        "import helpers",
        "import helpers\nprint(torch.backends.cpu.get_cpu_capability())",
        AVX2,
    ),
}


def variant(name: str) -> nbformat.NotebookNode:
    """The notebook with one line replaced (in memory: DoRA.ipynb is not modified)."""
    line, replacement, _ = VARIANTS[name]
    notebook = nbformat.read(REPO / "DoRA.ipynb", as_version=4)
    cell = next(c for c in notebook.cells if line in c.source.splitlines())
    lines = cell.source.splitlines()
    lines[lines.index(line)] = replacement
    cell.source = "\n".join(lines)
    return notebook


def main() -> None:
    os.environ["DORA_DEVICE"] = "cpu"
    results, said = {}, {}
    for name in VARIANTS:
        print(f"== {name}", flush=True)
        start = time.perf_counter()
        path = REPO / f".stability-{re.sub(r'[^a-z0-9]+', '-', name)}.ipynb"
        nbformat.write(variant(name), path)  # beside DoRA.ipynb: it runs in the repository
        saved_env = dict(os.environ)
        os.environ.update(VARIANTS[name][2])  # the kernel inherits this process's environment
        written = path.with_suffix(".json")  # what the variant's summary cell writes
        try:
            execute(path, written)
            conclusions = json.loads(written.read_text())["conclusions"]
            results[name] = {key: c["verdict"] for key, c in conclusions.items()}
            said[name] = {key: c["sentence"] for key, c in conclusions.items()}
        finally:
            path.unlink(missing_ok=True)
            written.unlink(missing_ok=True)
            os.environ.clear()
            os.environ.update(saved_env)
        print(f"   {time.perf_counter() - start:.0f} s", flush=True)
    saved = {"protocol": protocol(), "variants": results, "sentences": said}
    write_json(RESULTS, saved)
    conclusions = json.loads((REPO / "figures" / "results.json").read_text())["conclusions"]
    for key, verdict in ((key, c["verdict"]) for key, c in conclusions.items()):
        others = [results[name].get(key) for name in VARIANTS]
        mark = "agree" if all(v == verdict for v in others) else "DIFFER"
        print(f"{mark:<7}{key}: committed {verdict!r}; " + "; ".join(map(repr, others)))
    print(f"saved {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
