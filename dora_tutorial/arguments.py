"""Argument checks: a clear error when a layer is built, not deep inside a forward pass."""

import torch
from torch import nn


def check_adapter_args(in_features, out_features, rank, alpha):
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    if rank > min(in_features, out_features):
        raise ValueError(
            f"rank={rank} exceeds min(in_features, out_features) = "
            f"{min(in_features, out_features)} for a {in_features}->{out_features} layer; "
            "use a smaller rank"
        )
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not alpha > 0:
        raise ValueError(f"alpha must be a positive number, got {alpha!r}")


def check_dropout(p):
    """Dropout on the update's input is a probability; p = 1 would drop every input."""
    if isinstance(p, bool) or not isinstance(p, int | float) or not 0 <= p < 1:
        raise ValueError(f"dropout must be a number in [0, 1), got {p!r}")


def check_linear(module):
    if not isinstance(module, nn.Linear):
        raise TypeError(
            f"expected an nn.Linear to wrap, got {type(module).__name__}; "
            "wrap the Linear layers inside it instead"
        )


def choose_adapter_dtype(weight, adapter_dtype=None):
    """The dtype of A, B and m: float32 on a bfloat16 or float16 base (as PEFT), else the base's."""
    if adapter_dtype is None:
        return torch.float32 if weight.dtype in (torch.bfloat16, torch.float16) else weight.dtype
    if not isinstance(adapter_dtype, torch.dtype) or not adapter_dtype.is_floating_point:
        raise ValueError(f"adapter_dtype must be a floating torch.dtype, got {adapter_dtype!r}")
    return adapter_dtype


def check_conv(module, rank, alpha):
    if not isinstance(module, nn.Conv2d):
        raise TypeError(
            f"expected an nn.Conv2d to wrap, got {type(module).__name__}; nn.Linear: LinearWith*"
        )
    out_channels, _, kh, kw = module.weight.shape
    check_adapter_args(module.in_channels * kh * kw, out_channels, rank, alpha)  # kernel as matrix
    if rank % module.groups:
        raise ValueError(
            f"rank={rank} must be a multiple of groups={module.groups}: each gets rank/groups"
        )
    if module.padding_mode != "zeros":
        raise ValueError(
            f"padding_mode={module.padding_mode!r} unsupported: pad with F.pad and use padding=0"
        )
