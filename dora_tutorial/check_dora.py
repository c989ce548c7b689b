"""Check your own DoRA layer against the paper, the official code and PEFT, check by check.

    python tools/check_dora.py my_module.py:MyDoRA        # called as MyDoRA(linear, rank, alpha)
    python tools/check_dora.py package.module:make_layer  # any factory(linear, rank, alpha)
    python tools/check_dora.py --peft                     # Hugging Face PEFT's DoRA
    python tools/check_dora.py --conv2d my_module.py:MyConvDoRA   # MyConvDoRA(conv, rank, alpha)

From Python (importing this file does nothing but define things):

    from tools.check_dora import check_dora
    report = check_dora(MyDoRA)
    print(report)        # one line per check: pass or FAIL, and what a failure means for training
    report.passed        # True when every check passes

Exit status: 0 when every check passes, 1 when a check fails, 2 for a usage error (missing file
or name, a factory that cannot be called) or a layer whose A, B and m cannot be identified.

The reference (DoRA, arXiv 2402.09353, as the official code and PEFT implement it), for an
nn.Linear with weight W0 (out, in) and bias b, rank r and alpha:

    V  = W0 + s B A,  s = alpha / r,  A: (r, in) random,  B: (out, r) zeros at initialisation
    W' = m * V / ||V||,  ||V|| the norm of each OUTPUT row (dim=1), m: (out,) = ||W0|| at init
    y  = x W'^T + b   (the bias is not rescaled);  ||V|| is a constant in backward (.detach())

The paper writes W as (in, out) and takes "column" norms: per output neuron, i.e. per row of
PyTorch's (out, in) weight. Normalising over dim=0 (per input column) is a different method.

How a layer is read, without knowing its attribute names:
- the effective weight and bias come from the layer's function: basis inputs in float64
  (y(e_j) - y(0) is column j of W'), so no `merged_weight()` method is needed;
- A, B and m are found among its parameters by shape (A: (r, in) or (in, r); B: (out, r) or
  (r, out); m: out or in entries) and, where shapes are ambiguous, by initial values (B zeros,
  A not); m must start at the row norms of W0 (or of the initial W') -- or at the column norms,
  the wrong variant, which the report then names. When this fails the report says why, checks
  2-8 are not run, and the exit status is 2.
- The layer is built by the factory on a float64 nn.Linear on the CPU, moved with
  `.to(torch.float64)` and used in training mode (give it no dropout); the checks then set A, B
  and m to known values. A layer that computes in float32 inside fails the float64 tolerances.

Each check isolates one convention, so that a layer wrong in one way fails that check only: the
others use the layer's own axis (found with m, judged by check 2), scaling (measured by check 4),
bias placement (5) and detach (6) wherever those are not their point. E.g. a layer scaling by
alpha instead of alpha / r fails check 4 only. Check 7 compares everything else with the
reference formula (several shapes and ranks, with and without bias, the output and every
gradient) under those measured conventions, and its line names them. The verdict
(`Report.passed`) requires every check to pass.

Convolutions (`check_dora(factory, kind="conv2d")`, `--conv2d`): the factory is called on an
nn.Conv2d (3x3 kernel, stride 2, padding 1, IN input channels), whose kernel the checks read as
the matrix (out, in * 3 * 3): a row per output channel, so the row norms are DoRA's norm over all
axes but the output channel, and m has one entry per output channel. The effective kernel is
read from one-hot 3x3 patches, the reference applies a kernel with F.conv2d, A and B may be kept
as convolution kernels ((rank, in, 3, 3) and (out, rank, 1, 1), PEFT's layout), and m as
(1, out, 1, 1). Everything else, the checks and what they isolate, is the same.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import importlib
import importlib.util
import math
import os
import sys
import textwrap
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

WIDTH = 96  # report lines wrap here: they fit a terminal and a notebook's output area

EPS = 1e-12  # the reference's floor for ||V||: the paper's formula gives 0 / 0 on a zero row
TOL = 1e-9  # largest relative difference accepted in float64
LOW_PRECISION_TOL = 0.05  # bfloat16 / float16 layers against the float32 layer
FLOAT32_ROUNDING = 1e-5  # differences between TOL and this: the layer computes in float32
IN, OUT, RANK, ALPHA = 11, 7, 3, 5  # pairwise different: shapes say which axis is which
SEED = 0

# (in, out, rank, alpha, bias, input shape without the last axis) for check 7
SHAPES = [
    (11, 7, 3, 5, True, (4,)),
    (6, 9, 1, 2, False, (2, 3)),
    (16, 16, 4, 8, True, (5,)),
]

# the scaling rules a layer might use; the first one is DoRA's (and LoRA's)
SCALINGS: dict[str, Callable[[float, int], float]] = {
    "alpha / rank": lambda alpha, rank: alpha / rank,
    "alpha": lambda alpha, rank: float(alpha),
    "alpha / sqrt(rank)": lambda alpha, rank: alpha / math.sqrt(rank),
    "1": lambda alpha, rank: 1.0,
}

Factory = Callable[[nn.Linear, int, float], nn.Module]


# --------------------------------------------------------------------------------------
# The reference formula
# --------------------------------------------------------------------------------------


def reference_forward(
    x, W0, b, A, B, m, scaling, *, axis=1, detach=True, rescale_bias=False, apply=F.linear
):
    """DoRA's output y = x W'^T + b with W' = m V / ||V||, V = W0 + scaling B A.

    The defaults are the paper's conventions. The keywords give the variants the checks
    recognise: axis=0 normalises per input column, detach=False differentiates the norm,
    rescale_bias=True multiplies the bias by m / ||V|| too. ||V|| is floored at EPS.
    """
    V = W0 + scaling * (B @ A)
    norm = torch.linalg.vector_norm(V, dim=axis, keepdim=True).clamp_min(EPS)
    if detach:
        norm = norm.detach()
    k = m.reshape(norm.shape) / norm  # m_n / ||V_n||
    if b is not None and rescale_bias:
        b = k.flatten() * b
    return apply(x, k * V, b)


def norms(W, axis):
    """Norm of every row (axis=1) or column (axis=0) of W."""
    return torch.linalg.vector_norm(W, dim=axis)


def rel(a, b):
    """Largest difference relative to the largest entry of b."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def pct(x):
    """A relative difference in words."""
    return f"{100 * x:.0f}%" if x >= 0.01 else f"{x:.0e}"


