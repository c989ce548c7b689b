"""Comparisons of final test accuracies: paired or Welch t-tests, 95 % intervals, Holm's
adjustment, and LoRA interpolated to DoRA's trainable-parameter budget."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from dora_tutorial.training import Runs

LEVEL = 0.95  # confidence level of every interval; tests are two-sided at 1 - LEVEL
POWER = 0.80  # for "the smallest difference these seeds could detect"


@dataclass(frozen=True)
class Comparison:
    """Mean final test accuracy of A minus B, in points, with its 95 % interval and p-value.

    Paired (a t-test on the per-seed differences) when A and B ran with the same seeds, else
    Welch's t-test. ``p_holm`` is set when the comparison is one of a family (Holm)."""

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
    se: float = 0.0  # standard error of ``diff``
    df: float = 1.0  # degrees of freedom of the t-test
    values: tuple = ((), ())  # the per-seed values of A and of B

    @property
    def verdict(self) -> str:
        """'ahead', 'behind' or 'no difference detected' (from the Holm p when there is one)."""
        p = self.p if self.p_holm is None else self.p_holm
        if not p < 1 - LEVEL:
            return "no difference detected"
        return "ahead" if self.diff > 0 else "behind"

    @property
    def verdict_interval(self) -> tuple[float, float]:
        """The interval at the level the verdict is decided at: it reaches zero exactly when
        the verdict's p (Holm-adjusted in a family) reaches 5 %. Alone: the 95 % CI. In a
        family, Holm tests this comparison at 5 % * p / p_holm (5 % / k for the k-th largest p,
        before Holm's running maximum); the interval at 1 minus that level."""
        from scipy import stats

        if self.p_holm is None or not 0 < self.p < 1:
            return self.low, self.high
        alpha = (1 - LEVEL) * self.p / self.p_holm
        q = stats.t.ppf(1 - alpha / 2, self.df)
        return self.diff - q * self.se, self.diff + q * self.se

    def sentence(self) -> str:
        """One sentence from the numbers: the difference, its interval, the test, the verdict;
        when no difference is detected, what the interval the verdict is decided at rules out."""
        numbers = (
            f"95 % CI {self.low:+.2f} to {self.high:+.2f}; {self.test}, {self.n} seeds, "
            f"p {_p(self.p)}"
        )
        level = "95 %"
        if self.p_holm is not None:
            numbers += f", Holm-adjusted over {self.family} p {_p(self.p_holm)}"
            level = f"Holm's level for it ({100 * (1 - (1 - LEVEL) * self.p / self.p_holm):.1f} %)"
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
    """Compare the final test accuracies of two configurations (see ``Comparison``): paired
    when both ran with the same seeds, seed k against seed k."""
    paired = tuple(runs_a.seeds) == tuple(runs_b.seeds)
    return compare_values(name_a, runs_a.final, name_b, runs_b.final, paired=paired)


def compare_values(name_a: str, a, name_b: str, b, paired: bool = True) -> Comparison:
    """``compare`` on per-seed values (a paired t-test on a - b, or Welch's). The comparison
    keeps the values, so that runs on other seed sets can be pooled with it."""
    from scipy import stats  # on Colab; imported here so that importing helpers stays quick

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if min(len(a), len(b)) < 2:
        raise ValueError("a comparison needs at least 2 seeds per configuration")
    if paired:
        if len(a) != len(b):
            raise ValueError(f"a paired comparison needs as many a as b: {len(a)}, {len(b)}")
        d = a - b
        n, test, se, df = len(d), "paired t-test", d.std(ddof=1) / math.sqrt(len(d)), len(d) - 1
    else:
        va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
        n, test, se = min(len(a), len(b)), "Welch t-test", math.sqrt(va + vb)
        df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1)) if se else 1.0
    diff = float(a.mean() - b.mean())
    q = stats.t.ppf(0.5 + LEVEL / 2, df)
    if se > 0:
        p = float(2 * stats.t.sf(abs(diff) / se, df))
    else:  # every seed gave the same difference: no spread to test against
        p = 0.0 if diff else 1.0
    detectable = float((q + stats.t.ppf(POWER, df)) * se)
    return Comparison(
        name_a,
        name_b,
        diff,
        diff - q * se,
        diff + q * se,
        p,
        n,
        test,
        detectable,
        se=se,
        df=df,
        values=(tuple(map(float, a)), tuple(map(float, b))),
    )


