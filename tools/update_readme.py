"""Write the README's results (between its markers) and experiments/RESULTS.md from
experiments/evidence.json, experiments/vit.json and the committed run's figures/results.json.

    .venv/bin/python -m tools.update_readme           # rewrite both
    .venv/bin/python -m tools.update_readme --check   # exit 1 if either is out of date
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dora_tutorial import evidence as ev
from dora_tutorial.atomic_write import write_atomic
from dora_tutorial.weight_changes import closer_method, figure2_analysis

REPO = Path(__file__).resolve().parents[1]
START = "<!-- results: written by tools/update_readme.py, do not edit by hand -->"
END = "<!-- end of results -->"
DETAIL = REPO / "experiments" / "RESULTS.md"


def figure2_sentence(mlp: dict, vit: dict) -> str:
    """Which method's magnitude-direction slope is closer to full FT's, on both networks."""
    mlp, vit = (
        f"{closer_method(a['closer']) or 'neither detected'} (slope / full FT's: "
        + ", ".join(f"{m} {a['ratios'][f'{m} / full FT']['ratio']:.2f}" for m in ("DoRA", "LoRA"))
        + ")"
        for a in (mlp, vit)
    )
    return (
        "Figure 2: the method whose magnitude-direction slope is closer to full fine-tuning's "
        f"(paired by seed, last checkpoint) is, on the MLP, {mlp}; on the ViT, {vit}."
    )


def render(evidence: dict, found: dict, mlp_figure2: dict, vit: dict) -> str:
    vit_figure2 = figure2_analysis(vit["points"], vit["protocol"]["PAPER_CORRELATION"])
    networks, seeds = evidence["networks"], len(evidence["protocol"]["SEEDS"])
    held = ev.held_out(evidence)
    stated = [k for k, c in found.items() if c.verdict != "no difference detected"]
    same = sum(held[k].diff * found[k].diff > 0 for k in stated)
    vit_line = "; ".join(
        f"{c['a']} - {c['b']} {c['diff']:+.2f} ({c['low']:+.2f} to {c['high']:+.2f})"
        for c in vit["comparisons"]
    )
    return "\n".join(
        [
            START,
            f"From `experiments/evidence.py`: {networks} pretrained networks x {seeds} seeds, "
            "every configuration at its own tuned rate; paired within a network, tested over "
            f"networks, one Holm family of {len(found)}; each interval and p is the one its "
            "verdict is decided at; points of test accuracy ([details](experiments/RESULTS.md)).",
            "",
            *(f"- {s}" for s in ev.findings(found)),
            f"- {figure2_sentence(mlp_figure2, vit_figure2)}",
            "",
            f"```\n{ev.table(found)}\n```",
            "",
            "Scaled LoRA: LoRA with DoRA's per-row scale m but no normalisation (the ablation). "
            f"On a held-out network, {same} of the {len(stated)} results have an estimate of the "
            f"same sign. ViT ({len(vit['final']['LoRA'])} seeds, one network, 95 %): {vit_line}.",
            END,
        ]
    )


def detail(evidence: dict, found: dict) -> str:
    held = ev.held_out(evidence)
    check = {
        k: f"{h.diff:+.2f} [{h.low:+.2f}, {h.high:+.2f}] {ev.short(h.verdict)}"
        for k, h in held.items()
    }
    noise, spread = ev.float_noise(evidence)
    labels = [str(j) for j in range(evidence["networks"])] + ["held out"]
    return "\n".join(
        [
            "# The pooled results in detail",
            "",
            "Written by `python -m tools.update_readme` from `experiments/evidence.json`; the "
            "design is in `experiments/evidence.py`'s docstring and in the notebook.",
            "",
            "## Every comparison, with the held-out network",
            "",
            f"```\n{ev.table(found, check, 'held-out network (95 %)')}\n```",
            "",
            "Float rounding alone (the same seeds on PyTorch's portable CPU kernels, standing in "
            f"for another CPU type) moved a seed's accuracy by {noise:.2f} points (standard "
            f"deviation); a new seed moves it by {spread:.2f}.",
            "",
            "## Each network's mean difference (points)",
            "",
            "| comparison | " + " | ".join(labels) + " |",
            "|---|" + "---:|" * len(labels),
            *(
                f"| {name} | "
                + " | ".join(f"{a - b:+.2f}" for a, b in zip(*found[name].values, strict=True))
                + f" | {held[name].diff:+.2f}"
                + " |"
                for name in found
            ),
            "",
            "## Learning rates, chosen on the validation set of network 0",
            "",
            f"```\n{ev.rate_table(evidence['chosen'], evidence['protocol']['RANKS'])}\n```",
            "",
        ]
    )


def updated_readme(readme: str, section: str) -> str:
    if START not in readme or END not in readme:
        raise ValueError(f"README.md has no results markers ({START!r} ... {END!r})")
    head, rest = readme.split(START, 1)
    return head + section + rest.split(END, 1)[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 if out of date")
    evidence, check = ev.load(), parser.parse_args().check
    found = ev.pooled(evidence)
    vit = json.loads((REPO / "experiments" / "vit.json").read_text())
    mlp = json.loads((REPO / "figures" / "results.json").read_text())["figure2"]
    readme = REPO / "README.md"
    wanted = {
        readme: updated_readme(readme.read_text(), render(evidence, found, mlp, vit)),
        DETAIL: detail(evidence, found),
    }
    stale = [p for p, text in wanted.items() if not p.exists() or p.read_text() != text]
    for path in stale:
        if check:
            print(f"{path.relative_to(REPO)} is out of date: run python -m tools.update_readme")
        else:
            write_atomic(path, [wanted[path].encode()])
    if not check:
        print("README.md and experiments/RESULTS.md are up to date")
    return 1 if check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
