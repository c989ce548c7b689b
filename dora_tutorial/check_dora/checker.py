"""check_dora(): build the layer, find its A, B and m, run every check, collect the Report."""

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..runtime import wrap
from . import formula_checks as formula
from . import training_and_merging_checks as in_use
from .adapter import NotIdentified, as_matrix, find_adapter
from .conv import CONV2D
from .reference import ALPHA, CONVENTION, IN, LINEAR, OUT, PAPER, RANK, ROBUSTNESS, Run, describe
from .tolerances import DTYPES, TOL, dtype_name, rel, tolerance

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
# the kinds of failure, most serious first: the exit status each gives, and its meaning
_KINDS_OF_FAILURE = {
    PAPER: (1, "not DoRA as the paper defines it"),
    CONVENTION: (3, "differs from the official code and PEFT"),
    ROBUSTNESS: (4, "robustness"),
}


@dataclass
class CheckResult:
    """status: "pass", "fail" or "skip" (not run, or not applicable)."""

    number: int
    title: str
    status: str
    detail: str
    kind: str = PAPER
    numbers: dict = field(default_factory=dict)
    precision: str = "float64"

    @property
    def within_rounding(self) -> bool:
        """Passed, but only within the rounding of a dtype below float64."""
        return self.status == "pass" and self.numbers.get("error", 0) > TOL

    def __str__(self) -> str:
        mark = "FAIL" if self.status == "fail" else self.status
        text = f"  {mark} {self.number}. {self.title} [{self.kind}]: {self.detail}"
        if self.within_rounding:
            n = self.numbers
            text += f" (within {self.precision} rounding: {n['error']:.0e} <= {n['tolerance']:.0e})"
        return wrap(text, " " * 10)


@dataclass
class Report:
    """All checks of one layer. str(report) is one line per check (no timings: reproducible)."""

    name: str
    adapter: str | None = None  # where A, B, m were found, in words
    problem: str | None = None  # why they could not be found
    results: list[CheckResult] = field(default_factory=list)
    seconds: float = 0.0
    dtype: str = "float64"  # the dtype the layers were built and fed in
    precision: str = "float64"  # the rounding the tolerances allow for (below: the layer's)

    @property
    def identified(self) -> bool:
        return self.problem is None

    @property
    def passed(self) -> bool:
        """Identified, and no check fails (checks that do not apply are skipped)."""
        return self.identified and not self.failed

    @property
    def failed(self) -> list[int]:
        return self._numbers("fail")

    def _numbers(self, status, kind=None) -> list[int]:
        return [r.number for r in self.results if r.status == status and kind in (None, r.kind)]

    @property
    def exit_status(self) -> int:
        """0 all pass; 1, 3, 4 the most serious kind that fails; 2 the layer could not be
        checked."""
        if not self.identified:
            return 2
        return min(
            (_KINDS_OF_FAILURE[r.kind][0] for r in self.results if r.status == "fail"), default=0
        )

    def summary(self) -> str:
        """The verdict in one line, failures grouped by kind."""
        n, failed, skipped = len(self.results), self.failed, self._numbers("skip")
        rounding = sum(r.within_rounding for r in self.results)
        if failed:
            kinds = [
                f"{meaning} ({', '.join(map(str, numbers))})"
                for kind, (_, meaning) in _KINDS_OF_FAILURE.items()
                if (numbers := self._numbers("fail", kind))
            ]
            summary = f"{len(failed)} of {n} checks fail: {'; '.join(kinds)}"
        else:
            summary = f"{f'{n - len(skipped)} of {n}' if skipped else f'all {n}'} checks pass"
        if rounding:
            summary += f", {rounding} within {self.precision} rounding"
        if skipped and not self.identified:
            summary += f", {len(skipped)} not run (they need A, B and m)"
        elif skipped:
            summary += f", {len(skipped)} not applicable ({', '.join(map(str, skipped))})"
        return summary

    def __str__(self) -> str:
        precision = "" if self.dtype == "float64" else f" in {self.dtype}"
        found = (
            f"cannot check this layer: {self.problem}" if self.problem else f"found {self.adapter}"
        )
        lines = [f"DoRA conformance: {self.name}{precision}", wrap(f"  {found}", " " * 4)]
        if self.precision != self.dtype:
            note = (
                f"  the layer computes in {self.precision} with {self.dtype} parameters and "
                f"inputs: checked with {self.precision}'s rounding tolerances"
            )
            lines.append(wrap(note, " " * 4))
        lines += [str(r) for r in self.results]
        lines.append(wrap(f"  {self.summary()}", " " * 4))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """Everything in the report, for ``--json``."""
        results = [{**asdict(r), "within_rounding": r.within_rounding} for r in self.results]
        return {
            **asdict(self),
            **{k: getattr(self, k) for k in ("identified", "passed", "exit_status")},
            "summary": self.summary(),
            "failed": {k: self._numbers("fail", k) for k in _KINDS_OF_FAILURE},
            "results": results,
        }


def _identify(run: Run) -> str:
    """Find the layer's A, B and m. One built in float64 that starts at W0 rounded to float32
    computes in float32: its tolerances apply."""
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
    run.adapter = find_adapter(layer, W0, base.bias.detach(), RANK, W_init, rtol=run.tol(IN))
    return run.adapter.describe(layer)


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
    default = getattr(getattr(factory, "func", factory), "__qualname__", type(factory).__name__)
    default += "" if kind == "linear" else f" on {layer_kind.name}"
    report = Report(name or default, dtype=dtype_name(dtype))
    run = Run(factory, layer_kind, dtype=dtype, precision=dtype)
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        try:
            report.adapter = _identify(run)
        except Exception as e:  # NotIdentified, or a layer this tool did not foresee
            known = isinstance(e, NotIdentified)
            report.problem = str(e) if known else f"looking for A, B and m {describe(e)}"
        report.precision = dtype_name(run.precision)
        for number, c in enumerate(CHECKS, 1):
            ok, detail, numbers = None, "not run", {}
            if run.adapter is not None or not c.needs_adapter:
                try:
                    ok, detail, *more = c(run)
                    numbers = {k: v for k, v in (more[0] if more else {}).items() if v is not None}
                except Exception as e:
                    ok, detail = False, describe(e)
            status = "skip" if ok is None else "pass" if ok else "fail"
            report.results.append(
                CheckResult(number, c.title, status, detail, c.kind, numbers, report.precision)
            )
    report.seconds = time.perf_counter() - start
    return report
