"""What a conformance run found: one CheckResult per check, and the Report of a layer."""

import textwrap
from dataclasses import dataclass, field

from .tolerances import TOL

_WIDTH = 96  # report lines wrap here: they fit a terminal and a notebook's output area

# The kinds of finding, most serious first: the exit status the kind gives, and its meaning.
PAPER, CONVENTION, ROBUSTNESS = "paper", "convention", "robustness"
_EXIT_STATUS = {PAPER: 1, CONVENTION: 3, ROBUSTNESS: 4}
_KIND_MEANING = {
    PAPER: "not DoRA as the paper defines it",
    CONVENTION: "differs from the official code and PEFT",
    ROBUSTNESS: "robustness",
}


def _fill(text, indent, **options):
    return textwrap.fill(text, _WIDTH, subsequent_indent=" " * indent, **options)


@dataclass
class CheckResult:
    """One check's outcome: status "pass", "fail" or "skip" (not run, or not applicable);
    numbers: what it measured (error, tolerance, ...)."""

    number: int
    title: str
    status: str
    detail: str
    kind: str = PAPER
    numbers: dict = field(default_factory=dict)
    precision: str = "float64"

    @property
    def passed(self) -> bool:
        return self.status == "pass"

    @property
    def within_rounding(self) -> bool:
        """Passed, but only within the rounding of a dtype below float64."""
        error = self.numbers.get("error")
        return self.passed and error is not None and error > TOL

    def __str__(self) -> str:
        mark = "FAIL" if self.status == "fail" else self.status
        text = f"  {mark} {self.number}. {self.title} [{self.kind}]: {self.detail}"
        if self.within_rounding:
            n = self.numbers
            text += f" (within {self.precision} rounding: {n['error']:.0e} <= {n['tolerance']:.0e})"
        return _fill(text, 10, break_on_hyphens=False)

    def to_dict(self) -> dict:
        return {
            **{k: getattr(self, k) for k in ("number", "title", "kind")},
            "kind_meaning": _KIND_MEANING[self.kind],
            "result": self.status,
            **{k: getattr(self, k) for k in ("within_rounding", "detail", "numbers")},
        }


@dataclass
class Report:
    """All checks of one layer. str(report) is one line per check (no timings: reproducible)."""

    name: str
    adapter: str | None  # where A, B, m were found, in words
    problem: str | None  # why they could not be found
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
        return [r.number for r in self.results if r.status == "fail"]

    def failed_of_kind(self, kind) -> list[int]:
        return [r.number for r in self.results if r.status == "fail" and r.kind == kind]

    def _numbers(self, status) -> str:
        return ", ".join(str(r.number) for r in self.results if r.status == status)

    @property
    def exit_status(self) -> int:
        """0 all pass; 1 not DoRA as the paper defines it; 3 differs from the official code and
        PEFT (and nothing worse); 4 robustness only; 2 the layer could not be checked."""
        if not self.identified:
            return 2
        return next((_EXIT_STATUS[k] for k in _EXIT_STATUS if self.failed_of_kind(k)), 0)

    def summary(self) -> str:
        """The verdict in one line, failures grouped by kind."""
        n, failed = len(self.results), self.failed
        skipped = sum(r.status == "skip" for r in self.results)
        rounding = sum(r.within_rounding for r in self.results)
        if failed:
            kinds = [
                f"{_KIND_MEANING[k]} ({', '.join(map(str, self.failed_of_kind(k)))})"
                for k in _EXIT_STATUS
                if self.failed_of_kind(k)
            ]
            summary = f"{len(failed)} of {n} checks fail: {'; '.join(kinds)}"
        else:
            summary = f"{n - skipped} of {n} checks pass" if skipped else f"all {n} checks pass"
        if rounding:
            summary += f", {rounding} within {self.precision} rounding"
        if skipped:
            why = "not run (they need A, B and m)" if not self.identified else "not applicable"
            summary += f", {skipped} {why}" + (
                f" ({self._numbers('skip')})" if self.identified else ""
            )
        return summary

    def __str__(self) -> str:
        precision = "" if self.dtype == "float64" else f" in {self.dtype}"
        found = (
            f"found {self.adapter}"
            if self.identified
            else f"cannot check this layer: {self.problem}"
        )
        lines = [f"DoRA conformance: {self.name}{precision}", _fill(f"  {found}", 4)]
        if self.precision != self.dtype:
            note = (
                f"  the layer computes in {self.precision} with {self.dtype} parameters and "
                f"inputs: checked with {self.precision}'s rounding tolerances"
            )
            lines.append(_fill(note, 4))
        lines += [str(r) for r in self.results]
        lines.append(_fill(f"  {self.summary()}", 4))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """Everything in the report, for ``--json``."""
        keys = ("name", "dtype", "precision", "identified", "adapter", "problem", "passed")
        return {
            **{k: getattr(self, k) for k in (*keys, "exit_status")},
            "summary": self.summary(),
            "failed": {k: self.failed_of_kind(k) for k in _EXIT_STATUS},
            "checks": [r.to_dict() for r in self.results],
            "seconds": round(self.seconds, 3),
        }
