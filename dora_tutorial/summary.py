"""What a run found: Part I's conclusions in words, the results table, and the run's numbers
as data (figures/results.json)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from dora_tutorial.atomic_write import write_json as _write_json
from dora_tutorial.runtime import REPO
from dora_tutorial.stats import Comparison, compare, compare_values, holm, mean_interval
from dora_tutorial.training import Runs


def what_we_learned(
    runs: dict[str, Runs], pretrained_accuracy: float, rank: int, rates: dict | None = None
) -> list[str]:
    """Part I's conclusions in five plain sentences, each computed from the run: where the
    methods land, DoRA against LoRA after the last epoch and before it (paired tests; the
    earlier epochs Holm-adjusted as one family), full FT against DoRA, and what DoRA costs and
    these runs cannot say. ``rates`` ({method: learning rate}): when the method ahead before
    the last epoch trains at the larger rate, the sentence says so."""
    ft, lora, dora = (runs[name] for name in ("full FT", "LoRA", "DoRA"))
    n = len(dora.seeds)
    vs_lora, vs_ft = compare("DoRA", dora, "LoRA", lora), compare("full FT", ft, "DoRA", dora)
    said = [
        f"On the rotated digits, where the pretrained network gets {100 * pretrained_accuracy:.1f}"
        f" %, full fine-tuning reaches {ft.final.mean():.1f} %, LoRA {lora.final.mean():.1f} % "
        f"and DoRA {dora.final.mean():.1f} % (means of {n} seeds)."
    ]
    if vs_lora.verdict == "no difference detected":
        said.append(
            f"After the last epoch, at rank {rank}, {n} paired seeds cannot tell DoRA from LoRA: "
            f"DoRA - LoRA = {vs_lora.diff:+.2f} points (95 % CI {vs_lora.low:+.2f} to "
            f"{vs_lora.high:+.2f}): differences beyond these bounds are ruled out, ones inside "
            "them are not."
        )
    else:
        said.append(
            f"At rank {rank} DoRA is {vs_lora.verdict} of LoRA by {abs(vs_lora.diff):.2f} points "
            f"(95 % CI {vs_lora.low:+.2f} to {vs_lora.high:+.2f}, paired over {n} seeds)."
        )
    if dora.test_acc.shape[1] > 1:
        said.append(_before_the_end(dora, lora, rates))
    gap = "ahead of" if vs_ft.verdict == "ahead" else "not ahead of"
    extra = dora.trainable - lora.trainable
    said.append(
        f"Full fine-tuning, which trains {ft.trainable / dora.trainable:.1f} times as many "
        f"numbers as DoRA, is {gap} it: {vs_ft.diff:+.2f} points (95 % CI {vs_ft.low:+.2f} to "
        f"{vs_ft.high:+.2f})."
    )
    said.append(
        f"DoRA's magnitudes add {extra:,} trainable numbers to LoRA's {lora.trainable:,} "
        f"({extra / lora.trainable:.0%}), one per output row; whether they buy more at a lower "
        "rank or at an equal budget, one rank cannot say: Part II measures it."
    )
    return said


def _before_the_end(dora: Runs, lora: Runs, rates: dict | None = None) -> str:
    """DoRA - LoRA after each epoch before the last, as one Holm family: the epochs where a
    difference is detected (with it), and those where none is; and, when the method ahead
    trains at the larger learning rate, that an early lead can be that rate's faster start."""
    earlier = range(dora.test_acc.shape[1] - 1)
    family = holm(
        [
            compare_values("DoRA", 100 * dora.test_acc[:, e], "LoRA", 100 * lora.test_acc[:, e])
            for e in earlier
        ]
    )
    groups = {}
    for e, c in enumerate(family, 1):
        groups.setdefault(_who(c), []).append((e, c))
    parts = []
    for who, members in groups.items():
        part = f"{who} after {in_words([e for e, _ in members], 'epoch')}"
        if who != "no difference detected":
            part += f" ({', '.join(f'{c.diff:+.2f}' for _, c in members)} points)"
            leader, other = ("DoRA", "LoRA") if who == "DoRA ahead" else ("LoRA", "DoRA")
            if rates is not None and rates[leader] > rates[other]:
                part += (
                    f", with {leader} at the larger learning rate ({rates[leader]:g} against "
                    f"{rates[other]:g}, each chosen on the validation set): possibly just a "
                    "faster start"
                )
        parts.append(part)
    over = "epoch 1" if len(earlier) == 1 else f"epochs 1-{len(earlier)}"
    return (
        f"Before the last epoch ({over}, paired, Holm-adjusted together): "
        f"{'; '.join(parts)}; the right panel of the fine-tuning figure shows every epoch."
    )


