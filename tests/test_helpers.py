"""Unit tests of helpers.py: task building, training, adapters plumbing, analysis, reporting."""

import random

import numpy as np
import pytest
import torch
from torch import nn

import helpers
from dora_tutorial.session import _mps_works
from support import tiny_task

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
    model, lines = helpers.make_mlp((784, 128, 256, 10), seed=0), []
    runs = helpers.train(model, tiny_task(), epochs=3, lr=1e-3, batch_size=32, log=lines.append)
    assert runs.train_loss.shape == runs.test_acc.shape == (1, 3)
    assert runs.train_loss[0, -1] < 0.5 * runs.train_loss[0, 0]
    assert len(runs.seconds) == len(lines) == 3
    assert runs.final[0] > 90 and runs.models == [model]
    assert lines[0].startswith("epoch 1/3: train loss")
    assert helpers.accuracy(model, tiny_task().test_x, tiny_task().test_y) == runs.test_acc[0, -1]


def test_train_is_deterministic_for_a_seed():
    def run(seed):
        model = helpers.make_mlp((784, 128, 256, 10), seed=0)
        helpers.train(model, tiny_task(), epochs=2, lr=1e-3, batch_size=32, seeds=[seed], log=None)
        return model.state_dict()

    first, again, other = run(0), run(0), run(1)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_train_refuses_a_frozen_model_and_mismatched_seeds():
    model = helpers.make_mlp((784, 128, 256, 10)).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        helpers.train(model, tiny_task(), epochs=1, lr=1e-3, batch_size=32, log=None)
    with pytest.raises(ValueError, match="2 models need 2 seeds"):
        helpers.train([model, model], tiny_task(), epochs=1, lr=1e-3, batch_size=32, log=None)


def test_models_trained_together_must_share_frozen_weights(nb):
    a = helpers.add_adapters(helpers.make_mlp((784, 16, 10), seed=0), nb.LinearWithLoRA, 2, 4)
    b = helpers.add_adapters(helpers.make_mlp((784, 16, 10), seed=1), nb.LinearWithLoRA, 2, 4)
    with pytest.raises(ValueError, match="share their frozen weights"):
        helpers.train([a, b], tiny_task(), seeds=[0, 1], epochs=1, lr=1e-3, batch_size=32, log=None)


def test_accuracy_counts_correct_rows():
    model = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(3))
    x = torch.eye(3)
    assert helpers.accuracy(model, x, torch.tensor([0, 1, 2])) == 1.0
    assert helpers.accuracy(model, x, torch.tensor([0, 2, 1]), batch_size=2) == pytest.approx(1 / 3)


# ---- adapters plumbing (with the notebook's classes) -------------------------------------


def test_add_adapters_wraps_every_linear_and_freezes_the_rest(nb):
    base = helpers.make_mlp((784, 128, 256, 10), seed=0)
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
    base = helpers.make_mlp((784, 128, 256, 10), seed=0)
    total = 784 * 128 + 128 + 128 * 256 + 256 + 256 * 10 + 10
    assert helpers.parameter_counts(base) == (total, total)
    lora = helpers.add_adapters(base, nb.LinearWithLoRA, 4, 8)
    assert helpers.parameter_counts(lora)[0] == 4 * (784 + 128 + 128 + 256 + 256 + 10)


def test_layer_weights_reports_merged_weights(nb):
    model = helpers.add_adapters(
        helpers.make_mlp((784, 128, 256, 10), seed=0), nb.LinearWithLoRA, 2, 4
    )
    with torch.no_grad():
        model[0].lora.B.normal_()
    weights = helpers.layer_weights(model)
    assert list(weights) == ["0", "2", "4"]
    expected = model[0].linear.weight + 2.0 * model[0].lora.B @ model[0].lora.A
    assert torch.allclose(weights["0"], expected)


