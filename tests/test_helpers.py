"""Unit tests of helpers.py: task building, training, adapters plumbing, analysis, reporting."""

import math
import random

import numpy as np
import pytest
import torch
from torch import nn

import helpers


def tiny_task(n=256, seed=0):
    """A linearly separable 10-class problem in 784 dimensions, as a helpers.Task."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(10, 784, generator=g) * 3
    y = torch.randint(0, 10, (n,), generator=g)
    x = centers[y] + torch.randn(n, 784, generator=g)
    return helpers.Task(train_x=x, train_y=y, test_x=x[:64], test_y=y[:64])


# ---- data transforms -------------------------------------------------------------------


def test_to_inputs_normalises_and_flattens():
    images = torch.full((3, 28, 28), 255, dtype=torch.uint8)
    x = helpers.to_inputs(images)
    assert x.shape == (3, 784) and x.dtype == torch.float32
    assert torch.allclose(x, torch.full_like(x, (1 - 0.1307) / 0.3081))


def test_rotate_keeps_shape_and_is_exact_for_full_turns():
    images = torch.randint(0, 256, (4, 28, 28), dtype=torch.uint8)
    assert torch.equal(helpers.rotate(images, 0), images)
    assert torch.equal(helpers.rotate(helpers.rotate(images, 90), -90), images)
    turned = helpers.rotate(images, 45)
    assert turned.shape == images.shape and turned.dtype == torch.uint8
    assert not torch.equal(turned, images)


def test_make_task_subsamples_with_seed_and_validates():
    images = torch.randint(0, 256, (50, 28, 28), dtype=torch.uint8)
    labels = torch.arange(50) % 10
    a = helpers.make_task(images, labels, images[:5], labels[:5], n_train=20, seed=1)
    b = helpers.make_task(images, labels, images[:5], labels[:5], n_train=20, seed=1)
    c = helpers.make_task(images, labels, images[:5], labels[:5], n_train=20, seed=2)
    assert a.train_x.shape == (20, 784) and a.test_x.shape == (5, 784)
    assert torch.equal(a.train_y, b.train_y) and not torch.equal(a.train_y, c.train_y)
    with pytest.raises(ValueError, match="n_train"):
        helpers.make_task(images, labels, images, labels, n_train=51)


# ---- training ---------------------------------------------------------------------------


def test_train_reduces_loss_and_reports_each_epoch():
    model, lines = helpers.make_mlp(seed=0), []
    history = helpers.train(model, tiny_task(), epochs=3, lr=1e-3, batch_size=32, log=lines.append)
    assert history["train_loss"][-1] < 0.5 * history["train_loss"][0]
    assert len(history["test_acc"]) == len(history["seconds"]) == len(lines) == 3
    assert history["test_acc"][-1] > 0.9
    assert lines[0].startswith("epoch 1/3: train loss")


def test_train_is_deterministic_for_a_seed():
    def run(seed):
        model = helpers.make_mlp(seed=0)
        helpers.train(model, tiny_task(), epochs=2, lr=1e-3, batch_size=32, seed=seed, log=None)
        return model.state_dict()

    first, again, other = run(0), run(0), run(1)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_train_refuses_a_frozen_model():
    model = helpers.make_mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        helpers.train(model, tiny_task(), epochs=1, lr=1e-3, log=None)


def test_accuracy_counts_correct_rows():
    model = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(3))
    x = torch.eye(3)
    assert helpers.accuracy(model, x, torch.tensor([0, 1, 2])) == 1.0
    assert helpers.accuracy(model, x, torch.tensor([0, 2, 1]), batch_size=2) == pytest.approx(1 / 3)


# ---- adapters plumbing (with the notebook's classes) -------------------------------------


def test_add_adapters_wraps_every_linear_and_freezes_the_rest(nb):
    base = helpers.make_mlp(seed=0)
    model = helpers.add_adapters(base, nb.LinearWithDoRA, rank=16, alpha=32)
    wrapped = [m for m in model.modules() if isinstance(m, nb.LinearWithDoRA)]
    assert len(wrapped) == 3
    assert [w.lora.A.shape[0] for w in wrapped] == [16, 16, 10]  # the 10-output head: full rank
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{i}.{p}" for i in (0, 2, 4) for p in ("lora.A", "lora.B", "m")}
    assert all(p.requires_grad for p in base.parameters())  # the original is untouched
    with pytest.raises(ValueError, match="no nn.Linear"):
        helpers.add_adapters(nn.Sequential(nn.ReLU()), nb.LinearWithLoRA, 4, 8)


def test_parameter_counts(nb):
    base = helpers.make_mlp(seed=0)
    total = 784 * 128 + 128 + 128 * 256 + 256 + 256 * 10 + 10
    assert helpers.parameter_counts(base) == (total, total)
    lora = helpers.add_adapters(base, nb.LinearWithLoRA, 4, 8)
    assert helpers.parameter_counts(lora)[0] == 4 * (784 + 128 + 128 + 256 + 256 + 10)


def test_layer_weights_reports_merged_weights(nb):
    model = helpers.add_adapters(helpers.make_mlp(seed=0), nb.LinearWithLoRA, 2, 4)
    with torch.no_grad():
        model[0].lora.B.normal_()
    weights = helpers.layer_weights(model)
    assert list(weights) == ["0", "2", "4"]
    expected = model[0].linear.weight + 2.0 * model[0].lora.B @ model[0].lora.A
    assert torch.allclose(weights["0"], expected)


def test_finetune_records_checkpoints_and_seeds_the_adapter(nb):
    base, task = helpers.make_mlp(seed=0), tiny_task()
    kw = dict(wrapper=nb.LinearWithDoRA, epochs=2, lr=1e-3, batch_size=64, log=None)
    run = helpers.finetune(base, task, seed=3, checkpoints=True, **kw)
    again = helpers.finetune(base, task, seed=3, **kw)
    assert len(run["weights"]) == 2 and set(run["weights"][0]) == {"0", "2", "4"}
    assert run["test_acc"] == again["test_acc"]
    assert run["trainable"] == helpers.parameter_counts(run["model"])[0]
    full = helpers.finetune(base, task, seed=3, wrapper=None, epochs=1, lr=1e-3, log=None)
    assert full["trainable"] == helpers.parameter_counts(base)[0]


# ---- the paper's weight-decomposition analysis -----------------------------------------


def test_pure_rescaling_changes_magnitude_only():
    w0 = torch.randn(6, 5)
    scale = torch.tensor([1.0, 2.0, 0.5, 3.0, 1.0, 1.5]).unsqueeze(1)
    d_m, d_d = helpers.decomposition_change(scale * w0, w0)
    assert d_d == pytest.approx(0, abs=1e-12)
    expected = ((scale - 1).abs().squeeze() * w0.norm(dim=1)).mean().item()
    assert d_m == pytest.approx(expected, rel=1e-6)


def test_pure_rotation_changes_direction_only():
    angle = 0.3
    w0 = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    rotation = torch.tensor(
        [[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]]
    )
    d_m, d_d = helpers.decomposition_change(w0 @ rotation.T, w0)
    assert d_m == pytest.approx(0, abs=1e-6)
    assert d_d == pytest.approx(1 - math.cos(angle), rel=1e-6)


def test_decomposition_points_and_fit_line():
    base = helpers.make_mlp((4, 3, 2), seed=0)
    w = helpers.layer_weights(base)
    run = {"weights": [{k: 2 * v for k, v in w.items()}, {k: 3 * v for k, v in w.items()}]}
    pts = helpers.decomposition_points([run], base)
    assert [p["epoch"] for p in pts] == [1, 1, 2, 2]
    assert pts[0]["layer"] == "0 (4->3)"
    assert all(p["dD"] == pytest.approx(0, abs=1e-12) for p in pts)
    slope, r = helpers.fit_line([0, 1, 2, 3], [1, 3, 5, 7])
    assert slope == pytest.approx(2) and r == pytest.approx(1)
    assert helpers.fit_line([0, 1, 2], [3, 2, 1])[1] == pytest.approx(-1)


# ---- reporting ---------------------------------------------------------------------------


def runs_with(accuracies):
    return [{"test_acc": [a], "seconds": [0.1], "trainable": 7} for a in accuracies]


def test_compare_sentence_follows_the_numbers():
    clear = helpers.compare_sentence(
        "A", runs_with([0.95, 0.951, 0.949]), "B", runs_with([0.90, 0.901, 0.899])
    )
    assert clear.startswith("A is ahead of B by 5.00 points, more than")
    behind = helpers.compare_sentence(
        "B", runs_with([0.90, 0.901, 0.899]), "A", runs_with([0.95, 0.951, 0.949])
    )
    assert behind.startswith("B is behind A by 5.00 points")
    unclear = helpers.compare_sentence(
        "A", runs_with([0.95, 0.90, 0.93]), "B", runs_with([0.94, 0.91, 0.92])
    )
    assert "cannot tell them apart" in unclear


def test_summary_and_results_table():
    runs = runs_with([0.9, 0.92, 0.94])
    assert helpers.summary(runs) == "92.00 +- 2.00 % (n=3)"
    table = helpers.results_table({"LoRA": runs}).splitlines()
    assert table[0].split() == ["method", "trainable", "test", "accuracy", "time", "/", "epoch"]
    assert table[1].split()[:3] == ["LoRA", "7", "92.00"]
    assert table[1].endswith("0.10 s")


def test_mean_std_over_runs():
    mean, std = helpers.mean_std([{"x": [1.0, 2.0]}, {"x": [3.0, 4.0]}], "x")
    np.testing.assert_allclose(mean, [2.0, 3.0])
    np.testing.assert_allclose(std, [math.sqrt(2), math.sqrt(2)])


def test_add_adapters_wraps_a_bare_linear(nb):
    linear = nn.Linear(6, 4)
    wrapped = helpers.add_adapters(linear, nb.LinearWithLoRA, rank=2, alpha=4)
    assert isinstance(wrapped, nb.LinearWithLoRA) and wrapped.linear is not linear
    assert list(helpers.layer_weights(wrapped)) == [""]
    assert helpers.parameter_counts(wrapped)[0] == 2 * (6 + 4)


# ---- device choice and seeding ----------------------------------------------------------


def test_pick_device_prefers_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.delenv("DORA_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert helpers.pick_device().type == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(helpers, "_mps_works", lambda: True)
    assert helpers.pick_device().type == "mps"
    monkeypatch.setattr(helpers, "_mps_works", lambda: False)
    assert helpers.pick_device().type == "cpu"


def test_pick_device_can_be_forced(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("DORA_DEVICE", "cpu")
    assert helpers.pick_device().type == "cpu"
    assert helpers.pick_device("meta").type == "meta"


def test_mps_check_is_false_where_mps_is_missing_or_broken(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert helpers._mps_works() is False
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert helpers._mps_works() is False  # no MPS device here: the tiny op raises, caught


def test_seed_everything_repeats_all_generators():
    helpers.seed_everything(5)
    first = (torch.rand(2), np.random.rand(), random.random())
    helpers.seed_everything(5)
    assert (torch.equal(first[0], torch.rand(2)), first[1], first[2]) == (
        True,
        np.random.rand(),
        random.random(),
    )


def test_difference_is_mean_gap_and_two_standard_errors():
    diff, margin = helpers.difference(runs_with([0.90, 0.92, 0.94]), runs_with([0.90, 0.90, 0.90]))
    assert diff == pytest.approx(2.0)
    assert margin == pytest.approx(2 * math.sqrt(4 / 3))


def test_verdict_names_the_side_only_beyond_the_spread():
    high, low = runs_with([0.95, 0.951, 0.949]), runs_with([0.90, 0.901, 0.899])
    noisy = runs_with([0.90, 0.95, 1.00])
    assert helpers.verdict(high, low) == "ahead"
    assert helpers.verdict(low, high) == "behind"
    assert helpers.verdict(noisy, high) == "within"


def test_decomposition_table_and_verdicts_follow_the_sign_of_r():
    rising = [
        {"dD": d, "dM": 2 * d + (0.1 if layer == "b" else 0), "epoch": 1, "layer": layer}
        for layer in ("a", "b")
        for d in (0.1, 0.2, 0.3)
    ]
    falling = [{**p, "dM": -p["dM"]} for p in rising]
    points, paper = {"up": rising, "down": falling}, {"up": 0.5, "down": 0.5}
    table = helpers.decomposition_table(points, paper).splitlines()
    assert table[1].split()[:3] == ["up", "6", "2.000"]
    assert table[1].split()[4] == "+1.00"  # within each layer dM = 2 dD exactly
    verdicts = helpers.decomposition_verdicts(points, paper)
    assert "the same sign as the paper's" in verdicts[0]
    assert "the opposite sign to the paper's" in verdicts[1]
