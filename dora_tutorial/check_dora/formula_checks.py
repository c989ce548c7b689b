"""What the layer computes against the reference formula, one convention at a time
(initialisation, axis, normalisation, scaling, bias, detach), then the whole formula."""

import math

import torch

from .reference import as_matrix, pct, rel
from .report import CONVENTION, PAPER
from .run import ALPHA, IN, OUT, RANK, SCALINGS, Run, check, describe, result
from .tolerances import dtype_name

_COPIED = "as in catid/dora and rasbt/dora-from-scratch's merged layer"
# (in, out, rank, alpha, bias, input shape without the last axis) for the whole formula
_SHAPES = [(11, 7, 3, 5, True, (4,)), (6, 9, 1, 2, False, (2, 3)), (16, 16, 4, 8, True, (5,))]


@check("base function at init", CONVENTION, needs_adapter=False)
def identity_at_init(run: Run):
    """W' = W0 and the same bias at initialisation: with B = 0 every other convention leaves
    W' = W0, so this isolates the initial values (B = 0, m = ||W0||)."""
    base = run.base()
    x = run.inputs((5,), IN, seed=3)
    W0 = as_matrix(base.weight.detach()).double()
    expected = run.kind.apply(x.double(), W0, base.bias.detach().double())
    layer = run.layer(base)
    with torch.no_grad():
        err = rel(layer(x).double(), expected)
    tol = run.forward_tol(W0, x)
    if err <= tol:
        return result(True, "the layer starts as the pretrained layer (same outputs)", err, tol)
    nonzero_b = run.adapter is not None and run.adapter.tensors(layer)[1].detach().any()
    says = (
        f"at initialisation the outputs differ from the base layer's by up to {pct(err)}"
        f"{' (B is not zero at initialisation)' if nonzero_b else ''}: fine-tuning does not "
        "start from the pretrained model; DoRA starts with B = 0 and m = ||W0|| so that W' = W0"
    )
    return result(False, says, err, tol)


@check("magnitude axis", PAPER)
def magnitude_axis(run: Run):
    """One magnitude per output row: multiplying m by c multiplies each row n of W' by c_n."""
    axis = run.adapter.axis
    _, layer, (A, B, m) = run.trained_layer()
    W1, _ = run.kind.effective_weight(layer, IN)
    c = 0.5 + torch.rand(m.shape, generator=torch.Generator().manual_seed(4), dtype=m.dtype)
    run.adapter.assign(layer, A, B, m * c)
    c = run.adapter.tensors(layer)[2].detach().double() / m  # c as the layer rounded m c
    W2, _ = run.kind.effective_weight(layer, IN)
    err = rel(W2, c[:, None] * W1 if axis == 1 else W1 * c[None, :])
    tol = run.tol(W1.shape[1])
    if axis == 0:
        says = (
            f"one magnitude per INPUT column ({IN} entries, the column norms of W0), not per "
            f"output row: the per-input-column norm (norm(dim=0), {_COPIED}), which rescales "
            "input features instead of output neurons; a different method from the paper's and "
            "PEFT's, whose adapters do not load into it"
        )
    elif err > tol:
        says = (
            "changing m_n does not scale row n of the merged weight alone: m is not used as "
            "DoRA's magnitude, so training m does not do what DoRA's magnitude does"
        )
    else:
        return result(True, f"one magnitude per output row ({OUT} entries)", err, tol)
    return result(False, says, err, tol)


@check("normalisation", PAPER)
def normalisation(run: Run):
    """The merged weight's rows (along m's own axis) have norm m, whatever B is."""
    axis, worst = run.adapter.axis, 0.0
    for b_scale in (0.1, 10.0):
        _, layer, (_, _, m) = run.trained_layer(b_scale=b_scale)
        W, _ = run.kind.effective_weight(layer, IN)
        worst = max(worst, rel(W.norm(dim=axis), m))
    tol, line = run.tol(W.shape[1]), "rows" if axis == 1 else "columns"
    if worst <= tol:
        return result(True, f"the merged weight's {line} have norm m, whatever B is", worst, tol)
    says = (
        f"the merged weight's {line} do not have norm m (off by up to {pct(worst)}): magnitude "
        "and direction are not separated (is the norm taken of W0 + s B A, the weight with the "
        "update?), so training m does not set the rows' length as DoRA's magnitude does"
    )
    return result(False, says, worst, tol)


