"""check_dora(): build the layer, find its A, B and m, run every check, collect the Report."""

import functools
import time
from collections.abc import Callable

import torch
from torch import nn

from . import formula_checks as formula
from . import training_and_merging_checks as in_use
from .adapter import Adapter, NotIdentified, find_adapter
from .conv import CONV2D
from .reference import LINEAR, as_matrix, rel
from .report import CheckResult, Report
from .run import ALPHA, IN, OUT, RANK, Run, describe
from .tolerances import DTYPES, TOL, dtype_name, tolerance

# The checks in order: a check's number, in reports, exit statuses and --help, is its place here.
CHECKS = [
    formula.identity_at_init,
    formula.magnitude_axis,
    formula.normalisation,
    formula.scaling,
    formula.bias,
    formula.norm_detached,
    formula.reference_formula,
    in_use.zero_rows_low_precision,
    in_use.dropout,
    in_use.merge_and_unmerge,
    in_use.magnitude_trains_in_low_precision,
    in_use.merge_precision,
]
_KINDS = {"linear": LINEAR, "conv2d": CONV2D}


def _factory_name(factory) -> str:
    """The class or function, with a partial's arguments."""
    if isinstance(factory, functools.partial):
        args = [repr(a) for a in factory.args]
        args += [f"{k}={v!r}" for k, v in factory.keywords.items()]
        return f"{_factory_name(factory.func)}({', '.join(args)})"
    return getattr(factory, "__qualname__", None) or type(factory).__name__


def _identify(run: Run) -> tuple[Adapter, str]:
    """Build one layer and find its A, B and m (NotIdentified says why not). A layer built in
    float64 that starts at W0 rounded to float32 computes in float32: its tolerances apply."""
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
    W0 = as_matrix(base.weight.detach())
    if run.dtype == torch.float64 and TOL < rel(W_init, W0.double()) <= tolerance(
        torch.float32, IN
    ):
        run.precision = torch.float32
    adapter = find_adapter(layer, W0, base.bias.detach(), RANK, W_init, rtol=run.tol(IN))
    return adapter, adapter.describe(layer)


def check_dora(
    factory: Callable[..., nn.Module],
    *,
    name: str | None = None,
    kind: str = "linear",
    dtype=torch.float64,
) -> Report:
    """Check the DoRA layers factory(linear, rank, alpha) builds (factory(conv, rank, alpha)
    with kind="conv2d"); one CheckResult per check. dtype: of the base layers, the layer and the
    inputs (below float64 with tolerances from its rounding). The global random state is left
    as it was. ``python -m dora_tutorial.check_dora --help`` says what is checked and how."""
    start = time.perf_counter()
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    layer_kind = _KINDS[kind]
    default = _factory_name(factory) + ("" if kind == "linear" else f" on {layer_kind.name}")
    report = Report(name or default, None, None, dtype=dtype_name(dtype))
    run = Run(factory, layer_kind, dtype=dtype, precision=dtype)
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        try:
            run.adapter, report.adapter = _identify(run)
            run.conventions.axis = run.adapter.axis  # judged by its own check, used by the others
        except NotIdentified as e:
            report.problem = str(e)
        except Exception as e:  # a layer this tool did not foresee: say so, do not crash
            report.problem = f"looking for A, B and m {describe(e)}"
        report.precision = dtype_name(run.precision)
        for number, c in enumerate(CHECKS, 1):
            ok, detail, numbers = None, "not run", {}
            if run.adapter is not None or not c.needs_adapter:
                try:
                    ok, detail, *more = c.run(run)
                    numbers = {k: v for k, v in (more[0] if more else {}).items() if v is not None}
                except Exception as e:
                    ok, detail = False, describe(e)
            status = "skip" if ok is None else "pass" if ok else "fail"
            report.results.append(
                CheckResult(number, c.title, status, detail, c.kind, numbers, report.precision)
            )
    report.seconds = time.perf_counter() - start
    return report
