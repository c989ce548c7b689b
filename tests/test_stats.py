"""The verdicts the notebook prints (dora_tutorial/stats.py, summary.py): scipy's paired test
wired to the right degrees of freedom and standard error, the verdict decided at the interval
that excludes zero, and Part I's conclusions following the numbers."""

import numpy as np
import pytest
from scipy import stats

import helpers
from dora_tutorial.runtime import WIDTH
from dora_tutorial.stats import mean_interval


def runs(accuracies, seeds=None):
    """A helpers.Runs holding only final accuracies (in percent)."""
    acc = np.asarray(accuracies, dtype=float)
    seeds = tuple(range(len(acc))) if seeds is None else tuple(seeds)
    return helpers.Runs(seeds, [], 0, np.zeros((len(acc), 1)), acc[:, None] / 100, [0.0])


def test_interval_and_detectable_difference_follow_the_t_tables():
    d = np.array([0.9, -0.4, 1.6, 0.2, 1.1, 2.3, -0.8, 0.7, 1.4, 0.5])  # 10 paired differences
    se = d.std(ddof=1) / np.sqrt(10)
    c = helpers.compare_values("A", 90 + d, "B", np.full(10, 90.0))
    assert (c.n, c.df, c.test) == (10, 9, "paired t-test") and c.se == pytest.approx(se)
    t975, t80 = 2.2621572, 0.8834039  # t quantiles at 9 degrees of freedom, from the tables
    assert (c.low, c.high) == pytest.approx((d.mean() - t975 * se, d.mean() + t975 * se))
    assert c.detectable == pytest.approx((t975 + t80) * se)  # detected with 80 % power


def test_bad_input_is_an_error():
    with pytest.raises(ValueError, match="same seeds"):
        helpers.compare("A", runs([90, 91]), "B", runs([89, 90], seeds=(5, 6)))
    with pytest.raises(ValueError, match="at least 2 seeds"):
        helpers.compare("A", runs([90]), "B", runs([91]))


def test_degenerate_spreads_give_no_nan():
    same = helpers.compare("A", runs([90, 90, 90]), "B", runs([90, 90, 90]))
    assert same.p == 1.0 and same.verdict == "no difference detected" and same.low == same.high
    shifted = helpers.compare("A", runs([91, 92, 93]), "B", runs([90, 91, 92]))
    assert shifted.verdict == "ahead" and shifted.diff == pytest.approx(1.0)
    assert helpers.holm([shifted, same])[0].sentence().startswith("A is ahead of B by 1.00")


def test_sentences_follow_the_interval():
    ahead = helpers.compare("DoRA", runs([91, 92, 93.1]), "LoRA", runs([90, 91, 92]))
    assert ahead.sentence().startswith("DoRA is ahead of LoRA by 1.03 points (95 % CI +")
    assert "paired t-test, 3 seeds" in ahead.sentence()
    behind = helpers.compare("LoRA", runs([90, 91, 92]), "DoRA", runs([91, 92, 93.1]))
    assert behind.sentence().startswith("LoRA is behind DoRA by 1.03 points")
    unclear = helpers.compare("DoRA", runs([91, 90.2, 92.6]), "LoRA", runs([90.5, 91, 92]))
    assert unclear.low < 0 < unclear.high
    ruled_out = f"ahead by more than {unclear.high:.2f} or behind by more than {-unclear.low:.2f}"
    assert "no difference detected" in unclear.sentence() and ruled_out in unclear.sentence()
    null = helpers.compare("A", runs([90, 91, 92]), "B", runs([90.1, 90.9, 92.0]))  # p = 1
    family = helpers.holm([unclear, null])[0]  # the smaller p of two: tested at 5 % / 2
    low, high = family.verdict_interval
    assert low < unclear.low and high > unclear.high
    assert f"ahead by more than {high:.2f} or behind by more than {-low:.2f}" in family.sentence()


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
        for c in helpers.holm(family) if m > 1 else family:
            low, high = c.verdict_interval
            assert (c.verdict != "no difference detected") == (low > 0 or high < 0), c
    alone = helpers.compare_values("A", [1.0, 2.0, 4.0], "B", [0.0, 0.5, 1.0])
    assert alone.verdict_interval == (alone.low, alone.high)


def test_results_table_and_wrapping():
    table = helpers.results_table({"LoRA": runs([90, 92, 94])}).splitlines()
    assert table[0].split()[:4] == ["method", "trainable", "test", "accuracy"]
    assert table[1].split()[:6] == ["LoRA", "0", "92.00", "±", "2.00", "87.03-96.97"]
    # 87.03-96.97: 92 ± t(0.975, 2 degrees) * 2 / sqrt(3)
    assert all(len(line) <= WIDTH for line in helpers.wrap("word " * 60).splitlines())


