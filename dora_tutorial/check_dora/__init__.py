"""Check your own DoRA layer against the paper, the official code and PEFT, check by check.

    python -m dora_tutorial.check_dora my_module.py:MyDoRA    # MyDoRA(linear, rank, alpha)
    python -m dora_tutorial.check_dora package.module:make_layer   # any such factory
    python -m dora_tutorial.check_dora --peft                      # Hugging Face PEFT's DoRA
    python -m dora_tutorial.check_dora --conv2d my_module.py:MyConvDoRA   # (conv, rank, alpha)
    python -m dora_tutorial.check_dora --peft --dtype bfloat16 --json    # PEFT's, bf16, JSON

Run it from this repository's root (or anywhere with the root on PYTHONPATH); a module target,
and the modules your file imports, are found from the working directory, as Python finds them.

From Python (importing this file does nothing but define things):

    from dora_tutorial.check_dora import check_dora
    report = check_dora(MyDoRA)
    print(report)        # one line per check: pass or FAIL, its kind, what a failure means
    report.passed        # True when no check fails
    report.to_dict()     # every check's kind, result and numbers

Every check is of one of three kinds, shown on its line and grouped in the summary line:
- "paper": not DoRA as the paper defines it (magnitude axis and shape, normalisation, bias
  placement, the formula, merging): the layer computes another method;
- "convention": differs from the official code and PEFT (scaling alpha / r, the detached norm,
  initialisation, dropout placement): still DoRA, but PEFT adapters, learning rates and alphas
  do not transfer as they are;
- "robustness": zero weight rows and low precision: NaN or inf on damaged checkpoints or in
  half precision, a magnitude that does not train on a bfloat16 or float16 base (11), a merge
  that rounds more than once (12).

Exit status: 0 when every check passes; 1 when a "paper" check fails; 3 when a "convention"
check fails and no "paper" check; 4 when only "robustness" checks fail; 2 for a usage error
(missing file or name, a factory that cannot be called), a layer whose A, B and m cannot be
identified, or nothing checked (--peft alone where PEFT cannot be used). `--json` prints every
check's kind, result and numbers; `--dtype float32` (or bfloat16, float16) checks the layer in
that dtype, with tolerances derived from its rounding (a check that passes only within that
rounding says so).

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
  2-12 are not run, and the exit status is 2.
- The layer is built by the factory on an nn.Linear on the CPU (float64 unless dtype says
  otherwise), moved with `.to(dtype)` and used in training mode; the checks then set A, B and m
  to known values. The reference is computed in float64 from the layer's own (rounded)
  parameters and inputs. Below float64 the tolerance for a result of sums of up to n terms is
  ROUNDING_STEPS * eps / 2 * sqrt(n) (see ROUNDING_STEPS); a layer built in float64 that
  computes in float32 inside (its initial function is W0's to float32 rounding) is checked
  with float32's tolerances, and the report says so.
- Dropout (check 9) is checked only for a factory that takes `dropout=p`; merging (check 10)
  only for a layer with `merged_weight()`, `merge_and_unload()` or `merge()` (and
  `unmerge()`); otherwise they are "not applicable" and do not count against the verdict.

Each check isolates one convention, so that a layer wrong in one way fails that check only: the
others use the layer's own axis (found with m, judged by check 2), scaling (measured by check 4),
bias placement (5) and detach (6) wherever those are not their point. E.g. a layer scaling by
alpha instead of alpha / r fails check 4 only. Check 7 compares everything else with the
reference formula (several shapes and ranks, with and without bias, the output and every
gradient) under those measured conventions, and its line names them. The verdict
(`Report.passed`) requires that no check fails.

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
import copy
import difflib
import functools
import importlib
import importlib.util
import json
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

from dora_tutorial.precision import magnitude_moves, merge_error

WIDTH = 96  # report lines wrap here: they fit a terminal and a notebook's output area

EPS = 1e-12  # the reference's floor for ||V||: the paper's formula gives 0 / 0 on a zero row
TOL = 1e-9  # largest relative difference accepted in float64
# Below float64 the tolerance is derived, not chosen: a sum of n rounded terms errs by about
# u sqrt(n) relative (u = eps / 2, independent rounding errors), and DoRA's forward and backward
# chain about ROUNDING_STEPS such sums and roundings (V, its norm, the division, the product,
# the bias, and as many again in backward): tolerance = ROUNDING_STEPS * u * sqrt(n).
ROUNDING_STEPS = 8
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


def tolerance(dtype, n):
    """The largest relative difference accepted for a result of sums of up to n terms computed
    in ``dtype`` (see ROUNDING_STEPS); TOL in float64 (and never less than TOL)."""
    if dtype == torch.float64:
        return TOL
    return max(TOL, ROUNDING_STEPS * torch.finfo(dtype).eps / 2 * math.sqrt(n))


def dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


DTYPES = {dtype_name(d): d for d in (torch.float64, torch.float32, torch.bfloat16, torch.float16)}


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
    """(W', y(0)) of the affine map a layer computes, in float64: y(e_j) - y(0) is column j of W'.

    The n one-hot vectors e_j and 0 (the last row) go through ``to_inputs`` into the layer;
    ``from_outputs`` turns its outputs into (n + 1, out) rows."""
    dtype = next((p.dtype for p in layer.parameters() if p.is_floating_point()), torch.float64)
    eye = torch.eye(n, dtype=dtype)
    with torch.no_grad():
        y = from_outputs(layer(to_inputs(torch.cat([eye, eye.new_zeros(1, n)])))).double()
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


def find_adapter(layer, W0, b, rank, W_init, rtol=1e-6) -> Adapter:
    """A, B and m of a freshly built layer, by shape and initial values (never by name).

    W0, b: the base layer's weight and bias; W_init: the layer's effective weight at init;
    rtol: how closely m must start at the norms (the rounding of the layer's dtype).
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
            starts = (norms(W0.double(), axis), norms(W_init, axis))
            flat = p.detach().double().flatten()
            if any(flat.shape == s.shape and torch.allclose(flat, s, rtol=rtol) for s in starts):
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


# The three kinds of finding. A check belongs to one kind; a failure says which kind it is.
PAPER = "paper"  # the method itself: axis, magnitude shape, normalisation, bias, the formula
CONVENTION = "convention"  # what the official code and PEFT do: alpha / r, detach, init, dropout
ROBUSTNESS = "robustness"  # zero rows, low precision
KIND_MEANING = {
    PAPER: "not DoRA as the paper defines it",
    CONVENTION: "differs from the official code and PEFT",
    ROBUSTNESS: "robustness",
}
# Exit status of the command line: the most serious kind of failure decides it.
EXIT_STATUS = {PAPER: 1, CONVENTION: 3, ROBUSTNESS: 4}


@dataclass
class CheckResult:
    """One check's outcome: status is "pass", "fail" or "skip" (not run, or not applicable).

    kind: PAPER, CONVENTION or ROBUSTNESS; numbers: what the check measured (error, tolerance,
    ...); a pass whose error exceeds float64's TOL passed within the rounding of ``precision``.
    """

    number: int
    title: str
    status: str
    detail: str
    kind: str = PAPER
    numbers: dict = field(default_factory=dict)
    precision: str = "float64"

    @property
    def passed(self) -> bool:
        return self.status == "pass"

    @property
    def within_rounding(self) -> bool:
        """Passed, but only within the rounding of a dtype below float64."""
        error = self.numbers.get("error")
        return self.passed and error is not None and error > TOL

    def __str__(self) -> str:
        mark = {"pass": "pass", "fail": "FAIL", "skip": "skip"}[self.status]
        detail = self.detail
        if self.within_rounding:
            n = self.numbers
            detail += (
                f" (within {self.precision} rounding: {n['error']:.0e} <= {n['tolerance']:.0e})"
            )
        text = f"  {mark} {self.number}. {self.title} [{self.kind}]: {detail}"
        return textwrap.fill(text, WIDTH, subsequent_indent=" " * 10, break_on_hyphens=False)

    def to_dict(self) -> dict:
        return {
            "number": self.number,
            "title": self.title,
            "kind": self.kind,
            "kind_meaning": KIND_MEANING[self.kind],
            "result": self.status,
            "within_rounding": self.within_rounding,
            "detail": self.detail,
            "numbers": self.numbers,
        }


@dataclass
class Report:
    """All checks of one layer. str(report) is one line per check (no timings: reproducible)."""

    name: str
    adapter: str | None  # where A, B, m were found, in words
    problem: str | None  # why they could not be found
    results: list[CheckResult] = field(default_factory=list)
    seconds: float = 0.0
    dtype: str = "float64"  # the dtype the layers were built and fed in
    precision: str = "float64"  # the rounding the tolerances allow for (below: the layer's)

    @property
    def identified(self) -> bool:
        return self.problem is None

    @property
    def passed(self) -> bool:
        """Identified, and no check fails (checks that do not apply are skipped)."""
        return self.identified and not self.failed

    @property
    def failed(self) -> list[int]:
        """The numbers of the checks that failed."""
        return [r.number for r in self.results if r.status == "fail"]

    def failed_of_kind(self, kind) -> list[int]:
        return [r.number for r in self.results if r.status == "fail" and r.kind == kind]

    @property
    def exit_status(self) -> int:
        """0 all pass; 1 not DoRA as the paper defines it; 3 differs from the official code and
        PEFT (and nothing worse); 4 robustness only; 2 the layer could not be checked."""
        if not self.identified:
            return 2
        return next((EXIT_STATUS[k] for k in EXIT_STATUS if self.failed_of_kind(k)), 0)

    def summary(self) -> str:
        """The verdict in one line, failures grouped by kind."""
        n, failed = len(self.results), self.failed
        skipped = [r for r in self.results if r.status == "skip"]
        rounding = sum(r.within_rounding for r in self.results)
        if failed:
            kinds = [
                f"{KIND_MEANING[k]} ({_join(self.failed_of_kind(k))})"
                for k in EXIT_STATUS
                if self.failed_of_kind(k)
            ]
            summary = f"{len(failed)} of {n} checks fail: {'; '.join(kinds)}"
        elif not skipped:
            summary = f"all {n} checks pass"
        else:
            summary = f"{n - len(skipped)} of {n} checks pass"
        if rounding:
            summary += f", {rounding} within {self.precision} rounding"
        if skipped and not self.identified:
            summary += f", {len(skipped)} not run (they need A, B and m)"
        elif skipped:
            summary += f", {len(skipped)} not applicable ({_join(r.number for r in skipped)})"
        return summary

    def __str__(self) -> str:
        precision = "" if self.dtype == "float64" else f" in {self.dtype}"
        lines = [f"DoRA conformance: {self.name}{precision}"]
        found = (
            f"found {self.adapter}"
            if self.identified
            else f"cannot check this layer: {self.problem}"
        )
        lines.append(textwrap.fill(f"  {found}", WIDTH, subsequent_indent=" " * 4))
        if self.precision != self.dtype:
            note = (
                f"  the layer computes in {self.precision} with {self.dtype} parameters and "
                f"inputs: checked with {self.precision}'s rounding tolerances"
            )
            lines.append(textwrap.fill(note, WIDTH, subsequent_indent=" " * 4))
        lines += [str(r) for r in self.results]
        lines.append(textwrap.fill(f"  {self.summary()}", WIDTH, subsequent_indent=" " * 4))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """Everything in the report, for ``--json``."""
        return {
            "name": self.name,
            "dtype": self.dtype,
            "precision": self.precision,
            "identified": self.identified,
            "adapter": self.adapter,
            "problem": self.problem,
            "passed": self.passed,
            "exit_status": self.exit_status,
            "summary": self.summary(),
            "failed": {k: self.failed_of_kind(k) for k in EXIT_STATUS},
            "checks": [r.to_dict() for r in self.results],
            "seconds": round(self.seconds, 3),
        }


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
    """One conformance run: the factory, where its A, B, m are, the conventions measured.

    dtype: what the base layers, the layer and the inputs are built in; precision: the dtype
    whose rounding the tolerances allow for (dtype, or float32 for a layer that computes in
    float32 whatever its parameters)."""

    factory: Factory
    kind: LayerKind = LINEAR
    adapter: Adapter | None = None
    conventions: Conventions = field(default_factory=Conventions)
    dtype: torch.dtype = torch.float64
    precision: torch.dtype = torch.float64

    def tol(self, n):
        """The tolerance for results of sums of up to n terms (see ``tolerance``)."""
        return tolerance(self.precision, n)

    def base(self, n_in=IN, n_out=OUT, bias=True, seed=SEED):
        return self.kind.make_base(n_in, n_out, bias=bias, dtype=self.dtype, seed=seed)

    def inputs(self, lead, n_in, seed):
        return self.kind.inputs(lead, n_in, seed=seed, dtype=self.dtype)

    def layer(self, base, rank=RANK, alpha=ALPHA, **options):
        """A fresh layer around base, its initialisation reproducible, in base's dtype."""
        torch.manual_seed(SEED)
        layer = self.factory(base, rank, alpha, **options)
        if not isinstance(layer, nn.Module):
            raise TypeError(f"the factory returned a {type(layer).__name__}, not an nn.Module")
        return layer.to(base.weight.dtype)

    def scaling(self, alpha, rank):
        return SCALINGS[self.conventions.scaling](alpha, rank)

    def trained(self, layer, base, rank=RANK, b_scale=1.0, seed=1):
        """Give the layer trained-looking A, B (update comparable to W0) and m != ||V||.

        Returns A, B and m as the layer holds them (rounded to its dtype), in float64."""
        W0 = _matrix(base.weight.detach()).double()
        g = torch.Generator().manual_seed(seed)
        n_out, n_in = W0.shape
        A = torch.randn(rank, n_in, generator=g, dtype=W0.dtype) / math.sqrt(n_in)
        B = torch.randn(n_out, rank, generator=g, dtype=W0.dtype) * b_scale / math.sqrt(rank)
        base_norms = norms(W0, self.adapter.axis)
        m = (base_norms + 0.1) * (0.5 + torch.rand(len(base_norms), generator=g, dtype=W0.dtype))
        self.adapter.assign(layer, A, B, m)
        return [t.detach().double().clone() for t in self.adapter.tensors(layer)]

    def weight(self, base, A, B, m, rank, alpha):
        """The reference merged weight W' (float64) under the conventions measured so far."""
        c = self.conventions
        V = _matrix(base.weight.detach()).double() + self.scaling(alpha, rank) * (B @ A)
        norm = torch.linalg.vector_norm(V, dim=c.axis, keepdim=True).clamp_min(EPS)
        return m.reshape(norm.shape) / norm * V

    def reference(self, x, base, A, B, m, rank, alpha, detach=None):
        """The reference output (float64) under the conventions measured so far (detach:
        override)."""
        c = self.conventions
        return reference_forward(
            x.double(),
            _matrix(base.weight.detach()).double(),
            None if base.bias is None else base.bias.detach().double(),
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
    run: Callable[[Run], tuple]
    needs_adapter: bool
    kind: str


CHECKS: list[Check] = []


def check(number, title, kind, needs_adapter=True):
    """Register a check: a function Run -> (passed, one line in plain words[, numbers]);
    passed is True, False or None (the check does not apply to this layer: skipped)."""

    def register(fn):
        CHECKS.append(Check(number, title, fn, needs_adapter, kind))
        return fn

    return register


def leaf(t):
    return t.detach().clone().requires_grad_()


def sum_length(W0, x):
    """An upper bound on the terms in one sum of forward or backward: rows x max(in, out)."""
    rows = max(1, x.numel() // W0.shape[1])
    return rows * max(W0.shape)


def gradient_errors(run, layer, base, state, x, rank, alpha, detach=None):
    """Relative differences of output and of the gradients of A, B, m, x: layer vs reference
    (the reference in float64, from the layer's own rounded parameters and inputs)."""
    g = torch.Generator().manual_seed(2)
    x = leaf(x)
    y = layer(x)
    weights = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)
    (y * weights).sum().backward()
    got = [y, *run.adapter.grads(layer), x.grad]
    A, B, m, x = (leaf(t.double()) for t in (*state, x))
    y = run.reference(x, base, A, B, m, rank, alpha, detach)
    (y * weights.double()).sum().backward()
    expected = [y, A.grad, B.grad, m.grad, x.grad]
    names = ["output", *(f"gradient of {n}" for n in ("A", "B", "m", "the input"))]
    return {
        n: math.inf if a is None or a.shape != b.shape else rel(a.double(), b)
        for n, a, b in zip(names, got, expected, strict=True)
    }


# --------------------------------------------------------------------------------------
# The checks
# --------------------------------------------------------------------------------------


def result(ok, detail, error, tol, **numbers):
    """A check's outcome with the numbers it measured (for --json and "within rounding")."""
    return ok, detail, {"error": error, "tolerance": tol, **numbers}


@check(1, "base function at init", CONVENTION, needs_adapter=False)
def check_identity_at_init(run: Run):
    """At initialisation the layer computes what the base layer computes: W' = W0, same bias.

    Isolates the initial values (B = 0, m = ||W0||): every other convention (axis, scaling,
    bias, detach) leaves W' = W0 when B = 0. Failing means fine-tuning does not start from the
    pretrained model, and PEFT's initialisation is not this layer's.
    """
    base = run.base()
    x = run.inputs((5,), IN, seed=3)
    W0 = _matrix(base.weight.detach()).double()
    expected = run.kind.apply(x.double(), W0, base.bias.detach().double())
    layer = run.layer(base)
    with torch.no_grad():
        err = rel(layer(x).double(), expected)
    tol = run.tol(sum_length(W0, x))
    if err <= tol:
        return result(True, "the layer starts as the pretrained layer (same outputs)", err, tol)
    why = ""
    if run.adapter is not None and run.adapter.tensors(layer)[1].detach().any():
        why = " (B is not zero at initialisation)"
    return result(
        False,
        f"at initialisation the outputs differ from the base layer's by up to {pct(err)}{why}: "
        "fine-tuning does not start from the pretrained model; DoRA starts with B = 0 and "
        "m = ||W0|| so that W' = W0",
        err,
        tol,
    )


@check(2, "magnitude axis", PAPER)
def check_magnitude_axis(run: Run):
    """One magnitude per output row (out_features entries): m_n scales row n of W'.

    Isolates the axis: read from m's size and initial values, then confirmed from the function
    (multiplying m by c multiplies each row of W' by its c_n). The scaling, bias and detach
    conventions do not change this. The per-column variant (norm(dim=0), catid/dora and
    rasbt/dora-from-scratch's merged layer) rescales input features instead of output neurons:
    a different method.
    """
    axis = run.adapter.axis
    base = run.base()
    layer = run.layer(base)
    A, B, m = run.trained(layer, base)
    W1, _ = run.kind.effective_weight(layer, IN)
    c = 0.5 + torch.rand(m.shape, generator=torch.Generator().manual_seed(4), dtype=m.dtype)
    run.adapter.assign(layer, A, B, m * c)
    c = (
        run.adapter.tensors(layer)[2].detach().double().clone() / m
    )  # as rounded in the layer's dtype
    W2, _ = run.kind.effective_weight(layer, IN)
    err = rel(W2, c[:, None] * W1 if axis == 1 else W1 * c[None, :])
    tol = run.tol(W1.shape[1])
    if axis == 0:
        return result(
            False,
            f"one magnitude per INPUT column ({IN} entries, the column norms of W0), not per "
            f"output row: the per-input-column norm (norm(dim=0), as in catid/dora and "
            f"rasbt/dora-from-scratch's merged layer), which rescales input features instead "
            f"of output neurons; a different method from the paper's and PEFT's, whose "
            f"adapters do not load into it",
            err,
            tol,
        )
    if err > tol:
        return result(
            False,
            "changing m_n does not scale row n of the merged weight alone: m is not used as "
            "DoRA's magnitude, so training m does not do what DoRA's magnitude does",
            err,
            tol,
        )
    return result(True, f"one magnitude per output row ({OUT} entries)", err, tol)


@check(3, "normalisation", PAPER)
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
        base = run.base()
        layer = run.layer(base)
        _, _, m = run.trained(layer, base, b_scale=b_scale)
        W, _ = run.kind.effective_weight(layer, IN)
        worst = max(worst, rel(norms(W, axis), m))
    tol = run.tol(W.shape[1])
    line = "rows" if axis == 1 else "columns"
    if worst <= tol:
        return result(True, f"the merged weight's {line} have norm m, whatever B is", worst, tol)
    return result(
        False,
        f"the merged weight's {line} do not have norm m (off by up to {pct(worst)}): magnitude "
        "and direction are not separated (is the norm taken of W0 + s B A, the weight with the "
        "update?), so training m does not set the rows' length as DoRA's magnitude does",
        worst,
        tol,
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


@check(4, "scaling", CONVENTION)
def check_scaling(run: Run):
    """The update is scaled by s = alpha / rank: V = W0 + (alpha / r) B A.

    Isolates the scaling: s is measured from the direction of each row of W' (which lies
    along W0 + s B A whatever the magnitude, axis, bias or detach convention). A layer scaling by
    alpha (as catid/dora and rasbt/dora-from-scratch's merged layer do) makes the update r times
    stronger, so the learning rate and alpha tuned for the paper or PEFT do not transfer, and
    changing the rank changes the step size.
    """
    base = run.base()
    layer = run.layer(base)
    A, B, _ = run.trained(layer, base)
    W, _ = run.kind.effective_weight(layer, IN)
    W0 = _matrix(base.weight.detach()).double()
    s, spread, residual = measure_scaling(W0, B @ A, W, run.adapter.axis)
    # a row's s_n = c / a divides two fitted coefficients: twice the rounding of the fit
    tol = run.tol(W0.shape[1])
    fit = max(residual, spread / 2)
    if fit > tol:
        return result(
            False,
            "the merged weight's direction is not W0 + s B A for one s: the update B A is not "
            "added to W0 as DoRA's (and LoRA's) update, so the scaling cannot be measured",
            fit,
            tol,
        )
    name = next((n for n, f in SCALINGS.items() if abs(s - f(ALPHA, RANK)) <= 2 * tol * s), None)
    if name is not None:
        run.conventions.scaling = name
    expected = ALPHA / RANK
    numbers = {"scaling": s, "expected": expected}
    err = abs(s - expected) / expected
    if name == "alpha / rank":
        return result(
            True, f"the update is scaled by alpha / rank (= {expected:.4g})", err, tol, **numbers
        )
    if name == "alpha":
        return result(
            False,
            f"the update is scaled by alpha (= {ALPHA}), not alpha / rank (= {expected:.4g}), "
            f"as in catid/dora and rasbt/dora-from-scratch's merged layer: {RANK} times too "
            f"strong at rank {RANK}, and the step size changes with the rank; learning rates "
            "and alphas tuned for the paper or PEFT do not transfer",
            err,
            tol,
            **numbers,
        )
    if name == "alpha / sqrt(rank)":
        what = "alpha / sqrt(rank), rsLoRA's rule (PEFT's use_rslora=True)"
    elif name == "1":
        what = "1: alpha has no effect"
    else:
        what = f"{s:.4g}, none of alpha / rank, alpha, alpha / sqrt(rank), 1"
    return result(
        False,
        f"the update is scaled by {what}, not alpha / rank (= {expected:.4g}): learning rates "
        "and alphas tuned for the paper or PEFT do not transfer",
        err,
        tol,
        **numbers,
    )


@check(5, "bias", PAPER)
def check_bias(run: Run):
    """The bias is added after the rescaling and is not rescaled: y = x W'^T + b.

    Isolates the bias: the output at x = 0 is compared with b after B and m have moved (at
    initialisation m / ||V|| = 1 hides the bug); axis, scaling and detach do not change it.
    A bias multiplied by m / ||V|| drifts whenever m trains, and the layer no longer equals an
    nn.Linear with weight W' and bias b, so merging or exporting it changes the function. Typical
    cause: an efficient forward that rescales base_layer(x), which includes the bias.
    """
    base = run.base(bias=True)
    layer = run.layer(base)
    A, B, m = run.trained(layer, base)
    _, y0 = run.kind.effective_weight(layer, IN)
    b = base.bias.detach().double()
    err = rel(y0, b)
    tol = run.tol(IN)
    if err <= tol:
        return result(True, "the bias is added after the rescaling, not rescaled", err, tol)
    V = _matrix(base.weight.detach()).double() + run.scaling(ALPHA, RANK) * (B @ A)
    if run.adapter.axis == 1 and rel(y0, m / norms(V, 1) * b) <= tol:
        run.conventions.rescaled_bias = True
        return result(
            False,
            "the bias is rescaled by m / ||V|| with the weight: it drifts whenever m trains, and "
            "merging into an nn.Linear (weight W', bias b) changes the function; PEFT and the "
            "official code add b unscaled (subtract the bias before rescaling base_layer(x))",
            err,
            tol,
        )
    if not y0.abs().max() > 0:
        return result(
            False, "the bias is dropped: the layer's output at x = 0 is zero, not b", err, tol
        )
    return result(
        False, f"the output at x = 0 is not the bias b (off by up to {pct(err)})", err, tol
    )


@check(6, "norm detached", CONVENTION)
def check_detached(run: Run):
    """||V|| is a constant in backward (paper section 4.3, PEFT), which sets A's and B's gradients.

    Isolates the detach: the gradients of A and B (the only ones it changes) are compared with
    the reference with and without the detach, both under the axis, scaling and bias
    conventions measured by checks 2-5 (check 7 compares m's and the input's). Without
    the detach the gradients of A and B differ from the paper's and PEFT's (a different training
    trajectory), and backward keeps V for the norm (more memory); training still works: the
    exact gradient is the paper's own formula, the detach is section 4.3's cheaper approximation.
    """
    x = run.inputs((6,), IN, seed=5)
    errors = {}
    for detach in (True, False):
        base = run.base()  # a fresh base and layer for each backward pass
        layer = run.layer(base)
        state = run.trained(layer, base)
        err = gradient_errors(run, layer, base, state, x, RANK, ALPHA, detach)
        errors[detach] = max(err["gradient of A"], err["gradient of B"])
    tol = run.tol(sum_length(_matrix(base.weight), x))
    numbers = {"error_if_not_detached": errors[False]}
    if errors[True] <= tol:
        detail = "||V|| is a constant in backward (paper section 4.3, PEFT)"
        if errors[False] <= tol:
            detail += f"; {dtype_name(run.precision)} cannot tell it from the exact gradient here"
        return result(True, detail, errors[True], tol, **numbers)
    if errors[False] <= tol:
        run.conventions.detached = False
        return result(
            False,
            f"||V|| is differentiated in backward, not detached (paper section 4.3): the "
            f"gradients of A and B differ from the paper's and PEFT's by up to "
            f"{pct(errors[True])} (another training trajectory), and backward keeps V for the "
            f"norm (more memory)",
            errors[True],
            tol,
            **numbers,
        )
    return result(
        False,
        f"the gradients of A and B match DoRA's neither with nor without the detach "
        f"(off by up to {pct(min(errors.values()))}): backward does not train DoRA's parameters",
        errors[True],
        tol,
        **numbers,
    )


@check(7, "reference formula", PAPER)
def check_reference(run: Run):
    """Forward and gradients (of A, B, m and the input) match the reference formula.

    On wider, taller and square weights, ranks 1 to 4, with and without bias, 2-D and 3-D
    inputs, under the conventions checks 2-6 measured (so a layer wrong in one of those ways
    fails that check only). What it catches is everything else: a wrong gradient (of m, of the
    input), a rank or shape handled wrongly, a layer that only accepts 2-D inputs.
    """
    worst, what, where, tol = 0.0, "", "", 0.0
    for i, (n_in, n_out, rank, alpha, bias, lead) in enumerate(SHAPES):
        base = run.base(n_in, n_out, bias=bias, seed=10 + i)
        x = run.inputs(lead, n_in, seed=20 + i)
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
        this_tol = run.tol(sum_length(_matrix(base.weight), x))
        name, err = max(errors.items(), key=lambda kv: kv[1] / this_tol)
        if worst == 0.0 or err / this_tol > worst / tol:
            worst, what, where, tol = err, name, shape, this_tol
    conventions = run.conventions.differences()
    under = f" (with this layer's {', '.join(conventions)})" if conventions else ""
    ranks = sorted(rank for _, _, rank, *_ in SHAPES)
    if worst <= tol:
        return result(
            True,
            f"forward and gradients of A, B, m and x match on {len(SHAPES)} shapes, "
            f"ranks {ranks[0]}-{ranks[-1]}, with and without bias{under}",
            worst,
            tol,
        )
    off = "is missing or has the wrong shape" if math.isinf(worst) else f"is off by {pct(worst)}"
    return result(
        False,
        f"the {what} {off} ({where}){under}: the layer computes something other than DoRA, "
        "beyond the conventions checked above",
        None if math.isinf(worst) else worst,
        tol,
    )


def zeroed_base(run, what):
    """A base layer whose row 2 (what="row") or column 4 ("column") is all zero (float32, or
    the run's dtype where that is lower)."""
    base = run.kind.make_base(IN, OUT, dtype=low_precision(run))
    with torch.no_grad():
        _matrix(base.weight)[(2, slice(None)) if what == "row" else (slice(None), 4)] = 0.0
    return base


def low_precision(run):
    """float32, or the run's dtype if that is a half-precision one."""
    return run.dtype if run.dtype in (torch.bfloat16, torch.float16) else torch.float32


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


@check(8, "zero rows, low precision", ROBUSTNESS)
def check_robustness(run: Run):
    """No NaN or inf from an all-zero weight row or column; bfloat16 and float16 layers work.

    Isolates numerical safety from the conventions: a zero row and a zero column are tried
    separately (a per-column layer meets its own 0 / 0 on the column), at initialisation (there
    m = 0 and ||V|| = 0) and after B and m moved, forward and backward. Then the layer converted
    with .to(bfloat16) / .to(float16) and fed inputs of that dtype (a model loaded in half
    precision) must stay finite and agree with the float32 layer within that dtype's rounding
    (``tolerance``). One NaN output poisons the loss and, at the first optimiser step, every
    weight.
    """
    x = run.kind.inputs((4,), IN, seed=8, dtype=low_precision(run))
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
        expected = trained_layer()(x).double()
    worst, tol = 0.0, 0.0
    for dtype in (torch.bfloat16, torch.float16):
        low = trained_layer().to(dtype)
        name = dtype_name(dtype)
        bad = non_finite(run, low, x.to(dtype))
        if bad:
            return False, f"in {name} the {bad} has NaN or inf: the layer cannot train in {name}"
        with torch.no_grad():
            err = rel(low(x.to(dtype)).double(), expected)
        this_tol = tolerance(dtype, 64)
        if err > this_tol:
            return result(
                False,
                f"in {name} the output is off by {pct(err)} from float32's, more than {name}'s "
                f"rounding ({this_tol:.0e}): too inaccurate to train in half precision (sum "
                "the squares of the norm in float32)",
                err,
                this_tol,
            )
        if worst == 0.0 or err / this_tol > worst / tol:
            worst, tol = err, this_tol
    return (
        True,
        "no NaN or inf with an all-zero weight row or column; bfloat16 and float16 work",
        {"low_precision_error": worst, "low_precision_tolerance": tol},
    )


P_DROP = 0.5  # the dropout probability check 9 gives a factory that takes dropout=p


@check(9, "dropout", CONVENTION)
def check_dropout(run: Run):
    """With dropout=p in training, PEFT's placement: the base path sees the clean input.

    For a factory that takes ``dropout=p`` (PEFT: ``lora_dropout``): y = base(x) + (k - 1) x_d
    W0^T + k s x_d A^T B^T with x_d = dropout(x), k = m / ||V|| (the official code and PEFT),
    i.e. y = x W0^T + b + x_d (W' - W0)^T. The mask is the one ``F.dropout(x, p)`` draws from
    the same random state (an nn.Dropout draws the same). In eval mode there is no dropout. A
    layer that drops the base path too (y = DoRA(dropout(x))) perturbs the pretrained function
    even at B = 0; one that ignores p trains without the regularisation asked for (the
    divergence reported as fsdp_qlora #68). Not applicable to a factory without ``dropout``.
    """
    base = run.base()
    try:
        layer = run.layer(base, dropout=P_DROP)
    except TypeError as e:
        if "dropout" not in str(e):
            raise
        return None, "the factory takes no dropout=p argument (not applicable)"
    A, B, m = run.trained(layer, base)
    x = run.inputs((6,), IN, seed=11)
    layer.train()
    torch.manual_seed(12)
    with torch.no_grad():
        y = layer(x).double()
    torch.manual_seed(12)
    x_d = F.dropout(x, P_DROP).double()  # the same mask: the same random state
    W0 = _matrix(base.weight.detach()).double()
    b = base.bias.detach().double()
    W = run.weight(base, A, B, m, RANK, ALPHA)
    apply = run.kind.apply
    expected = apply(x.double(), W0, b) + apply(x_d, W - W0, None)
    tol = run.tol(sum_length(W0, x))
    err = rel(y, expected)
    layer.eval()
    with torch.no_grad():
        eval_err = rel(layer(x).double(), apply(x.double(), W, b))
    numbers = {"eval_error": eval_err}
    if err <= tol and eval_err <= tol:
        return result(
            True,
            f"dropout (p = {P_DROP}) as in PEFT: the base path on the clean input, the magnitude "
            "and update terms on the dropped input; none in eval mode",
            err,
            tol,
            **numbers,
        )
    if err <= tol:
        return result(
            False,
            f"in eval mode the output is off by {pct(eval_err)} from the layer without dropout: "
            "dropout must act in training only",
            eval_err,
            tol,
        )
    if rel(y, apply(x.double(), W, b)) <= tol:
        return result(
            False,
            "dropout=p has no effect in training: the layer ignores p (the divergence reported "
            "as fsdp_qlora #68, DoRA ignoring lora_dropout); PEFT drops the input of the "
            "magnitude and update terms",
            err,
            tol,
            **numbers,
        )
    if rel(y, apply(x_d, W, b)) <= tol:
        return result(
            False,
            "the base path sees the dropped input too, y = DoRA(dropout(x)): the pretrained "
            "layer's output is perturbed even at B = 0; PEFT keeps base(x) on the clean input and "
            "drops only the input of the magnitude and update terms: "
            "y = base(x) + (k - 1) x_d W0^T + k s x_d A^T B^T",
            err,
            tol,
            **numbers,
        )
    return result(
        False,
        f"with dropout=p the output is off by {pct(err)} from PEFT's, y = base(x) + (k - 1) x_d "
        "W0^T + k s x_d A^T B^T with the mask F.dropout(x, p) draws from the same random state",
        err,
        tol,
        **numbers,
    )


MERGES = ("merged_weight", "merge_and_unload", "merge")  # methods check 10 looks for
UNMERGES = ("unmerge", "unmerge_adapter")


def _merge_problems(run, layer, base, x, y, tol):
    """(what was tried, [problems in words], worst error) for the merge methods a layer has."""
    W0_before = base.weight.detach().clone()
    b = base.bias.detach().double()
    tried, problems, worst = [], [], 0.0

    def compare(what, got):
        nonlocal worst
        err = rel(got.double(), y)
        worst = max(worst, err)
        if err > tol:
            problems.append(f"{what} is off by {pct(err)} from the unmerged layer")

    with torch.no_grad():
        if callable(getattr(layer, "merged_weight", None)):
            tried.append("merged_weight()")
            W = _matrix(layer.merged_weight().detach()).double()
            compare("x W'^T + b with W' = merged_weight()", run.kind.apply(x.double(), W, b))
        if callable(getattr(layer, "merge_and_unload", None)):
            tried.append("merge_and_unload()")
            compare(
                "the layer merge_and_unload() returns", copy.deepcopy(layer).merge_and_unload()(x)
            )
        if callable(getattr(layer, "merge", None)):
            merged = copy.deepcopy(layer).merge()
            if isinstance(merged, nn.Module):
                tried.append("merge()")
                compare("the layer merge() returns", merged(x))
            else:  # merges in place
                tried.append("merge() in place")
                layer.merge()
                compare("the layer after merge()", layer(x))
                unmerge = next((n for n in UNMERGES if callable(getattr(layer, n, None))), None)
                if unmerge is not None:
                    tried.append(f"{unmerge}()")
                    getattr(layer, unmerge)()
                    err = rel(base.weight.detach().double(), W0_before.double())
                    worst = max(worst, err)
                    if err > tol:
                        problems.append(
                            f"after {unmerge}() the base weight is off by {pct(err)} from W0"
                        )
                    compare(f"the layer after {unmerge}()", layer(x))
    return tried, problems, worst


@check(10, "merge and unmerge", PAPER)
def check_merge(run: Run):
    """Where the layer offers a merge, the merged function is the layer's; unmerge restores W0.

    Looks for ``merged_weight()`` (a tensor W': x W'^T + b must equal the layer's output),
    ``merge_and_unload()`` or ``merge()`` returning a plain layer (its output must equal the
    layer's), and ``merge()`` merging in place (the output must not change), then
    ``unmerge()`` / ``unmerge_adapter()`` (the base weight must come back to W0, and the output
    stay the same). Merging is where PEFT's recent DoRA bugs were (PEFT #3608, #3532): a merge
    that changes the function makes the deployed model another model. Not applicable to a
    layer without any of these methods.
    """
    base = run.base()
    layer = run.layer(base)
    run.trained(layer, base)
    x = run.inputs((5,), IN, seed=13)
    with torch.no_grad():
        y = layer(x).double()
    tol = run.tol(sum_length(_matrix(base.weight), x))
    tried, problems, worst = _merge_problems(run, layer, base, x, y, tol)
    if not tried:
        names = ", ".join(f"{n}()" for n in MERGES)
        return None, f"the layer offers no merge ({names}; not applicable)"
    if problems:
        return result(False, "; ".join(problems), worst, tol, tried=tried)
    return result(
        True,
        f"{', '.join(tried)}: the merged function is the layer's"
        + ("; unmerging restores W0" if any(t.startswith("unmerge") for t in tried) else ""),
        worst,
        tol,
        tried=tried,
    )


LOW_PRECISION = (torch.bfloat16, torch.float16)


def as_built(run, base, rank=RANK, alpha=ALPHA):
    """The factory's layer on base as the factory builds it: no .to(), so its adapters keep the
    dtype the factory chose for a base of this dtype."""
    torch.manual_seed(SEED)
    return run.factory(base, rank, alpha)


@check(11, "magnitude trains in low precision", ROBUSTNESS)
def check_low_precision_training(run: Run):
    """On a frozen bfloat16 and a frozen float16 base, 20 Adam steps at lr 1e-4 move m and leave
    it finite.

    Near m = 0.6 bfloat16's neighbouring numbers are 2^-8 apart while an Adam step is about the
    learning rate, so an m kept in bfloat16 never moves: DoRA silently trains as LoRA with a
    fixed rescaling. In float16, Adam's squared gradients and its epsilon round to 0 and m turns
    NaN. PEFT keeps adapters in float32 on such a base (autocast_adapter_dtype=True).
    """
    found, numbers = [], {}
    for dtype in LOW_PRECISION:
        base = run.kind.make_base(IN, OUT, dtype=dtype, seed=6).requires_grad_(False)
        layer = as_built(run, base)
        m = layer.get_parameter(run.adapter.m)
        x = run.kind.inputs((16,), IN, seed=10, dtype=dtype)
        moved, finite = magnitude_moves(layer, m, x)
        numbers[f"m_moved_{dtype_name(dtype)}"] = moved
        if moved < 0.5 or not finite:
            end = "" if finite else ", and it became NaN or inf"
            found.append(
                f"on a {dtype_name(dtype)} base m ({dtype_name(m.dtype)}) changed in "
                f"{moved:.0%} of its entries{end}"
            )
    if found:
        return (
            False,
            (
                "; ".join(found) + " after 20 Adam steps at lr 1e-4: the magnitude does not train. "
                "Keep A, B and m in float32 on a low-precision base and compute m / ||V|| in "
                "float32 (as PEFT's autocast_adapter_dtype=True does)"
            ),
            numbers,
        )
    return True, "m moves on bfloat16 and float16 bases and stays finite", numbers


def merged_matrix(run, layer):
    """(how, the weight a merge writes as a float64 matrix), or (None, None) without a merge."""
    with torch.no_grad():
        if callable(getattr(layer, "merged_weight", None)):
            return "merged_weight()", _matrix(layer.merged_weight().detach()).double()
        for name in ("merge_and_unload", "merge"):
            if callable(getattr(layer, name, None)):
                merged_layer = copy.deepcopy(layer)
                merged = getattr(merged_layer, name)()
                module = merged if isinstance(merged, nn.Module) else merged_layer
                return f"{name}()", run.kind.effective_weight(module.double(), IN)[0]
    return None, None


@check(12, "merge precision", ROBUSTNESS)
def check_merge_precision(run: Run):
    """On a bfloat16 base, a merge loses no more of a small update than rounding the exact W'
    to bfloat16 once does (within 25 %).

    The merged weight must be rounded to the base's dtype once; computing W' in bfloat16 rounds
    V, the norm and the product along the way, and with a small update (here about 5 % of W0)
    that loses much of what fine-tuning learned. Measured as ||merged - W'|| / ||W' - W0||, W' in
    float64 from the layer's own parameters. Not applicable to a layer without a merge.
    """
    base = run.kind.make_base(IN, OUT, dtype=torch.bfloat16, seed=6).requires_grad_(False)
    layer = as_built(run, base)
    W0 = _matrix(base.weight.detach()).double()
    g = torch.Generator().manual_seed(3)
    A = torch.randn(RANK, W0.shape[1], generator=g, dtype=W0.dtype) / math.sqrt(W0.shape[1])
    B = torch.randn(W0.shape[0], RANK, generator=g, dtype=W0.dtype) * 0.01
    m = norms(W0, run.adapter.axis)
    run.adapter.assign(layer, A, B, m * (1 + 0.01 * torch.randn(m.shape, generator=g)))
    A, B, m = (t.detach().double() for t in run.adapter.tensors(layer))
    how, merged = merged_matrix(run, layer)
    if how is None:
        return None, "the layer offers no merge (not applicable)"
    exact = run.weight(base, A, B, m, RANK, ALPHA)
    lost, least = merge_error(merged, exact, _matrix(base.weight.detach()))
    numbers = {"update_lost": lost, "update_lost_rounding_once": least}
    if lost > 1.25 * least + 1e-6:
        return (
            False,
            (
                f"{how} on a bfloat16 base loses {pct(lost)} of a small update, where rounding the "
                f"exact W' once loses {pct(least)}: compute W' in float32 and cast to the base's "
                "dtype once"
            ),
            numbers,
        )
    return (
        True,
        (
            f"{how} on a bfloat16 base loses {pct(lost)} of a small update, as rounding W' once "
            f"does ({pct(least)})"
        ),
        numbers,
    )


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


def identify(run: Run) -> tuple[Adapter, str]:
    """Build one layer and find its A, B and m (NotIdentified says why not).

    Sets run.precision to float32 for a layer built in float64 whose initial function differs
    from the base layer's by float32 rounding (it computes in float32 inside, as many do)."""
    base = run.base()
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
            f"the layer {describe(e)} on one-hot {dtype_name(run.dtype)} inputs ({IN} features)"
        ) from e
    W0 = _matrix(base.weight.detach())
    err = rel(W_init, W0.double())
    if run.dtype == torch.float64 and TOL < err <= tolerance(torch.float32, IN):
        run.precision = torch.float32
    adapter = find_adapter(layer, W0, base.bias.detach(), RANK, W_init, rtol=run.tol(IN))
    return adapter, adapter.describe(layer)


def check_dora(
    factory: Factory, *, name: str | None = None, kind: str = "linear", dtype=torch.float64
) -> Report:
    """Check the DoRA layers factory(linear, rank, alpha) builds; one CheckResult per check.

    factory: a DoRA class or any function called as factory(linear, rank, alpha) that returns an
    nn.Module computing (..., in_features) -> (..., out_features); with kind="conv2d", called as
    factory(conv, rank, alpha) on an nn.Conv2d. dtype: the dtype of the base layers, the layer
    and the inputs (float64 tells the conventions apart best; float32, bfloat16 and float16 are
    checked with tolerances derived from their rounding). The global random state is left as it
    was. See the module docstring for what is checked and how.
    """
    start = time.perf_counter()
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    layer_kind = KINDS[kind]
    default = factory_name(factory) + ("" if kind == "linear" else f" on {layer_kind.name}")
    report = Report(name or default, None, None, dtype=dtype_name(dtype))
    run = Run(factory, layer_kind, dtype=dtype, precision=dtype)
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        try:
            run.adapter, report.adapter = identify(run)
            run.conventions.axis = run.adapter.axis  # judged by check 2, used by the others
        except NotIdentified as e:
            report.problem = str(e)
        except Exception as e:  # a layer this tool did not foresee: say so, do not crash
            report.problem = f"looking for A, B and m {describe(e)}"
        report.precision = dtype_name(run.precision)
        for c in CHECKS:
            if c.needs_adapter and run.adapter is None:
                report.results.append(CheckResult(c.number, c.title, "skip", "not run", c.kind))
                continue
            numbers = {}
            try:
                ok, detail, *more = c.run(run)
                numbers = more[0] if more else {}
            except Exception as e:
                ok, detail = False, describe(e)
            status = "skip" if ok is None else "pass" if ok else "fail"
            numbers = {k: v for k, v in numbers.items() if v is not None}
            report.results.append(
                CheckResult(c.number, c.title, status, detail, c.kind, numbers, report.precision)
            )
    report.seconds = time.perf_counter() - start
    return report


# --------------------------------------------------------------------------------------
# PEFT's DoRA as a layer
# --------------------------------------------------------------------------------------


def _raised_in(e: BaseException, packages) -> bool:
    """Whether e was raised inside one of the packages (a frame of theirs in its traceback)."""
    tb = e.__traceback__
    while tb is not None:
        module = tb.tb_frame.f_globals.get("__name__", "")
        if module.partition(".")[0] in packages:
            return True
        tb = tb.tb_next
    return False


@functools.cache
def peft_unavailable_reason() -> str | None:
    """None when PEFT can be imported and used, else why not (in words).

    Used, not only imported: PEFT can import fine and fail when it wraps a layer (e.g. an older
    torchao installed beside it makes get_peft_model raise ImportError), so this wraps a tiny
    nn.Linear with DoRA."""
    try:
        import peft  # noqa: F401
        from peft import LoraConfig, get_peft_model
    except Exception as e:  # not only ImportError: a broken install can raise anything
        return f"peft cannot be imported ({type(e).__name__}: {e}); pip install peft"
    try:
        config = LoraConfig(r=1, lora_alpha=1, use_dora=True, target_modules=["0"])
        get_peft_model(nn.Sequential(nn.Linear(2, 2)), config)
    except Exception as e:
        text = " ".join(str(e).split())[:200]
        return f"peft imports but fails in use ({type(e).__name__}: {text})"
    return None


class PeftDoRA(nn.Module):
    """PEFT's DoRA on one layer (nn.Linear or nn.Conv2d): get_peft_model(nn.Sequential(layer),
    use_dora=True, lora_dropout=dropout), with PEFT's merges as methods (check 10)."""

    def __init__(self, linear, rank, alpha, dropout=0.0):
        super().__init__()
        reason = peft_unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"PEFT's DoRA cannot be built: {reason}")
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=rank, lora_alpha=alpha, use_dora=True, target_modules=["0"], lora_dropout=dropout
        )
        self.model = get_peft_model(nn.Sequential(linear), config)

    def forward(self, x):
        return self.model(x)

    def merge_and_unload(self):
        """A plain copy of the base layer with W' merged in (PEFT's merge_and_unload)."""
        return self.model.merge_and_unload()

    def merge(self):
        """Merge W' into the base layer in place (PEFT's merge_adapter)."""
        self.model.merge_adapter()

    def unmerge(self):
        """Restore the base layer's W0 (PEFT's unmerge_adapter)."""
        self.model.unmerge_adapter()


def peft_dora_factory(linear: nn.Linear, rank: int, alpha: float, dropout=0.0) -> nn.Module:
    """The factory for PEFT's DoRA (B = 0 at initialisation, PEFT's default)."""
    return PeftDoRA(linear, rank, alpha, dropout)


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


class UsageError(Exception):
    """A target that cannot be loaded; the message says what to do."""


def import_file(path: Path):
    """Import a Python file as a module. Its own imports are found where Python finds them:
    ``python -m`` puts the working directory on the path, so run from the folder that holds the
    modules it imports (nothing here edits ``sys.path``)."""
    name = path.stem if path.stem not in sys.modules else f"_check_dora_target_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UsageError(f"cannot import {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
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


EXIT_HELP = (
    "exit status: 0 every check passes; 1 a check of kind 'paper' fails (not DoRA as the paper "
    "defines it); 3 a check of kind 'convention' fails and none of kind 'paper' (differs from "
    "the official code and PEFT: PEFT adapters do not transfer as they are); 4 only checks of "
    "kind 'robustness' fail (zero rows, low precision); 2 usage error, a layer whose A, B and m "
    "cannot be identified, or nothing checked (--peft alone, PEFT unusable). With several "
    "layers, the most serious found: 2, then 1, 3, 4"
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="check_dora.py",
        description="Check a DoRA layer against the paper, the official code and PEFT.",
        epilog=EXIT_HELP,
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
    parser.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default="float64",
        help="build the layers and inputs in this dtype; below float64 the tolerances follow "
        "its rounding (default: float64)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object: a list of reports, each with every check's kind, result "
        "and numbers, and the exit status",
    )
    args = parser.parse_args(argv)
    kind = "conv2d" if args.conv2d else "linear"
    if args.target is None and not args.peft:
        parser.error("give FILE.py:NAME or module:NAME, or --peft")
    on = " on nn.Conv2d" if args.conv2d else ""
    reports, skipped = [], []
    if args.target is not None:
        try:
            factory = load_factory(args.target)
        except UsageError as e:
            print(f"check_dora.py: error: {e}", file=sys.stderr)
            return 2
        name = args.target.rpartition(":")[2] + on
        reports.append(check_dora(factory, name=name, kind=kind, dtype=args.dtype))
        if not args.json:
            show(reports[-1])
    if args.peft:
        reason = peft_unavailable_reason()
        if reason is not None:  # one line, and the rest goes on
            skipped.append(f"PEFT's DoRA: skipped: {reason}")
            print(skipped[-1], file=sys.stderr)
        else:
            import peft

            name = f"PEFT {peft.__version__}{on}"
            reports.append(check_dora(peft_dora_factory, name=name, kind=kind, dtype=args.dtype))
            if not args.json:
                show(reports[-1])
    status = exit_status(reports)
    if args.json:
        out = {"reports": [r.to_dict() for r in reports], "skipped": skipped}
        print(json.dumps({**out, "exit_status": status}, indent=2))
    return status


def exit_status(reports) -> int:
    """The command's exit status for these reports (EXIT_HELP); 2 when there are none."""
    statuses = {r.exit_status for r in reports}
    return next((s for s in (2, 1, 3, 4) if s in statuses), 0 if statuses else 2)


def show(report: Report) -> int:
    print(report)
    print(f"  ({report.seconds:.1f} s)", flush=True)
    return report.exit_status
