"""Write the README's results from the executed notebook and the stability runs (no hand copies).

    .venv/bin/python -m tools.update_readme           # rewrite the marked part of README.md
    .venv/bin/python -m tools.update_readme --check   # exit 1 if README.md is out of date

Reads figures/results.json (what the notebook's summary cell wrote: the results table, each
conclusion's verdict and sentence; ``helpers.run_summary``) and experiments/stability.json (the
verdicts of the same notebook run on other seed sets and with other CPU kernels). A
conclusion is stated as a result only if its verdict is the same in the committed run and in
every variant; the others are listed as not settled. Everything between the two markers in
README.md is replaced; nothing else is touched.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import helpers
from dora_tutorial.files import write_atomic

REPO = Path(__file__).resolve().parents[1]
START = "<!-- results: written by tools/update_readme.py, do not edit by hand -->"
END = "<!-- end of results -->"
RESULTS = REPO / "figures" / "results.json"


MARGIN = 0.25  # an interval's end within a quarter of its half-width of zero touches zero


def borderline(comparisons: list[dict]) -> bool:
    """Whether a verdict's interval, at the level the verdict is decided at, touches zero (the
    threshold between "ahead", "no difference detected" and "behind"): see
    ``helpers.Comparison.near_threshold``. The comparisons are rebuilt from their per-seed
    values (the test rerun, Holm again within the family)."""
    rebuilt = helpers.pooled([comparisons]) if comparisons else []
    return any(c.near_threshold(MARGIN) for c in rebuilt)


def pooled_sentence(key: str, results: dict, stability: dict) -> str:
    """The estimate pooled over the disjoint seed sets (committed run and stability's POOLED)."""
    runs = [results["conclusions"][key]["comparisons"]]
    runs += [stability["comparisons"][name][key] for name in stability["pooled"]]
    if not runs[0]:
        return ""
    pooled = helpers.pooled(runs)
    n = pooled[0].n
    if len(pooled) == 1:
        return f" Pooled over {len(runs)} seed sets ({n} seeds): {pooled[0].sentence()}"
    ranks = results["conclusions"][key]["labels"] or [str(i) for i in range(len(pooled))]
    parts = [
        f"{label}: {c.diff:+.2f} (95 % CI {c.low:+.2f} to {c.high:+.2f}, {c.verdict})"
        for label, c in zip(ranks, pooled, strict=True)
    ]
    return (
        f" Pooled over {len(runs)} seed sets ({n} seeds), Holm over {len(pooled)}: "
        + "; ".join(parts)
        + "."
    )


def held_conclusions(results: dict, stability: dict) -> list[str]:
    """The conclusions whose verdict held: the same in every stability run, and in no run (the
    committed one included) its interval touched zero."""
    conclusions, variants = results["conclusions"], stability["variants"]
    runs = stability["comparisons"]

    def settled(k):
        same = all(v.get(k) == conclusions[k]["verdict"] for v in variants.values())
        near = borderline(conclusions[k]["comparisons"]) or any(
            borderline(runs[name].get(k, [])) for name in runs
        )
        return same and not near

    return [k for k in conclusions if settled(k)]


def render(results: dict, stability: dict) -> str:
    """The README's results section, from the notebook's results and the stability runs."""
    conclusions = results["conclusions"]
    committed = {k: c["verdict"] for k, c in conclusions.items()}
    said = {k: c["sentence"] for k, c in conclusions.items()}
    variants = stability["variants"]
    seeds = len(stability["protocol"]["SEEDS"])
    held = held_conclusions(results, stability)
    unsettled = [k for k in committed if k not in held]
    pretrained = f"{results['pretrained_accuracy']:.2f}%"
    out = [
        START,
        f"From the committed run of `DoRA.ipynb` (CPU, {seeds} seeds per configuration; the "
        "notebook's summary cell prints all of this and writes it to `figures/results.json`). "
        "Test accuracy on the rotated digits after fine-tuning; the pretrained model gets "
        f"{pretrained}.",
        "",
        "| method | trainable parameters | test accuracy (%), mean ± std | 95 % CI of the mean |",
        "|---|---:|---:|---:|",
        *(
            f"| {r['method']} | {r['trainable']:,} | {r['mean']:.2f} ± {r['std']:.2f} | "
            f"{r['ci'][0]:.2f} to {r['ci'][1]:.2f} |"
            for r in results["methods"]
        ),
        "",
        f"**Results**: these verdicts held in the committed run and in every variant of "
        f"`experiments/stability.py` ({', '.join(variants)}), and in no run did the verdict's "
        "interval touch zero (at the level the verdict is decided at, Holm's inside a family; "
        f"touching: its end nearest zero within {MARGIN:.0%} of its half-width of zero). Each "
        f"gives the committed run's sentence, then the estimate pooled over "
        f"{1 + len(stability['pooled'])} disjoint seed sets.",
        "",
        *(f"- **{k}**: {said[k]}{pooled_sentence(k, results, stability)}" for k in held),
        *(["- none"] if not held else []),
        "",
        "**Not settled**: the verdict changed in at least one variant, or its interval touched "
        "zero in one of them, so it is not a result.",
        "",
        *(
            f"- **{k}**: {said[k]} (verdicts: {_row(k, committed, variants)})"
            f"{pooled_sentence(k, results, stability)}"
            for k in unsettled
        ),
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
    results = json.loads(RESULTS.read_text())
    stability = json.loads((REPO / "experiments" / "stability.json").read_text())
    readme_path = REPO / "README.md"
    readme = readme_path.read_text()
    new = updated_readme(readme, render(results, stability))
    if args.check:
        if new != readme:
            print("README.md's results are out of date: run python -m tools.update_readme")
            return 1
        print("README.md's results match DoRA.ipynb and experiments/stability.json")
        return 0
    if new != readme:
        write_atomic(readme_path, [new.encode()])
    print("README.md's results are up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