def test_finetune_records_checkpoints_per_seed_and_epoch(nb):
    base, task = helpers.make_mlp((784, 32, 16, 10), seed=0), tiny_task()
    kw = dict(wrapper=nb.LinearWithDoRA, epochs=2, lr=1e-3, batch_size=64, log=None)
    runs = helpers.finetune(base, task, seeds=(3, 4), record_weights=True, **kw)
    again = helpers.finetune(base, task, seeds=(3, 4), **kw)
    assert len(runs.weights) == 2 and len(runs.weights[0]) == 2
    assert set(runs.weights[0][0]) == {"0", "2", "4"}
    np.testing.assert_array_equal(runs.test_acc, again.test_acc)
    assert again.weights == []
    assert runs.trainable == helpers.parameter_counts(runs.models[0])[0]
    full = helpers.finetune(base, task, seeds=(3,), epochs=1, lr=1e-3, batch_size=64, log=None)
    assert full.trainable == helpers.parameter_counts(base)[0]
    last = helpers.layer_weights(runs.models[1])
    assert all(torch.equal(last[k], runs.weights[1][-1][k]) for k in last)


# ---- the paper's weight-decomposition analysis -----------------------------------------


# ---- reporting ---------------------------------------------------------------------------


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
    monkeypatch.setattr("dora_tutorial.session._mps_works", lambda: True)
    assert helpers.pick_device().type == "mps"
    monkeypatch.setattr("dora_tutorial.session._mps_works", lambda: False)
    assert helpers.pick_device().type == "cpu"


def test_pick_device_can_be_forced(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("DORA_DEVICE", "cpu")
    assert helpers.pick_device().type == "cpu"
    assert helpers.pick_device("meta").type == "meta"


def test_mps_check_is_false_where_mps_is_missing_or_broken(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert _mps_works() is False
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert _mps_works() is False  # no MPS device here: the tiny op raises, caught


def test_seed_everything_repeats_all_generators():
    helpers.seed_everything(5)
    first = (torch.rand(2), np.random.rand(), random.random())
    helpers.seed_everything(5)
    assert (torch.equal(first[0], torch.rand(2)), first[1], first[2]) == (
        True,
        np.random.rand(),
        random.random(),
    )


def test_make_task_validation_split_is_disjoint_and_keeps_the_training_set():
    images = torch.arange(50, dtype=torch.uint8).reshape(50, 1, 1).expand(50, 28, 28).clone()
    labels = torch.arange(50) % 10
    plain = helpers.make_task(images, labels, images[:5], labels[:5], n_train=20, seed=1)
    split = helpers.make_task(images, labels, images[:5], labels[:5], n_train=20, n_val=10, seed=1)
    assert torch.equal(plain.train_x, split.train_x)  # asking for validation changes nothing
    assert split.val_x.shape == (10, 784) and plain.val_x.shape == (0, 784)
    train_ids = {round(float(v), 5) for v in split.train_x[:, 0]}  # one pixel value per image
    val_ids = {round(float(v), 5) for v in split.val_x[:, 0]}
    assert len(train_ids) == 20 and len(val_ids) == 10 and train_ids.isdisjoint(val_ids)
    with pytest.raises(ValueError, match="n_train"):
        helpers.make_task(images, labels, images, labels, n_train=45, n_val=10)


def test_curves_false_evaluates_only_after_the_last_epoch_and_changes_nothing_else(nb):
    base, task = helpers.make_mlp((784, 32, 16, 10), seed=0), tiny_task()
    kw = dict(wrapper=nb.LinearWithDoRA, seeds=(3, 4), epochs=3, lr=1e-3, batch_size=64, log=None)
    every = helpers.finetune(base, task, **kw)
    last = helpers.finetune(base, task, curves=False, **kw)
    assert np.isnan(last.test_acc[:, :-1]).all() and not np.isnan(last.final).any()
    np.testing.assert_array_equal(last.final, every.final)
    np.testing.assert_array_equal(last.train_loss, every.train_loss)
    for a, b in zip(last.models, every.models, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    lines = []
    helpers.finetune(base, task, **{**kw, "log": lines.append}, curves=False)
    assert "not measured" in lines[0] and "not measured" not in lines[-1]
