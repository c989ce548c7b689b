"""The notebook's LoRA and DoRA layers against their definitions (the official code and PEFT:
norm over output rows, m = ||W0|| at init, s = alpha / r, bias not rescaled, norm detached)."""

import math

import pytest
import torch
from torch import nn

import helpers
from support import assert_detach_changes_only_direction_gradients, looks_trained

DORA_CLASSES = ["LinearWithDoRA", "DoRALinear"]
ALL_CLASSES = ["LinearWithLoRA", *DORA_CLASSES]


def test_lora_is_identity_at_init(nb):
    torch.manual_seed(0)
    base = nn.Linear(30, 20)
    x = torch.randn(7, 30)
    layer = nb.LinearWithLoRA(base, rank=3, alpha=6)
    assert torch.equal(layer(x), base(x))
    assert torch.equal(layer.lora.B, torch.zeros(20, 3))


@pytest.mark.parametrize("cls", DORA_CLASSES)
def test_dora_is_identity_at_init(nb, cls):
    torch.manual_seed(0)
    base = nn.Linear(30, 20).double()
    x = torch.randn(7, 30, dtype=torch.float64)
    layer = getattr(nb, cls)(base, rank=3, alpha=6)
    torch.testing.assert_close(layer(x), base(x), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(layer.m, base.weight.norm(dim=1))


@pytest.mark.parametrize("cls", ALL_CLASSES)
def test_init_conventions(nb, cls):
    torch.manual_seed(0)
    layer = getattr(nb, cls)(nn.Linear(64, 32), rank=4, alpha=12)
    assert layer.lora.scaling == 3.0  # alpha / rank
    assert layer.lora.A.shape == (4, 64) and layer.lora.B.shape == (32, 4)
    bound = 1 / math.sqrt(64)  # kaiming_uniform_(a=sqrt(5)) on fan_in 64
    assert layer.lora.A.abs().max() <= bound and layer.lora.A.abs().max() > 0.8 * bound
    if hasattr(layer, "m"):
        assert layer.m.shape == (32,)  # one magnitude per OUTPUT row
        assert layer.detach_norm is True


@pytest.mark.parametrize("cls", ALL_CLASSES)
def test_only_adapter_parameters_train(nb, cls):
    model = helpers.make_mlp((784, 128, 256, 10), seed=0)
    wrapped = helpers.add_adapters(model, getattr(nb, cls), rank=4, alpha=8)
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    suffixes = ("lora.A", "lora.B", "m") if cls != "LinearWithLoRA" else ("lora.A", "lora.B")
    expected = {f"{i}.{s}" for i in ("0", "2", "4") for s in suffixes}
    assert trainable == expected
    x = torch.randn(5, 784)
    wrapped(x).sum().backward()
    assert all(p.grad is None for n, p in wrapped.named_parameters() if n not in expected)


@pytest.mark.parametrize(
    "cls, kwargs",
    [
        ("LinearWithDoRA", {}),
        ("DoRALinear", {"factored_norm": True}),
        ("DoRALinear", {"factored_norm": False}),
    ],
)
@pytest.mark.parametrize("bias", [True, False])
def test_dora_matches_formula(nb, cls, kwargs, bias):
    """y = x (m * V / ||V||_row)^T + b with V = W0 + (alpha/r) B A, computed here independently."""
    torch.manual_seed(0)
    base = nn.Linear(40, 24, bias=bias).double()
    layer = looks_trained(getattr(nb, cls)(base, rank=5, alpha=7, **kwargs))
    x = torch.randn(9, 40, dtype=torch.float64)
    W0, A, B, m = (t.detach() for t in (base.weight, layer.lora.A, layer.lora.B, layer.m))
    V = W0 + (7 / 5) * B @ A
    W = m[:, None] * V / torch.sqrt((V * V).sum(dim=1, keepdim=True))
    expected = x @ W.T + (base.bias.detach() if bias else 0)
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.merged_weight(), W, rtol=1e-12, atol=1e-12)
    # the dim=0 mix-up (per input column) must NOT match
    W_col = m[:, None] * V / torch.sqrt((V * V).sum(dim=0, keepdim=True))
    assert not torch.allclose(layer.merged_weight(), W_col, rtol=1e-3)


def test_lora_matches_formula(nb):
    torch.manual_seed(0)
    base = nn.Linear(40, 24).double()
    layer = looks_trained(nb.LinearWithLoRA(base, rank=5, alpha=7))
    x = torch.randn(9, 40, dtype=torch.float64)
    W = base.weight + (7 / 5) * layer.lora.B @ layer.lora.A
    torch.testing.assert_close(layer(x), x @ W.T + base.bias, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.merged_weight(), W, rtol=1e-12, atol=1e-12)


PRACTICAL = ["LoRALinear", "DoRALinear"]  # Part I's layers leave the checks to these


@pytest.mark.parametrize("cls", PRACTICAL)
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rank=0, alpha=8), "positive int"),
        (dict(rank=-1, alpha=8), "positive int"),
        (dict(rank=2.0, alpha=8), "positive int"),
        (dict(rank=True, alpha=8), "positive int"),
        (dict(rank=17, alpha=8), "exceeds"),
        (dict(rank=4, alpha=0), "alpha"),
        (dict(rank=4, alpha=-1.0), "alpha"),
        (dict(rank=4, alpha=float("nan")), "alpha"),
        (dict(rank=4, alpha="8"), "alpha"),
    ],
)
def test_invalid_arguments(nb, cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        getattr(nb, cls)(nn.Linear(32, 16), **kwargs)


@pytest.mark.parametrize("cls", PRACTICAL)
def test_rejects_non_linear(nb, cls):
    with pytest.raises(TypeError, match="nn.Linear"):
        getattr(nb, cls)(nn.Conv2d(3, 8, 3), rank=2, alpha=4)


@pytest.mark.parametrize("cls", DORA_CLASSES)
def test_detach_changes_only_direction_gradients(nb, cls):
    torch.manual_seed(0)
    base = nn.Linear(30, 20).double().requires_grad_(False)
    detached = looks_trained(getattr(nb, cls)(base, rank=4, alpha=8))
    exact = getattr(nb, cls)(base, rank=4, alpha=8, detach_norm=False)
    x = torch.randn(11, 30, dtype=torch.float64)
    assert_detach_changes_only_direction_gradients(detached, exact, x)


def test_extra_repr_shows_rank_and_scaling(nb):
    layer = nb.DoRALinear(nn.Linear(30, 20), rank=4, alpha=8)
    text = repr(layer)
    assert "rank=4, scaling=2" in text and "detach_norm=True" in text
