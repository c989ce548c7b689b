"""The checks on a layer that wraps an nn.Conv2d (kind="conv2d", --conv2d). The kernel is read
as the matrix (out, in * 3 * 3): a row per output channel, so the row norms are DoRA's norm over
all axes but the output channel and m has one entry per output channel."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .reference import LayerKind, make_linear, read_weight

_STRIDE, _PADDING = 2, 1


def _make(n_in, n_out, bias, dtype, seed):
    linear = make_linear(n_in * 9, n_out, bias=bias, dtype=dtype, seed=seed)
    conv = nn.Conv2d(n_in, n_out, 3, _STRIDE, _PADDING, bias=bias, dtype=dtype)
    with torch.no_grad():
        conv.weight.copy_(linear.weight.reshape(conv.weight.shape))
        if bias:
            conv.bias.copy_(linear.bias)
    return conv


def _effective_weight(layer, n_in):
    """(W' as an (out, n_in * 9) matrix, y(0)): one-hot 3x3 patches, padded to 5x5 so that
    output pixel (1, 1) (stride 2, padding 1) sees exactly the patch."""
    return read_weight(
        layer,
        n_in * 9,
        lambda basis: F.pad(basis.reshape(-1, n_in, 3, 3), (1, 1, 1, 1)),
        lambda y: y[:, :, 1, 1],
    )


def _inputs(lead, n_in, seed, dtype=torch.float64):
    # a convolution takes one batch axis
    g = torch.Generator().manual_seed(seed)
    return torch.randn(math.prod(lead), n_in, 6, 5, generator=g, dtype=dtype)


def _apply(x, W, b):
    return F.conv2d(x, W.reshape(W.shape[0], -1, 3, 3), b, _STRIDE, _PADDING)


CONV2D = LayerKind("nn.Conv2d", _make, _effective_weight, _inputs, _apply)
