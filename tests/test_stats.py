"""The verdicts the notebook prints (dora_tutorial/stats.py): error rates, power, intervals.

Simulated experiments with a known truth. Under the null hypothesis (both configurations from
one distribution) a verdict other than "no difference detected" is a false positive: its rate
must be at most 5 % within sampling error, for the paired test, for Welch's test, and for a
Holm-corrected family of five. A real shift must be detected.
"""

import math

import numpy as np
import pytest

import helpers

TRIALS = 4000
SLACK = 3 * math.sqrt(0.05 * 0.95 / TRIALS)  # three standard errors of a 5 % rate


def runs(accuracies, seeds=None):
    """A helpers.Runs holding only final accuracies (in percent)."""
    acc = np.asarray(accuracies, dtype=float)
    seeds = tuple(range(len(acc))) if seeds is None else tuple(seeds)
    return helpers.Runs(seeds, [], 0, np.zeros((len(acc), 1)), acc[:, None] / 100, [0.0])


def paired_pair(rng, n=10, shift=0.0, seed_sd=0.6, noise_sd=0.4):
    """Two arms sharing a per-seed effect (same init, same batches), as in the notebook."""
    seed_effect = rng.normal(90, seed_sd, n)
    a = seed_effect + rng.normal(0, noise_sd, n) + shift
    b = seed_effect + rng.normal(0, noise_sd, n)
    return runs(a), runs(b)


def compare_pair(a, b):
    return helpers.compare("A", a, "B", b)


def test_paired_false_positive_rate_is_at_most_five_percent():
    rng = np.random.default_rng(0)
    verdicts = [compare_pair(*paired_pair(rng)).verdict for _ in range(TRIALS)]
    rate = np.mean([v != "no difference detected" for v in verdicts])
    assert rate <= 0.05 + SLACK, rate


def test_welch_false_positive_rate_with_unequal_spreads():
    rng = np.random.default_rng(1)
    false = 0
    for _ in range(TRIALS):
        a = runs(rng.normal(90, 1.5, 10), seeds=range(10))
        b = runs(rng.normal(90, 0.5, 10), seeds=range(10, 20))  # other seeds: not paired
        comparison = helpers.compare("A", a, "B", b)
        assert comparison.test == "Welch t-test"
        false += comparison.verdict != "no difference detected"
    assert false / TRIALS <= 0.05 + SLACK