# --------------------------------------------------------------------------------------
# The base layer type (nn.Linear now; a Conv2d version provides the same four functions)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerKind:
    """What the checks need to know about the wrapped layer type.

    make_base(n_in, n_out, bias, dtype, seed): a base layer with reproducible weights;
    effective_weight(layer, n_in): the weight (as a matrix, out x everything else) and offset
    y(0) the layer applies, read from its outputs; inputs(lead, n_in, seed, dtype): random
    inputs; apply(x, W, b): the base layer's function with weight W, given as that matrix.
    Every weight is compared as that matrix (``weight.flatten(1)``), whatever its shape.
    """

    name: str
    make_base: Callable[..., nn.Module]
    effective_weight: Callable[[nn.Module, int], tuple[torch.Tensor, torch.Tensor]]
    inputs: Callable[..., torch.Tensor]
    apply: Callable[..., torch.Tensor]


def make_linear(n_in, n_out, bias=True, dtype=torch.float64, seed=SEED):
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
    """(W', y(0)) of the affine map a layer computes: y(e_j) - y(0) is column j of W'.

    The n one-hot vectors e_j and 0 (the last row) go through ``to_inputs`` into the layer;
    ``from_outputs`` turns its outputs into (n + 1, out) rows."""
    dtype = next((p.dtype for p in layer.parameters() if p.is_floating_point()), torch.float64)
    eye = torch.eye(n, dtype=dtype)
    with torch.no_grad():
        y = from_outputs(layer(to_inputs(torch.cat([eye, eye.new_zeros(1, n)]))))
    return (y[:-1] - y[-1]).T, y[-1]


def linear_inputs(lead, n_in, seed, dtype=torch.float64):
    """Random inputs of shape (*lead, n_in)."""
    return torch.randn(*lead, n_in, generator=torch.Generator().manual_seed(seed), dtype=dtype)


LINEAR = LayerKind("nn.Linear", make_linear, read_weight, linear_inputs, F.linear)

CONV = {"kernel_size": 3, "stride": 2, "padding": 1}  # the nn.Conv2d the checks build


def make_conv2d(n_in, n_out, bias=True, dtype=torch.float64, seed=SEED):
    """An nn.Conv2d (n_in -> n_out channels, CONV) with make_linear's weights on its kernel."""
    linear = make_linear(n_in * 9, n_out, bias=bias, dtype=dtype, seed=seed)
    conv = nn.Conv2d(n_in, n_out, bias=bias, dtype=dtype, **CONV)
    with torch.no_grad():
        conv.weight.copy_(linear.weight.reshape(conv.weight.shape))
        if bias:
            conv.bias.copy_(linear.bias)
    return conv


def conv2d_effective_weight(layer, n_in):
    """(W' as an (out, n_in * 9) matrix, y(0)) of a layer on n_in channels: one-hot 3x3 patches,
    padded to 5x5 so that output pixel (1, 1) (stride 2, padding 1) sees exactly the patch."""
    return read_weight(
        layer,
        n_in * 9,
        lambda basis: F.pad(basis.reshape(-1, n_in, 3, 3), (1, 1, 1, 1)),
        lambda y: y[:, :, 1, 1],
    )


def conv2d_inputs(lead, n_in, seed, dtype=torch.float64):
    """Random (prod(lead), n_in, 6, 5) images: a convolution takes one batch axis."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(math.prod(lead), n_in, 6, 5, generator=g, dtype=dtype)


def conv2d_apply(x, W, b):
    """The checks' convolution with the kernel W, given as an (out, in * 9) matrix."""
    return F.conv2d(x, W.reshape(W.shape[0], -1, 3, 3), b, CONV["stride"], CONV["padding"])


CONV2D = LayerKind("nn.Conv2d", make_conv2d, conv2d_effective_weight, conv2d_inputs, conv2d_apply)
KINDS = {"linear": LINEAR, "conv2d": CONV2D}


# --------------------------------------------------------------------------------------
# Finding A, B and m
# --------------------------------------------------------------------------------------


class NotIdentified(Exception):
    """The layer's A, B and m could not be found; the message says why."""


def _matrix(t):
    """A kernel (out, in, kh, kw) as the matrix (out, in * kh * kw); vectors and matrices as
    they are."""
    return t.flatten(1) if t.dim() > 2 else t


def _canonical(t, transposed: bool):
    """A or B (or its gradient) in the canonical layout: A (r, in), B (out, r)."""
    return t.T if transposed else _matrix(t)