def _who(c: Comparison) -> str:
    """'DoRA ahead', 'DoRA behind' or 'no difference detected'."""
    return c.verdict if c.verdict == "no difference detected" else f"{c.a} {c.verdict}"


def in_words(numbers, noun: str) -> str:
    """[] -> 'no rank'; [4] -> 'rank 4'; [1, 16] -> 'ranks 1 and 16'; [2, 4, 8] -> 'ranks 2, 4
    and 8'."""
    numbers = [str(x) for x in numbers]
    if not numbers:
        return f"no {noun}"
    if len(numbers) == 1:
        return f"{noun} {numbers[0]}"
    return f"{noun}s {', '.join(numbers[:-1])} and {numbers[-1]}"


def _accuracy_rows(results: dict[str, Runs]) -> list[dict]:
    """Per method: trainable parameters, final test accuracy's mean, std and 95 % interval."""
    rows = []
    for name, runs in results.items():
        acc = runs.final
        low, high = mean_interval(acc)
        rows.append(
            {
                "method": name,
                "trainable": runs.trainable,
                "mean": float(acc.mean()),
                "std": float(acc.std(ddof=1)),
                "ci": [float(low), float(high)],
            }
        )
    return rows


def results_table(results: dict[str, Runs], timing: bool = True) -> str:
    """Method | trainable | final test accuracy: mean ± std, 95 % CI of the mean | s / epoch
    (``timing=False``: without the time per epoch)."""
    seconds = [float(np.mean(runs.seconds)) for runs in results.values()] if timing else None
    seeds = len(next(iter(results.values())).seeds)
    return _accuracy_table(_accuracy_rows(results), seeds, seconds)


def _accuracy_table(rows: list[dict], seeds: int, seconds: list[float] | None = None) -> str:
    head = f"{'method':<18}{'trainable':>10}  {'test accuracy (%)':<17}{'95 % CI':>15}"
    lines = [head + (f"{'s / epoch':>11}" if seconds else "")]
    for i, row in enumerate(rows):
        interval = "{:.2f}-{:.2f}".format(*row["ci"])
        lines.append(
            f"{row['method']:<18}{row['trainable']:>10,}  {row['mean']:>6.2f} ± "
            f"{row['std']:<6.2f}{interval:>17}" + (f"{seconds[i]:>9.2f} s" if seconds else "")
        )
    note = "; s / epoch: all seeds together" if seconds else ""
    return "\n".join(lines) + f"\n({seeds} seeds each{note})"


def run_summary(results: dict[str, Runs], pretrained_accuracy: float, comparisons, figure2) -> dict:
    """This run's numbers as data, for the regression check on any CPU
    (tests/test_results_any_cpu.py): each method's accuracy, the pretrained model's accuracy (%),
    {name: Comparison} with their verdicts, and Figure 2's conclusions."""
    keep = ("diff", "low", "high", "p", "p_holm")
    return {
        "seeds": len(next(iter(results.values())).seeds),
        "pretrained_accuracy": 100 * float(pretrained_accuracy),
        "methods": _accuracy_rows(results),
        "comparisons": {
            name: {
                **{k: getattr(c, k) for k in keep},
                "verdict": c.verdict,
                "interval": c.verdict_interval,
            }
            for name, c in comparisons.items()
        },
        "figure2": {key: figure2[key] for key in ("conclusions", "ratios", "closer")},
    }


RESULTS_FILE = REPO / "figures" / "results.json"


def write_results(summary: dict) -> Path:
    """Save ``summary`` as JSON: to $DORA_RESULTS if set (the tests' runs write elsewhere), else
    to figures/results.json, beside the figures of the same run."""
    path = Path(os.environ.get("DORA_RESULTS") or RESULTS_FILE)
    _write_json(path, summary)
    return path
