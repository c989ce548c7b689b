"""The efficient DoRA layer equals the textbook one, and is cheaper where it should be."""

import copy

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
    book = nb.LinearWithDoRA(base, rank, 2 * rank, detach_norm=detach)
    with torch.no_grad():
        book.lora.B.normal_(std=0.3)
        book.m.mul_(torch.rand(n_out, dtype=dtype) + 0.5)
    fast = nb.DoRALinear(base, rank, 2 * rank, detach_norm=detach, factored_norm=factored)
    fast.load_state_dict(book.state_dict())
    return book, fast


@pytest.mark.parametrize("factored", [True, False])
@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(33, 17, 3), (64, 128, 8), (10, 10, 10)])
def test_efficient_equals_textbook(nb, shape, bias, detach, factored):
    book, fast = pair(nb, *shape, bias=bias, detach=detach, factored=factored)
    x = torch.randn(2, 5, shape[0], dtype=torch.float64, requires_grad=True)  # (batch, seq, in)
    y_book, y_fast = book(x), fast(x)
    assert y_fast.shape == (2, 5, shape[1])
    assert rel(y_fast, y_book) < 1e-12
    grad_out = torch.randn_like(y_book)
    g_book = torch.autograd.grad(y_book, [x, *(book.get_parameter(n) for n in PARAMS)], grad_out)
    g_fast = torch.autograd.grad(y_fast, [x, *(fast.get_parameter(n) for n in PARAMS)], grad_out)
    for name, a, b in zip(("x", *PARAMS), g_fast, g_book, strict=True):
        assert rel(a, b) < 1e-10, name


def test_efficient_float32_close_to_float64(nb):
    book, fast = pair(nb, 256, 128, 8)
    fast32 = copy.deepcopy(fast).float()
    x = torch.randn(64, 256, dtype=torch.float64)
    assert rel(fast32(x.float()).double(), book(x)) < 1e-5


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-13), (torch.float32, 1e-6)])
def test_factored_row_norm(nb, dtype, tol):
    torch.manual_seed(0)
    W0, A, B = (torch.randn(*s, dtype=dtype) for s in [(50, 70), (6, 70), (50, 6)])
    dense = torch.linalg.vector_norm(W0 + 0.7 * B @ A, dim=1)
    assert rel(nb.factored_row_norm(W0, A, B, 0.7), dense) < tol
    assert torch.equal(nb.row_norm(W0 + 0.7 * B @ A), dense)


def test_factored_row_norm_gradient(nb):
    """Without detaching, gradients flow through the factored norm exactly as through the dense."""
    torch.manual_seed(0)
    W0 = torch.randn(12, 9, dtype=torch.float64)
    A = torch.randn(3, 9, dtype=torch.float64, requires_grad=True)
    B = torch.randn(12, 3, dtype=torch.float64, requires_grad=True)
    gf = torch.autograd.grad(nb.factored_row_norm(W0, A, B, 1.5).sum(), [A, B])
    gd = torch.autograd.grad(nb.row_norm(W0 + 1.5 * B @ A).sum(), [A, B])
    for a, b in zip(gf, gd, strict=True):
        assert rel(a, b) < 1e-12


def test_detached_norm_keeps_no_full_size_matrix(nb):
    """Efficient + detached saves only token-sized tensors; the textbook layer saves V and W'."""
    n_in, n_out, tokens, rank = 512, 256, 16, 4
    book, fast = pair(nb, n_in, n_out, rank, dtype=torch.float32)
    x = torch.randn(tokens, n_in, requires_grad=True)
    saved_fast = helpers.saved_tensor_bytes(lambda: fast(x).sum())
    saved_book = helpers.saved_tensor_bytes(lambda: book(x).sum())
    full = n_in * n_out * 4
    # x V^T (tokens, out), x A^T (tokens, r), k = m/||V|| and ||V|| (out,) each
    assert saved_fast == 4 * (tokens * n_out + tokens * rank + 2 * n_out)
    assert saved_book >= 2 * full  # V and W'


def test_factored_norm_chosen_by_size(nb):
    small = nb.DoRALinear(nn.Linear(784, 128), 4, 8)
    large = nb.DoRALinear(nn.Linear(1024, 1024), 4, 8)
    forced = nb.DoRALinear(nn.Linear(784, 128), 4, 8, factored_norm=True)
    assert (small.factored_norm, large.factored_norm, forced.factored_norm) == (False, True, True)


def test_efficient_has_the_textbook_state_dict_and_merged_weight(nb):
    book, fast = pair(nb, 20, 10, 2)
    assert sorted(fast.state_dict()) == sorted(book.state_dict())  # they load each other
    torch.testing.assert_close(fast.merged_weight(), book.merged_weight(), rtol=0, atol=0)
