"""Dropout in the adapter layers, without PEFT: the mask falls on the update's input only.

In training mode with dropout p every layer computes y = x W0^T + b + x_d (W' - W0)^T with
x_d = dropout(x) (the efficient DoRA layer as (k - 1) x_d W0^T + k s x_d A^T B^T + x W0^T + b,
k = m / ||V||_row). Same random state before two forwards = the same mask."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from support import looks_trained, make_layer, rel

P = 0.4
KEYS = ["LoRALinear", "DoRALinear-factored", "DoRALinear-dense"]  # Part I's have no dropout


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("key, exact", [(k, False) for k in KEYS] + [(k, True) for k in KEYS[1:]])
def test_training_forward_is_clean_base_plus_dropped_update(nb, key, bias, exact):
    """y = x W0^T + b + x_d (W' - W0)^T, W' from Part I's layer (which builds it) with the same
    parameters; the gradients of x and every adapter parameter agree. Eval mode: no mask."""
    torch.manual_seed(0)
    base = nn.Linear(30, 20, bias=bias, dtype=torch.float64).requires_grad_(False)
    exact = {"detach_norm": False} if exact else {}
    ours = make_layer(nb, key, base, 4, 6, dropout=P, **exact).train()
    looks_trained(ours, b_std=0.3, m_spread=0.5)  # B != 0, m != ||W0||: the update is not zero
    x = torch.randn(16, 30, dtype=torch.float64, requires_grad=True)
    book_cls = nb.LinearWithDoRA if "DoRA" in key else nb.LinearWithLoRA
    book = book_cls(base, 4, 6, **exact)
    book.load_state_dict(ours.state_dict())
    torch.manual_seed(5)
    y = ours(x)
    torch.manual_seed(5)
    expected = base(x) + F.linear(F.dropout(x, P), book.merged_weight() - base.weight)
    assert rel(y, expected) < 1e-12
    g = torch.randn_like(y)
    trained = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert len(trained) == (3 if "DoRA" in key else 2)
    got = torch.autograd.grad(y, [x, *(ours.get_parameter(n) for n in trained)], g)
    want = torch.autograd.grad(expected, [x, *(book.get_parameter(n) for n in trained)], g)
    for name, a, b in zip(["x", *trained], got, want, strict=True):
        assert rel(a, b) < 1e-10, name
    torch.manual_seed(6)
    assert rel(ours(x), y) > 1e-3  # another mask, another output: dropout is on
    ours.eval()
    with torch.no_grad():
        assert rel(ours(x), F.linear(x, ours.merged_weight(), base.bias)) < 1e-12
