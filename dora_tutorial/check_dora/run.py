"""What the checks share: the Run (factory, layer type, A/B/m, the conventions measured so far),
the check registry and the helpers that build layers and compare them with the reference.

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
class _Conventions:
    """The layer's conventions where the checks measured them; the paper's until then."""

    axis: int = 1
    scaling: str = "alpha / rank"
    rescaled_bias: bool = False
    detached: bool = True

    def differences(self) -> list[str]:
        return [
            says
            for differs, says in (
                (self.axis == 0, "magnitude per input column"),
                (self.scaling != "alpha / rank", f"scaling {self.scaling}"),
                (self.rescaled_bias, "bias rescaled"),
                (not self.detached, "norm not detached"),
            )
            if differs
        ]


@dataclass
class Run:
    """One conformance run. dtype: what base layers, layer and inputs are built in; precision:
    whose rounding the tolerances allow for (float32 for a layer computing in float32)."""

    factory: Factory
    kind: LayerKind = LINEAR
    adapter: Adapter | None = None
    conventions: _Conventions = field(default_factory=_Conventions)
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
        """A fresh layer around base, reproducibly initialised, in base's dtype (on a half
        precision base as the factory builds it: adapters may be kept in float32)."""
        torch.manual_seed(SEED)
        layer = self.factory(base, rank, alpha, **options)
        if not isinstance(layer, nn.Module):
            raise TypeError(f"the factory returned a {type(layer).__name__}, not an nn.Module")
        return layer if base.weight.dtype in LOW_PRECISION else layer.to(base.weight.dtype)

    def scaling(self, alpha, rank):
        return SCALINGS[self.conventions.scaling](alpha, rank)

    def trained(self, layer, base, rank=RANK, b_scale=1.0, seed=1):
        """Give the layer trained-looking A, B and m != ||V|| (at initialisation m / ||V|| = 1
        hides most bugs); returns them as the layer holds them, in float64."""
        W0 = as_matrix(base.weight.detach()).double()
        g = torch.Generator().manual_seed(seed)
        n_out, n_in = W0.shape
        A = torch.randn(rank, n_in, generator=g, dtype=W0.dtype) / math.sqrt(n_in)
        B = torch.randn(n_out, rank, generator=g, dtype=W0.dtype) * b_scale / math.sqrt(rank)
        base_norms = norms(W0, self.adapter.axis)
        m = (base_norms + 0.1) * (0.5 + torch.rand(len(base_norms), generator=g, dtype=W0.dtype))
        self.adapter.assign(layer, A, B, m)
        return [t.detach().double().clone() for t in self.adapter.tensors(layer)]

    def trained_layer(self, **options):
        """(base, layer, [A, B, m]): a fresh layer with trained-looking values."""
        base = self.base()
        layer = self.layer(base)
        return base, layer, self.trained(layer, base, **options)

    def weight(self, base, A, B, m, rank=RANK, alpha=ALPHA):
        """The reference merged weight W' (float64) under the conventions measured so far."""
        W0 = as_matrix(base.weight.detach()).double()
        return reference_weight(W0, A, B, m, self.scaling(alpha, rank), self.conventions.axis)[0]

    def reference(self, x, base, A, B, m, rank, alpha, detach=None):
        """The reference output (float64) under the conventions measured so far."""
        c, b = self.conventions, base.bias
        return reference_forward(
            *(x.double(), as_matrix(base.weight.detach()).double()),
            *(None if b is None else b.detach().double(), A, B, m, self.scaling(alpha, rank)),
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
    """Register a check: a function Run -> (passed, one line in plain words[, numbers]);
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


def sum_length(W0, x):
    """An upper bound on the terms in one sum of forward or backward: rows x max(in, out)."""
    return max(1, x.numel() // W0.shape[1]) * max(W0.shape)


def gradient_errors(run, layer, base, state, x, rank, alpha, detach=None):
    """Relative differences of the output and the gradients of A, B, m, x: layer vs reference
    (in float64, from the layer's own rounded parameters and inputs)."""
    x = x.detach().clone().requires_grad_()
    y = layer(x)
    g = torch.Generator().manual_seed(2)
    weights = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)
    (y * weights).sum().backward()
    got = [y, *run.adapter.grads(layer), x.grad]
    A, B, m, x = (t.detach().double().clone().requires_grad_() for t in (*state, x))
    y = run.reference(x, base, A, B, m, rank, alpha, detach)
    (y * weights.double()).sum().backward()
    names = ["output", *(f"gradient of {n}" for n in ("A", "B", "m", "the input"))]
    return {
        n: math.inf if a is None or a.shape != b.shape else rel(a.double(), b)
        for n, a, b in zip(names, got, [y, A.grad, B.grad, m.grad, x.grad], strict=True)
    }
