"""helpers' models plumbing (with the notebook's classes) and the runtime: device and seeds."""

import random

import numpy as np
import pytest
import torch
from torch import nn

import helpers
from dora_tutorial.runtime import _mps_works, seed_everything

SIZES = (784, 128, 256, 10)
TOTAL = 784 * 128 + 128 + 128 * 256 + 256 + 256 * 10 + 10


def test_add_adapters_wraps_every_linear_and_freezes_the_rest(nb):
    base = helpers.make_mlp(SIZES, seed=0)
    model = helpers.add_adapters(base, nb.LinearWithDoRA, rank=16, alpha=32)
    wrapped = [m for m in model.modules() if isinstance(m, nb.LinearWithDoRA)]
    assert [w.lora.A.shape[0] for w in wrapped] == [16, 16, 10]  # the 10-output head: full rank
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{i}.{p}" for i in (0, 2, 4) for p in ("lora.A", "lora.B", "m")}
    assert all(p.requires_grad for p in base.parameters())  # the original is untouched
    with pytest.raises(ValueError, match="no nn.Linear"):
        helpers.add_adapters(nn.Sequential(nn.ReLU()), nb.LinearWithLoRA, 4, 8)
    bare = helpers.add_adapters(nn.Linear(6, 4), nb.LinearWithLoRA, rank=2, alpha=4)
    assert isinstance(bare, nb.LinearWithLoRA) and list(helpers.layer_weights(bare)) == [""]


def test_counts_and_weights_of_an_adapted_model(nb):
    base = helpers.make_mlp(SIZES, seed=0)
    assert helpers.parameter_counts(base) == (TOTAL, TOTAL)
    model = helpers.add_adapters(base, nb.LinearWithLoRA, 2, 4)
    assert helpers.parameter_counts(model)[0] == 2 * (784 + 128 + 128 + 256 + 256 + 10)
    with torch.no_grad():
        model[0].lora.B.normal_()
    weights = helpers.layer_weights(model)
    assert list(weights) == ["0", "2", "4"]
    expected = model[0].linear.weight + 2.0 * model[0].lora.B @ model[0].lora.A
    torch.testing.assert_close(weights["0"], expected)


@pytest.mark.parametrize(
    "env, prefer, cuda, mps, expected",
    [
        (None, None, True, True, "cuda"),
        (None, None, False, True, "mps"),
        (None, None, False, False, "cpu"),
        ("cpu", None, True, True, "cpu"),
        ("cpu", "meta", True, True, "meta"),
    ],
)
def test_pick_device(monkeypatch, env, prefer, cuda, mps, expected):
    monkeypatch.delenv("DORA_DEVICE", raising=False)
    if env:
        monkeypatch.setenv("DORA_DEVICE", env)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr("dora_tutorial.runtime._mps_works", lambda: mps)
    assert helpers.pick_device(prefer).type == expected


@pytest.mark.parametrize("available", [False, True])
def test_mps_check_is_false_where_mps_is_missing_or_broken(monkeypatch, available):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: available)
    assert _mps_works() is False  # no MPS device here: the tiny op raises, caught


def test_seed_everything_repeats_all_generators():
    draws = []
    for _ in range(2):
        seed_everything(5)
        draws.append((torch.rand(2).tolist(), np.random.rand(), random.random()))
    assert draws[0] == draws[1]
