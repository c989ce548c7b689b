"""check_dora(): build the layer, find its A, B and m, run every check, collect the Report."""

import functools
import time

import torch

from . import formula_checks, training_and_merging_checks
from .adapter import Adapter, NotIdentified, find_adapter
from .conv import CONV2D
from .reference import ALPHA, IN, LINEAR, OUT, RANK, Factory, as_matrix, rel
from .report import CheckResult, Report
from .run import Run, describe
from .tolerances import DTYPES, TOL, dtype_name, tolerance

CHECKS = formula_checks.CHECKS + training_and_merging_checks.CHECKS
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
    err = rel(W_init, W0.double())
    if run.dtype == torch.float64 and TOL < err <= tolerance(torch.float32, IN):
        run.precision = torch.float32
    adapter = find_adapter(layer, W0, base.bias.detach(), RANK, W_init, rtol=run.tol(IN))
    return adapter, adapter.describe(layer)


def check_dora(
    factory: Factory, *, name: str | None = None, kind: str = "linear", dtype=torch.float64
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