def holm(comparisons: list[Comparison]) -> list[Comparison]:
    """The same comparisons with Holm's step-down adjusted p-values (family-wise error 5 %)."""
    m = len(comparisons)
    order = sorted(range(m), key=lambda i: comparisons[i].p)
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * comparisons[i].p))
        adjusted[i] = running
    return [replace(c, p_holm=adjusted[i], family=m) for i, c in enumerate(comparisons)]


def lora_at_budget(lora: dict[int, Runs], dora: Runs) -> Runs:
    """LoRA's final accuracy at DoRA's trainable-parameter count, seed by seed, as a Runs that
    ``compare`` pairs with ``dora``: "DoRA against LoRA at equal budget", beside equal rank.

    ``lora`` is {rank: Runs} (at least two ranks). For each seed, LoRA's final accuracy is
    interpolated linearly in log(trainable parameters) between the two ranks whose counts
    bracket DoRA's (DoRA's magnitudes add one parameter per output row, so its count lies
    between two LoRA ranks); an exact count takes that rank's accuracy. Every LoRA run must
    have DoRA's seeds, in the same order, so seed k stays paired with seed k. Only ``final``
    (and ``seeds``, ``trainable``) of the result mean anything: it has no models or history.
    """
    if len(lora) < 2:
        raise ValueError(f"interpolating needs LoRA at two ranks or more, got {list(lora)}")
    for rank, runs in lora.items():
        if tuple(runs.seeds) != tuple(dora.seeds):
            raise ValueError(
                f"LoRA at rank {rank} ran seeds {tuple(runs.seeds)}, DoRA {tuple(dora.seeds)}: "
                "a paired comparison needs the same seeds in the same order"
            )
    ranks = sorted(lora, key=lambda r: lora[r].trainable)
    counts = np.array([lora[r].trainable for r in ranks], dtype=float)
    if (np.diff(counts) <= 0).any():
        raise ValueError(f"two LoRA ranks have the same trainable count: {counts.tolist()}")
    target = dora.trainable
    if not counts[0] <= target <= counts[-1]:
        raise ValueError(
            f"DoRA's {target:,} trainable parameters lie outside LoRA's range "
            f"({counts[0]:,.0f} to {counts[-1]:,.0f} at ranks {ranks[0]} to {ranks[-1]}): "
            "add a LoRA rank on the other side, interpolation cannot extrapolate"
        )
    final = interpolate_at(
        {r: lora[r].trainable for r in ranks}, {r: lora[r].final for r in ranks}, target
    )
    nothing = np.full((len(final), 1), np.nan)
    return Runs(tuple(dora.seeds), [], target, nothing, final[:, None] / 100, [])


def interpolate_at(counts: dict, accuracy: dict, target: float) -> np.ndarray:
    """Per-seed accuracy at ``target`` trainable parameters, linear in log(count) between the
    two configurations ({key: count}, {key: per-seed array}) whose counts bracket it; an exact
    count takes that configuration's accuracy."""
    keys = sorted(counts, key=counts.get)
    logs = np.log([counts[k] for k in keys])
    if not logs[0] <= np.log(target) <= logs[-1]:
        raise ValueError(f"{target:,} parameters lie outside {counts}: interpolation only")
    hi = int(np.searchsorted(logs, np.log(target)))  # the first count >= target
    if logs[hi] == np.log(target):
        return np.asarray(accuracy[keys[hi]], dtype=float)
    w = (np.log(target) - logs[hi - 1]) / (logs[hi] - logs[hi - 1])
    return (1 - w) * np.asarray(accuracy[keys[hi - 1]]) + w * np.asarray(accuracy[keys[hi]])


def mean_interval(values: np.ndarray) -> tuple[float, float]:
    """The 95 % confidence interval of the mean of ``values`` (t quantile, n - 1 degrees)."""
    from scipy import stats

    if len(values) < 2:
        raise ValueError("an interval needs at least 2 values")
    n, mean = len(values), values.mean()
    half = stats.t.ppf(0.5 + LEVEL / 2, n - 1) * values.std(ddof=1) / math.sqrt(n)
    return mean - half, mean + half
