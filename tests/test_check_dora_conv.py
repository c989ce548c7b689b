"""dora_tutorial/check_dora on convolutions (kind="conv2d", --conv2d): a conv DoRA broken once
fails that check only, and PEFT's fails only where its linear DoRA does. (The notebook's
Conv2dWithDoRA is checked in tests/test_conv.py.)

ConvReferenceDoRA is the paper's DoRA on an nn.Conv2d (A and B as kernels, PEFT's layout), with
one switch per convention, written here on the kernel read as a matrix (out, in * kh * kw).
"""

import functools
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dora_tutorial.check_dora import check_dora, main, peft_dora_factory, peft_unavailable_reason


class ConvReferenceDoRA(nn.Module):
    """The paper's DoRA on a convolution; each keyword breaks one convention."""

    def __init__(
        self, conv, rank, alpha, *, axis=1, scale_by_alpha=False, detach=True, rescale_bias=False
    ):
        super().__init__()
        self.conv = conv.requires_grad_(False)
        out, n_in, kh, kw = conv.weight.shape
        w = conv.weight  # float32 adapters on a bfloat16 or float16 base, as PEFT
        dtype = torch.float32 if w.dtype in (torch.bfloat16, torch.float16) else w.dtype
        self.A = nn.Parameter(torch.empty(rank, n_in, kh, kw, dtype=dtype))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.B = nn.Parameter(torch.zeros(out, rank, 1, 1, dtype=dtype))
        self.m = nn.Parameter(w.detach().to(dtype).flatten(1).norm(dim=axis))
        self.scaling = alpha if scale_by_alpha else alpha / rank
        self.axis, self.detach, self.rescale_bias = axis, detach, rescale_bias

    def forward(self, x):
        c, h = self.conv, x.to(self.A.dtype)
        V = c.weight.flatten(1).to(h.dtype) + self.scaling * self.B.flatten(1) @ self.A.flatten(1)
        b = None if c.bias is None else c.bias.to(h.dtype)
        norm = V.norm(dim=self.axis, keepdim=True).clamp_min(1e-12)
        if self.detach:
            norm = norm.detach()
        k = self.m.reshape(norm.shape) / norm
        if self.rescale_bias:  # rescales the whole base output, bias included
            y = F.conv2d(h, V.reshape(c.weight.shape), b, c.stride, c.padding)
            return (k.reshape(1, -1, 1, 1) * y).to(x.dtype)
        return F.conv2d(h, (k * V).reshape(c.weight.shape), b, c.stride, c.padding).to(x.dtype)


VARIANTS = {  # factory, the checks it must fail
    "reference": (ConvReferenceDoRA, set()),
    "norm per input column": (functools.partial(ConvReferenceDoRA, axis=0), {2}),
    "scaling alpha": (functools.partial(ConvReferenceDoRA, scale_by_alpha=True), {4}),
    "no detach": (functools.partial(ConvReferenceDoRA, detach=False), {6}),
    "rescaled bias": (functools.partial(ConvReferenceDoRA, rescale_bias=True), {5}),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_conv_variant_fails_exactly_its_own_checks(variant):
    factory, expected = VARIANTS[variant]
    report = check_dora(factory, kind="conv2d")
    assert report.identified, report.problem
    assert set(report.failed) == expected, str(report)


def test_peft_conv_dora_passes_1_to_7_and_fails_8_on_zero_rows():
    """As for nn.Linear: PEFT divides by the raw norm, so an all-zero kernel gives 0 / 0."""
    reason = peft_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    report = check_dora(peft_dora_factory, kind="conv2d")
    assert "lora_magnitude_vector.default.weight (1, 7, 1, 1)" in report.adapter
    assert set(report.failed) == {8}, str(report)


def test_command_line_conv2d(capsys):
    status = main(["--conv2d", f"{Path(__file__)}:ConvReferenceDoRA"])
    out = capsys.readouterr().out
    assert status == 0 and "ConvReferenceDoRA on nn.Conv2d" in out
    assert "9 of 12 checks pass, 3 not applicable (9, 10, 12)" in out
