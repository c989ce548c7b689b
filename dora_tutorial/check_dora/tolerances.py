"""How far a layer may be from the float64 reference: derived from its dtype's rounding."""

import math

import torch

TOL = 1e-9  # largest relative difference accepted in float64
# A sum of n rounded terms errs by about u sqrt(n) relative (u = eps / 2, independent rounding
# errors), and DoRA's forward and backward chain about this many such sums and roundings (V, its
# norm, the division, the product, the bias, and as many again in backward).
_ROUNDING_STEPS = 8


def tolerance(dtype, n):
    """The largest relative difference accepted for a result of sums of up to n terms computed
    in ``dtype``: _ROUNDING_STEPS * eps / 2 * sqrt(n), and never less than TOL."""
    if dtype == torch.float64:
        return TOL
    return max(TOL, _ROUNDING_STEPS * torch.finfo(dtype).eps / 2 * math.sqrt(n))


def rel(a, b):
    """Largest difference relative to the largest entry of b."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def pct(x):
    return f"{100 * x:.0f}%" if x >= 0.01 else f"{x:.0e}"


def dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


DTYPES = {dtype_name(d): d for d in (torch.float64, torch.float32, torch.bfloat16, torch.float16)}
LOW_PRECISION = (torch.bfloat16, torch.float16)
