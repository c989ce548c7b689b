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


def runs(accs, trainable=100):
    """Several seeds' test accuracies (lists of per-epoch lists) as helpers.Runs."""
    acc = np.array(accs, dtype=float)
    return helpers.Runs(tuple(range(len(acc))), [], trainable, np.zeros_like(acc), acc, [0.0])


def test_plot_methods_starts_at_epoch_0_and_shows_the_paired_difference():
    results = {"LoRA": runs([[0.80, 0.90], [0.82, 0.94]]), "DoRA": runs([[0.85, 0.95]] * 2)}
    fig = helpers.plot_methods(results, 0.4, "fine-tuning")
    ax_acc, ax_diff = fig.axes
    np.testing.assert_allclose(ax_acc.lines[0].get_ydata(), [40, 81, 92])  # epoch 0 first
    np.testing.assert_array_equal(ax_acc.lines[0].get_xdata(), [0, 1, 2])
    np.testing.assert_allclose(ax_acc.lines[1].get_ydata(), [40, 85, 95])
    # the band is the 95 % interval of the mean: LoRA at epoch 2, 92 +- t(0.975, 1) * 2 / sqrt 2
    band = ax_acc.collections[0].get_paths()[0].vertices[:, 1]
    half = 12.706 * np.std([90, 94], ddof=1) / np.sqrt(2)
    assert band.max() == pytest.approx(92 + half, rel=1e-3)
    # the right panel: DoRA - LoRA seed by seed, mean per epoch
    diff = [line for line in ax_diff.lines if line.get_label() == "DoRA - LoRA"][0]
    np.testing.assert_allclose(diff.get_ydata(), [4, 3])
    assert [t.get_text() for t in ax_acc.get_legend().get_texts()] == ["LoRA", "DoRA"]


def test_plot_paired_draws_every_seed_and_the_interval():
    a, b = runs([[0.90], [0.92], [0.95]]), runs([[0.89], [0.90], [0.91]])
    fig = helpers.plot_paired({"A - B": (a, b)}, "paired")
    (ax,) = fig.axes
    np.testing.assert_allclose(sorted(ax.lines[0].get_xdata()), [1, 2, 4])
    assert float(ax.containers[0].lines[0].get_xdata()[0]) == pytest.approx(7 / 3)  # the mean
    assert ax.get_yticklabels()[0].get_text() == "A - B"


def test_plot_rank_sweep_error_bars_reference_band_and_both_axes():
    sweep = {
        (method, r): runs([[acc + 0.01 * r], [acc + 0.01 * r + 0.02]], 1_500 * r)
        for method, acc in (("LoRA", 0.80), ("DoRA", 0.81))
        for r in (1, 2, 4, 8, 16)
    }
    fig = helpers.plot_rank_sweep(sweep, runs([[0.95], [0.97]]), "rank sweep")
    by_rank, by_params = fig.axes
    assert by_rank.lines[-1].get_label() == "full FT"  # drawn after the methods
    np.testing.assert_allclose(by_rank.lines[-1].get_ydata(), [96, 96])
    lora = by_rank.containers[0].lines[0]
    np.testing.assert_allclose(lora.get_ydata(), [82, 83, 85, 89, 97])
    np.testing.assert_array_equal(lora.get_xdata(), [1, 2, 4, 8, 16])
    assert [t.get_text() for t in by_rank.get_xticklabels()] == ["1", "2", "4", "8", "16"]
    params = by_params.containers[0].lines[0].get_xdata()
    assert by_params.get_xscale() == "log" and list(params) == [1_500 * r for r in (1, 2, 4, 8, 16)]


def test_plot_digits_two_rows_labelled_by_class():
    images = torch.zeros(4, 28, 28, dtype=torch.uint8)
    fig = helpers.plot_digits(images, images, torch.tensor([3, 1, 4, 1]))
    assert [ax.get_title() for ax in fig.axes] == ["3", "1", "4", "1"] + [""] * 4


def test_plot_learning_rates_one_panel_per_rank_full_ft_in_each():
    validation = {
        "full FT": {"0.001": 80.0, "0.002": 82.0},
        "LoRA r1": {"0.001": 60.0, "0.01": 70.0, "0.02": 65.0},
        "DoRA r1": {"0.001": 61.0, "0.01": 71.0},
        "LoRA r4": {"0.002": 75.0, "0.005": 78.0},
    }
    fig = helpers.plot_learning_rates(validation, (1, 4), "rates")
    assert [ax.get_xscale() for ax in fig.axes] == ["log", "log"]
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert set(lines) == {"full FT", "LoRA", "DoRA"}
    assert list(lines["LoRA"].get_xdata()) == [0.001, 0.01, 0.02]  # sorted by rate
    assert list(lines["LoRA"].get_ydata()) == [60.0, 70.0, 65.0]
    assert [line.get_label() for line in fig.axes[1].get_lines()] == ["full FT", "LoRA"]