def test_mean_interval_of_ten_values_follows_the_t_table():
    # 4.5 ± t(0.975, 9 degrees) 2.2622 * sd 3.0277 / sqrt(10)
    assert mean_interval(np.arange(10.0)) == pytest.approx((2.3341, 6.6659), abs=1e-4)


def _per_epoch(epochs, trainable=1000):
    """Runs of ten seeds whose test accuracy after each epoch is ``epochs[e]`` (percent)."""
    acc = np.stack(epochs, 1) / 100
    return helpers.Runs(tuple(range(10)), [], trainable, np.zeros_like(acc), acc, [0.0])


def part_one():
    """Ten seeds, three epochs: DoRA ahead of LoRA after epoch 1 by about 2 points, unclear after
    epoch 2, tied at the end; full FT ahead."""
    rng = np.random.default_rng(0)
    base = rng.normal(90, 0.5, 10)
    noise = [rng.normal(0, s, 10) for s in (0.1, 2.0, 0.1)]
    return {
        "full FT": _per_epoch([base, base, base + 3], 20000),
        "LoRA": _per_epoch([base - 5, base - 1, base], 1000),
        "DoRA": _per_epoch([base - 3 + noise[0], base - 1 + noise[1], base + noise[2]], 1100),
    }


def test_what_we_learned_says_what_the_numbers_say():
    """The early lead is reported as one (the epochs before the last Holm-adjusted together),
    the end-point tie as a tie, the extra parameters as DoRA's minus LoRA's."""
    runs = part_one()
    said = helpers.what_we_learned(runs, 0.4, 4)
    assert len(said) == 5
    assert said[1].startswith("After the last epoch, at rank 4: DoRA - LoRA = +0.01 points")
    assert "Holm-adjusted over 2 epochs): after epoch 1: +1.95, DoRA ahead;" in said[2]
    assert "after epoch 2: +0.00, no difference detected" in said[2]
    assert "18.2 times as many" in said[3]  # 20,000 / 1,100
    assert "100 trainable numbers to LoRA's 1,000 (10%)" in said[4]
    base = runs["full FT"].test_acc[:, 0] * 100
    runs["LoRA"] = _per_epoch([base + 1, base + 1, base + 1], 1000)
    early = helpers.what_we_learned(runs, 0.4, 4)[2]
    assert "epoch 1: -4.05, DoRA behind; after epoch 2: -2.00, DoRA behind;" in early


def test_what_we_learned_adjusts_the_early_epochs_for_their_number():
    """A lead at one of three earlier epochs with unadjusted p = 0.03 is not reported as a
    lead: Holm over the three epochs multiplies the smallest p by 3."""
    rng = np.random.default_rng(1)
    d = rng.normal(0, 1, 10)
    d = (d - d.mean()) / d.std(ddof=1)  # mean 0, sd 1: the shift below sets t exactly
    shift = stats.t.ppf(1 - 0.03 / 2, 9) / np.sqrt(10)  # two-sided p = 0.03
    base = rng.normal(90, 0.5, 10)
    lora = _per_epoch([base, base, base, base])
    far = rng.normal(0, 1, 10)
    dora = _per_epoch([base + d + shift, base + far, base + rng.normal(0, 1, 10), base + far])
    early = helpers.what_we_learned({"full FT": lora, "LoRA": lora, "DoRA": dora}, 0.4, 4)[2]
    alone = helpers.compare_values("A", 100 * dora.test_acc[:, 0], "B", 100 * lora.test_acc[:, 0])
    assert alone.p == pytest.approx(0.03) and alone.verdict == "ahead"
    assert "ahead" not in early and "after epoch 1: +0.81, no difference detected" in early


@pytest.mark.parametrize(
    ("rates", "said"),
    [
        (
            {"LoRA": 5e-3, "DoRA": 1e-2},
            "DoRA trains at the larger learning rate (0.01 against 0.005",
        ),
        (None, ""),
        ({"LoRA": 5e-3, "DoRA": 5e-3}, ""),
        ({"LoRA": 1e-2, "DoRA": 5e-3}, ""),  # the method behind has the larger rate
    ],
)
def test_an_early_lead_at_the_larger_rate_may_be_a_faster_start(rates, said):
    early = helpers.what_we_learned(part_one(), 0.4, 4, rates)[2]
    assert "after epoch 1: +1.95, DoRA ahead" in early
    assert said in early if said else "learning rate" not in early