def _measure_scaling(W0, D, W, axis):
    """(median s, spread of the s_n, worst residual): each row n (axis=1) or column of W fitted
    as a W0[n] + c D[n] by least squares, s_n = c / a."""
    if axis == 0:
        W0, D, W = W0.T, D.T, W.T
    M = torch.stack([W0, D], dim=2)  # (rows, in, 2)
    coef = torch.linalg.lstsq(M, W.unsqueeze(2)).solution  # (rows, 2, 1)
    residual = rel((M @ coef).squeeze(2), W)
    s = coef[:, 1, 0] / coef[:, 0, 0]
    median = s.median()
    return median.item(), rel(s, median.expand_as(s)), residual


@check("scaling", CONVENTION)
def scaling(run: Run):
    """V = W0 + (alpha / r) B A: s measured from the direction of each row of W', which lies
    along W0 + s B A whatever the magnitude, axis, bias or detach convention."""
    base, layer, (A, B, _) = run.trained_layer()
    W, _ = run.kind.effective_weight(layer, IN)
    W0 = as_matrix(base.weight.detach()).double()
    s, spread, residual = _measure_scaling(W0, B @ A, W, run.adapter.axis)
    tol = run.tol(W0.shape[1])
    fit = max(residual, spread / 2)  # s_n = c / a divides two fitted numbers: twice the rounding
    if fit > tol:
        says = (
            "the merged weight's direction is not W0 + s B A for one s: the update B A is not "
            "added to W0 as DoRA's (and LoRA's) update, so the scaling cannot be measured"
        )
        return result(False, says, fit, tol)
    name = next((n for n, f in SCALINGS.items() if abs(s - f(ALPHA, RANK)) <= 2 * tol * s), None)
    run.conventions.scaling = name or run.conventions.scaling
    expected = ALPHA / RANK
    numbers = {"scaling": s, "expected": expected}
    err = abs(s - expected) / expected
    if name == "alpha / rank":
        says = f"the update is scaled by alpha / rank (= {expected:.4g})"
        return result(True, says, err, tol, **numbers)
    why = {  # after "not alpha / rank"
        "alpha": f", {_COPIED}: {RANK} times too strong at rank {RANK}, and the step size "
        "changes with the rank",
        "alpha / sqrt(rank)": " (rsLoRA's rule, PEFT's use_rslora=True)",
        "1": " (alpha has no effect)",
    }.get(name, "")
    says = (
        f"the update is scaled by {name or f'{s:.4g}'}{f' (= {ALPHA})' if name == 'alpha' else ''}"
        f", not alpha / rank (= {expected:.4g}){why}: learning rates and alphas tuned for the "
        "paper or PEFT do not transfer"
    )
    return result(False, says, err, tol, **numbers)


@check("bias", PAPER)
def bias(run: Run):
    """y = x W'^T + b, the bias not rescaled: the output at x = 0 is b after B and m moved (the
    usual bug: an efficient forward rescaling base_layer(x), bias included)."""
    base, layer, (A, B, m) = run.trained_layer()
    _, y0 = run.kind.effective_weight(layer, IN)
    b = base.bias.detach().double()
    err, tol = rel(y0, b), run.tol(IN)
    if err <= tol:
        return result(True, "the bias is added after the rescaling, not rescaled", err, tol)
    V = as_matrix(base.weight.detach()).double() + run.scaling(ALPHA, RANK) * (B @ A)
    if run.adapter.axis == 1 and rel(y0, m / V.norm(dim=1) * b) <= tol:
        run.conventions.rescaled_bias = True
        says = (
            "the bias is rescaled by m / ||V|| with the weight: it drifts whenever m trains, and "
            "merging into an nn.Linear (weight W', bias b) changes the function; PEFT and the "
            "official code add b unscaled (subtract the bias before rescaling base_layer(x))"
        )
    elif not y0.abs().max() > 0:
        says = "the bias is dropped: the layer's output at x = 0 is zero, not b"
    else:
        says = f"the output at x = 0 is not the bias b (off by up to {pct(err)})"
    return result(False, says, err, tol)


