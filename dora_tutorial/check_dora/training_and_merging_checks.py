"""The layer in use: zero rows and half precision, dropout in training, merging for deployment,
and training and merging on a bfloat16 or float16 base."""

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from dora_tutorial.precision import magnitude_moves, merge_error

from .adapter import as_matrix
from .reference import CONVENTION, IN, PAPER, RANK, ROBUSTNESS, Run, check, describe, result
from .tolerances import LOW_PRECISION, dtype_name, pct, rel, tolerance

_P_DROP = 0.5  # the dropout probability given to a factory that takes dropout=p
_PEFT_DROPOUT = "y = base(x) + (k - 1) x_d W0^T + k s x_d A^T B^T"
_FLOAT32_ADAPTERS = "keep A, B and m in float32 and compute in float32, as PEFT does"


def _non_finite(run, layer, x):
    """What is NaN or inf after one forward and backward pass ("" when nothing is)."""
    y = layer(x)
    if not torch.isfinite(y).all():
        return "output"
    weights = torch.randn(y.shape, generator=torch.Generator().manual_seed(7))
    (y.float() * weights).sum().backward()
    for what, grad in zip("ABm", run.adapter.tensors(layer, grads=True), strict=True):
        if grad is not None and not torch.isfinite(grad).all():
            return f"gradient of {what}"
    return ""


@check("zero rows, low precision", ROBUSTNESS)
def zero_rows_low_precision(run: Run):
    """No NaN or inf from an all-zero weight row or column (a per-column layer meets its 0 / 0
    on the column), at initialisation and after B and m moved; the layer converted with
    .to(bfloat16) / .to(float16) stays finite and within that dtype's rounding of float32's."""
    low = run.dtype if run.dtype in LOW_PRECISION else torch.float32
    x = run.kind.inputs((4,), IN, seed=8, dtype=low)
    for what in ("row", "column"):
        for moved in (False, True):
            base = run.base(dtype=low)
            with torch.no_grad():  # row 2 or column 4 all zero
                as_matrix(base.weight)[(2, slice(None)) if what == "row" else (slice(None), 4)] = 0
            layer = run.layer(base)
            if moved:
                run.trained(layer, base)
            if bad := _non_finite(run, layer, x):
                return False, (
                    f"an all-zero weight {what} gives NaN or inf in the {bad} "
                    f"{'after B and m moved' if moved else 'at initialisation'} (m / ||V|| = "
                    "0 / 0): floor the norm. Pruned checkpoints have such rows (PEFT #2049)"
                )

    def trained_layer():
        base = run.base(64, 32, seed=6, dtype=torch.float32)
        layer = run.layer(base, 4, 8)
        run.trained(layer, base, 4)
        return layer

    x = run.kind.inputs((8,), 64, seed=9, dtype=torch.float32)
    with torch.no_grad():
        expected = trained_layer()(x).double()
    found = []  # (error / tolerance, error, tolerance)
    for dtype in LOW_PRECISION:
        layer, name, tol = trained_layer().to(dtype), dtype_name(dtype), tolerance(dtype, 64)
        if bad := _non_finite(run, layer, x.to(dtype)):
            return False, f"in {name} the {bad} has NaN or inf"
        with torch.no_grad():
            err = rel(layer(x.to(dtype)).double(), expected)
        if err > tol:
            says = f"in {name} the output is off by {pct(err)} from float32's, more than rounding"
            return result(False, says, err, tol)
        found.append((err / tol, err, tol))
    _, err, tol = max(found)
    says = "no NaN or inf with an all-zero weight row or column; bfloat16 and float16 work"
    return True, says, {"low_precision_error": err, "low_precision_tolerance": tol}


@check("dropout", CONVENTION)
def dropout(run: Run):
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
    W0, b = run.w0(base), base.bias.detach().double()
    W, apply, x = run.weight(base, A, B, m)[0], run.kind.apply, x.double()
    tol, err = run.forward_tol(W0, x), rel(y, apply(x, W0, b) + apply(x_d, W - W0, None))
    layer.eval()
    with torch.no_grad():
        eval_err = rel(layer(x.to(run.dtype)).double(), apply(x, W, b))
    if err <= tol and eval_err <= tol:
        says = f"dropout (p = {_P_DROP}) as in PEFT, {_PEFT_DROPOUT}; none in eval mode"
        return result(True, says, err, tol, eval_error=eval_err)
    if err <= tol:
        says = f"in eval mode the output is off by {pct(eval_err)}: dropout in training only"
        return result(False, says, eval_err, tol)
    if rel(y, apply(x, W, b)) <= tol:
        says = "dropout=p has no effect in training (fsdp_qlora #68)"
    elif rel(y, apply(x_d, W, b)) <= tol:
        says = "the base path sees the dropped input too: y = DoRA(dropout(x))"
    else:
        says = f"with dropout=p the output is off by {pct(err)}"
    return result(False, f"{says}; PEFT: {_PEFT_DROPOUT}", err, tol, eval_error=eval_err)


def _merges(layer):
    """(how, merged) for each merge the layer offers, one at a time, in this order:
    merged_weight() (merged: the weight as a float64 matrix), merge_and_unload() and merge()
    returning a layer (on a copy), merge() in place (on the layer itself). Call under
    torch.no_grad()."""
    if callable(getattr(layer, "merged_weight", None)):
        yield "merged_weight()", as_matrix(layer.merged_weight().detach()).double()
    if callable(getattr(layer, "merge_and_unload", None)):
        yield "merge_and_unload()", copy.deepcopy(layer).merge_and_unload()
    if callable(getattr(layer, "merge", None)):
        merged = copy.deepcopy(layer).merge()
        if isinstance(merged, nn.Module):
            yield "merge()", merged
        else:
            layer.merge()
            yield "merge() in place", layer