@dataclass
class Adapter:
    """Where a layer keeps A, B and m (parameter names), and in which layout."""

    a: str
    a_transposed: bool  # stored as (in, r); else (r, in) or a kernel (r, ...)
    b: str
    b_transposed: bool  # stored as (r, out); else (out, r) or a kernel (out, r, 1, 1)
    m: str
    axis: int  # 1: one magnitude per output row, 0: per input column

    def tensors(self, layer):
        """A (r, in), B (out, r) and m (flat), whatever the layout the layer stores them in."""
        A, B, m = (layer.get_parameter(n) for n in (self.a, self.b, self.m))
        return _canonical(A, self.a_transposed), _canonical(B, self.b_transposed), m.flatten()

    def assign(self, layer, A, B, m):
        """Set the layer's A, B and m (given in the canonical layout)."""
        with torch.no_grad():
            for name, value, transposed in (
                (self.a, A, self.a_transposed),
                (self.b, B, self.b_transposed),
            ):
                p = layer.get_parameter(name)
                p.copy_((value.T if transposed else value).reshape(p.shape))
            p = layer.get_parameter(self.m)
            p.copy_(m.reshape(p.shape))

    def grads(self, layer):
        """The gradients of A, B and m in the canonical layout (None where there is none)."""
        out = []
        for name, transposed in ((self.a, self.a_transposed), (self.b, self.b_transposed)):
            g = layer.get_parameter(name).grad
            out.append(None if g is None else _canonical(g, transposed))
        g = layer.get_parameter(self.m).grad
        return [*out, None if g is None else g.flatten()]

    def describe(self, layer):
        shapes = [tuple(layer.get_parameter(n).shape) for n in (self.a, self.b, self.m)]
        return ", ".join(
            f"{what} = {name} {shape}"
            for what, name, shape in zip("ABm", (self.a, self.b, self.m), shapes, strict=True)
        )


def _listing(params):
    return ", ".join(f"{n} {tuple(p.shape)}" for n, p in params) or "none"


def _is_base(p, W0, b):
    """Whether p holds the base layer's weight (or its transpose) or bias."""
    p = _matrix(p.detach())
    if p.shape == W0.shape and torch.equal(p, W0) or p.shape == W0.T.shape and torch.equal(p, W0.T):
        return True
    return b is not None and p.shape == b.shape and torch.equal(p, b)


def _one(candidates, what, wanted, params):
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise NotIdentified(f"no parameter for {what} ({wanted}); parameters: {_listing(params)}")
    names = ", ".join(n for n, _, _ in candidates)
    raise NotIdentified(f"several parameters could be {what} ({wanted}): {names}")


def find_adapter(layer, W0, b, rank, W_init) -> Adapter:
    """A, B and m of a freshly built layer, by shape and initial values (never by name).

    W0, b: the base layer's weight and bias; W_init: the layer's effective weight at init.
    Raises NotIdentified with a message that says what was looked for and what was found.
    """
    n_out, n_in = W0.shape
    params = [(n, p) for n, p in layer.named_parameters() if not _is_base(p, W0, b)]
    shaped = {
        "A": {(rank, n_in): False, (n_in, rank): True},
        "B": {(n_out, rank): False, (rank, n_out): True},
    }
    found = {}
    for what, shapes in shaped.items():
        cands = [(n, p, shapes[s]) for n, p in params if (s := tuple(_matrix(p).shape)) in shapes]
        if len(cands) > 1:  # B starts at zero, A does not
            cands = [c for c in cands if c[1].detach().any() == (what == "A")]
        wanted = " or ".join(str(s) for s in shapes)
        found[what] = _one(cands, what, wanted, params)

    sized = [(n, p) for n, p in params if _vector_like(p) and p.numel() in (n_out, n_in)]
    if not sized:
        raise NotIdentified(
            f"no magnitude vector m: no parameter has {n_out} (out_features) or {n_in} "
            f"(in_features) entries besides the bias; this looks like LoRA, not DoRA. "
            f"Parameters: {_listing(params)}"
        )
    matches = []
    for n, p in sized:
        for axis in (1, 0):
            starts = (norms(W0, axis), norms(W_init, axis))
            flat = p.detach().flatten()
            if any(flat.shape == s.shape and torch.allclose(flat, s, rtol=1e-6) for s in starts):
                matches.append((n, p, axis))
    if not matches:
        raise NotIdentified(
            f"{_listing(sized)} has the size of a magnitude vector, but its initial values are "
            "neither the row norms of W0 nor its column norms; DoRA starts from m = ||W0|| so "
            "that the layer starts as the base layer, and this check needs m in those units "
            "(a magnitude kept as log m or as a factor of ||W0|| cannot be checked)"
        )
    (a, _, a_t), (b_name, _, b_t) = found["A"], found["B"]
    m, _, axis = _one(matches, "m", "the row or column norms of W0", params)
    return Adapter(a, a_t, b_name, b_t, m, axis)


def _vector_like(p):
    return p.dim() >= 1 and sum(s > 1 for s in p.shape) <= 1


# --------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------


@dataclass
class CheckResult:
    """One check's outcome: status is "pass", "fail" or "skip" (not run)."""

    number: int
    title: str
    status: str
    detail: str

    @property
    def passed(self) -> bool:
        return self.status == "pass"

    def __str__(self) -> str:
        mark = {"pass": "pass", "fail": "FAIL", "skip": "skip"}[self.status]
        text = f"  {mark} {self.number}. {self.title}: {self.detail}"
        return textwrap.fill(text, WIDTH, subsequent_indent=" " * 10, break_on_hyphens=False)


