"""The plots show the data they are given: curves, bands, error bars, ticks, titles, legends."""

import matplotlib

matplotlib.use("Agg")  # headless; set before pyplot is imported anywhere

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

import helpers


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def run(losses, accs, trainable=100):
    """One seed's history as helpers.Runs."""
    return runs([losses], [accs], trainable)


def runs(losses, accs, trainable=100):
    """Several seeds' histories (lists of per-epoch lists) as helpers.Runs."""
    loss, acc = np.array(losses, dtype=float), np.array(accs, dtype=float)
    return helpers.Runs(tuple(range(len(acc))), [], trainable, loss, acc, [0.0])


def test_plot_history_draws_loss_and_accuracy_in_percent():
    fig = helpers.plot_history(run([0.5, 0.3, 0.2], [0.90, 0.95, 0.97]), "pretraining")
    ax_loss, ax_acc = fig.axes
    np.testing.assert_allclose(ax_loss.lines[0].get_ydata(), [0.5, 0.3, 0.2])
    np.testing.assert_allclose(ax_acc.lines[0].get_ydata(), [90, 95, 97])
    np.testing.assert_array_equal(ax_acc.lines[0].get_xdata(), [1, 2, 3])
    assert fig._suptitle.get_text() == "pretraining"
    assert ax_acc.get_ylabel() == "test accuracy (%)"


def test_plot_methods_draws_the_mean_and_a_one_std_band_per_method():
    results = {
        "LoRA": runs([[1.0, 0.5], [1.2, 0.7]], [[0.80, 0.90], [0.82, 0.94]]),
        "DoRA": runs([[0.9, 0.4], [0.9, 0.4]], [[0.85, 0.95], [0.85, 0.95]]),
    }
    fig = helpers.plot_methods(results, "fine-tuning")
    ax_loss, ax_acc = fig.axes
    np.testing.assert_allclose(ax_acc.lines[0].get_ydata(), [81, 92])
    np.testing.assert_allclose(ax_loss.lines[1].get_ydata(), [0.9, 0.4])
    # band of LoRA's accuracy: mean +- sample std (ddof=1) at epoch 2 is 92 +- 2.83
    band = ax_acc.collections[0].get_paths()[0].vertices[:, 1]
    low, high = band.min(), band.max()
    assert low == pytest.approx(81 - np.std([80, 82], ddof=1))
    assert high == pytest.approx(92 + np.std([90, 94], ddof=1))
    legend = [t.get_text() for t in ax_acc.get_legend().get_texts()]
    assert legend == ["LoRA (n=2)", "DoRA (n=2)"]
    assert fig._suptitle.get_text() == "fine-tuning"


def test_plot_rank_sweep_error_bars_reference_band_and_readable_ticks():
    sweep = {
        (method, r): runs(
            [[0.1], [0.1]], [[acc + 0.01 * r + extra] for extra in (0, 0.02)], 1_500 * r
        )
        for method, acc in (("LoRA", 0.80), ("DoRA", 0.81))
        for r in (1, 2, 4, 8, 16)
    }
    reference = runs([[0.1], [0.1]], [[0.95], [0.97]])
    fig = helpers.plot_rank_sweep(sweep, reference, "rank sweep")
    assert fig._suptitle.get_text() == "rank sweep"
    by_rank, by_params = fig.axes
    means = by_rank.lines[-1].get_ydata()  # the full-FT line is drawn after the methods
    assert by_rank.lines[-1].get_label() == "full FT"
    np.testing.assert_allclose(means, [96, 96])
    lora = by_rank.containers[0]
    np.testing.assert_allclose(lora.lines[0].get_ydata(), [82, 83, 85, 89, 97])
    np.testing.assert_array_equal(lora.lines[0].get_xdata(), [1, 2, 4, 8, 16])
    np.testing.assert_array_equal(
        by_params.containers[1].lines[0].get_xdata(), [1500 * r for r in (1, 2, 4, 8, 16)]
    )
    assert [t.get_text() for t in by_rank.get_xticklabels()] == ["1", "2", "4", "8", "16"]
    # parameter axis: 1-2-5 ticks inside the data range, written out in full
    assert [t.get_text() for t in by_params.get_xticklabels()] == [
        "2,000",
        "5,000",
        "10,000",
        "20,000",
    ]


def test_plot_decomposition_titles_carry_the_fitted_slope_and_r():
    pts = [
        {"dD": d, "dM": 2 * d + 0.1 * (-1) ** i, "epoch": 1 + i % 2, "layer": f"{i % 3}", "seed": 0}
        for i, d in enumerate(np.linspace(0.1, 1.0, 12))
    ]
    points = {"LoRA": pts, "DoRA": [dict(p, dM=-p["dM"]) for p in pts]}
    fig = helpers.plot_decomposition(points, "Figure 2")
    ax_lora, ax_dora = fig.axes[:2]
    slope, r = helpers.fit_line([p["dD"] for p in pts], [p["dM"] for p in pts])
    assert ax_lora.get_title() == f"LoRA: slope {slope:.2f}, r = {r:+.2f}"
    assert ax_dora.get_title() == f"DoRA: slope {-slope:.2f}, r = {-r:+.2f}"
    drawn = np.concatenate([c.get_offsets() for c in ax_lora.collections])
    assert sorted(map(tuple, drawn)) == sorted((p["dD"], p["dM"]) for p in pts)  # every point
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["layer 0", "layer 1", "layer 2", "epoch 1", "epoch 2"]
    assert fig._suptitle.get_text() == "Figure 2"


def test_plot_digits_two_rows_labelled_by_class():
    images = torch.zeros(4, 28, 28, dtype=torch.uint8)
    fig = helpers.plot_digits(images, images, torch.tensor([3, 1, 4, 1]))
    assert len(fig.axes) == 8
    assert [ax.get_title() for ax in fig.axes[:4]] == ["3", "1", "4", "1"]
    assert fig._suptitle.get_text()  # every figure has a title