_NO_MERGE = "the layer offers no merge (merged_weight(), merge_and_unload(), merge())"


@check("merge and unmerge", PAPER)
def merge_and_unmerge(run: Run):
    """Each merge the layer offers gives the layer's function; unmerge() / unmerge_adapter()
    after merge() in place restores W0. Merging is where PEFT's recent DoRA bugs were (PEFT
    #3608, #3532)."""
    base, layer, _ = run.trained_layer()
    x = run.inputs((5,), IN, seed=13)
    W0, b = base.weight.detach().double().clone(), base.bias.detach().double()
    tol, errors = run.forward_tol(as_matrix(W0), x), {}
    with torch.no_grad():
        y = layer(x).double()
        merges = list(_merges(layer))
        for how, merged in merges:
            if how == "merged_weight()":
                got, what = run.kind.apply(x.double(), merged, b), f"x W'^T + b with W' = {how}"
            else:
                got = merged(x)
                what = "after merge()" if how == "merge() in place" else f"the layer {how} returns"
            errors[what] = rel(got.double(), y)
        unmerge = next((n for n in ("unmerge", "unmerge_adapter") if hasattr(layer, n)), None)
        if merges and merges[-1][0] == "merge() in place" and unmerge is not None:
            getattr(layer, unmerge)()
            errors[f"after {unmerge}() the base weight"] = rel(base.weight.double(), W0)
            errors[f"the layer after {unmerge}()"] = rel(layer(x).double(), y)
            merges.append((f"{unmerge}()", None))
    if not merges:
        return None, _NO_MERGE
    tried, worst = [how for how, _ in merges], max(errors.values())
    if problems := [f"{w} is off by {pct(e)}" for w, e in errors.items() if e > tol]:
        return result(False, "; ".join(problems), worst, tol, tried=tried)
    says = f"{', '.join(tried)}: the merged function is the layer's"
    return result(True, says, worst, tol, tried=tried)


@check("magnitude trains in low precision", ROBUSTNESS)
def magnitude_trains_in_low_precision(run: Run):
    """On a frozen bfloat16 and float16 base, 20 Adam steps at lr 1e-4 move m and leave it
    finite: an m kept in bfloat16 never moves (its spacing near 0.6 is 2^-8, an Adam step about
    the learning rate), and in float16 Adam's epsilon rounds to 0 (0 / 0 on a zero gradient)."""
    found, numbers = [], {}
    for dtype in LOW_PRECISION:
        base = run.base(seed=6, dtype=dtype).requires_grad_(False)
        x = run.kind.inputs((16,), IN, seed=10, dtype=dtype)
        try:
            layer = run.layer(base)
            m = layer.get_parameter(run.adapter.names[2])
            moved, finite = magnitude_moves(layer, m, x)
        except Exception as e:
            return False, f"on a {dtype_name(dtype)} base the layer {describe(e)}", numbers
        numbers[f"m_moved_{dtype_name(dtype)}"] = moved
        if moved < 0.5 or not finite:
            found.append(
                f"on a {dtype_name(dtype)} base m ({dtype_name(m.dtype)}) changed in "
                f"{moved:.0%} of its entries{'' if finite else ', and it became NaN or inf'}"
            )
    if found:
        return False, "; ".join(found) + f" after 20 Adam steps: {_FLOAT32_ADAPTERS}", numbers
    return True, "m moves on bfloat16 and float16 bases and stays finite", numbers


@check("merge precision", ROBUSTNESS)
def merge_precision(run: Run):
    """On a bfloat16 base, a merge loses no more of a small update (||merged - W'|| / ||W' -
    W0||) than rounding the exact W' once does, within 25 %: computing W' in bfloat16 rounds V,
    the norm and the product along the way."""
    n_in, n_out = 96, 64  # large enough that rounding twice stands out from rounding once
    base = run.base(n_in, n_out, seed=6, dtype=torch.bfloat16).requires_grad_(False)
    layer = run.layer(base)
    W0 = as_matrix(base.weight.detach()).clone()  # in bfloat16: a merge may act in place
    g = torch.Generator().manual_seed(3)
    (rows, cols), double = W0.shape, torch.float64
    A = torch.randn(RANK, cols, generator=g, dtype=double) / math.sqrt(cols)
    B = torch.randn(rows, RANK, generator=g, dtype=double) * 0.01
    m = W0.double().norm(dim=run.adapter.axis)
    run.adapter.assign(layer, A, B, m * (1 + 0.01 * torch.randn(m.shape, generator=g)))
    exact = run.weight(base, *(t.detach().double() for t in run.adapter.tensors(layer)))[0]
    with torch.no_grad():
        first = next(_merges(layer), None)  # the first merge the layer offers, alone
        if first is None:
            return None, _NO_MERGE
        how, merged = first
        if isinstance(merged, nn.Module):
            merged = run.kind.effective_weight(merged.double(), n_in)[0]
    lost, least = merge_error(merged, exact, W0)
    numbers = {"update_lost": lost, "update_lost_rounding_once": least}
    says = f"{how} on a bfloat16 base loses {pct(lost)} of a small update"
    if lost > 1.25 * least + 1e-6:
        return False, f"{says}, rounding W' once {pct(least)}: {_FLOAT32_ADAPTERS}", numbers
    return True, f"{says}, as rounding W' once does ({pct(least)})", numbers
