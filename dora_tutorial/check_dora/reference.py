"""The reference DoRA formula, and the base layer type the checks wrap (nn.Linear here, see
conv.py for nn.Conv2d): build it, read the weight a layer applies, feed it inputs."""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def reference_weight(W0, A, B, m, scaling, axis=1, detach=True):
    """(W', k): DoRA's W' = k V with V = W0 + scaling B A and k = m / ||V||."""
    V = W0 + scaling * (B @ A)
    norm = V.norm(dim=axis, keepdim=True).clamp_min(1e-12)  # the paper's formula: 0 / 0 on 0 rows
    k = m.reshape(norm.shape) / (norm.detach() if detach else norm)
    return k * V, k


def reference_forward(
    x, W0, b, A, B, m, scaling, *, axis=1, detach=True, rescale_bias=False, apply=F.linear
):
    """DoRA's output y = x W'^T + b. The defaults are the paper's conventions; the keywords the
    variants the checks recognise (axis=0: per input column; detach=False: the norm
    differentiated; rescale_bias: the bias multiplied by m / ||V|| too)."""
    W, k = reference_weight(W0, A, B, m, scaling, axis, detach)
    return apply(x, W, k.flatten() * b if b is not None and rescale_bias else b)


def rel(a, b):
    """Largest difference relative to the largest entry of b."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def pct(x):
    """A relative difference in words."""
    return f"{100 * x:.0f}%" if x >= 0.01 else f"{x:.0e}"


def as_matrix(t):
    """A kernel (out, in, kh, kw) as the matrix (out, in * kh * kw), the form every weight is
    compared in; vectors and matrices as they are."""
    return t.flatten(1) if t.dim() > 2 else t


@dataclass(frozen=True)
class LayerKind:
    """What the checks need to know about the wrapped layer type.

    make_base(n_in, n_out, bias, dtype, seed): a base layer with reproducible weights;
    effective_weight(layer, n_in): the weight matrix and offset y(0) the layer applies, read
    from its outputs; inputs(lead, n_in, seed, dtype): random inputs; apply(x, W, b): the base
    layer's function with the weight matrix W."""

    name: str
    make_base: Callable[..., nn.Module]
    effective_weight: Callable[[nn.Module, int], tuple[torch.Tensor, torch.Tensor]]
    inputs: Callable[..., torch.Tensor]
    apply: Callable[..., torch.Tensor]


def make_linear(n_in, n_out, bias, dtype, seed):
    """An nn.Linear with reproducible weights in nn.Linear's range and a bias of order 1."""
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(n_in, n_out, bias=bias, dtype=dtype)
    with torch.no_grad():
        bound = 1 / math.sqrt(n_in)
        linear.weight.copy_((2 * torch.rand(n_out, n_in, generator=g) - 1) * bound)
        if bias:
            linear.bias.copy_(2 * torch.rand(n_out, generator=g) - 1)
    return linear


def read_weight(layer, n, to_inputs=lambda basis: basis, from_outputs=lambda y: y):
    """(W', y(0)) of the affine map a layer computes, in float64: y(e_j) - y(0) is column j of
    W', so no ``merged_weight()`` method is needed. The n one-hot vectors e_j and 0 go through
    ``to_inputs`` into the layer; ``from_outputs`` turns its outputs into (n + 1, out) rows."""
    dtype = next((p.dtype for p in layer.parameters() if p.is_floating_point()), torch.float64)
    eye = torch.eye(n, dtype=dtype)
    with torch.no_grad():
        y = from_outputs(layer(to_inputs(torch.cat([eye, eye.new_zeros(1, n)])))).double()
    return (y[:-1] - y[-1]).T, y[-1]


def _linear_inputs(lead, n_in, seed, dtype=torch.float64):
    return torch.randn(*lead, n_in, generator=torch.Generator().manual_seed(seed), dtype=dtype)


LINEAR = LayerKind("nn.Linear", make_linear, read_weight, _linear_inputs, F.linear)
