"""Dropout in the adapter layers, without PEFT: the mask falls on the update's input only.

In training mode with dropout p, every layer computes

    y = x W0^T + b + x_d (W' - W0)^T,    x_d = dropout(x)

(LoRA: W' - W0 = s B A; DoRA: W' = m V / ||V||_row; the efficient DoRA layer writes the same as
(k - 1) x_d W0^T + k s x_d A^T B^T + x W0^T + b with k = m / ||V||_row). The base term always
sees the clean input. PEFT does the same (tests/test_peft_parity.py checks that separately);
these tests need nothing but torch. Same random state before two forwards = the same mask.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

P = 0.4
RANK, ALPHA = 4, 6  # s = 1.5
LAYERS = {  # Part III's layers: Part I's keep the idea alone, without dropout
    "LoRALinear": ("LoRALinear", {}),
    "DoRALinear-factored": ("DoRALinear", {"factored_norm": True}),
    "DoRALinear-dense": ("DoRALinear", {"factored_norm": False}),
}


def layer(nb, key, base, trained=True, dropout=P, **kw):
    cls, options = LAYERS.get(key, (key, {}))
    extra = {"dropout": dropout} if dropout is not None else {}
    out = getattr(nb, cls)(base, RANK, ALPHA, **extra, **options, **kw)
    if trained:  # B != 0, m != ||W0||: the update is not zero
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            out.lora.B.copy_(0.3 * torch.randn(out.lora.B.shape, generator=g))
            if hasattr(out, "m"):
                out.m.mul_(1 + 0.5 * torch.rand(out.m.shape, generator=g, dtype=out.m.dtype))
    return out


def base_linear(bias=True, n_in=30, n_out=20):
    torch.manual_seed(0)
    return nn.Linear(n_in, n_out, bias=bias, dtype=torch.float64).requires_grad_(False)


def inputs(n_in=30):
    torch.manual_seed(3)
    return torch.randn(16, n_in, dtype=torch.float64, requires_grad=True)


def trainable(module):
    return [p for p in module.parameters() if p.requires_grad]


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("key", list(LAYERS))
def test_zero_update_gives_exactly_the_base_layer_under_dropout(nb, key, bias):
    """B = 0 and m = ||W0|| (the layers at init): the update term is zero whatever the mask,
    so the output and the input's gradient are the base layer's, undropped."""
    base = base_linear(bias)
    fresh = layer(nb, key, base, trained=False).train()
    x = inputs()
    torch.manual_seed(5)
    y = fresh(x)
    y_base = base(x)
    assert rel(y, y_base) < 1e-13  # DoRA: m V / ||V|| = W0 up to rounding
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    (gx_base,) = torch.autograd.grad(y_base, x, g)
    assert rel(gx, gx_base) < 1e-13
    torch.manual_seed(5)
    dropped = F.dropout(x, P)
    assert rel(base(dropped), y_base) > 0.1  # a mask on the base term would have shown


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("key", list(LAYERS))
def test_training_forward_is_clean_base_plus_dropped_update(nb, key, bias):
    """y = x W0^T + b + x_d (W' - W0)^T with x_d = dropout(x) under the same random state;
    the gradients of x and of every adapter parameter agree too. In eval mode: no mask."""
    base = base_linear(bias)
    ours = layer(nb, key, base).train()
    x = inputs()
    torch.manual_seed(5)
    y = ours(x)
    torch.manual_seed(5)
    x_d = F.dropout(x, P)
    W0 = base.weight
    expected = F.linear(x, W0, base.bias) + F.linear(x_d, ours.merged_weight() - W0)
    assert rel(y, expected) < 1e-12
    g = torch.randn_like(y)
    wrt = [x, *trainable(ours)]
    got, want = torch.autograd.grad(y, wrt, g), torch.autograd.grad(expected, wrt, g)
    assert len(got) == 1 + (3 if "DoRA" in key else 2)
    for a, b in zip(got, want, strict=True):
        assert rel(a, b) < 1e-10
    torch.manual_seed(6)
    assert rel(ours(x), y) > 1e-3  # another mask, another output: dropout is on
    ours.eval()
    with torch.no_grad():
        assert rel(ours(x), F.linear(x, ours.merged_weight(), base.bias)) < 1e-12


@pytest.mark.parametrize("detach", [True, False], ids=["detached", "not-detached"])
@pytest.mark.parametrize("factored", [True, False], ids=["factored", "dense"])
def test_textbook_and_efficient_agree_in_training_with_dropout(nb, factored, detach):
    """The efficient forward ((k - 1) x_d W0^T + ...) against x W0^T + b + x_d (W' - W0)^T
    written out with Part I's layer (which builds W'), same parameters and mask: outputs and
    the gradients of x, A, B and m."""
    base = base_linear(n_in=48, n_out=24)
    book = layer(nb, "LinearWithDoRA", base, dropout=None, detach_norm=detach).train()
    fast = nb.DoRALinear(
        base, RANK, ALPHA, detach_norm=detach, factored_norm=factored, dropout=P
    ).train()
    fast.load_state_dict(book.state_dict())
    x = inputs(48)
    torch.manual_seed(9)
    y_book = base(x) + F.linear(F.dropout(x, P), book.merged_weight() - base.weight)
    torch.manual_seed(9)
    y_fast = fast(x)
    assert rel(y_fast, y_book) < 1e-12
    g = torch.randn_like(y_book)
    names = ["lora.A", "lora.B", "m"]
    g_book = torch.autograd.grad(y_book, [x, *(book.get_parameter(n) for n in names)], g)
    g_fast = torch.autograd.grad(y_fast, [x, *(fast.get_parameter(n) for n in names)], g)
    for name, a, b in zip(["x", *names], g_fast, g_book, strict=True):
        assert rel(a, b) < 1e-10, name
