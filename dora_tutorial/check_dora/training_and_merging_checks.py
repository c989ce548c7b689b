"""Checks 8-12, the layer in use: zero rows and half precision, dropout in training, merging
for deployment, and training and merging on a bfloat16 or float16 base."""

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from dora_tutorial.precision import magnitude_moves, merge_error

from .reference import IN, OUT, RANK, as_matrix, norms, pct, rel
from .report import CONVENTION, PAPER, ROBUSTNESS
from .run import Check, Run, check, describe, result, sum_length
from .tolerances import LOW_PRECISION, dtype_name, tolerance

CHECKS: list[Check] = []


def _low_precision(run):
    """float32, or the run's dtype if that is a half-precision one."""
    return run.dtype if run.dtype in LOW_PRECISION else torch.float32


def _non_finite(run, layer, x):
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


@check(CHECKS, 8, "zero rows, low precision", ROBUSTNESS)
def _check_robustness(run: Run):
    """No NaN or inf from an all-zero weight row or column (a per-column layer meets its 0 / 0
    on the column), at initialisation and after B and m moved; the layer converted with
    .to(bfloat16) / .to(float16) stays finite and within that dtype's rounding of float32's."""
    x = run.kind.inputs((4,), IN, seed=8, dtype=_low_precision(run))
    for what in ("row", "column"):
        for moved in (False, True):
            base = run.kind.make_base(IN, OUT, dtype=_low_precision(run))
            with torch.no_grad():  # row 2 or column 4 all zero
                as_matrix(base.weight)[(2, slice(None)) if what == "row" else (slice(None), 4)] = 0
            layer = run.layer(base)
            if moved:
                run.trained(layer, base)
            bad = _non_finite(run, layer, x)
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
        bad = _non_finite(run, low, x.to(dtype))
        if bad:
            return False, f"in {name} the {bad} has NaN or inf: the layer cannot train in {name}"
        with torch.no_grad():
            err = rel(low(x.to(dtype)).double(), expected)
        this_tol = tolerance(dtype, 64)
        if err > this_tol:
            says = (
                f"in {name} the output is off by {pct(err)} from float32's, more than {name}'s "
                f"rounding ({this_tol:.0e}): too inaccurate to train in half precision (sum "
                "the squares of the norm in float32)"
            )
            return result(False, says, err, this_tol)
        if worst == 0.0 or err / this_tol > worst / tol:
            worst, tol = err, this_tol
    return (
        True,
        "no NaN or inf with an all-zero weight row or column; bfloat16 and float16 work",
        {"low_precision_error": worst, "low_precision_tolerance": tol},
    )


_P_DROP = 0.5  # the dropout probability check 9 gives a factory that takes dropout=p


@check(CHECKS, 9, "dropout", CONVENTION)
def _check_dropout(run: Run):
    """PEFT's placement of dropout=p in training, y = x W0^T + b + x_d (W' - W0)^T with x_d the
    mask F.dropout(x, p) draws from the same random state; none in eval mode. Not applicable
    to a factory without ``dropout`` (PEFT's ``lora_dropout``)."""
    base = run.base()
    try:
        layer = run.layer(base, dropout=_P_DROP)
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
    x_d = F.dropout(x, _P_DROP).double()  # the same mask: the same random state
    W0 = as_matrix(base.weight.detach()).double()
    b = base.bias.detach().double()
    W = run.weight(base, A, B, m)
    apply = run.kind.apply
    expected = apply(x.double(), W0, b) + apply(x_d, W - W0, None)
    tol = run.tol(sum_length(W0, x))
    err = rel(y, expected)
    layer.eval()
    with torch.no_grad():
        eval_err = rel(layer(x).double(), apply(x.double(), W, b))
    peft = "y = base(x) + (k - 1) x_d W0^T + k s x_d A^T B^T"
    if err <= tol and eval_err <= tol:
        says = (
            f"dropout (p = {_P_DROP}) as in PEFT: the base path on the clean input, the magnitude "
            "and update terms on the dropped input; none in eval mode"
        )
        return result(True, says, err, tol, eval_error=eval_err)
    if err <= tol:
        says = (
            f"in eval mode the output is off by {pct(eval_err)} from the layer without dropout: "
            "dropout must act in training only"
        )
        return result(False, says, eval_err, tol)
    if rel(y, apply(x.double(), W, b)) <= tol:
        says = (
            "dropout=p has no effect in training: the layer ignores p (the divergence reported "
            "as fsdp_qlora #68, DoRA ignoring lora_dropout); PEFT drops the input of the "
            "magnitude and update terms"
        )
    elif rel(y, apply(x_d, W, b)) <= tol:
        says = (
            "the base path sees the dropped input too, y = DoRA(dropout(x)): the pretrained "
            "layer's output is perturbed even at B = 0; PEFT keeps base(x) on the clean input and "
            f"drops only the input of the magnitude and update terms: {peft}"
        )
    else:
        says = (
            f"with dropout=p the output is off by {pct(err)} from PEFT's, {peft} with the mask "
            "F.dropout(x, p) draws from the same random state"
        )
    return result(False, says, err, tol, eval_error=eval_err)


_MERGES = ("merged_weight", "merge_and_unload", "merge")
_UNMERGES = ("unmerge", "unmerge_adapter")


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
            W = as_matrix(layer.merged_weight().detach()).double()
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
            else:
                tried.append("merge() in place")
                layer.merge()
                compare("the layer after merge()", layer(x))
                unmerge = next((n for n in _UNMERGES if callable(getattr(layer, n, None))), None)
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


