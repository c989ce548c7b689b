"""Figure 2 as a test: the measures, the orthogonal-update reference, the slopes, the paired
ratio, per-checkpoint correlations and the verdicts, each on data whose answer is known."""

import dataclasses
import math

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

import helpers

W0 = torch.randn(16, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
NORM = W0.norm(dim=1, keepdim=True)
D = torch.randn(16, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
UNIT = F.normalize(D - (D * W0).sum(1, keepdim=True) / NORM**2 * W0)  # across W0's rows
T = torch.linspace(0.05, 2.0, 16, dtype=torch.float64).unsqueeze(1)  # update / row, across it
COS_T = 1 / (1 + T**2).sqrt()
ANGLE = torch.linspace(0.1, 1.2, 16, dtype=torch.float64).unsqueeze(1)
COS, SIN = torch.cos(ANGLE), torch.sin(ANGLE)
SCALE = torch.linspace(0.5, 1.5, 16, dtype=torch.float64).unsqueeze(1)
ONE = 1 - 1 / math.sqrt(1 + 0.3**2)  # dD where every row is turned by the same update 0.3


@pytest.mark.parametrize(
    ("weight", "dD", "dM", "orthogonal"),
    [  # updates across the rows lie on the curve, dD / (1 - dD) where every row turns alike
        (W0 + T * NORM * UNIT, (1 - COS_T).mean(), (1 / COS_T - 1).mean(), (1 / COS_T - 1).mean()),
        (W0 + 0.3 * NORM * UNIT, ONE, ONE / (1 - ONE), ONE / (1 - ONE)),
        # turning each row within a plane keeps its length; scaling it keeps its direction
        (COS * W0 + SIN * NORM * UNIT, (1 - COS).mean(), 0.0, (1 / COS - 1).mean()),
        (SCALE * W0, 0.0, (SCALE - 1).abs().mean(), 0.0),
    ],
    ids=["orthogonal", "orthogonal, one angle", "rotation", "scaling"],
)
def test_only_updates_across_the_rows_lie_on_the_curve(weight, dD, dM, orthogonal):
    c = helpers.relative_change(weight, W0)
    expected = [float(dD), float(dM), float(orthogonal)]
    assert [c["dD"], c["dM"], c["orthogonal"]] == pytest.approx(expected, abs=1e-12)


def test_rows_turned_by_90_degrees_count_but_have_no_orthogonal_reference():
    k = len(W0)
    change = helpers.relative_change(torch.cat([-W0[:1], W0[1:] * 1.1]), W0)
    assert change["dD"] == pytest.approx(2 / k) and change["dM"] == pytest.approx(0.1 * (k - 1) / k)
    assert change["orthogonal"] == pytest.approx(0, abs=1e-12)
    every = helpers.relative_change(-W0, W0)
    assert math.isnan(every["orthogonal"]) and every["dD"] == 2
    slopes = helpers.figure2_slopes([dict(p, orthogonal=math.nan) for p in points([1, 2])])
    assert math.isnan(slopes["orthogonal_mean"])


@pytest.mark.parametrize(
    ("weight0", "error"),
    [(torch.cat([W0[:-1], torch.zeros(1, 32, dtype=W0.dtype)]), "all zero"), (W0[:5], "shapes")],
)
def test_relative_change_rejects_what_it_cannot_measure(weight0, error):
    with pytest.raises(ValueError, match=error):
        helpers.relative_change(W0, weight0)


def points(slopes, intercept=0.01, noise=0.0, seed=0):
    """Synthetic Figure 2 points, 6 layers at 4 checkpoints: per seed k,
    dM = slopes[k] * dD + intercept + N(0, noise^2)."""
    rng, dd = np.random.default_rng(seed), np.linspace(0.01, 0.1, 24)
    dm = [s * dd + intercept + noise * rng.standard_normal(24) for s in slopes]
    return [
        dict(seed=k, checkpoint=i % 4 + 1, layer=i // 4, dD=x, dM=y, orthogonal=x / (1 - x))
        for k, row in enumerate(dm)
        for i, (x, y) in enumerate(zip(dd, row, strict=True))
    ]


def test_the_slope_interval_covers_the_true_slope_at_its_level_with_the_right_width():
    """Per-seed slopes vary (seed spread 0.2) and points are noisy (0.002): the interval over 5
    seeds must cover the true slope about 95 % of the time, and be as wide as t(4) says."""
    true, spread, noise, n, trials = 0.8, 0.2, 0.002, 5, 600
    rng = np.random.default_rng(0)
    dd = np.linspace(0.01, 0.1, 24)
    sd = math.sqrt(spread**2 + noise**2 / ((dd - dd.mean()) ** 2).sum())  # of one seed's slope
    covered, widths = 0, []
    for t in range(trials):
        slopes = true + spread * rng.standard_normal(n)
        s = helpers.figure2_slopes(points(slopes, noise=noise, seed=t))
        covered += s["low"] <= true <= s["high"]
        widths.append(s["high"] - s["low"])
    assert 0.92 <= covered / trials <= 0.98  # z instead of t(4) would give about 0.88
    expected = 2 * stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n) * 0.94  # E[s] = c4 sigma
    assert np.mean(widths) == pytest.approx(expected, rel=0.1)


def test_the_slope_is_fitted_with_an_intercept_and_the_reference_gives_about_one():
    s = helpers.figure2_slopes(points([0.5, 0.6, 0.7], intercept=0.3))
    assert s["slope"] == pytest.approx([0.5, 0.6, 0.7])  # a constant offset changes nothing
    assert s["intercept"] == pytest.approx([0.3] * 3)
    assert s["orthogonal_mean"] == pytest.approx(1.12, abs=0.02)  # x / (1 - x) over 0.01-0.1


def test_the_ratio_is_paired_by_seed():
    """Slopes share a large seed effect: paired by seed, the ratio is a near-constant 2 and its
    interval, the t-interval of the per-seed log-ratios, is narrow."""
    rng = np.random.default_rng(3)
    effect = 1 + 0.3 * rng.standard_normal(8)
    a, b = points(2 * effect * (1 + 0.01 * rng.standard_normal(8))), points(effect)
    r = helpers.slope_ratio(a, b)
    logs = np.log(np.array(helpers.figure2_slopes(a)["slope"]) / helpers.figure2_slopes(b)["slope"])
    half = stats.t.ppf(0.975, 7) * logs.std(ddof=1) / math.sqrt(8)
    assert r["scale"] == "log" and r["low"] < 2 < r["high"] and r["high"] - r["low"] < 0.05
    assert (r["low"], r["high"]) == pytest.approx(np.exp([logs.mean() - half, logs.mean() + half]))
    with pytest.raises(ValueError, match="same seeds"):
        helpers.slope_ratio(a, points([1, 2]))
    negative = helpers.slope_ratio(points([1.0, 1.1, 0.9]), points([-1, -1, -1]))  # no log
    assert negative["scale"] == "linear" and negative["ratio"] == pytest.approx(-1.0)


def test_correlations_do_not_mix_checkpoints():
    """Within each checkpoint dM falls as dD rises across layers (r = -1), while both grow
    from checkpoint to checkpoint: pooled over time r is positive, per checkpoint it is -1."""
    pts = [
        dict(seed=s, checkpoint=c, layer=str(i), dD=c + 0.1 * i, dM=2 * c - 0.01 * i * (1 + s))
        for s in range(3)
        for c in (1, 2, 3, 4)
        for i in range(6)
    ]
    per = helpers.checkpoint_correlations(pts)
    expected = {c: {"r": pytest.approx([-1] * 3), "mean": pytest.approx(-1)} for c in range(1, 5)}
    assert {c: {"r": v["r"], "mean": v["mean"]} for c, v in per.items()} == expected


@pytest.mark.parametrize(
    ("full_ft", "dora", "pattern", "follows", "closer"),
    [
        ([1.0, 1.05, 0.95, 1.02], [0.2, 0.25, 0.22, 0.2], "not the paper's", "less than", "LoRA"),
        ([-1.0, -0.9, -1.1, -1.0], [0.2, 0.25, 0.22, 0.2], "the paper's negative", "less", "DoRA"),
        ([0.3, 0.32, 0.28, 0.3], [0.31, 0.33, 0.27, 0.3], "not the paper's", "less than", "DoRA"),
        ([1.0, 1.05, 0.95, 1.02], [0.82, 0.86, 0.88, 0.79], "not the paper's", "as far as", None),
        ([1.0, 1.05, 0.95, 1.02], [1.6, 1.8, 1.7, 1.6], "not the paper's", "more than", "LoRA"),
    ],
)
def test_the_conclusions_say_what_the_numbers_support(full_ft, dora, pattern, follows, closer):
    lora = [0.8, 0.9, 0.85, 0.8]
    pts = {"full FT": points(full_ft, noise=0.0005), "LoRA": points(lora), "DoRA": points(dora)}
    said = helpers.figure2_analysis(pts, {"full FT": -0.62})["conclusions"]
    assert pattern in said["full FT pattern"] and "-0.62" in said["full FT pattern"]
    assert follows in said["DoRA decoupled vs LoRA"]
    verdict = f"{closer} moves the weights more like" if closer else "the seeds cannot tell"
    assert verdict in said["closer to full FT"]


def test_figure2_points_from_recorded_weights():
    torch.manual_seed(0)
    pretrained = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 5))
    w = helpers.layer_weights(pretrained)
    moved = [[{k: v * 1.1 for k, v in w.items()}, {k: v * 1.2 for k, v in w.items()}]]
    runs = helpers.Runs((7,), [], 1, np.zeros((1, 2)), np.zeros((1, 2)), [0.0], moved)
    pts = helpers.figure2_points(runs, pretrained, ["2"])
    assert [(p["seed"], p["checkpoint"], p["layer"]) for p in pts] == [(7, 1, "2"), (7, 2, "2")]
    assert [p["dM"] for p in pts] == pytest.approx([0.1, 0.2])
    with pytest.raises(ValueError, match="no layer named"):
        helpers.figure2_points(runs, pretrained, ["9"])
    with pytest.raises(ValueError, match="record_weights"):
        helpers.figure2_points(dataclasses.replace(runs, weights=[]), pretrained, ["2"])


def test_the_table_fits_the_notebook_and_the_figure_titles_each_panel_with_its_slope():
    slopes = {"full FT": [1.0, 1.2], "LoRA": [0.8, 1.0], "DoRA": [0.2, 0.4]}
    pts = {method: points(s) for method, s in slopes.items()}
    table = helpers.figure2_table(helpers.figure2_analysis(pts, {"full FT": -0.62}))
    assert all(len(line) <= 100 for line in table.splitlines())
    fig = helpers.plot_figure2(pts, "test")
    titles = [f"{method}: slope {np.mean(s):.2f}" for method, s in slopes.items()]
    assert [ax.get_title() for ax in fig.axes] == titles
    box = fig.legends[0].get_window_extent().transformed(fig.transFigure.inverted())
    plt.close(fig)
    assert 0 <= box.x0 and box.x1 <= 1 and 0 <= box.y0 and box.y1 <= 1  # inside the figure
