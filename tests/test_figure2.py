"""Figure 2 as a test (helpers' "How fine-tuning moves the weights"): the measures, the
orthogonal-update reference, the slope and its interval, the paired ratio, per-checkpoint
correlations and the verdicts, each on data whose answer is known."""

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

import helpers


def orthogonal_update(w0: torch.Tensor, sizes: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A random update per row, with its component along the row removed, scaled to ``sizes``."""
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(w0.shape, generator=g, dtype=torch.float64)
    d -= (d * w0).sum(1, keepdim=True) / (w0 * w0).sum(1, keepdim=True) * w0
    return d / d.norm(dim=1, keepdim=True) * sizes.unsqueeze(1)


W0 = torch.randn(16, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def test_an_orthogonal_update_lies_on_the_orthogonal_update_curve():
    sizes = torch.linspace(0.05, 2.0, 16, dtype=torch.float64) * W0.norm(dim=1)  # rows differ
    c = helpers.relative_change(W0 + orthogonal_update(W0, sizes), W0)
    assert c["dM"] == pytest.approx(c["orthogonal"], rel=1e-12)
    assert c["dM"] > 0.1  # not a trivially small update
    # one angle for every row: the curve's own formula, dM / a = dD / (1 - dD)
    same = helpers.relative_change(W0 + orthogonal_update(W0, 0.3 * W0.norm(dim=1)), W0)
    assert same["dM"] == pytest.approx(same["dD"] / (1 - same["dD"]), rel=1e-12)


def test_a_rotation_keeps_the_length_and_lies_off_the_curve():
    """Turning each row within a plane keeps its length: dM = 0 whatever dD, below the curve."""
    unit = orthogonal_update(W0, torch.ones(16, dtype=torch.float64))  # unit, orthogonal to rows
    angle = torch.linspace(0.1, 1.2, 16, dtype=torch.float64).unsqueeze(1)
    turned = torch.cos(angle) * W0 + torch.sin(angle) * W0.norm(dim=1, keepdim=True) * unit
    c = helpers.relative_change(turned, W0)
    assert c["dM"] == pytest.approx(0, abs=1e-12)
    assert c["dD"] == pytest.approx((1 - torch.cos(angle)).mean().item(), rel=1e-12)
    assert c["orthogonal"] > 0.1  # where an orthogonal update of the same angles would be


def test_a_pure_magnitude_change_lies_off_the_orthogonal_update_curve():
    scale = torch.linspace(0.5, 1.5, 16, dtype=torch.float64)
    c = helpers.relative_change(scale.unsqueeze(1) * W0, W0)
    assert c["dD"] == pytest.approx(0, abs=1e-12)
    assert c["orthogonal"] == pytest.approx(0, abs=1e-12)
    assert c["dM"] == pytest.approx((scale - 1).abs().mean().item(), rel=1e-12)


def test_rows_turned_by_90_degrees_count_but_have_no_orthogonal_reference():
    """A row turned by 90 degrees or more counts in dD and dM and in ``turned``, and is left
    out of the orthogonal-update reference, which no such update reaches for it."""
    turned = torch.cat([-W0[:1], W0[1:] * 1.1])
    change = helpers.relative_change(turned, W0)
    k = len(W0)
    assert change["turned"] == 1
    assert change["dD"] == pytest.approx(2 / k)
    assert change["dM"] == pytest.approx(0.1 * (k - 1) / k)
    assert change["orthogonal"] == pytest.approx(0.0, abs=1e-12)  # the others did not turn
    every = helpers.relative_change(-W0, W0)
    assert every["turned"] == k and math.isnan(every["orthogonal"]) and every["dD"] == 2
    points = [
        {
            "seed": seed,
            "checkpoint": 1,
            "layer": str(i),
            "dD": 0.1 * i,
            "dM": 0.1 * i,
            "orthogonal": math.nan,
            "turned": k,
        }
        for seed in (0, 1)
        for i in range(1, 5)
    ]
    slopes = helpers.figure2_slopes(points)
    assert all(map(math.isnan, slopes["orthogonal"])) and math.isnan(slopes["orthogonal_mean"])


def test_relative_change_rejects_what_it_cannot_measure():
    with pytest.raises(ValueError, match="all zero"):
        helpers.relative_change(W0, torch.cat([W0[:-1], torch.zeros(1, 32, dtype=W0.dtype)]))
    with pytest.raises(ValueError, match="shapes"):
        helpers.relative_change(W0[:, :5], W0)


def points_with_slopes(slopes, intercept=0.01, noise=0.0, seed=0, layers=6, checkpoints=4):
    """Synthetic Figure 2 points: per seed k, dM = slopes[k] * dD + intercept + N(0, noise^2)."""
    rng = np.random.default_rng(seed)
    dd = np.linspace(0.01, 0.1, layers * checkpoints)
    points = []
    for k, s in enumerate(slopes):
        dm = s * dd + intercept + noise * rng.standard_normal(len(dd))
        for i, (x, y) in enumerate(zip(dd, dm, strict=True)):
            layer, checkpoint = divmod(i, checkpoints)
            points.append(
                {
                    "seed": k,
                    "checkpoint": checkpoint + 1,
                    "layer": f"l.{layer}",
                    "dD": x,
                    "dM": y,
                    "orthogonal": x / (1 - x),
                }
            )
    return points


def test_the_slope_interval_covers_the_true_slope_at_its_level_with_the_right_width():
    """Per-seed slopes vary (seed spread 0.2) and points are noisy (0.002): the interval over 5
    seeds must cover the true slope about 95 % of the time, and be as wide as t(4) says."""
    true, spread, noise, n, trials = 0.8, 0.2, 0.002, 5, 600
    rng = np.random.default_rng(0)
    dd = np.linspace(0.01, 0.1, 24)
    sd = math.sqrt(spread**2 + noise**2 / ((dd - dd.mean()) ** 2).sum())  # of one seed's slope
    covered, widths = 0, []
    for t in range(trials):
        s = helpers.figure2_slopes(
            points_with_slopes(true + spread * rng.standard_normal(n), noise=noise, seed=t)
        )
        covered += s["low"] <= true <= s["high"]
        widths.append(s["high"] - s["low"])
    assert 0.92 <= covered / trials <= 0.98  # z instead of t(4) would give about 0.88
    expected = 2 * stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n) * 0.94  # E[s] = c4 sigma
    assert np.mean(widths) == pytest.approx(expected, rel=0.1)


def test_the_slope_is_fitted_with_an_intercept_and_the_reference_gives_about_one():
    s = helpers.figure2_slopes(points_with_slopes([0.5, 0.6, 0.7], intercept=0.3))
    assert s["slope"] == pytest.approx([0.5, 0.6, 0.7])  # a constant offset changes nothing
    assert s["intercept"] == pytest.approx([0.3] * 3)
    assert s["orthogonal_mean"] == pytest.approx(1.12, abs=0.02)  # x / (1 - x) over 0.01-0.1


def test_the_ratio_interval_uses_the_pairing():
    """Slopes share a large seed effect: paired by seed the ratio is near-constant 2 and its
    interval narrow; the unpaired interval sees only the spread across seeds."""
    rng = np.random.default_rng(3)
    effect = 1 + 0.3 * rng.standard_normal(8)
    a = points_with_slopes(2 * effect * (1 + 0.01 * rng.standard_normal(8)))
    b = points_with_slopes(effect)
    paired, unpaired = helpers.slope_ratio(a, b), helpers.slope_ratio(a, b, paired=False)
    assert paired["paired"] and not unpaired["paired"] and paired["scale"] == "log"
    assert paired["low"] < 2 < paired["high"] and unpaired["low"] < 2 < unpaired["high"]
    assert (paired["high"] - paired["low"]) < (unpaired["high"] - unpaired["low"]) / 5
    logs = np.log(np.array(helpers.figure2_slopes(a)["slope"]) / helpers.figure2_slopes(b)["slope"])
    half = stats.t.ppf(0.975, 7) * logs.std(ddof=1) / math.sqrt(8)
    assert paired["low"] == pytest.approx(math.exp(logs.mean() - half))
    assert paired["high"] == pytest.approx(math.exp(logs.mean() + half))


def test_a_paired_ratio_needs_the_same_seeds():
    a, b = points_with_slopes([1, 2, 3]), points_with_slopes([1, 2])
    with pytest.raises(ValueError, match="same seeds"):
        helpers.slope_ratio(a, b, paired=True)
    assert not helpers.slope_ratio(a, b)["paired"]  # decided from the seeds


def test_a_negative_slope_gives_a_linear_ratio():
    r = helpers.slope_ratio(points_with_slopes([1.0, 1.1, 0.9]), points_with_slopes([-1, -1, -1]))
    assert r["scale"] == "linear" and r["ratio"] == pytest.approx(-1.0)


def test_correlations_do_not_mix_checkpoints():
    """Within each checkpoint dM falls as dD rises across layers (r = -1), while both grow
    from checkpoint to checkpoint: pooled over time r is positive, per checkpoint it is -1."""
    points = []
    for seed in range(3):
        for checkpoint in (1, 2, 3, 4):
            for layer in range(6):
                dd = checkpoint + 0.1 * layer
                points.append(
                    {
                        "seed": seed,
                        "checkpoint": checkpoint,
                        "layer": str(layer),
                        "dD": dd,
                        "dM": 2 * checkpoint - 0.01 * layer * (1 + seed),
                        "orthogonal": 0.0,
                    }
                )
    per = helpers.checkpoint_correlations(points)
    assert list(per) == [1, 2, 3, 4]
    for v in per.values():
        assert v["r"] == pytest.approx([-1, -1, -1]) and v["mean"] == pytest.approx(-1)
    pooled = np.corrcoef([p["dD"] for p in points], [p["dM"] for p in points])[0, 1]
    assert pooled > 0.9  # what pooling the checkpoints would read
    # one checkpoint's sign does not leak into another's
    flipped = [dict(p, dM=-p["dM"]) if p["checkpoint"] == 2 else p for p in points]
    per = helpers.checkpoint_correlations(flipped)
    assert per[2]["mean"] == pytest.approx(1) and per[1]["mean"] == pytest.approx(-1)


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
    points = {
        "full FT": points_with_slopes(full_ft, noise=0.0005),
        "LoRA": points_with_slopes([0.8, 0.9, 0.85, 0.8]),
        "DoRA": points_with_slopes(dora),
    }
    said = helpers.figure2_analysis(points, {"full FT": -0.62})["conclusions"]
    assert pattern in said["full FT pattern"] and "-0.62" in said["full FT pattern"]
    assert follows in said["DoRA decoupled vs LoRA"]
    if closer:
        assert f"{closer} moves the weights more like full fine" in said["closer to full FT"]


def test_figure2_points_from_recorded_weights():
    torch.manual_seed(0)
    pretrained = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 5))
    w = helpers.layer_weights(pretrained)
    moved = [[{k: v * 1.1 for k, v in w.items()}, {k: v * 1.2 for k, v in w.items()}]]
    runs = helpers.Runs((7,), [], 1, np.zeros((1, 2)), np.zeros((1, 2)), [0.0], moved)
    points = helpers.figure2_points(runs, pretrained, ["2"])
    assert [(p["seed"], p["checkpoint"], p["layer"]) for p in points] == [(7, 1, "2"), (7, 2, "2")]
    assert [p["dM"] for p in points] == pytest.approx([0.1, 0.2])
    with pytest.raises(ValueError, match="no layer named"):
        helpers.figure2_points(runs, pretrained, ["9"])
    with pytest.raises(ValueError, match="record_weights"):
        helpers.figure2_points(
            helpers.Runs((7,), [], 1, *[np.zeros((1, 2))] * 2, [0.0]), pretrained, ["2"]
        )


def test_the_analysis_and_its_figure():
    import matplotlib

    matplotlib.use("Agg")
    points = {
        "full FT": points_with_slopes([1.0, 1.1, 0.9]),
        "LoRA": points_with_slopes([0.8, 0.9, 0.85]),
        "DoRA": points_with_slopes([0.2, 0.25, 0.22]),
    }
    analysis = helpers.figure2_analysis(points, {"full FT": -0.62, "LoRA": 0.83, "DoRA": -0.31})
    assert set(analysis["ratios"]) == {"DoRA / full FT", "DoRA / LoRA", "LoRA / full FT"}
    assert set(analysis["conclusions"]) == {
        "full FT pattern",
        "DoRA decoupled vs LoRA",
        "closer to full FT",
    }
    table = helpers.figure2_table(analysis)
    assert "slope at 4" in table and "r at 4" in table and "-0.62" in table
    assert all(len(line) <= 100 for line in table.splitlines())
    fig = helpers.plot_figure2(points, "test")
    axes = fig.axes
    assert len(axes) == 3 and tuple(fig.get_size_inches()) == (12, 3.6)
    assert axes[0].get_shared_y_axes().joined(axes[0], axes[2])
    assert axes[0].get_shared_x_axes().joined(axes[0], axes[1])
    assert len(fig.legends) == 1
    box = fig.legends[0].get_window_extent().transformed(fig.transFigure.inverted())
    assert 0 <= box.x0 and box.x1 <= 1 and 0 <= box.y0 and box.y1 <= 1  # inside the figure
    import matplotlib.pyplot as plt

    plt.close(fig)