def test_holm_keeps_the_family_wise_rate_of_a_five_rank_sweep():
    rng = np.random.default_rng(2)
    any_false = 0
    for _ in range(TRIALS // 2):
        family = helpers.holm([compare_pair(*paired_pair(rng)) for _ in range(5)])
        any_false += any(c.verdict != "no difference detected" for c in family)
    assert any_false / (TRIALS // 2) <= 0.05 + SLACK
    unadjusted = sum(
        any(compare_pair(*paired_pair(rng)).p < 0.05 for _ in range(5)) for _ in range(TRIALS // 4)
    )
    assert unadjusted / (TRIALS // 4) > 0.15  # without the correction: about 23 %


def test_a_real_shift_is_detected_and_the_interval_covers_it():
    rng = np.random.default_rng(3)
    found, covered = 0, 0
    for _ in range(1000):
        comparison = compare_pair(*paired_pair(rng, shift=0.8))
        found += comparison.verdict == "ahead"
        covered += comparison.low <= 0.8 <= comparison.high
    assert found / 1000 > 0.9  # differences have sd 0.57: 10 seeds detect 0.8 nearly always
    assert abs(covered / 1000 - 0.95) < 0.025


def test_detectable_difference_is_about_the_eighty_percent_power_point():
    rng = np.random.default_rng(4)
    se = math.sqrt(2) * 0.4 / math.sqrt(10)  # sd of a per-seed difference, over sqrt(n)
    detectable = np.mean([compare_pair(*paired_pair(rng)).detectable for _ in range(500)])
    assert detectable == pytest.approx((2.262 + 0.883) * se, rel=0.1)  # t quantiles, 9 df
    hits = [
        compare_pair(*paired_pair(rng, shift=detectable)).verdict == "ahead" for _ in range(1000)
    ]
    assert 0.72 < np.mean(hits) < 0.88


def test_paired_only_when_the_seeds_match():
    a, b = runs([90, 91, 92]), runs([89, 90.5, 91])
    assert helpers.compare("A", a, "B", b).test == "paired t-test"
    assert helpers.compare("A", a, "B", runs([89, 90.5, 91], seeds=(5, 6, 7))).test == (
        "Welch t-test"
    )
    with pytest.raises(ValueError, match="at least 2 seeds"):
        helpers.compare("A", runs([90]), "B", runs([91]))


def test_degenerate_spreads_give_no_nan():
    same = helpers.compare("A", runs([90, 90, 90]), "B", runs([90, 90, 90]))
    assert same.p == 1.0 and same.verdict == "no difference detected" and same.low == same.high
    shifted = helpers.compare("A", runs([91, 92, 93]), "B", runs([90, 91, 92]))
    assert shifted.verdict == "ahead" and shifted.diff == pytest.approx(1.0)


def test_holm_adjusts_in_step_down_order():
    ps = [0.01, 0.04, 0.03, 0.5]
    family = [helpers.Comparison("A", "B", 1.0, 0.1, 2.0, p, 10, "paired t-test", 0.5) for p in ps]
    adjusted = [c.p_holm for c in helpers.holm(family)]
    assert adjusted == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert [c.verdict for c in helpers.holm(family)] == [
        "ahead",
        "no difference detected",
        "no difference detected",
        "no difference detected",
    ]


def test_sentences_follow_the_interval():
    ahead = helpers.compare("DoRA", runs([91, 92, 93.1]), "LoRA", runs([90, 91, 92]))
    assert ahead.sentence().startswith("DoRA is ahead of LoRA by 1.03 points (95 % CI +")
    assert "paired t-test, 3 seeds" in ahead.sentence()
    behind = helpers.compare("LoRA", runs([90, 91, 92]), "DoRA", runs([91, 92, 93.1]))
    assert behind.sentence().startswith("LoRA is behind DoRA by 1.03 points")
    unclear = helpers.compare("DoRA", runs([91, 90.2, 92.6]), "LoRA", runs([90.5, 91, 92]))
    text = unclear.sentence()
    assert unclear.low < 0 < unclear.high and "no difference detected" in text
    ahead_by, behind_by = unclear.high, -unclear.low  # what the interval rules out
    assert f"ahead by more than {ahead_by:.2f} or behind by more than {behind_by:.2f}" in text
    null = helpers.compare("A", runs([90, 91, 92]), "B", runs([90.1, 90.9, 92.0]))  # p = 1
    family = helpers.holm([unclear, null])[0]  # the smaller p of two: tested at 5 % / 2
    low, high = family.verdict_interval
    assert low < unclear.low and high > unclear.high
    assert f"ahead by more than {high:.2f} or behind by more than {-low:.2f}" in family.sentence()


def test_results_table_and_wrapping():
    table = helpers.results_table({"LoRA": runs([90, 92, 94])}).splitlines()
    assert table[0].split()[:4] == ["method", "trainable", "test", "accuracy"]
    assert table[1].split()[:5] == ["LoRA", "0", "92.00", "±", "2.00"]
    assert table[1].split()[5] == "87.03-96.97"  # 92 ± t(0.975, 2) * 2 / sqrt(3)
    long = "word " * 60
    assert all(len(line) <= helpers.WIDTH for line in helpers.wrap(long, "  ").splitlines())


def _per_epoch(epochs, trainable=1000):
    """Runs of ten seeds whose test accuracy after each epoch is ``epochs[e]`` (percent)."""
    acc = np.stack(epochs, 1) / 100
    return helpers.Runs(tuple(range(10)), [], trainable, np.zeros_like(acc), acc, [0.0])


def test_what_we_learned_says_what_the_numbers_say():
    """Part I's plain-words conclusions follow the per-seed numbers, in five sentences: a
    clear early lead of DoRA is reported as one (the epochs before the last Holm-adjusted
    together), an end-point tie as a tie with its 95 % bounds, and the extra parameters are
    DoRA's minus LoRA's."""
    rng = np.random.default_rng(0)
    base = rng.normal(90, 0.5, 10)
    lora = _per_epoch([base - 5, base - 1, base], 1000)
    noise = [rng.normal(0, s, 10) for s in (0.1, 2.0, 0.1)]
    dora = _per_epoch([base - 3 + noise[0], base - 1 + noise[1], base + noise[2]], 1100)
    ft = _per_epoch([base, base, base + 3], 20000)
    said = helpers.what_we_learned({"full FT": ft, "LoRA": lora, "DoRA": dora}, 0.4, 4)
    assert len(said) == 5
    tie, early = said[1], said[2]
    assert "cannot tell DoRA from LoRA" in tie and "beyond these bounds are ruled out" in tie
    assert "epochs 1-2, paired, Holm-adjusted together" in early
    assert (
        "DoRA ahead after epoch 1 (+" in early and "no difference detected after epoch 2" in early
    )
    diff = float(early.split("epoch 1 (")[1].split(" points")[0])
    assert abs(diff - 2) < 0.2
    assert "18.2 times as many" in said[3]  # 20,000 / 1,100
    assert "100 trainable numbers to LoRA's 1,000 (10%)" in said[4]
    lora_ahead = _per_epoch([base + 1, base + 1, base + 1], 1000)
    early = helpers.what_we_learned({"full FT": ft, "LoRA": lora_ahead, "DoRA": dora}, 0.4, 4)[2]
    assert "DoRA behind after epochs 1 and 2" in early


def test_what_we_learned_adjusts_the_early_epochs_for_their_number():
    """A lead seen at one of three earlier epochs with unadjusted p = 0.03 is not reported as
    a lead: Holm over the three epochs multiplies the smallest p by 3."""
    rng = np.random.default_rng(1)
    d = rng.normal(0, 1, 10)
    d = (d - d.mean()) / d.std(ddof=1)  # mean 0, sd 1: the shift below sets t exactly
    from scipy import stats

    shift = stats.t.ppf(1 - 0.03 / 2, 9) / np.sqrt(10)  # two-sided p = 0.03
    base = rng.normal(90, 0.5, 10)
    lora = _per_epoch([base, base, base, base])
    far = rng.normal(0, 1, 10)
    dora = _per_epoch([base + d + shift, base + far, base + rng.normal(0, 1, 10), base + far])
    early = helpers.what_we_learned({"full FT": lora, "LoRA": lora, "DoRA": dora}, 0.4, 4)[2]
    alone = helpers.compare_values(
        "DoRA", 100 * dora.test_acc[:, 0], "LoRA", 100 * lora.test_acc[:, 0]
    )
    assert abs(alone.p - 0.03) < 1e-9 and alone.verdict == "ahead"
    assert "ahead" not in early and "no difference detected after epoch" in early


def test_what_we_learned_says_when_an_early_lead_comes_with_the_larger_rate():
    """An early lead of the method trained at the larger learning rate may be a faster start:
    the sentence says which rates, and says nothing when the rates are equal or the method
    behind has the larger one."""
    rng = np.random.default_rng(0)
    base = rng.normal(90, 0.5, 10)
    lora = _per_epoch([base - 5, base - 1, base], 1000)
    dora = _per_epoch([base - 3 + rng.normal(0, 0.1, 10), base - 1, base], 1100)
    runs = {"full FT": lora, "LoRA": lora, "DoRA": dora}

    def early(rates):
        return helpers.what_we_learned(runs, 0.4, 4, rates)[2]

    faster = early({"full FT": 1e-3, "LoRA": 5e-3, "DoRA": 1e-2})
    assert "DoRA ahead after epoch 1 (+" in faster
    assert "with DoRA at the larger learning rate (0.01 against 0.005" in faster
    for rates in (None, {"LoRA": 5e-3, "DoRA": 5e-3}, {"LoRA": 1e-2, "DoRA": 5e-3}):
        assert "learning rate" not in early(rates) and "DoRA ahead after epoch 1" in early(rates)


# ---- the verdict rule: a difference exactly when the adjusted interval excludes zero ---------


def test_the_verdict_interval_excludes_zero_exactly_when_the_verdict_is_a_difference():
    rng = np.random.default_rng(7)
    for _ in range(200):
        m = int(rng.integers(1, 6))
        family = [
            helpers.compare_values(
                "A", rng.normal(rng.normal(0, 0.6), 1, 10), "B", rng.normal(0, 1, 10)
            )
            for _ in range(m)
        ]
        family = helpers.holm(family) if m > 1 else family
        for c in family:
            low, high = c.verdict_interval
            assert (c.verdict != "no difference detected") == (low > 0 or high < 0), c
    alone = helpers.compare_values("A", [1.0, 2.0, 4.0], "B", [0.0, 0.5, 1.0])
    assert alone.verdict_interval == (alone.low, alone.high)