@check("norm detached", CONVENTION)
def norm_detached(run: Run):
    """||V|| is a constant in backward (paper section 4.3, PEFT): the gradients of A and B,
    the only ones the detach changes, compared with the reference with and without it."""
    x = run.inputs((6,), IN, seed=5)
    errors = {}
    for detach in (True, False):
        base = run.base()  # fresh: gradients from the first pass would add up
        layer = run.layer(base)
        state = run.trained(layer, base)
        err = run.gradient_errors(layer, base, state, x, RANK, ALPHA, detach)
        errors[detach] = max(err["gradient of A"], err["gradient of B"])
    tol = run.forward_tol(as_matrix(base.weight), x)
    numbers = {"error_if_not_detached": errors[False]}
    if errors[True] <= tol:
        detail = "||V|| is a constant in backward (paper section 4.3, PEFT)"
        if errors[False] <= tol:
            detail += f"; {dtype_name(run.precision)} cannot tell it from the exact gradient here"
        return result(True, detail, errors[True], tol, **numbers)
    if errors[False] <= tol:
        run.conventions.detached = False
        says = (
            "||V|| is differentiated in backward, not detached (paper section 4.3): the "
            f"gradients of A and B differ from the paper's and PEFT's by up to "
            f"{pct(errors[True])} (another training trajectory), and backward keeps V for the "
            "norm (more memory)"
        )
    else:
        says = (
            "the gradients of A and B match DoRA's neither with nor without the detach (off by "
            f"up to {pct(min(errors.values()))}): backward does not train DoRA's parameters"
        )
    return result(False, says, errors[True], tol, **numbers)


@check("reference formula", PAPER)
def reference_formula(run: Run):
    """Forward and gradients of A, B, m and the input match the formula under the conventions
    measured so far, on _SHAPES: what no convention check catches (a wrong gradient of m, a
    rank or shape handled wrongly, a layer taking only 2-D inputs)."""
    found = []  # (error / tolerance, error, tolerance, what, on which shape)
    for i, (n_in, n_out, rank, alpha, bias, lead) in enumerate(_SHAPES):
        base = run.base(n_in, n_out, bias=bias, seed=10 + i)
        x = run.inputs(lead, n_in, seed=20 + i)
        shape = (
            f"in {n_in}, out {n_out}, rank {rank}, alpha {alpha}, "
            f"{'bias' if bias else 'no bias'}, input {tuple(x.shape)}"
        )
        try:
            layer = run.layer(base, rank, alpha)
            state = run.trained(layer, base, rank, seed=30 + i)
            errors = run.gradient_errors(layer, base, state, x, rank, alpha)
        except Exception as e:
            return False, f"the layer {describe(e)} ({shape})"
        tol = run.forward_tol(as_matrix(base.weight), x)
        found += [(err / tol, err, tol, what, shape) for what, err in errors.items()]
    _, worst, tol, what, where = max(found)
    c = run.conventions
    differences = {
        "magnitude per input column": c.axis == 0,
        f"scaling {c.scaling}": c.scaling != "alpha / rank",
        "bias rescaled": c.rescaled_bias,
        "norm not detached": not c.detached,
    }
    conventions = [says for says, differs in differences.items() if differs]
    under = f" (with this layer's {', '.join(conventions)})" if conventions else ""
    if worst <= tol:
        says = (
            f"forward and gradients of A, B, m and x match on {len(_SHAPES)} shapes, ranks "
            f"{min(s[2] for s in _SHAPES)}-{max(s[2] for s in _SHAPES)}, with and without bias"
        )
        return result(True, says + under, worst, tol)
    off = "is missing or has the wrong shape" if math.isinf(worst) else f"is off by {pct(worst)}"
    says = (
        f"the {what} {off} ({where}){under}: the layer computes something other than DoRA, "
        "beyond the conventions checked above"
    )
    return result(False, says, None if math.isinf(worst) else worst, tol)
