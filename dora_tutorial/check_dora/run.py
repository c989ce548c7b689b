"""What the checks share: the Run (factory, layer type, A/B/m, the conventions measured so far)
and the helpers that build layers, give them trained values and compare them with the reference.

Each check isolates one convention: the others use the layer's own axis (check 2), scaling (4),
bias placement (5) and detach (6), recorded in Run.conventions as those checks measure them, so
that a layer wrong in one way fails that check only.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .adapter import Adapter
from .reference import (
    ALPHA,
    IN,
    LINEAR,
    OUT,
    RANK,
    SCALINGS,
    SEED,
    Factory,
    LayerKind,
    as_matrix,
    norms,
    reference_forward,
    reference_weight,
    rel,
)
from .tolerances import LOW_PRECISION, tolerance


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
    """One conformance run.

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
        """The tolerance for results of sums of up to n terms."""
        return tolerance(self.precision, n)

    def base(self, n_in=IN, n_out=OUT, bias=True, seed=SEED):
        return self.kind.make_base(n_in, n_out, bias=bias, dtype=self.dtype, seed=seed)

    def inputs(self, lead, n_in, seed):
        return self.kind.inputs(lead, n_in, seed=seed, dtype=self.dtype)

    def layer(self, base, rank=RANK, alpha=ALPHA, **options):
        """A fresh layer around base, its initialisation reproducible, in base's dtype; on a
        bfloat16 or float16 base as the factory builds it (adapters may be kept in float32)."""
        torch.manual_seed(SEED)
        layer = self.factory(base, rank, alpha, **options)
        if not isinstance(layer, nn.Module):
            raise TypeError(f"the factory returned a {type(layer).__name__}, not an nn.Module")
        return layer if base.weight.dtype in LOW_PRECISION else layer.to(base.weight.dtype)

    def scaling(self, alpha, rank):
        return SCALINGS[self.conventions.scaling](alpha, rank)

    def trained(self, layer, base, rank=RANK, b_scale=1.0, seed=1):
        """Give the layer trained-looking A, B (update comparable to W0) and m != ||V||, since
        at initialisation m / ||V|| = 1 hides most bugs.

        Returns A, B and m as the layer holds them (rounded to its dtype), in float64."""
        W0 = as_matrix(base.weight.detach()).double()
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
        W0 = as_matrix(base.weight.detach()).double()
        return reference_weight(W0, A, B, m, self.scaling(alpha, rank), self.conventions.axis)[0]

    def reference(self, x, base, A, B, m, rank, alpha, detach=None):
        """The reference output (float64) under the conventions measured so far."""
        c = self.conventions
        return reference_forward(
            x.double(),
            as_matrix(base.weight.detach()).double(),
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


def check(checks: list[Check], number, title, kind, needs_adapter=True):
    """Add a check to ``checks``: a function Run -> (passed, one line in plain words[, numbers]);
    passed is True, False or None (the check does not apply to this layer: skipped)."""

    def register(fn):
        checks.append(Check(number, title, fn, needs_adapter, kind))
        return fn

    return register


def result(ok, detail, error, tol, **numbers):
    """A check's outcome with the numbers it measured (for --json and "within rounding")."""
    return ok, detail, {"error": error, "tolerance": tol, **numbers}


def describe(e: BaseException) -> str:
    """An exception in one line."""
    text = str(e).strip().splitlines()
    return f"raised {type(e).__name__}" + (f": {text[0][:200]}" if text else "")


def _leaf(t):
    return t.detach().clone().requires_grad_()


def sum_length(W0, x):
    """An upper bound on the terms in one sum of forward or backward: rows x max(in, out)."""
    rows = max(1, x.numel() // W0.shape[1])
    return rows * max(W0.shape)


def gradient_errors(run, layer, base, state, x, rank, alpha, detach=None):
    """Relative differences of output and of the gradients of A, B, m, x: layer vs reference
    (the reference in float64, from the layer's own rounded parameters and inputs)."""
    g = torch.Generator().manual_seed(2)
    x = _leaf(x)
    y = layer(x)
    weights = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)
    (y * weights).sum().backward()
    got = [y, *run.adapter.grads(layer), x.grad]
    A, B, m, x = (_leaf(t.double()) for t in (*state, x))
    y = run.reference(x, base, A, B, m, rank, alpha, detach)
    (y * weights.double()).sum().backward()
    expected = [y, A.grad, B.grad, m.grad, x.grad]
    names = ["output", *(f"gradient of {n}" for n in ("A", "B", "m", "the input"))]
    return {
        n: math.inf if a is None or a.shape != b.shape else rel(a.double(), b)
        for n, a, b in zip(names, got, expected, strict=True)
    }