@dataclass
class Report:
    """All checks of one layer. str(report) is one line per check (no timings: reproducible)."""

    name: str
    adapter: str | None  # where A, B, m were found, in words
    problem: str | None  # why they could not be found
    results: list[CheckResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def identified(self) -> bool:
        return self.problem is None

    @property
    def passed(self) -> bool:
        return self.identified and all(r.passed for r in self.results)

    @property
    def failed(self) -> list[int]:
        """The numbers of the checks that failed."""
        return [r.number for r in self.results if r.status == "fail"]

    @property
    def exit_status(self) -> int:
        return 2 if not self.identified else 0 if self.passed else 1

    def __str__(self) -> str:
        lines = [f"DoRA conformance: {self.name}"]
        found = (
            f"found {self.adapter}"
            if self.identified
            else f"cannot check this layer: {self.problem}"
        )
        lines.append(textwrap.fill(f"  {found}", WIDTH, subsequent_indent=" " * 4))
        lines += [str(r) for r in self.results]
        n, failed = len(self.results), self.failed
        skipped = sum(r.status == "skip" for r in self.results)
        if self.passed:
            summary = f"all {n} checks pass"
        elif failed:
            summary = f"{len(failed)} of {n} checks fail ({_join(failed)})"
        else:
            summary = f"{n - skipped} of {n} checks pass"
        if skipped:
            summary += f", {skipped} not run (they need A, B and m)"
        lines.append(f"  {summary}")
        return "\n".join(lines)


def _join(numbers):
    return ", ".join(str(n) for n in numbers)


# --------------------------------------------------------------------------------------
# What the checks share
# --------------------------------------------------------------------------------------


@dataclass
class Conventions:
    """The layer's conventions where the checks measured them; the paper's until then."""

    axis: int = 1
    scaling: str = "alpha / rank"
    rescaled_bias: bool = False
    detached: bool = True

    def differences(self) -> list[str]:
        out = ["magnitude per input column"] if self.axis == 0 else []
        out += [f"scaling {self.scaling}"] if self.scaling != "alpha / rank" else []
        out += ["bias rescaled"] if self.rescaled_bias else []
        return out + (["norm not detached"] if not self.detached else [])


@dataclass
class Run:
    """One conformance run: the factory, where its A, B, m are, the conventions measured."""

    factory: Factory
    kind: LayerKind = LINEAR
    adapter: Adapter | None = None
    conventions: Conventions = field(default_factory=Conventions)

    def layer(self, base, rank=RANK, alpha=ALPHA):
        """A fresh layer around base, its initialisation reproducible, in base's dtype."""
        torch.manual_seed(SEED)
        layer = self.factory(base, rank, alpha)
        if not isinstance(layer, nn.Module):
            raise TypeError(f"the factory returned a {type(layer).__name__}, not an nn.Module")
        return layer.to(base.weight.dtype)

    def scaling(self, alpha, rank):
        return SCALINGS[self.conventions.scaling](alpha, rank)

    def trained(self, layer, base, rank=RANK, b_scale=1.0, seed=1):
        """Give the layer trained-looking A, B (update comparable to W0) and m != ||V||."""
        W0 = _matrix(base.weight.detach())
        g = torch.Generator().manual_seed(seed)
        n_out, n_in = W0.shape
        A = torch.randn(rank, n_in, generator=g, dtype=W0.dtype) / math.sqrt(n_in)
        B = torch.randn(n_out, rank, generator=g, dtype=W0.dtype) * b_scale / math.sqrt(rank)
        base_norms = norms(W0, self.adapter.axis)
        m = (base_norms + 0.1) * (0.5 + torch.rand(len(base_norms), generator=g, dtype=W0.dtype))
        self.adapter.assign(layer, A, B, m)
        return A, B, m

    def reference(self, x, base, A, B, m, rank, alpha, detach=None):
        """The reference output under the conventions measured so far (detach: override)."""
        c = self.conventions
        return reference_forward(
            x,
            _matrix(base.weight.detach()),
            None if base.bias is None else base.bias.detach(),
            A,
            B,
            m,
            self.scaling(alpha, rank),
            axis=c.axis,
            detach=c.detached if detach is None else detach,
            rescale_bias=c.rescaled_bias,
            apply=self.kind.apply,
        )


@dataclass(frozen=True)
class Check:
    number: int
    title: str
    run: Callable[[Run], tuple[bool, str]]
    needs_adapter: bool


CHECKS: list[Check] = []


def check(number, title, needs_adapter=True):
    """Register a check: a function Run -> (passed, one line in plain words)."""

    def register(fn):
        CHECKS.append(Check(number, title, fn, needs_adapter))
        return fn

    return register


def leaf(t):
    return t.detach().clone().requires_grad_()


def gradient_errors(run, layer, base, state, x, rank, alpha, detach=None):
    """Relative differences of output and of the gradients of A, B, m, x: layer vs reference."""
    g = torch.Generator().manual_seed(2)
    x = leaf(x)
    y = layer(x)
    weights = torch.randn(y.shape, generator=g, dtype=y.dtype)
    (y * weights).sum().backward()
    got = [y, *run.adapter.grads(layer), x.grad]
    A, B, m, x = (leaf(t) for t in (*state, x))
    y = run.reference(x, base, A, B, m, rank, alpha, detach)
    (y * weights).sum().backward()
    expected = [y, A.grad, B.grad, m.grad, x.grad]
    names = ["output", *(f"gradient of {n}" for n in ("A", "B", "m", "the input"))]
    return {
        n: math.inf if a is None or a.shape != b.shape else rel(a, b)
        for n, a, b in zip(names, got, expected, strict=True)
    }


# --------------------------------------------------------------------------------------
# The checks
# --------------------------------------------------------------------------------------


@check(1, "base function at init", needs_adapter=False)
def check_identity_at_init(run: Run):
    """At initialisation the layer computes what the base layer computes: W' = W0, same bias.

    Isolates the initial values (B = 0, m = ||W0||): every other convention (axis, scaling,
    bias, detach) leaves W' = W0 when B = 0. Failing means fine-tuning does not start from the
    pretrained model.
    """
    base = run.kind.make_base(IN, OUT)
    x = run.kind.inputs((5,), IN, seed=3)
    expected = base(x).detach()
    layer = run.layer(base)
    with torch.no_grad():
        err = rel(layer(x), expected)
    if err <= TOL:
        return True, "the layer starts as the pretrained layer (same outputs)"
    if err < FLOAT32_ROUNDING:
        return False, FLOAT32_INSIDE.format(err=err)
    why = ""
    if run.adapter is not None and run.adapter.tensors(layer)[1].detach().any():
        why = " (B is not zero at initialisation)"
    return False, (
        f"at initialisation the outputs differ from the base layer's by up to {pct(err)}{why}: "
        "fine-tuning does not start from the pretrained model; DoRA starts with B = 0 and "
        "m = ||W0|| so that W' = W0"
    )


@check(2, "magnitude axis")
def check_magnitude_axis(run: Run):
    """One magnitude per output row (out_features entries): m_n scales row n of W'.

    Isolates the axis: read from m's size and initial values, then confirmed from the function
    (multiplying m by c multiplies each row of W' by its c_n). The scaling, bias and detach
    conventions do not change this. The per-column variant (norm(dim=0), from a widely copied
    tutorial) rescales input features instead of output neurons: a different method.
    """
    axis = run.adapter.axis
    base = run.kind.make_base(IN, OUT)
    layer = run.layer(base)
    A, B, m = run.trained(layer, base)
    W1, _ = run.kind.effective_weight(layer, IN)
    c = 0.5 + torch.rand(m.shape, generator=torch.Generator().manual_seed(4), dtype=m.dtype)
    run.adapter.assign(layer, A, B, m * c)
    W2, _ = run.kind.effective_weight(layer, IN)
    scales = rel(W2, c[:, None] * W1 if axis == 1 else W1 * c[None, :]) <= TOL
    if axis == 0:
        return False, (
            f"one magnitude per INPUT column ({IN} entries, the column norms of W0), not per "
            f"output row: the norm(dim=0) variant, which rescales input features instead of "
            f"output neurons; a different method from the paper's and PEFT's, whose adapters "
            f"do not load into it"
        )
    if not scales:
        return False, (
            "changing m_n does not scale row n of the merged weight alone: m is not used as "
            "DoRA's magnitude, so training m does not do what DoRA's magnitude does"
        )
    return True, f"one magnitude per output row ({OUT} entries)"


@check(3, "normalisation")
def check_norm_is_m(run: Run):
    """The merged weight's rows have norm m, whatever B is: W' = m V / ||V||, V = W0 + s B A.

    Isolates the normalisation: the norms are taken along the axis the layer's own m lives on
    (check 2 judges the axis); scaling, bias and detach do not change W'. Failing means
    magnitude and direction are not separated (e.g. dividing by ||W0|| instead of ||W0 + s B A||,
    or not normalising), so m is not the rows' length and DoRA's decomposition is lost.
    """
    axis = run.adapter.axis
    worst = 0.0
    for b_scale in (0.1, 10.0):
        base = run.kind.make_base(IN, OUT)
        layer = run.layer(base)
        _, _, m = run.trained(layer, base, b_scale=b_scale)
        W, _ = run.kind.effective_weight(layer, IN)
        worst = max(worst, rel(norms(W, axis), m))
    line = "rows" if axis == 1 else "columns"
    if worst <= TOL:
        return True, f"the merged weight's {line} have norm m, whatever B is"
    return False, (
        f"the merged weight's {line} do not have norm m (off by up to {pct(worst)}): magnitude "
        "and direction are not separated (is the norm taken of W0 + s B A, the weight with the "
        "update?), so training m does not set the rows' length as DoRA's magnitude does"
    )


def measure_scaling(W0, D, W, axis):
    """s such that every row (axis=1) or column of W is proportional to W0 + s D, and the fit.

    Each row n: W[n] = a W0[n] + c D[n] by least squares, s_n = c / a. Returns the median s,
    the spread of the s_n and the worst residual (both relative).
    """
    if axis == 0:
        W0, D, W = W0.T, D.T, W.T
    M = torch.stack([W0, D], dim=2)  # (rows, in, 2)
    coef = torch.linalg.lstsq(M, W.unsqueeze(2)).solution  # (rows, 2, 1)
    residual = rel((M @ coef).squeeze(2), W)
    s = coef[:, 1, 0] / coef[:, 0, 0]
    median = s.median()
    return median.item(), rel(s, median.expand_as(s)), residual


@check(4, "scaling")
def check_scaling(run: Run):
    """The update is scaled by s = alpha / rank: V = W0 + (alpha / r) B A.

    Isolates the scaling: s is measured from the direction of each row of W' (which lies
    along W0 + s B A whatever the magnitude, axis, bias or detach convention). A layer scaling by
    alpha makes the update r times stronger, so the learning rate and alpha tuned for the paper
    or PEFT do not transfer, and changing the rank changes the step size.
    """
    base = run.kind.make_base(IN, OUT)
    layer = run.layer(base)
    A, B, _ = run.trained(layer, base)
    W, _ = run.kind.effective_weight(layer, IN)
    s, spread, residual = measure_scaling(_matrix(base.weight.detach()), B @ A, W, run.adapter.axis)
    if residual > 1e-6 or spread > 1e-6:
        return False, (
            "the merged weight's direction is not W0 + s B A for one s: the update B A is not "
            "added to W0 as DoRA's (and LoRA's) update, so the scaling cannot be measured"
        )
    name = next((n for n, f in SCALINGS.items() if abs(s - f(ALPHA, RANK)) <= 1e-6 * abs(s)), None)
    if name is not None:
        run.conventions.scaling = name
    expected = ALPHA / RANK
    if name == "alpha / rank":
        return True, f"the update is scaled by alpha / rank (= {expected:.4g})"
    if name == "alpha":
        return False, (
            f"the update is scaled by alpha (= {ALPHA}), not alpha / rank (= {expected:.4g}): "
            f"{RANK} times too strong at rank {RANK}, and the step size changes with the rank; "
            "learning rates and alphas tuned for the paper or PEFT do not transfer"
        )
    if name == "alpha / sqrt(rank)":
        what = "alpha / sqrt(rank), rsLoRA's rule (PEFT's use_rslora=True)"
    elif name == "1":
        what = "1: alpha has no effect"
    else:
        what = f"{s:.4g}, none of alpha / rank, alpha, alpha / sqrt(rank), 1"
    return False, (
        f"the update is scaled by {what}, not alpha / rank (= {expected:.4g}): learning rates "
        "and alphas tuned for the paper or PEFT do not transfer"
    )


@check(5, "bias")
def check_bias(run: Run):
    """The bias is added after the rescaling and is not rescaled: y = x W'^T + b.

    Isolates the bias: the output at x = 0 is compared with b after B and m have moved (at
    initialisation m / ||V|| = 1 hides the bug); axis, scaling and detach do not change it.
    A bias multiplied by m / ||V|| drifts whenever m trains, and the layer no longer equals an
    nn.Linear with weight W' and bias b, so merging or exporting it changes the function. Typical
    cause: an efficient forward that rescales base_layer(x), which includes the bias.
    """
    base = run.kind.make_base(IN, OUT, bias=True)
    layer = run.layer(base)
    A, B, m = run.trained(layer, base)
    _, y0 = run.kind.effective_weight(layer, IN)
    b = base.bias.detach()
    if rel(y0, b) <= TOL:
        return True, "the bias is added after the rescaling, not rescaled"
    V = _matrix(base.weight.detach()) + run.scaling(ALPHA, RANK) * (B @ A)
    if run.adapter.axis == 1 and rel(y0, m / norms(V, 1) * b) <= TOL:
        run.conventions.rescaled_bias = True
        return False, (
            "the bias is rescaled by m / ||V|| with the weight: it drifts whenever m trains, and "
            "merging into an nn.Linear (weight W', bias b) changes the function; PEFT and the "
            "official code add b unscaled (subtract the bias before rescaling base_layer(x))"
        )
    if not y0.abs().max() > 0:
        return False, "the bias is dropped: the layer's output at x = 0 is zero, not b"
    return False, f"the output at x = 0 is not the bias b (off by up to {pct(rel(y0, b))})"


@check(6, "norm detached")
def check_detached(run: Run):
    """||V|| is a constant in backward (paper section 4.3, PEFT), which sets A's and B's gradients.

    Isolates the detach: the gradients of A and B (the only ones it changes) are compared with
    the reference with and without the detach, both under the axis, scaling and bias
    conventions measured by checks 2-5 (check 7 compares m's and the input's). Without
    the detach the gradients of A and B differ from the paper's and PEFT's (a different training
    trajectory), and backward keeps V for the norm (more memory); training still works.
    """
    x = run.kind.inputs((6,), IN, seed=5)
    errors = {}
    for detach in (True, False):
        base = run.kind.make_base(IN, OUT)  # a fresh base and layer for each backward pass
        layer = run.layer(base)
        state = run.trained(layer, base)
        err = gradient_errors(run, layer, base, state, x, RANK, ALPHA, detach)
        errors[detach] = max(err["gradient of A"], err["gradient of B"])
    if errors[True] <= TOL:
        return True, "||V|| is a constant in backward (paper section 4.3, PEFT)"
    if errors[False] <= TOL:
        run.conventions.detached = False
        return False, (
            f"||V|| is differentiated in backward, not detached (paper section 4.3): the "
            f"gradients of A and B differ from the paper's and PEFT's by up to "
            f"{pct(errors[True])} (another training trajectory), and backward keeps V for the "
            f"norm (more memory)"
        )
    return False, (
        f"the gradients of A and B match DoRA's neither with nor without the detach "
        f"(off by up to {pct(min(errors.values()))}): backward does not train DoRA's parameters"
    )


@check(7, "reference formula")
def check_reference(run: Run):
    """Forward and gradients (of A, B, m and the input) match the reference formula in float64.

    On wider, taller and square weights, ranks 1 to 4, with and without bias, 2-D and 3-D
    inputs, under the conventions checks 2-6 measured (so a layer wrong in one of those ways
    fails that check only). What it catches is everything else: a wrong gradient (of m, of the
    input), a rank or shape handled wrongly, a layer that only accepts 2-D inputs.
    """
    worst, what, where = 0.0, "", ""
    for i, (n_in, n_out, rank, alpha, bias, lead) in enumerate(SHAPES):
        base = run.kind.make_base(n_in, n_out, bias=bias, seed=10 + i)
        x = run.kind.inputs(lead, n_in, seed=20 + i)
        shape = (
            f"in {n_in}, out {n_out}, rank {rank}, alpha {alpha}, "
            f"{'bias' if bias else 'no bias'}, input {tuple(x.shape)}"
        )
        try:
            layer = run.layer(base, rank, alpha)
            state = run.trained(layer, base, rank, seed=30 + i)
            errors = gradient_errors(run, layer, base, state, x, rank, alpha)
        except Exception as e:
            return False, f"the layer {describe(e)} ({shape})"
        name, err = max(errors.items(), key=lambda kv: kv[1])
        if err > worst:
            worst, what, where = err, name, shape
    conventions = run.conventions.differences()
    under = f" (with this layer's {', '.join(conventions)})" if conventions else ""
    ranks = sorted(rank for _, _, rank, *_ in SHAPES)
    if worst <= TOL:
        return True, (
            f"forward and gradients of A, B, m and x match in float64 on {len(SHAPES)} shapes, "
            f"ranks {ranks[0]}-{ranks[-1]}, with and without bias{under}"
        )
    off = "is missing or has the wrong shape" if math.isinf(worst) else f"is off by {pct(worst)}"
    return False, (
        f"the {what} {off} ({where}){under}: the layer computes something other than DoRA, "
        "beyond the conventions checked above"
    )


def zeroed_base(run, what):
    """A float32 base layer whose row 2 (what="row") or column 4 ("column") is all zero."""
    base = run.kind.make_base(IN, OUT, dtype=torch.float32)
    with torch.no_grad():
        _matrix(base.weight)[(2, slice(None)) if what == "row" else (slice(None), 4)] = 0.0
    return base


def non_finite(run, layer, x):
    """What is NaN or inf after one forward and backward pass ("" when nothing is)."""
    y = layer(x)
    if not torch.isfinite(y).all():
        return "output"
    weights = torch.randn(y.shape, generator=torch.Generator().manual_seed(7))
    (y.float() * weights).sum().backward()
    for what, grad in zip("ABm", run.adapter.grads(layer), strict=True):
        if grad is not None and not torch.isfinite(grad).all():
            return f"gradient of {what}"
    return ""


@check(8, "zero rows, low precision")
def check_robustness(run: Run):
    """No NaN or inf from an all-zero weight row or column; bfloat16 and float16 layers work.

    Isolates numerical safety from the conventions: a zero row and a zero column are tried
    separately (a per-column layer meets its own 0 / 0 on the column), at initialisation (there
    m = 0 and ||V|| = 0) and after B and m moved, forward and backward. Then the layer converted
    with .to(bfloat16) / .to(float16) and fed inputs of that dtype (a model loaded in half
    precision) must stay finite and within 5% of the float32 layer. One NaN output poisons the
    loss and, at the first optimiser step, every weight.
    """
    x = run.kind.inputs((4,), IN, seed=8, dtype=torch.float32)
    for what in ("row", "column"):
        for moved in (False, True):
            base = zeroed_base(run, what)
            layer = run.layer(base)
            if moved:
                run.trained(layer, base)
            bad = non_finite(run, layer, x)
            if bad:
                when = "after B and m moved" if moved else "at initialisation"
                return False, (
                    f"an all-zero weight {what} gives NaN or inf in the {bad} {when}: the norm "
                    f"of a zero {what} is 0 and m / ||V|| = 0 / 0, and one NaN poisons every "
                    "weight at the first step; floor the norm (clamp_min(eps)). Zero rows and "
                    "columns occur in pruned or damaged checkpoints (PEFT issue #2049)"
                )

    def trained_layer():
        base = run.kind.make_base(64, 32, dtype=torch.float32, seed=6)
        layer = run.layer(base, 4, 8)
        run.trained(layer, base, 4)
        return layer

    x = run.kind.inputs((8,), 64, seed=9, dtype=torch.float32)
    with torch.no_grad():
        expected = trained_layer()(x)
    for dtype in (torch.bfloat16, torch.float16):
        low = trained_layer().to(dtype)
        name = str(dtype).removeprefix("torch.")
        bad = non_finite(run, low, x.to(dtype))
        if bad:
            return False, f"in {name} the {bad} has NaN or inf: the layer cannot train in {name}"
        with torch.no_grad():
            err = rel(low(x.to(dtype)).float(), expected)
        if err > LOW_PRECISION_TOL:
            return False, (
                f"in {name} the output is off by {pct(err)} from float32's: too inaccurate to "
                "train in half precision (sum the squares of the norm in float32)"
            )
    return True, "no NaN or inf with an all-zero weight row or column; bfloat16 and float16 work"


# --------------------------------------------------------------------------------------
# Running the checks
# --------------------------------------------------------------------------------------


def describe(e: BaseException) -> str:
    """An exception in one line."""
    text = str(e).strip().splitlines()
    return f"raised {type(e).__name__}" + (f": {text[0][:200]}" if text else "")


def factory_name(factory) -> str:
    """A readable name: the class or function, with a partial's keyword arguments."""
    if isinstance(factory, functools.partial):
        args = [repr(a) for a in factory.args]
        args += [f"{k}={v!r}" for k, v in factory.keywords.items()]
        return f"{factory_name(factory.func)}({', '.join(args)})"
    return getattr(factory, "__qualname__", None) or type(factory).__name__


FLOAT32_INSIDE = (
    "at initialisation the layer differs from the base layer by {err:.0e}, float32 rounding: it "
    "computes in float32 even with float64 parameters and inputs, and these checks need float64 "
    "to tell the conventions apart; make the layer compute in its parameters' dtype"
)


def identify(run: Run) -> tuple[Adapter, str]:
    """Build one layer and find its A, B and m (NotIdentified says why not)."""
    base = run.kind.make_base(IN, OUT)
    try:
        layer = run.layer(base)
    except Exception as e:
        raise NotIdentified(
            f"calling the factory as factory({run.kind.name}({IN}, {OUT}), rank={RANK}, "
            f"alpha={ALPHA}) {describe(e)}; it must take ({run.kind.name[3:].lower()}, rank, "
            "alpha) and return an nn.Module"
        ) from e
    try:
        W_init, _ = run.kind.effective_weight(layer, IN)
    except Exception as e:
        raise NotIdentified(
            f"the layer {describe(e)} on one-hot float64 inputs ({IN} features)"
        ) from e
    W0 = _matrix(base.weight.detach())
    err = rel(W_init, W0)
    if TOL < err < FLOAT32_ROUNDING:
        raise NotIdentified(FLOAT32_INSIDE.format(err=err))
    adapter = find_adapter(layer, W0, base.bias.detach(), RANK, W_init)
    return adapter, adapter.describe(layer)


def check_dora(factory: Factory, *, name: str | None = None, kind: str = "linear") -> Report:
    """Check the DoRA layers factory(linear, rank, alpha) builds; one CheckResult per check.

    factory: a DoRA class or any function called as factory(linear, rank, alpha) that returns an
    nn.Module computing (..., in_features) -> (..., out_features); with kind="conv2d", called as
    factory(conv, rank, alpha) on an nn.Conv2d. The global random state is left as it was. See
    the module docstring for what is checked and how.
    """
    start = time.perf_counter()
    layer_kind = KINDS[kind]
    default = factory_name(factory) + ("" if kind == "linear" else f" on {layer_kind.name}")
    report = Report(name or default, None, None)
    run = Run(factory, layer_kind)
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        try:
            run.adapter, report.adapter = identify(run)
            run.conventions.axis = run.adapter.axis  # judged by check 2, used by the others
        except NotIdentified as e:
            report.problem = str(e)
        except Exception as e:  # a layer this tool did not foresee: say so, do not crash
            report.problem = f"looking for A, B and m {describe(e)}"
        for c in CHECKS:
            if c.needs_adapter and run.adapter is None:
                report.results.append(CheckResult(c.number, c.title, "skip", "not run"))
                continue
            try:
                ok, detail = c.run(run)
            except Exception as e:
                ok, detail = False, describe(e)
            report.results.append(CheckResult(c.number, c.title, "pass" if ok else "fail", detail))
    report.seconds = time.perf_counter() - start
    return report


# --------------------------------------------------------------------------------------
# PEFT's DoRA as a layer
# --------------------------------------------------------------------------------------


@functools.cache
def peft_unavailable_reason() -> str | None:
    """None when PEFT can be imported, else why not (in words)."""
    try:
        import peft  # noqa: F401
        from peft import LoraConfig, get_peft_model  # noqa: F401
    except Exception as e:  # not only ImportError: a broken install can raise anything
        return f"peft cannot be imported ({type(e).__name__}: {e}); pip install peft"
    return None


class PeftDoRA(nn.Module):
    """PEFT's DoRA on one layer (nn.Linear or nn.Conv2d): get_peft_model(nn.Sequential(layer),
    use_dora=True)."""

    def __init__(self, linear, rank, alpha):
        super().__init__()
        reason = peft_unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"PEFT's DoRA cannot be built: {reason}")
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=rank, lora_alpha=alpha, use_dora=True, target_modules=["0"], lora_dropout=0.0
        )
        self.model = get_peft_model(nn.Sequential(linear), config)

    def forward(self, x):
        return self.model(x)


