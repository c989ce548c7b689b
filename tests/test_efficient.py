"""The efficient DoRA layer (DoRALinear), with its factored or its dense row norm, equals the
textbook one (LinearWithDoRA), and it keeps less for backward."""

import pytest
import torch
from torch import nn

import helpers
from support import rel

PARAMS = ("lora.A", "lora.B", "m")


def pair(nb, n_in, n_out, rank, *, bias=True, detach=True, factored=True, dtype=torch.float64):
    """A textbook and an efficient layer with the same random, non-zero parameters."""
    torch.manual_seed(0)
    base = nn.Linear(n_in, n_out, bias=bias, dtype=dtype).requires_grad_(False)
    book = nb.LinearWithDoRA(base, rank, 3 * rank, detach_norm=detach)  # s = 3: 2s != s^2
    with torch.no_grad():
        book.lora.B.normal_(std=0.3)
        book.m.mul_(torch.rand(n_out, dtype=dtype) + 0.5)
    fast = nb.DoRALinear(base, rank, 3 * rank, detach_norm=detach, factored_norm=factored)
    fast.load_state_dict(book.state_dict())  # the same state dict: they load each other
    return book, fast


@pytest.mark.parametrize("factored", [True, False], ids=["factored", "dense"])
@pytest.mark.parametrize("detach", [True, False], ids=["detached", "exact"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", [(33, 17, 3), (64, 128, 8), (10, 10, 10), (3, 1, 1)], ids=str)
def test_efficient_equals_textbook(nb, shape, bias, detach, factored):
    book, fast = pair(nb, *shape, bias=bias, detach=detach, factored=factored)
    x = torch.randn(2, 5, shape[0], dtype=torch.float64, requires_grad=True)  # (batch, seq, in)
    y_book, y_fast = book(x), fast(x)
    assert y_fast.shape == (2, 5, shape[1])
    assert rel(y_fast, y_book) < 1e-12
    torch.testing.assert_close(fast.merged_weight(), book.merged_weight(), rtol=1e-13, atol=0)
    grad_out = torch.randn_like(y_book)
    g_book = torch.autograd.grad(y_book, [x, *(book.get_parameter(n) for n in PARAMS)], grad_out)
    g_fast = torch.autograd.grad(y_fast, [x, *(fast.get_parameter(n) for n in PARAMS)], grad_out)
    for name, a, b in zip(("x", *PARAMS), g_fast, g_book, strict=True):
        assert rel(a, b) < 1e-10, name


def cancelling(shrink, dtype=torch.float32):
    """W0 (6, 40) and a rank-1 update (s = 2) that shrinks row 0 to `shrink` times its length."""
    g = torch.Generator().manual_seed(0)
    W0 = torch.randn(6, 40, generator=g, dtype=dtype)
    B = torch.zeros(6, 1, dtype=dtype)
    B[0, 0] = -(1 - shrink) / 2.0
    B[1:, 0] = 0.01 * torch.randn(5, generator=g, dtype=dtype)
    return W0, W0[:1].clone(), B, 2.0


@pytest.mark.parametrize("shrink", [0.3, 0.05, 1e-5])
def test_factored_norm_where_the_sum_cancels(nb, shrink):
    """The factored sum's error grows like u ||W0||^2 / ||V||^2. Where it is all rounding (row 0
    at 1e-5 of its length, float32) the norm is floored at float32's rounding of ||W0[0]||^2,
    not at EPS (k = m / norm would be m * 1e12); float64 is not floored there in practice."""
    W0, A, B, s = cancelling(shrink)
    exact = nb.row_norm(W0.double() + s * (B.double() @ A.double()))
    got = nb.factored_row_norm(W0, A, B, s).double()
    if shrink > 1e-3:
        assert ((got - exact).abs() / exact).max() < 2e-7 / shrink**2
    else:
        floor = torch.finfo(torch.float32).eps ** 0.5 * W0[0].norm()
        assert torch.isfinite(got).all() and floor * 0.99 <= got[0] <= 10 * floor
        torch.testing.assert_close(got[1:], exact[1:], rtol=1e-5, atol=0)
    W0, A, B, s = cancelling(shrink, torch.float64)
    exact = nb.row_norm(W0 + s * (B @ A))
    torch.testing.assert_close(nb.factored_row_norm(W0, A, B, s), exact, rtol=1e-5, atol=0)


def test_detached_norm_keeps_no_full_size_matrix(nb):
    """Efficient + detached saves only token-sized tensors; the textbook layer saves V and W'."""
    n_in, n_out, tokens, rank = 512, 256, 16, 4
    book, fast = pair(nb, n_in, n_out, rank, dtype=torch.float32)
    x = torch.randn(tokens, n_in, requires_grad=True)
    saved_fast = helpers.saved_tensor_bytes(lambda: fast(x).sum())
    saved_book = helpers.saved_tensor_bytes(lambda: book(x).sum())
    # x V^T (tokens, out), x A^T (tokens, r), k = m/||V|| and ||V|| (out,) each
    assert saved_fast == 4 * (tokens * n_out + tokens * rank + 2 * n_out)
    assert saved_book >= 2 * n_in * n_out * 4  # V and W'
