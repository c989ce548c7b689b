"""Write the README's results from the executed notebook and the stability runs (no hand copies).

    .venv/bin/python tools/update_readme.py           # rewrite the marked part of README.md
    .venv/bin/python tools/update_readme.py --check   # exit 1 if README.md is out of date

Reads the last cell of DoRA.ipynb (tagged ``summary``: the results table, the verdict table and
one sentence per conclusion) and experiments/stability.json (the verdicts of the same notebook
run with other seeds and another thread count). A conclusion is stated as a result only if its
verdict is the same in the committed run and in every variant; the others are listed as not
settled. Everything between the two markers in README.md is replaced; nothing else is touched.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import nbformat

REPO = Path(__file__).resolve().parents[1]
START = "<!-- results: written by tools/update_readme.py, do not edit by hand -->"
END = "<!-- end of results -->"


def summary_text(notebook: nbformat.NotebookNode) -> str:
    """The printed output of the notebook's cell tagged ``summary``."""
    cell = next(c for c in notebook.cells if "summary" in c.metadata.get("tags", []))
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def parse_verdict_table(text: str) -> dict[str, str]:
    """{conclusion: verdict} from the rows of ``helpers.verdict_table`` inside ``text``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(r"conclusion +verdict$", line))
    column = lines[start].index("verdict")
    table: dict[str, str] = {}
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        key, value = line[:column].strip(), line[column:].strip()
        if key:
            table[key] = value
        else:  # a long verdict continues on the next line
            last = next(reversed(table))
            table[last] += " " + value
    return table


def verdicts_of(notebook: nbformat.NotebookNode) -> dict[str, str]:
    return parse_verdict_table(summary_text(notebook))


def sentences(text: str) -> dict[str, str]:
    """{conclusion: sentence} from the ``- conclusion: sentence`` bullets (wrapped lines joined)."""
    bullets: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("- "):
            key, _, sentence = line[2:].partition(": ")
            bullets[key] = sentence
        elif line.startswith("  ") and bullets:
            last = next(reversed(bullets))
            bullets[last] += " " + line.strip()
    return bullets


def results_rows(text: str) -> list[list[str]]:
    """The results table's rows as [method, trainable, mean ± std, interval, s / epoch]."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("method "))
    rows = []
    for line in lines[start + 1 :]:
        match = re.match(r"(.+?)\s{2,}([\d,]+)\s+([\d.]+ ± [\d.]+)\s+([\d.]+-[\d.]+)", line)
        if not match:
            break
        rows.append(list(match.groups()))
    return rows


def render(notebook: nbformat.NotebookNode, stability: dict) -> str:
    """The README's results section, from the notebook's summary and the stability runs."""
    text = summary_text(notebook)
    committed, said = parse_verdict_table(text), sentences(text)
    variants = stability["variants"]
    seeds = len(stability["protocol"]["SEEDS"])
    held = [k for k in committed if all(v.get(k) == committed[k] for v in variants.values())]
    unsettled = [k for k in committed if k not in held]
    pretrained = re.search(r"pretrained model on rotated digits: ([\d.]+%)", text).group(1)
    out = [
        START,
        f"From the committed run of `DoRA.ipynb` (CPU, {seeds} seeds per configuration; the "
        "notebook's last cell prints all of this). Test accuracy on the rotated digits after "
        f"fine-tuning; the pretrained model gets {pretrained}.",
        "",
        "| method | trainable parameters | test accuracy (%), mean ± std | 95 % CI of the mean |",
        "|---|---:|---:|---:|",
        *(
            f"| {m} | {n} | {acc} | {ci.replace('-', ' to ')} |"
            for m, n, acc, ci in results_rows(text)
        ),
        "",
        f"**Results**: these verdicts held in the committed run and in every variant of "
        f"`experiments/stability.py` ({', '.join(variants)}).",
        "",
        *(f"- **{k}**: {said[k]}" for k in held),
        "",
        "**Not settled**: the verdict changed in at least one variant, so it is not a result.",
        "",
        *(f"- **{k}**: {said[k]} (verdicts: {_row(k, committed, variants)})" for k in unsettled),
        *(["- none"] if not unsettled else []),
        "",
        "| conclusion | committed run | " + " | ".join(variants) + " |",
        "|---|---|" + "---|" * len(variants),
        *(
            f"| {k} | {committed[k]} | "
            + " | ".join(v.get(k, "-") for v in variants.values())
            + " |"
            for k in committed
        ),
        END,
    ]
    return "\n".join(out)


def _row(key: str, committed: dict, variants: dict) -> str:
    return "; ".join(
        [f"committed: {committed[key]}"] + [f"{n}: {v.get(key)}" for n, v in variants.items()]
    )


def updated_readme(readme: str, section: str) -> str:
    if START not in readme or END not in readme:
        raise ValueError(f"README.md has no results markers ({START!r} ... {END!r})")
    head, rest = readme.split(START, 1)
    return head + section + rest.split(END, 1)[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 if out of date")
    args = parser.parse_args()
    notebook = nbformat.read(REPO / "DoRA.ipynb", as_version=4)
    stability = json.loads((REPO / "experiments" / "stability.json").read_text())
    readme_path = REPO / "README.md"
    readme = readme_path.read_text()
    new = updated_readme(readme, render(notebook, stability))
    if args.check:
        if new != readme:
            print("README.md's results are out of date: run tools/update_readme.py")
            return 1
        print("README.md's results match DoRA.ipynb and experiments/stability.json")
        return 0
    if new != readme:
        from dora_tutorial.files import write_atomic

        write_atomic(readme_path, [new.encode()])
    print("README.md's results are up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
