"""Comparisons of final test accuracies: scipy's paired t-test and interval, Holm's adjustment,
and LoRA interpolated to DoRA's trainable-parameter budget."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from dora_tutorial.training import Runs

LEVEL = 0.95  # confidence level of every interval; tests are two-sided at 1 - LEVEL
POWER = 0.80  # for "the smallest difference these seeds could detect"


@dataclass(frozen=True)
class Comparison:
    """Mean final test accuracy of A minus B, in points, paired by seed; ``p_holm`` is set in a
    family; ``se`` and ``df`` give the interval at any other level."""

    a: str
    b: str
    diff: float
    low: float
    high: float
    p: float
    n: int
    test: str
    detectable: float
    p_holm: float | None = None
    family: int = 1
    se: float = 0.0
    df: float = 1.0
    values: tuple = ((), ())  # the per-seed (or per-network) values of A and of B, paired

    @property
    def verdict(self) -> str:
        """'ahead', 'behind' or 'no difference detected' (from the Holm p when there is one)."""
        p = self.p if self.p_holm is None else self.p_holm
        if not p < 1 - LEVEL:
            return "no difference detected"
        return "ahead" if self.diff > 0 else "behind"

    @property
    def level(self) -> float:
        """The confidence level the verdict is decided at: in a family, Holm tests this comparison
        at 5 % * p / p_holm."""
        if self.p_holm is None or not 0 < self.p < 1:
            return LEVEL
        return 1 - (1 - LEVEL) * self.p / self.p_holm

    @property
    def verdict_interval(self) -> tuple[float, float]:
        """The interval at ``level``: it excludes zero exactly when there is a verdict."""
        from scipy import stats

        if self.level == LEVEL:
            return self.low, self.high
        half = stats.t.ppf(0.5 + self.level / 2, self.df) * self.se
        return self.diff - half, self.diff + half

    def sentence(self) -> str:
        """The difference, its interval, test and verdict; with no verdict, what is ruled out."""
        numbers = (
            f"95 % CI {self.low:+.2f} to {self.high:+.2f}; {self.test}, {self.n} seeds, "
            f"p {_p(self.p)}"
        )
        level = "95 %"
        if self.p_holm is not None:
            numbers += f", Holm-adjusted over {self.family} p {_p(self.p_holm)}"
            level = f"Holm's level for it ({100 * self.level:.1f} %)"
        if self.verdict == "no difference detected":
            low, high = self.verdict_interval
            return (
                f"{self.a} - {self.b} = {self.diff:+.2f} points ({numbers}): no difference "
                f"detected; {self.a} ahead by more than {max(high, 0):.2f} or behind by more "
                f"than {max(-low, 0):.2f} points is ruled out at {level}."
            )
        side = "ahead of" if self.verdict == "ahead" else "behind"
        return f"{self.a} is {side} {self.b} by {abs(self.diff):.2f} points ({numbers})."


def _p(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"= {p:.3f}"


def compare(name_a: str, runs_a: Runs, name_b: str, runs_b: Runs) -> Comparison:
    """Compare the final test accuracies of two configurations that ran the same seeds."""
    _same_seeds(name_a, runs_a, name_b, runs_b)
    return compare_values(name_a, runs_a.final, name_b, runs_b.final)


def _same_seeds(name_a: str, runs_a: Runs, name_b: str, runs_b: Runs) -> None:
    if tuple(runs_a.seeds) != tuple(runs_b.seeds):
        raise ValueError(
            f"{name_a} ran seeds {tuple(runs_a.seeds)}, {name_b} {tuple(runs_b.seeds)}: "
            "a paired comparison needs the same seeds in the same order"
        )


def compare_values(name_a: str, a, name_b: str, b) -> Comparison:
    """``compare`` on per-seed values, seed k of A against seed k of B."""
    from scipy import stats  # imported here so that importing helpers stays quick

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"a paired comparison needs at least 2 seeds, as many A as B: {a}, {b}")
    diff, se, df = float(a.mean() - b.mean()), float(stats.sem(a - b)), len(a) - 1
    low, high = map(float, mean_interval(a - b))  # the paired t-interval
    # every seed gave the same difference: no spread to test against
    p = float(stats.ttest_rel(a, b).pvalue) if se > 0 else (0.0 if diff else 1.0)
    detectable = float((stats.t.ppf(0.5 + LEVEL / 2, df) + stats.t.ppf(POWER, df)) * se)
    n, test, pairs = len(a), "paired t-test", (tuple(map(float, a)), tuple(map(float, b)))
    return Comparison(
        name_a, name_b, diff, low, high, p, n, test, detectable, se=se, df=df, values=pairs
    )


def holm(comparisons: list[Comparison]) -> list[Comparison]:
    """The comparisons with Holm's adjusted p-values: the k-th smallest p times (m - k + 1),
    then a running maximum so that the order is kept."""
    m, adjusted, running = len(comparisons), {}, 0.0
    for k, i in enumerate(sorted(range(m), key=lambda i: comparisons[i].p)):
        running = max(running, min(1.0, (m - k) * comparisons[i].p))
        adjusted[i] = running
    return [replace(c, p_holm=adjusted[i], family=m) for i, c in enumerate(comparisons)]


def lora_at_budget(lora: dict[int, Runs], dora: Runs) -> Runs:
    """LoRA's ({rank: Runs}) final accuracy at DoRA's trainable-parameter count, seed by seed,
    as a Runs that ``compare`` pairs with ``dora``; only its ``final`` means anything."""
    for rank, runs in lora.items():
        _same_seeds(f"LoRA at rank {rank}", runs, "DoRA", dora)
    counts = {r: runs.trainable for r, runs in lora.items()}
    final = interpolate_at(counts, {r: runs.final for r, runs in lora.items()}, dora.trainable)
    nothing = np.full((len(final), 1), np.nan)
    return Runs(tuple(dora.seeds), [], dora.trainable, nothing, final[:, None] / 100, [])


def interpolate_at(counts: dict, accuracy: dict, target: float) -> np.ndarray:
    """Per-seed accuracy ({key: per-seed array}) at ``target`` trainable parameters ({key:
    count}), linear in log(count) between the two counts that bracket it."""
    keys = sorted(counts, key=counts.get)
    logs = np.log([counts[k] for k in keys])
    if (np.diff(logs) == 0).any():
        raise ValueError(f"two configurations have the same trainable count: {counts}")
    if not logs[0] <= np.log(target) <= logs[-1]:
        raise ValueError(
            f"{target:,} trainable parameters lie outside the range of {counts}: "
            "interpolation cannot extrapolate"
        )
    per_seed = np.array([accuracy[k] for k in keys], dtype=float).T
    return np.array([np.interp(np.log(target), logs, seed) for seed in per_seed])


def mean_interval(values) -> tuple[float, float]:
    """The 95 % confidence interval of the mean of ``values``."""
    from scipy import stats

    if len(values) < 2:
        raise ValueError("an interval needs at least 2 values")
    mean, se = float(np.mean(values)), float(stats.sem(values))
    if se == 0:  # every value the same: scipy's interval would be NaN
        return mean, mean
    return stats.t.interval(LEVEL, len(values) - 1, mean, se)
