"""What the layer computes against the reference formula, one convention at a time
(initialisation, axis, normalisation, scaling, bias, detach), then the whole formula."""

import math

import torch

from .reference import ALPHA, CONVENTION, IN, PAPER, RANK, SCALINGS, Run, check, describe, result
from .tolerances import dtype_name, pct, rel

# (in, out, rank, alpha, bias, input shape without the last axis) for the whole formula
_SHAPES = [(11, 7, 3, 5, True, (4,)), (6, 9, 1, 2, False, (2, 3)), (16, 16, 4, 8, True, (5,))]


@check("base function at init", CONVENTION, needs_adapter=False)
def identity_at_init(run: Run):
    """W' = W0 and the same bias at initialisation: with B = 0 every other convention leaves
    W' = W0, so this isolates the initial values (B = 0, m = ||W0||)."""
    base = run.base()
    x = run.inputs((5,), IN, seed=3)
    W0 = run.w0(base)
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
        f"{' (B is not zero at initialisation)' if nonzero_b else ''}: DoRA starts with B = 0 "
        "and m = ||W0||, so that fine-tuning starts from the pretrained model"
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
            f"one magnitude per INPUT column ({len(m)} entries, the column norms of W0), not per "
            "output row (norm(dim=0)): it rescales input features, not output neurons; another "
            "method than the paper's and PEFT's"
        )
    elif err > tol:
        says = "changing m_n does not scale row n of the merged weight alone: m is not a magnitude"
    else:
        return result(True, f"one magnitude per output row ({len(m)} entries)", err, tol)
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
        "and direction are not separated (is the norm taken of W0 + s B A?)"
    )
    return result(False, says, worst, tol)


@check("scaling", CONVENTION)
def scaling(run: Run):
    """V = W0 + (alpha / r) B A: s measured from the direction of each row of W', which lies
    along W0 + s B A whatever the magnitude, axis, bias or detach convention. Each row n (or
    column) of W is fitted as a W0[n] + c (B A)[n] by least squares, s_n = c / a."""
    base, layer, (A, B, _) = run.trained_layer()
    W, _ = run.kind.effective_weight(layer, IN)
    W0, D = run.w0(base), B @ A
    tol = run.tol(W0.shape[1])
    if run.adapter.axis == 0:
        W0, D, W = W0.T, D.T, W.T
    M = torch.stack([W0, D], dim=2)  # (rows, in, 2)
    coef = torch.linalg.lstsq(M, W.unsqueeze(2)).solution  # (rows, 2, 1)
    s_n = coef[:, 1, 0] / coef[:, 0, 0]
    s = s_n.median().item()
    # s_n = c / a divides two fitted numbers: twice the rounding
    fit = max(rel((M @ coef).squeeze(2), W), rel(s_n, torch.full_like(s_n, s)) / 2)
    if fit > tol:
        says = "the merged weight's direction is not W0 + s B A for one s: B A is not DoRA's update"
        return result(False, says, fit, tol)
    name = next((n for n, f in SCALINGS.items() if abs(s - f(ALPHA, RANK)) <= 2 * tol * s), None)
    run.conventions.scaling = name or run.conventions.scaling
    expected = ALPHA / RANK
    numbers = {"scaling": s, "expected": expected}
    err = abs(s - expected) / expected
    says = f"the update is scaled by {name or 's'} (= {s:.4g})"
    if name == "alpha / rank":
        return result(True, says, err, tol, **numbers)
    says += (
        f", not alpha / rank (= {expected:.4g}): tuned learning rates and alphas do not transfer"
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
    V = run.w0(base) + run.scaling(ALPHA, RANK) * (B @ A)
    if run.adapter.axis == 1 and rel(y0, m / V.norm(dim=1) * b) <= tol:
        run.conventions.rescaled_bias = True
        says = (
            "the bias is rescaled by m / ||V|| with the weight: it drifts as m trains, and the "
            "merged layer computes another function (subtract b before rescaling base_layer(x))"
        )
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
    tol = run.forward_tol(run.w0(base), x)
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
            f"gradients of A and B differ from PEFT's by up to {pct(errors[True])}"
        )
    else:
        says = (
            "the gradients of A and B match DoRA's neither with nor without the detach (off by "
            f"up to {pct(min(errors.values()))})"
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
        shape = f"in {n_in}, out {n_out}, rank {rank}, bias {bias}, input {tuple(x.shape)}"
        try:
            layer = run.layer(base, rank, alpha)
            state = run.trained(layer, base, rank, seed=30 + i)
            errors = run.gradient_errors(layer, base, state, x, rank, alpha)
        except Exception as e:
            return False, f"the layer {describe(e)} ({shape})"
        tol = run.forward_tol(run.w0(base), x)
        found += [(err / tol, err, tol, what, shape) for what, err in errors.items()]
    _, worst, tol, what, where = max(found)
    c = run.conventions
    differences = {
        "magnitude per input column": run.adapter.axis == 0,
        f"scaling {c.scaling}": c.scaling != "alpha / rank",
        "bias rescaled": c.rescaled_bias,
        "norm not detached": not c.detached,
    }
    conventions = [says for says, differs in differences.items() if differs]
    under = f" (with this layer's {', '.join(conventions)})" if conventions else ""
    if worst <= tol:
        ranks = sorted(s[2] for s in _SHAPES)
        says = f"forward and gradients of A, B, m and x match on {len(_SHAPES)} shapes, ranks "
        says += f"{ranks[0]}-{ranks[-1]}"
        return result(True, says + under, worst, tol)
    off = "is missing or has the wrong shape" if math.isinf(worst) else f"is off by {pct(worst)}"
    says = f"the {what} {off} ({where}){under}"
    return result(False, says, None if math.isinf(worst) else worst, tol)