def peft_dora_factory(linear: nn.Linear, rank: int, alpha: float) -> nn.Module:
    """The factory for PEFT's DoRA (B = 0 at initialisation, PEFT's default)."""
    return PeftDoRA(linear, rank, alpha)


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


class UsageError(Exception):
    """A target that cannot be loaded; the message says what to do."""


def import_file(path: Path):
    """Import a Python file as a module (its folder on sys.path, so its own imports work)."""
    name = path.stem if path.stem not in sys.modules else f"_check_dora_target_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UsageError(f"cannot import {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.resolve().parent))
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_factory(target: str):
    """The object a FILE.py:NAME or package.module:NAME target names (NAME may be dotted)."""
    where, colon, attr = target.rpartition(":")
    if not colon or not where or not attr:
        raise UsageError(f"expected FILE.py:NAME or module:NAME, got {target!r}")
    try:
        if where.endswith(".py") or "/" in where or os.sep in where:
            path = Path(where)
            if not path.is_file():
                raise UsageError(f"no such file: {where}")
            module = import_file(path)
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(where)
    except UsageError:
        raise
    except ModuleNotFoundError as e:
        if e.name and where.startswith(e.name):
            raise UsageError(
                f"no module named {where!r} (run from the folder that holds it, or give the "
                f"file: path/to/{where.replace('.', '/')}.py:{attr})"
            ) from e
        raise UsageError(f"importing {where} failed: {_where_failed(e)}") from e
    except Exception as e:
        raise UsageError(f"importing {where} failed: {_where_failed(e)}") from e
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"{where} has no {attr!r}{_suggest(module, attr)}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(f"{target} is a {type(obj).__name__}, not a class or function")
    return obj


