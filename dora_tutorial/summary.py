"""What a run found: Part I's conclusions in words, the results table, and the run's numbers
as data (figures/results.json)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from dora_tutorial.atomic_write import write_json as _write_json
from dora_tutorial.runtime import REPO
from dora_tutorial.stats import compare, compare_values, holm, mean_interval
from dora_tutorial.training import Runs


def what_we_learned(
    runs: dict[str, Runs], pretrained_accuracy: float, rank: int, rates: dict | None = None
) -> list[str]:
    """Part I's conclusions, computed from the run. ``rates`` ({method: learning rate}): the
    sentence on the earlier epochs says when the method ahead trains at the larger rate."""
    ft, lora, dora = (runs[name] for name in ("full FT", "LoRA", "DoRA"))
    n, extra = len(dora.seeds), dora.trainable - lora.trainable
    said = [
        f"On the rotated digits, where the pretrained network gets {100 * pretrained_accuracy:.1f}"
        f" %, full fine-tuning reaches {ft.final.mean():.1f} %, LoRA {lora.final.mean():.1f} % "
        f"and DoRA {dora.final.mean():.1f} % (means of {n} seeds).",
        f"After the last epoch, at rank {rank}: {compare('DoRA', dora, 'LoRA', lora).sentence()}",
    ]
    if dora.test_acc.shape[1] > 1:
        said.append(_before_the_end(dora, lora, rates))
    return said + [
        f"Full fine-tuning trains {ft.trainable / dora.trainable:.1f} times as many numbers as "
        f"DoRA: {compare('full FT', ft, 'DoRA', dora).sentence()}",
        f"DoRA's magnitudes add {extra:,} trainable numbers to LoRA's {lora.trainable:,} "
        f"({extra / lora.trainable:.0%}), one per output row; whether they buy more at a lower "
        "rank or at an equal budget, one rank cannot say: Part II measures it.",
    ]


def _before_the_end(dora: Runs, lora: Runs, rates: dict | None) -> str:
    """DoRA - LoRA after each epoch before the last, Holm-adjusted as one family; an early lead
    of the method at the larger rate may be only a faster start."""
    family = holm(
        [
            compare_values("DoRA", 100 * dora.test_acc[:, e], "LoRA", 100 * lora.test_acc[:, e])
            for e in range(dora.test_acc.shape[1] - 1)
        ]
    )
    said = "; ".join(
        f"after epoch {e}: {c.diff:+.2f}, "
        + (c.verdict if c.verdict == "no difference detected" else f"DoRA {c.verdict}")
        for e, c in enumerate(family, 1)
    )
    ahead = {c.a if c.diff > 0 else c.b for c in family if c.verdict != "no difference detected"}
    if rates and rates["DoRA"] != rates["LoRA"]:
        slow, fast = sorted(("DoRA", "LoRA"), key=rates.get)
        if fast in ahead:
            said += (
                f"; {fast} trains at the larger learning rate ({rates[fast]:g} against "
                f"{rates[slow]:g}, each chosen on the validation set): possibly a faster start"
            )
    return (
        f"Before the last epoch, DoRA - LoRA (paired, Holm-adjusted over {len(family)} epochs): "
        f"{said}; the right panel of the fine-tuning figure shows every epoch."
    )


def _accuracy_rows(results: dict[str, Runs]) -> list[dict]:
    """Per method: trainable parameters, final test accuracy's mean, std and 95 % interval."""
    return [
        {
            "method": name,
            "trainable": runs.trainable,
            "mean": float(runs.final.mean()),
            "std": float(runs.final.std(ddof=1)),
            "ci": [float(x) for x in mean_interval(runs.final)],
        }
        for name, runs in results.items()
    ]


def results_table(results: dict[str, Runs], timing: bool = True) -> str:
    """Method | trainable | final test accuracy: mean ± std, 95 % CI of the mean | s / epoch."""
    head = f"{'method':<18}{'trainable':>10}  {'test accuracy (%)':<17}{'95 % CI':>15}"
    lines = [head + (f"{'s / epoch':>11}" if timing else "")]
    for row, runs in zip(_accuracy_rows(results), results.values(), strict=True):
        interval = "{:.2f}-{:.2f}".format(*row["ci"])
        lines.append(
            f"{row['method']:<18}{row['trainable']:>10,}  {row['mean']:>6.2f} ± "
            f"{row['std']:<6.2f}{interval:>17}"
            + (f"{np.mean(runs.seconds):>9.2f} s" if timing else "")
        )
    seeds = len(next(iter(results.values())).seeds)
    return "\n".join(lines) + f"\n({seeds} seeds each{'; s / epoch: all seeds together' * timing})"


def run_summary(results: dict[str, Runs], pretrained_accuracy: float, comparisons, figure2) -> dict:
    """This run's numbers as data, for the regression check on any CPU
    (tests/test_results_any_cpu.py)."""
    keep = ("diff", "low", "high", "p", "p_holm", "verdict")
    return {
        "seeds": len(next(iter(results.values())).seeds),
        "pretrained_accuracy": 100 * float(pretrained_accuracy),
        "methods": _accuracy_rows(results),
        "comparisons": {
            name: {k: getattr(c, k) for k in keep} | {"interval": c.verdict_interval}
            for name, c in comparisons.items()
        },
        "figure2": {key: figure2[key] for key in ("conclusions", "ratios", "closer")},
    }


RESULTS_FILE = REPO / "figures" / "results.json"


def write_results(summary: dict) -> Path:
    """Save ``summary`` as JSON to $DORA_RESULTS if set (the tests' runs), else RESULTS_FILE."""
    path = Path(os.environ.get("DORA_RESULTS") or RESULTS_FILE)
    _write_json(path, summary)
    return path
