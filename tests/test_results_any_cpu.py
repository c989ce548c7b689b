"""The regression check of the results on any CPU, after `pytest ... DoRA.ipynb --nbval` has run.

nbval ignores the cells that print results (their last digits move with the CPU type and the
thread count), so this compares what that run wrote (DORA_RESULTS) with figures/results.json:
each number within four standard deviations of what float rounding alone moves it (the noise
experiments/evidence.py measured on other CPU kernels), and each verdict whose committed interval
lies farther from zero than that band (one nearer its threshold can flip on another CPU).
"""

import json
import math
import os
from pathlib import Path

import pytest

from dora_tutorial import evidence as ev

REPO = Path(__file__).resolve().parents[1]
COMMITTED = json.loads((REPO / "figures" / "results.json").read_text())
NOISE = ev.float_noise(ev.load())[0]  # points, one seed, one run


def bands(seeds: int, noise: float = NOISE) -> tuple[float, float]:
    """(band of a mean over ``seeds``, band of a paired difference of two such means): four
    standard deviations of the change between two runs that differ only in float rounding."""
    return 4 * noise * math.sqrt(2 / seeds), 4 * 2 * noise / math.sqrt(seeds)


def differences(fresh: dict, committed: dict = COMMITTED) -> list[str]:
    """What in ``fresh`` lies outside the committed run's bands, in words ([] if nothing)."""
    mean_band, diff_band = bands(committed["seeds"])
    problems = []
    for old, new in zip(committed["methods"], fresh["methods"], strict=True):
        if abs(new["mean"] - old["mean"]) > mean_band:
            problems.append(f"{old['method']}: {new['mean']:.2f} %, committed {old['mean']:.2f}")
    for key, old in committed["comparisons"].items():
        new = fresh["comparisons"][key]
        if abs(new["diff"] - old["diff"]) > diff_band:
            problems.append(f"{key}: moved by {new['diff'] - old['diff']:+.2f} points")
        low, high = old["interval"]
        clear = low > diff_band or high < -diff_band or (low < -diff_band and high > diff_band)
        if clear and new["verdict"] != old["verdict"]:
            problems.append(f"{key}: verdict {new['verdict']!r}, committed {old['verdict']!r}")
    return problems


@pytest.mark.after_notebook
def test_the_notebooks_results_match_the_committed_run_within_float_noise():
    fresh = Path(os.environ["DORA_RESULTS"])
    if not fresh.exists():
        pytest.skip("the notebook did not run in this session: add DoRA.ipynb --nbval")
    problems = differences(json.loads(fresh.read_text()))
    assert not problems, "\n".join(problems)


def test_a_moved_number_or_a_flipped_clear_verdict_is_caught():
    assert differences(COMMITTED) == []
    mean_band, diff_band = bands(COMMITTED["seeds"])
    assert 0 < mean_band < diff_band < 5  # tenths of a point per seed: a few points at most
    fresh = json.loads(json.dumps(COMMITTED))
    key = next(iter(fresh["comparisons"]))
    fresh["comparisons"][key]["diff"] += 1.01 * diff_band
    fresh["methods"][0]["mean"] -= 1.01 * mean_band
    assert [p.split(":")[0] for p in differences(fresh)] == [fresh["methods"][0]["method"], key]


def test_a_verdict_near_its_threshold_is_not_compared():
    _, band = bands(10)
    near = {"diff": band, "interval": [band / 2, 2 * band], "verdict": "ahead"}
    clear = {"diff": 3 * band, "interval": [2 * band, 4 * band], "verdict": "ahead"}
    committed = {"seeds": 10, "methods": [], "comparisons": {"near": near, "clear": clear}}
    flipped = {
        k: c | {"verdict": "no difference detected"} for k, c in [("near", near), ("clear", clear)]
    }
    problems = differences(committed | {"comparisons": flipped}, committed)
    assert problems == ["clear: verdict 'no difference detected', committed 'ahead'"]
