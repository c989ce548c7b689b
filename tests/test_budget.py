"""helpers.lora_at_budget: LoRA's accuracy at DoRA's parameter count, interpolated per seed in
log(trainable parameters), paired with DoRA's seeds so that ``compare`` stays a paired test."""

import math

import numpy as np
import pytest

import helpers


def runs(final, trainable, seeds=(0, 1, 2, 3)):
    final = np.asarray(final, dtype=float)
    acc = np.stack([np.zeros_like(final), final / 100], 1)  # (seeds, epochs): final is last
    return helpers.Runs(tuple(seeds), [], trainable, np.zeros_like(acc), acc, [0.1, 0.1])


COUNTS = {1: 1_700, 2: 3_400, 4: 6_800, 8: 13_600}
A = np.array([80.0, 81.0, 79.5, 80.5])  # per-seed intercepts ...
B = np.array([1.5, 2.0, 1.0, 2.5])  # ... and slopes in log(parameters)


def lora_linear_in_log():
    return {r: runs(A + B * math.log(c), c) for r, c in COUNTS.items()}


@pytest.mark.parametrize("target", [2_158, 3_400, 5_000, 13_600])
def test_interpolation_is_exact_on_data_linear_in_log_parameters(target):
    at = helpers.lora_at_budget(lora_linear_in_log(), runs([90] * 4, target))
    assert at.trainable == target
    np.testing.assert_allclose(at.final, A + B * math.log(target), rtol=1e-12)


def test_the_result_stays_paired_with_dora_seed_by_seed():
    dora = runs([83.0, 80.0, 84.0, 81.0], 2_158)
    at = helpers.lora_at_budget(lora_linear_in_log(), dora)
    c = helpers.compare("DoRA", dora, "LoRA at DoRA's count", at)
    assert at.seeds == dora.seeds and c.diff == pytest.approx((dora.final - at.final).mean())
    # swapping two seeds' LoRA accuracies moves their interpolated values along
    swapped = {r: runs(x.final[[1, 0, 2, 3]], x.trainable) for r, x in lora_linear_in_log().items()}
    np.testing.assert_allclose(helpers.lora_at_budget(swapped, dora).final, at.final[[1, 0, 2, 3]])


@pytest.mark.parametrize(
    ("lora", "dora", "message"),
    [
        (None, ([90] * 4, 20_000), "outside the range"),
        (None, ([90] * 4, 1_000), "outside the range"),
        ({1: (A, 1_700)}, ([90] * 4, 2_158), "outside the range"),
        (None, ([90] * 3, 2_158, (0, 1, 2)), "same seeds"),
        ({1: (A, 1_700), 2: (A, 1_700)}, ([90] * 4, 1_700), "same trainable count"),
    ],
)
def test_bad_input_is_an_error(lora, dora, message):
    lora = lora_linear_in_log() if lora is None else {r: runs(*x) for r, x in lora.items()}
    with pytest.raises(ValueError, match=message):
        helpers.lora_at_budget(lora, runs(*dora))
