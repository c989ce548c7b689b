"""The reference DoRA formula, the base layer type the checks wrap (nn.Linear here, conv.py for
nn.Conv2d), and the Run the checks share: it builds layers, sets their A, B and m, and computes
the reference under the layer's conventions as their checks measure them, so that a layer wrong
in one way fails that check only."""

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .adapter import Adapter, as_matrix
from .tolerances import LOW_PRECISION, rel, tolerance

# The kinds of finding, most serious first.
PAPER, CONVENTION, ROBUSTNESS = "paper", "convention", "robustness"
IN, OUT, RANK, ALPHA = 11, 7, 3, 5  # pairwise different: shapes say which axis is which
SEED = 0
# the scaling rules a layer might use (check 7 computes the reference with the layer's own)
SCALINGS: dict[str, Callable[[float, int], float]] = {
    "alpha / rank": lambda alpha, rank: alpha / rank,
    "alpha": lambda alpha, rank: float(alpha),
    "alpha / sqrt(rank)": lambda alpha, rank: alpha / math.sqrt(rank),
    "1": lambda alpha, rank: 1.0,
}


def reference_weight(W0, A, B, m, scaling, axis=1, detach=True):
    """(W', k): DoRA's W' = k V with V = W0 + scaling B A and k = m / ||V||."""
    V = W0 + scaling * (B @ A)
    norm = V.norm(dim=axis, keepdim=True).clamp_min(1e-12)  # the paper's formula: 0 / 0 on 0 rows
    k = m.reshape(norm.shape) / (norm.detach() if detach else norm)
    return k * V, k


def describe(e: BaseException) -> str:
    """An exception in one line."""
    text = str(e).strip().splitlines()
    return f"raised {type(e).__name__}" + (f": {text[0][:200]}" if text else "")


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


@dataclass
class _Conventions:
    """The layer's conventions where the checks measured them; the paper's until then."""

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

    @staticmethod
    def w0(base):
        return as_matrix(base.weight.detach()).double()

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
        W0 = self.w0(base)
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

    def weight(self, base, A, B, m, rank=RANK, alpha=ALPHA, detach=True):
        """(W', m / ||V||) of the reference (float64) under the conventions measured so far."""
        s, axis = self.scaling(alpha, rank), self.adapter.axis
        return reference_weight(self.w0(base), A, B, m, s, axis, detach)

    def gradient_errors(self, layer, base, state, x, rank, alpha, detach=None):
        """Relative differences of the output and the gradients of A, B, m, x: layer vs the
        reference under the conventions measured so far (in float64, from the layer's own
        rounded parameters and inputs)."""
        x = x.detach().clone().requires_grad_()
        y = layer(x)
        g = torch.Generator().manual_seed(2)
        weights = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)
        (y * weights).sum().backward()
        got = [y, *self.adapter.tensors(layer, grads=True), x.grad]
        A, B, m, x = (t.detach().double().clone().requires_grad_() for t in (*state, x))
        c, b = self.conventions, base.bias
        W, k = self.weight(base, A, B, m, rank, alpha, c.detached if detach is None else detach)
        b = None if b is None else b.detach().double() * (k.flatten() if c.rescaled_bias else 1)
        y = self.kind.apply(x, W, b)
        (y * weights.double()).sum().backward()
        names = ["output", *(f"gradient of {n}" for n in ("A", "B", "m", "the input"))]
        return {
            n: math.inf if a is None or a.shape != b.shape else rel(a.double(), b)
            for n, a, b in zip(names, got, [y, A.grad, B.grad, m.grad, x.grad], strict=True)
        }


def check(title, kind, needs_adapter=True):
    """fn(run) -> (passed: True, False or None for not applicable, says[, numbers])."""

    def mark(fn):
        fn.title, fn.kind, fn.needs_adapter = title, kind, needs_adapter
        return fn

    return mark


def result(ok, detail, error, tol, **numbers):
    """A check's outcome with the numbers it measured (for --json and "within rounding")."""
    return ok, detail, {"error": error, "tolerance": tol, **numbers}
