"""The pooled analysis of experiments/evidence.json, one Holm family: on each pretrained network
the configurations are paired by seed; a comparison's estimate is the mean of the networks' mean
paired differences, t-tested over networks, so that its interval covers pretraining, not only
the seeds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dora_tutorial.stats import Comparison, compare_values, holm, interpolate_at

EVIDENCE = Path(__file__).resolve().parents[1] / "experiments" / "evidence.json"


def load(path: Path = EVIDENCE) -> dict:
    return json.loads(Path(path).read_text())


def differences(evidence: dict, network: dict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The family's comparisons on one network: {name: (per-seed A, per-seed B)}."""
    ranks, counts = evidence["protocol"]["RANKS"], evidence["trainable"]
    lora = {r: network[f"LoRA r{r}"] for r in ranks}
    lora_counts = {r: counts[f"LoRA r{r}"] for r in ranks}
    out = {}
    for r in ranks:
        out[f"DoRA - LoRA, rank {r}"] = (network[f"DoRA r{r}"], lora[r])
    for r in ranks:
        if counts[f"DoRA r{r}"] <= max(lora_counts.values()):
            budget = interpolate_at(lora_counts, lora, counts[f"DoRA r{r}"])
            out[f"DoRA - LoRA, equal budget, rank {r}"] = (network[f"DoRA r{r}"], budget)
    rank = evidence["protocol"]["RANK"]
    out[f"full FT - DoRA, rank {rank}"] = (network["full FT"], network[f"DoRA r{rank}"])
    for key in sorted(k for k in network if k.startswith("scaled LoRA")):
        r = int(key.rsplit("r", 1)[1])
        out[f"scaled LoRA - LoRA, rank {r}"] = (network[key], lora[r])
        out[f"DoRA - scaled LoRA, rank {r}"] = (network[f"DoRA r{r}"], network[key])
    return {name: (np.asarray(a, float), np.asarray(b, float)) for name, (a, b) in out.items()}


def pooled(evidence: dict) -> dict[str, Comparison]:
    """Every comparison over the analysed networks (not the held-out last one), Holm-adjusted
    as one family. ``n`` of each comparison counts networks."""
    analysed = [differences(evidence, net) for net in evidence["accuracy"][: evidence["networks"]]]
    found = []
    for name in analysed[0]:
        a, b = ([net[name][i].mean() for net in analysed] for i in (0, 1))
        found.append(_compare(name, a, b))
    return dict(zip(analysed[0], holm(found), strict=True))


def held_out(evidence: dict) -> dict[str, Comparison]:
    """The same comparisons on the held-out network alone, paired by seed, each at 95 %."""
    net = differences(evidence, evidence["accuracy"][evidence["networks"]])
    return {name: _compare(name, a, b) for name, (a, b) in net.items()}


def _compare(name: str, a, b) -> Comparison:
    first, second = name.split(",")[0].split(" - ")
    return compare_values(first, a, second, b)


def float_noise(evidence: dict) -> tuple[float, float]:
    """(how far float rounding alone moved one seed's accuracy, a new seed's spread), in points:
    the two kernel choices' runs of the same seeds differ by sqrt 2 times the former."""
    runs = np.asarray(evidence["float_noise"]["accuracy"], dtype=float)
    return float((runs[0] - runs[1]).std(ddof=1) / np.sqrt(2)), float(runs[0].std(ddof=1))


def table(found: dict[str, Comparison], extra: dict[str, str] | None = None, head: str = "") -> str:
    """The estimate, and the interval and p its verdict is decided at; ``extra``: a column."""
    width = max(map(len, found)) + 1
    rows = [
        f"{'comparison':<{width}}{'diff':>6}  {'interval':<12}  {'p':>6}  {'verdict':<13}{head}"
    ]
    for name, c in found.items():
        (low, high), p = c.verdict_interval, c.p if c.p_holm is None else c.p_holm
        p = "<0.001" if p < 0.001 else f"{p:.3f}"
        row = f"{name:<{width}}{c.diff:>+6.2f}  {low:+.2f}, {high:+.2f}  {p:>6}  "
        rows.append(row + f"{short(c.verdict):<13}{(extra or {}).get(name, '')}")
    return "\n".join(row.rstrip() for row in rows)


def short(verdict: str) -> str:
    return "not detected" if verdict == "no difference detected" else verdict


def finding(c: Comparison, what: str) -> str:
    """A result when the adjusted interval excludes zero, else the margins it rules out."""
    low, high = c.verdict_interval
    if c.verdict == "no difference detected":
        return (
            f"{what}: no difference detected ({c.diff:+.2f} points; differences outside "
            f"{low:+.2f} to {high:+.2f} are ruled out)."
        )
    side = "ahead of" if c.verdict == "ahead" else "behind"
    return f"{what}: {c.a} {side} {c.b} by {abs(c.diff):.2f} points ({low:+.2f} to {high:+.2f})."


def findings(found: dict[str, Comparison]) -> list[str]:
    """Low rank, moderate rank, equal budget, full fine-tuning: one sentence each."""
    rank = max(int(k.rsplit(" ", 1)[1]) for k in found if k.startswith("full FT"))
    return [
        finding(found["DoRA - LoRA, rank 1"], "At rank 1, each method at its own tuned rate"),
        finding(found[f"DoRA - LoRA, rank {rank}"], f"At rank {rank}"),
        finding(found["DoRA - LoRA, equal budget, rank 1"], "At DoRA's parameter count, rank 1"),
        finding(
            found[f"full FT - DoRA, rank {rank}"], f"Full fine-tuning against DoRA at rank {rank}"
        ),
    ]


def ablation_line(found: dict[str, Comparison], ranks) -> str:
    """Rank by rank: does the per-row scale help over LoRA, the normalisation over the scale?"""
    parts = []
    for r in ranks:
        scale, norm = found[f"scaled LoRA - LoRA, rank {r}"], found[f"DoRA - scaled LoRA, rank {r}"]
        parts.append(
            f"at rank {r}, the per-row scale against LoRA: {scale.verdict} ({scale.diff:+.2f}); "
            f"the normalisation against the scale alone: {norm.verdict} ({norm.diff:+.2f})"
        )
    return "Pooled over the networks, " + "; ".join(parts) + "."


def disagreements(ten_seeds: dict[str, Comparison], found: dict[str, Comparison]) -> str:
    """Where this run's ten-seed verdicts differ from the pooled ones."""
    differ = [k for k, c in ten_seeds.items() if c.verdict != found[k].verdict]
    if not differ:
        return "each ten-seed verdict is also the pooled one."
    said = "; ".join(f"{k}: {ten_seeds[k].verdict} here, {found[k].verdict} pooled" for k in differ)
    return f"the ten seeds and the pooled analysis differ at {said}."


def rate_table(rates: dict[str, float], ranks) -> str:
    """The chosen learning rates: one row per method, one column per rank."""
    methods = dict.fromkeys(k.rsplit(" r", 1)[0] for k in rates if k != "full FT")  # in order
    lines = [f"{'chosen rate':<13}" + "".join(f"{'rank ' + str(r):>9}" for r in ranks)]
    for m in methods:
        cells = "".join(
            f"{rates[f'{m} r{r}']:>9g}" if f"{m} r{r}" in rates else f"{'-':>9}" for r in ranks
        )
        lines.append(f"{m:<13}{cells}")
    return "\n".join(lines) + f"\n(full FT: {rates['full FT']:g})"
