"""Execute DoRA.ipynb top to bottom, headless, and store its outputs and figures.

    .venv/bin/python -m tools.run_notebook                # CPU; writes runs/ (untracked)
    .venv/bin/python -m tools.run_notebook --regenerate   # maintainers: the committed outputs
    .venv/bin/python -m tools.run_notebook --device cuda --output /tmp/DoRA-cuda.ipynb

1. makes MNIST available (helpers.load_mnist: verified local files, else a download);
2. runs every cell in a fresh kernel, printing each cell's text output as it finishes, so a
   long run shows its progress;
3. writes the executed notebook and saves every figure of a cell tagged ``fig-NAME`` as
   ``NAME.png``, and the summary cell's results as ``results.json``: by default into ``runs/``
   (ignored by git, so a reader's run leaves the clone as it was); with ``--regenerate`` over the
   committed DoRA.ipynb and ``figures/`` (the README's results are written from
   ``figures/results.json``).

Outputs stay comparable with `pytest --nbval`: the device is the CPU unless ``--device`` says
otherwise, and nothing else about this machine changes what the compared cells print. A run on
any other device (``cuda``, ``mps``, or ``auto`` picking one) refuses to write the committed
notebook or figures/: give it an ``--output`` elsewhere.
"""

from __future__ import annotations

import argparse
import base64
import os
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

import helpers
from dora_tutorial.files import write_atomic

REPO = Path(__file__).resolve().parents[1]
RUNS = REPO / "runs"  # a reader's run goes here (.gitignore), never over the committed files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--notebook", type=Path, default=REPO / "DoRA.ipynb")
    parser.add_argument(
        "--output", type=Path, help="where to write the notebook (default: runs/DoRA.ipynb)"
    )
    parser.add_argument(
        "--figures", type=Path, help="folder for the PNGs (default: beside the notebook written)"
    )
    parser.add_argument(
        "--regenerate",
        action="store_true",
        help="maintainers: write over the committed DoRA.ipynb and figures/ (CPU only)",
    )
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, mps or auto")
    args = parser.parse_args()
    device = helpers.pick_device(None if args.device == "auto" else args.device)
    if args.regenerate and (args.output or args.figures):
        parser.error("--regenerate writes the committed files: give no --output or --figures")
    if args.regenerate:
        args.output, args.figures = args.notebook, REPO / "figures"
    output, figures = destinations(args.notebook, args.output, args.figures, device)
    if output is None:
        parser.error(
            f"a {device.type} run must not overwrite the committed DoRA.ipynb or figures/, which "
            f"come from the CPU: pass --output elsewhere, e.g. --output /tmp/DoRA-{device.type}"
            f".ipynb (its figures then go to /tmp/DoRA-{device.type}-figures/)"
        )

    helpers.load_mnist()
    os.environ["DORA_DEVICE"] = str(device)  # read by helpers.pick_device() in the kernel
    start = time.perf_counter()
    results = figures / "results.json"  # figures/results.json for the committed run
    figures.mkdir(parents=True, exist_ok=True)  # the kernel writes results.json there
    notebook = execute(args.notebook, results)
    print(f"executed {args.notebook.name} on {device} in {time.perf_counter() - start:.1f} s")
    write_atomic(output, [nbformat.writes(notebook).encode()])
    for path in [*save_figures(notebook, figures), results]:
        print(f"saved {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")


def destinations(notebook: Path, output, figures, device) -> tuple[Path | None, Path]:
    """Where the executed notebook and its figures go; (None, _) if that is not allowed.

    By default runs/DoRA.ipynb and runs/figures/; an --output elsewhere gets its figures beside
    it. Another device's outputs differ (other kernels, other rounding), so they never replace
    the committed notebook or figures/ (``--regenerate``, or naming them, is for the CPU only).
    """
    if output is None:
        output, figures = RUNS / notebook.name, figures or RUNS / "figures"
    figures = figures or output.with_name(f"{output.stem}-figures")
    if device.type == "cpu":
        return output, figures
    committed = {(REPO / "DoRA.ipynb").resolve(), notebook.resolve(), (REPO / "figures").resolve()}
    if output.resolve() in committed or figures.resolve() in committed:
        return None, figures
    return output, figures


def execute(path: Path, results: Path | None = None) -> nbformat.NotebookNode:
    """Run all cells in a fresh python3 kernel whose working directory is the notebook's.

    The summary cell writes the run's results (``helpers.write_results``) to ``results``; by
    default to a temporary file, so that only a run asked to (``main``) replaces the committed
    figures/results.json."""
    with tempfile.TemporaryDirectory() as tmp:
        target = results or Path(tmp) / "results.json"
        saved = os.environ.get("DORA_RESULTS")
        os.environ["DORA_RESULTS"] = str(target)  # the kernel inherits this process's environment
        try:
            return _execute(path)
        finally:
            if saved is None:
                os.environ.pop("DORA_RESULTS", None)
            else:
                os.environ["DORA_RESULTS"] = saved


def _execute(path: Path) -> nbformat.NotebookNode:
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        cell.metadata.pop("execution", None)  # timestamps of an earlier run
    n_code = sum(cell.cell_type == "code" for cell in notebook.cells)
    counter = iter(range(1, n_code + 1))
    times: list[tuple[float, int, str]] = []  # (seconds, cell number, first line)
    clock = [time.perf_counter()]

    def report(cell, **_):
        now, number = time.perf_counter(), next(counter)
        seconds, clock[0] = now - clock[0], now
        text = "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")
        first = cell.source.strip().splitlines()[0] if cell.source.strip() else ""
        times.append((seconds, number, first[:60]))
        print(f"[{number}/{n_code}, {seconds:.1f} s] {first[:70]}", flush=True)
        if text.strip():
            print("    " + text.rstrip().replace("\n", "\n    "), flush=True)

    client = NotebookClient(
        notebook,
        timeout=1800,
        kernel_name="python3",
        record_timing=False,  # no per-cell timestamps in the stored notebook
        resources={"metadata": {"path": str(path.parent)}},
        on_cell_executed=report,
    )
    client.execute()
    print("slowest cells:", flush=True)
    for seconds, number, first in sorted(times, reverse=True)[:5]:
        print(f"  {seconds:5.1f} s  [{number}/{n_code}] {first}", flush=True)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs = coalesce_streams(cell.outputs)
    return notebook


def coalesce_streams(outputs: list) -> list:
    """Join consecutive stdout (or stderr) chunks into one output, as Jupyter shows them.

    How a kernel splits a cell's printing into messages depends on timing; joined, the stored
    notebook is the same from run to run."""
    merged = []
    for out in outputs:
        previous = merged[-1] if merged else None
        if (
            out.output_type == "stream"
            and previous is not None
            and previous.output_type == "stream"
            and previous.name == out.name
        ):
            previous.text += out.text
        else:
            merged.append(out)
    return merged


def save_figures(notebook: nbformat.NotebookNode, folder: Path) -> list[Path]:
    """Save the PNG output of each cell tagged ``fig-NAME`` as ``folder/NAME.png``."""
    saved = []
    for cell in notebook.cells:
        names = [t[4:] for t in cell.metadata.get("tags", []) if t.startswith("fig-")]
        outputs = cell.get("outputs", [])
        pngs = [o["data"]["image/png"] for o in outputs if "image/png" in o.get("data", {})]
        for name, png in zip(names, pngs, strict=False):
            path = folder / f"{name}.png"
            write_atomic(path, [base64.b64decode(png)])
            saved.append(path)
    return saved


if __name__ == "__main__":
    main()
