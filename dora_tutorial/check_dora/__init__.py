"""Check any DoRA layer against the paper, the official code and Hugging Face PEFT.

    from dora_tutorial.check_dora import check_dora
    report = check_dora(MyDoRA)   # MyDoRA(linear, rank, alpha), or any such factory
    print(report)                 # one line per check: pass or FAIL, its kind, what it means
    report.passed                 # True when no check fails

or ``python -m dora_tutorial.check_dora my_module.py:MyDoRA`` (``--help`` is the manual).
Reading order: reference.py (the formula, the base layer), adapter.py (finding A, B and m),
run.py (what the checks share), checks.py (1-7), checks_in_use.py (8-12), checker.py
(check_dora), report.py; conv.py, peft.py, tolerances.py and cli.py around them.
"""

from .checker import CHECKS, check_dora
from .cli import main
from .peft import peft_dora_factory, peft_unavailable_reason
from .report import CONVENTION, PAPER, ROBUSTNESS, CheckResult, Report

__all__ = [
    "CHECKS",
    "CONVENTION",
    "PAPER",
    "ROBUSTNESS",
    "CheckResult",
    "Report",
    "check_dora",
    "main",
    "peft_dora_factory",
    "peft_unavailable_reason",
]