def _suggest(module, attr):
    """The classes and functions a module defines, the closest to attr first."""
    defined = sorted(
        n
        for n, v in vars(module).items()
        if callable(v) and getattr(v, "__module__", None) == module.__name__
    )
    if not defined:
        return "; it defines no class or function"
    close = difflib.get_close_matches(attr, defined, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{hint} It defines: {', '.join(defined)}"


def _where_failed(e: BaseException) -> str:
    frames = traceback.extract_tb(e.__traceback__)
    at = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{type(e).__name__}: {e}{at}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="check_dora.py",
        description="Check a DoRA layer against the paper, the official code and PEFT.",
        epilog="exit status: 0 all checks pass, 1 a check fails, 2 usage error or a layer "
        "whose A, B and m cannot be identified",
    )
    parser.add_argument(
        "target",
        nargs="?",
        help="FILE.py:NAME or package.module:NAME, a class or function called as "
        "NAME(linear, rank, alpha)",
    )
    parser.add_argument("--peft", action="store_true", help="also check Hugging Face PEFT's DoRA")
    parser.add_argument(
        "--conv2d",
        action="store_true",
        help="the layers wrap an nn.Conv2d: NAME(conv, rank, alpha) (and PEFT's on a Conv2d)",
    )
    args = parser.parse_args(argv)
    kind = "conv2d" if args.conv2d else "linear"
    if args.target is None and not args.peft:
        parser.error("give FILE.py:NAME or module:NAME, or --peft")
    status = 0
    if args.target is not None:
        try:
            factory = load_factory(args.target)
        except UsageError as e:
            print(f"check_dora.py: error: {e}", file=sys.stderr)
            return 2
        name = args.target.rpartition(":")[2] + (" on nn.Conv2d" if args.conv2d else "")
        status = show(check_dora(factory, name=name, kind=kind))
    if args.peft:
        reason = peft_unavailable_reason()
        if reason is not None:
            print(f"PEFT's DoRA: skipped: {reason}", file=sys.stderr)
            return 2
        import peft

        name = f"PEFT {peft.__version__}" + (" on nn.Conv2d" if args.conv2d else "")
        status = max(status, show(check_dora(peft_dora_factory, name=name, kind=kind)))
    return status


def show(report: Report) -> int:
    print(report)
    print(f"  ({report.seconds:.1f} s)", flush=True)
    return report.exit_status


if __name__ == "__main__":
    sys.exit(main())
