"""Execute DoRA.ipynb headless, in a fresh kernel, and save what it made.

    .venv/bin/python -m tools.run_notebook                # CPU, into runs/ (untracked)
    .venv/bin/python -m tools.run_notebook --regenerate   # over DoRA.ipynb and figures/
    .venv/bin/python -m tools.run_notebook --device cuda --output /tmp/DoRA-cuda.ipynb

It saves the executed notebook, each ``fig-NAME`` cell's PNG as ``NAME.png`` and the summary's
``results.json``. The committed ones come from the CPU: no other device may overwrite them.
"""

from __future__ import annotations

import argparse
import base64
import os
from pathlib import Path

import nbformat

import helpers
from dora_tutorial.atomic_write import write_atomic
from dora_tutorial.notebook import execute

REPO = Path(__file__).resolve().parents[1]
RUNS = REPO / "runs"  # a reader's run goes here (.gitignore), never over the committed files


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--notebook", type=Path, default=REPO / "DoRA.ipynb")
    parser.add_argument("--output", type=Path, help="the notebook (default: runs/DoRA.ipynb)")
    parser.add_argument("--figures", type=Path, help="PNGs (default: beside the notebook)")
    parser.add_argument("--regenerate", action="store_true", help="write the committed files")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, mps or auto")
    args = parser.parse_args(argv)
    device = helpers.pick_device(None if args.device == "auto" else args.device)
    if args.regenerate:
        if args.output or args.figures:
            parser.error("--regenerate writes the committed files: give no --output or --figures")
        args.output, args.figures = args.notebook, REPO / "figures"
    output, figures = destinations(args.notebook, args.output, args.figures, device)
    if output is None:
        parser.error(
            f"a {device.type} run must not overwrite the committed DoRA.ipynb or figures/: pass "
            f"--output elsewhere, e.g. --output /tmp/DoRA-{device.type}.ipynb"
        )
    helpers.load_mnist()
    os.environ["DORA_DEVICE"] = str(device)  # read by helpers.pick_device() in the kernel
    figures.mkdir(parents=True, exist_ok=True)  # the kernel writes results.json there
    notebook = execute(args.notebook, figures / "results.json")
    print(f"executed {args.notebook.name} on {device}")
    write_atomic(output, [nbformat.writes(notebook).encode()])
    for path in [output, *save_figures(notebook, figures), figures / "results.json"]:
        print(f"saved {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")


def destinations(notebook: Path, output, figures, device) -> tuple[Path | None, Path]:
    """(notebook, figures folder) to write; (None, _) if another device's would be committed."""
    if output is None:
        output, figures = RUNS / notebook.name, figures or RUNS / "figures"
    figures = figures or output.with_name(f"{output.stem}-figures")
    committed = {(REPO / "DoRA.ipynb").resolve(), notebook.resolve(), (REPO / "figures").resolve()}
    if device.type != "cpu" and {output.resolve(), figures.resolve()} & committed:
        return None, figures
    return output, figures


def save_figures(notebook: nbformat.NotebookNode, folder: Path) -> list[Path]:
    """Save the PNG output of each cell tagged ``fig-NAME`` as ``folder/NAME.png``."""
    saved = []
    for cell in notebook.cells:
        names = [t[4:] for t in cell.metadata.get("tags", []) if t.startswith("fig-")]
        data = [o.get("data", {}) for o in cell.get("outputs", [])]
        pngs = [d["image/png"] for d in data if "image/png" in d]
        for name, png in zip(names, pngs, strict=False):
            saved.append(folder / f"{name}.png")
            write_atomic(saved[-1], [base64.b64decode(png)])
    return saved


if __name__ == "__main__":
    main()
