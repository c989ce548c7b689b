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
    """Part I's conclusions in five sentences computed from the run. ``rates`` ({method:
    learning rate}): when the method ahead before the last epoch trains at the larger rate, the
    sentence on the earlier epochs says so."""
    ft, lora, dora = (runs[name] for name in ("full FT", "LoRA", "DoRA"))
    n, extra = len(dora.seeds), dora.trainable - lora.trainable
    vs_lora, vs_ft = compare("DoRA", dora, "LoRA", lora), compare("full FT", ft, "DoRA", dora)
    interval = f"95 % CI {vs_lora.low:+.2f} to {vs_lora.high:+.2f}"
    side = "ahead of" if vs_lora.verdict == "ahead" else "behind"
    said = [
        f"On the rotated digits, where the pretrained network gets {100 * pretrained_accuracy:.1f}"
        f" %, full fine-tuning reaches {ft.final.mean():.1f} %, LoRA {lora.final.mean():.1f} % "
        f"and DoRA {dora.final.mean():.1f} % (means of {n} seeds).",
        f"After the last epoch, at rank {rank}, {n} paired seeds cannot tell DoRA from LoRA: "
        f"DoRA - LoRA = {vs_lora.diff:+.2f} points ({interval}): differences beyond these bounds "
        "are ruled out, ones inside them are not."
        if vs_lora.verdict == "no difference detected"
        else f"At rank {rank} DoRA is {side} LoRA by {abs(vs_lora.diff):.2f} "
        f"points ({interval}, paired over {n} seeds).",
    ]
    if dora.test_acc.shape[1] > 1:
        said.append(_before_the_end(dora, lora, rates))
    return said + [
        f"Full fine-tuning, which trains {ft.trainable / dora.trainable:.1f} times as many "
        f"numbers as DoRA, is {'ahead of' if vs_ft.verdict == 'ahead' else 'not ahead of'} it: "
        f"{vs_ft.diff:+.2f} points (95 % CI {vs_ft.low:+.2f} to {vs_ft.high:+.2f}).",
        f"DoRA's magnitudes add {extra:,} trainable numbers to LoRA's {lora.trainable:,} "
        f"({extra / lora.trainable:.0%}), one per output row; whether they buy more at a lower "
        "rank or at an equal budget, one rank cannot say: Part II measures it.",
    ]


def _before_the_end(dora: Runs, lora: Runs, rates: dict | None) -> str:
    """DoRA - LoRA after each epoch before the last, Holm-adjusted as one family, the epochs
    grouped by verdict; an early lead of the method at the larger rate may be a faster start."""
    earlier = range(dora.test_acc.shape[1] - 1)
    family = holm(
        [
            compare_values("DoRA", 100 * dora.test_acc[:, e], "LoRA", 100 * lora.test_acc[:, e])
            for e in earlier
        ]
    )
    groups = {}
    for epoch, c in enumerate(family, 1):
        groups.setdefault(c.verdict, []).append((str(epoch), f"{c.diff:+.2f}"))
    parts = []
    for verdict, members in groups.items():
        epochs, diffs = zip(*members, strict=True)
        when = (
            f"epoch {epochs[0]}"
            if len(epochs) == 1
            else "epochs " + " and ".join([", ".join(epochs[:-1]), epochs[-1]])
        )
        if verdict == "no difference detected":
            parts.append(f"{verdict} after {when}")
            continue
        parts.append(f"DoRA {verdict} after {when} ({', '.join(diffs)} points)")
        leader, other = ("DoRA", "LoRA") if verdict == "ahead" else ("LoRA", "DoRA")
        if rates is not None and rates[leader] > rates[other]:
            parts[-1] += (
                f", with {leader} at the larger learning rate ({rates[leader]:g} against "
                f"{rates[other]:g}, each chosen on the validation set): possibly just a "
                "faster start"
            )
    over = "epoch 1" if len(earlier) == 1 else f"epochs 1-{len(earlier)}"
    return (
        f"Before the last epoch ({over}, paired, Holm-adjusted together): "
        f"{'; '.join(parts)}; the right panel of the fine-tuning figure shows every epoch."
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
    """Method | trainable | final test accuracy: mean ± std, 95 % CI of the mean | s / epoch
    (``timing=False``: without the time per epoch)."""
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
