"""What a conformance run found: one CheckResult per check, and the Report of a layer."""

import textwrap
from dataclasses import asdict, dataclass, field

from .tolerances import TOL

# The kinds of finding, most serious first: the exit status each gives, and its meaning.
PAPER, CONVENTION, ROBUSTNESS = "paper", "convention", "robustness"
_EXIT_STATUS = {PAPER: 1, CONVENTION: 3, ROBUSTNESS: 4}
_KIND_MEANING = {
    PAPER: "not DoRA as the paper defines it",
    CONVENTION: "differs from the official code and PEFT",
    ROBUSTNESS: "robustness",
}


def _fill(text, indent):
    """Wrapped at 96 columns: they fit a terminal and a notebook's output area."""
    return textwrap.fill(text, 96, subsequent_indent=" " * indent, break_on_hyphens=False)


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
    def within_rounding(self) -> bool:
        """Passed, but only within the rounding of a dtype below float64."""
        return self.status == "pass" and self.numbers.get("error", 0) > TOL

    def __str__(self) -> str:
        mark = "FAIL" if self.status == "fail" else self.status
        text = f"  {mark} {self.number}. {self.title} [{self.kind}]: {self.detail}"
        if self.within_rounding:
            n = self.numbers
            text += f" (within {self.precision} rounding: {n['error']:.0e} <= {n['tolerance']:.0e})"
        return _fill(text, 10)


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
        return self._numbers("fail")

    def _numbers(self, status, kind=None) -> list[int]:
        return [r.number for r in self.results if r.status == status and kind in (None, r.kind)]

    @property
    def exit_status(self) -> int:
        """0 all pass; 1 not DoRA as the paper defines it; 3 differs from the official code and
        PEFT (and nothing worse); 4 robustness only; 2 the layer could not be checked."""
        if not self.identified:
            return 2
        return min((_EXIT_STATUS[r.kind] for r in self.results if r.status == "fail"), default=0)

    def summary(self) -> str:
        """The verdict in one line, failures grouped by kind."""
        n, failed, skipped = len(self.results), self.failed, self._numbers("skip")
        rounding = sum(r.within_rounding for r in self.results)
        if failed:
            kinds = [
                f"{meaning} ({', '.join(map(str, numbers))})"
                for kind, meaning in _KIND_MEANING.items()
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
        results = [{**asdict(r), "within_rounding": r.within_rounding} for r in self.results]
        return {
            **asdict(self),
            **{k: getattr(self, k) for k in ("identified", "passed", "exit_status")},
            "summary": self.summary(),
            "failed": {k: self._numbers("fail", k) for k in _EXIT_STATUS},
            "results": results,
        }
