"""What the checks share: the Run (factory, layer type, A/B/m, the conventions measured so far),
the Check, and the helpers that build layers and compare them with the reference.

Each check isolates one convention: the others use the layer's own axis, scaling, bias placement
and detach, recorded in Run.conventions as their checks measure them, so that a layer wrong in
one way fails that check only.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .adapter import Adapter
from .reference import LINEAR, LayerKind, as_matrix, reference_forward, reference_weight, rel
from .tolerances import LOW_PRECISION, tolerance

IN, OUT, RANK, ALPHA = 11, 7, 3, 5  # pairwise different: shapes say which axis is which
SEED = 0
# the scaling rules a layer might use; the first one is DoRA's (and LoRA's)
SCALINGS: dict[str, Callable[[float, int], float]] = {
    "alpha / rank": lambda alpha, rank: alpha / rank,
    "alpha": lambda alpha, rank: float(alpha),
    "alpha / sqrt(rank)": lambda alpha, rank: alpha / math.sqrt(rank),
    "1": lambda alpha, rank: 1.0,
}


@dataclass
class _Conventions:
    """The layer's conventions where the checks measured them; the paper's until then."""

    axis: int = 1
    scaling: str = "alpha / rank"
    rescaled_bias: bool = False
    detached: bool = True


@dataclass
class Run:
    """One conformance run. dtype: what base layers, layer and inputs are built in; precision:
    whose rounding the tolerances allow for (float32 for a layer computing in float32)."""

    factory: Callable[..., nn.Module]
    kind: LayerKind = LINEAR
    adapter: Adapter | None = None
    conventions: _Conventions = field(default_factory=_Conventions)
    dtype: torch.dtype = torch.float64
    precision: torch.dtype = torch.float64

    def tol(self, n):
        """The tolerance for results of sums of up to n terms."""
        return tolerance(self.precision, n)

    def forward_tol(self, W0, x):
        """The tolerance for forward and backward: sums of up to rows x max(in, out) terms."""
        return self.tol(max(1, x.numel() // W0.shape[1]) * max(W0.shape))

    def base(self, n_in=IN, n_out=OUT, bias=True, seed=SEED, dtype=None):
        return self.kind.make_base(n_in, n_out, bias, dtype or self.dtype, seed)

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
        base_norms = W0.norm(dim=self.adapter.axis)
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

    def gradient_errors(self, layer, base, state, x, rank, alpha, detach=None):
        """Relative differences of the output and the gradients of A, B, m, x: layer vs reference
        (in float64, from the layer's own rounded parameters and inputs)."""
        x = x.detach().clone().requires_grad_()
        y = layer(x)
        g = torch.Generator().manual_seed(2)
        weights = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)
        (y * weights).sum().backward()
        got = [y, *self.adapter.tensors(layer, grads=True), x.grad]
        A, B, m, x = (t.detach().double().clone().requires_grad_() for t in (*state, x))
        y = self.reference(x, base, A, B, m, rank, alpha, detach)
        (y * weights.double()).sum().backward()
        names = ["output", *(f"gradient of {n}" for n in ("A", "B", "m", "the input"))]
        return {
            n: math.inf if a is None or a.shape != b.shape else rel(a.double(), b)
            for n, a, b in zip(names, got, [y, A.grad, B.grad, m.grad, x.grad], strict=True)
        }


@dataclass(frozen=True)
class Check:
    """run(Run) -> (passed, one line in plain words[, numbers]); passed is True, False or None
    (the check does not apply to this layer: skipped). Its number is its place in CHECKS."""

    title: str
    kind: str
    run: Callable[[Run], tuple]
    needs_adapter: bool = True


def check(title, kind, needs_adapter=True):
    """Make the function a Check (checker.CHECKS gives the order)."""
    return lambda fn: Check(title, kind, fn, needs_adapter)


def result(ok, detail, error, tol, **numbers):
    """A check's outcome with the numbers it measured (for --json and "within rounding")."""
    return ok, detail, {"error": error, "tolerance": tol, **numbers}


def describe(e: BaseException) -> str:
    """An exception in one line."""
    text = str(e).strip().splitlines()
    return f"raised {type(e).__name__}" + (f": {text[0][:200]}" if text else "")