@check(CHECKS, 10, "merge and unmerge", PAPER)
def _check_merge(run: Run):
    """Where the layer offers a merge (merged_weight(), merge_and_unload(), merge() returning a
    layer or in place), the merged function is the layer's; unmerge() / unmerge_adapter()
    restores W0. Merging is where PEFT's recent DoRA bugs were (PEFT #3608, #3532)."""
    base, layer, _ = run.trained_layer()
    x = run.inputs((5,), IN, seed=13)
    with torch.no_grad():
        y = layer(x).double()
    tol = run.tol(sum_length(as_matrix(base.weight), x))
    tried, problems, worst = _merge_problems(run, layer, base, x, y, tol)
    if not tried:
        names = ", ".join(f"{n}()" for n in _MERGES)
        return None, f"the layer offers no merge ({names}; not applicable)"
    if problems:
        return result(False, "; ".join(problems), worst, tol, tried=tried)
    unmerged = any(t.startswith("unmerge") for t in tried)
    says = f"{', '.join(tried)}: the merged function is the layer's" + (
        "; unmerging restores W0" if unmerged else ""
    )
    return result(True, says, worst, tol, tried=tried)


@check(CHECKS, 11, "magnitude trains in low precision", ROBUSTNESS)
def _check_low_precision_training(run: Run):
    """On a frozen bfloat16 and float16 base, 20 Adam steps at lr 1e-4 move m and leave it
    finite: an m kept in bfloat16 never moves (its spacing near 0.6 is 2^-8, an Adam step about
    the learning rate), and in float16 Adam's epsilon rounds to 0 (0 / 0 on a zero gradient)."""
    found, numbers = [], {}
    for dtype in LOW_PRECISION:
        base = run.kind.make_base(IN, OUT, dtype=dtype, seed=6).requires_grad_(False)
        x = run.kind.inputs((16,), IN, seed=10, dtype=dtype)
        try:
            layer = run.layer(base)
            m = layer.get_parameter(run.adapter.m)
            moved, finite = magnitude_moves(layer, m, x)
        except Exception as e:
            detail = (
                f"on a {dtype_name(dtype)} base the layer cannot even train ({describe(e)}): "
                "build A, B and m so that they work with a half-precision base (keep them in "
                "float32 and compute in float32, as PEFT does)"
            )
            return False, detail, numbers
        numbers[f"m_moved_{dtype_name(dtype)}"] = moved
        if moved < 0.5 or not finite:
            end = "" if finite else ", and it became NaN or inf"
            found.append(
                f"on a {dtype_name(dtype)} base m ({dtype_name(m.dtype)}) changed in "
                f"{moved:.0%} of its entries{end}"
            )
    if found:
        detail = "; ".join(found) + (
            " after 20 Adam steps at lr 1e-4: the magnitude does not train. Keep A, B and m in "
            "float32 on a low-precision base and compute m / ||V|| in float32 (as PEFT's "
            "autocast_adapter_dtype=True does)"
        )
        return False, detail, numbers
    return True, "m moves on bfloat16 and float16 bases and stays finite", numbers


def _merged_matrix(run, layer, n_in):
    """(how, the weight a merge writes as a float64 matrix), or (None, None) without a merge."""
    with torch.no_grad():
        if callable(getattr(layer, "merged_weight", None)):
            return "merged_weight()", as_matrix(layer.merged_weight().detach()).double()
        for name in _MERGES[1:]:
            if callable(getattr(layer, name, None)):
                merged_layer = copy.deepcopy(layer)
                merged = getattr(merged_layer, name)()
                module = merged if isinstance(merged, nn.Module) else merged_layer
                return f"{name}()", run.kind.effective_weight(module.double(), n_in)[0]
    return None, None


@check(CHECKS, 12, "merge precision", ROBUSTNESS)
def _check_merge_precision(run: Run):
    """On a bfloat16 base, a merge loses no more of a small update (||merged - W'|| / ||W' -
    W0||) than rounding the exact W' once does, within 25 %: computing W' in bfloat16 rounds V,
    the norm and the product along the way."""
    n_in, n_out = 96, 64  # large enough that rounding twice stands out from rounding once
    base = run.kind.make_base(n_in, n_out, dtype=torch.bfloat16, seed=6).requires_grad_(False)
    layer = run.layer(base)
    W0 = as_matrix(base.weight.detach()).double()
    g = torch.Generator().manual_seed(3)
    A = torch.randn(RANK, W0.shape[1], generator=g, dtype=W0.dtype) / math.sqrt(W0.shape[1])
    B = torch.randn(W0.shape[0], RANK, generator=g, dtype=W0.dtype) * 0.01
    m = norms(W0, run.adapter.axis)
    run.adapter.assign(layer, A, B, m * (1 + 0.01 * torch.randn(m.shape, generator=g)))
    A, B, m = (t.detach().double() for t in run.adapter.tensors(layer))
    how, merged = _merged_matrix(run, layer, n_in)
    if how is None:
        return None, "the layer offers no merge (not applicable)"
    exact = run.weight(base, A, B, m)
    lost, least = merge_error(merged, exact, as_matrix(base.weight.detach()))
    numbers = {"update_lost": lost, "update_lost_rounding_once": least}
    says = f"{how} on a bfloat16 base loses {pct(lost)} of a small update"
    if lost > 1.25 * least + 1e-6:
        says += f", where rounding the exact W' once loses {pct(least)}: compute W' in float32 "
        return False, says + "and cast to the base's dtype once", numbers
    return True, f"{says}, as rounding W' once does ({pct(least)})", numbers
