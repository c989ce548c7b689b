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

from .adapter import Adapter, NotIdentified, find_adapter
from .checker import CHECKS, check_dora
from .cli import main
from .conv import CONV2D
from .peft import PeftDoRA, peft_dora_factory, peft_unavailable_reason
from .reference import LINEAR, LayerKind, reference_forward
from .report import CONVENTION, PAPER, ROBUSTNESS, CheckResult, Report
from .tolerances import DTYPES, ROUNDING_STEPS, TOL, dtype_name, tolerance

__all__ = [
    "CHECKS",
    "CONV2D",
    "CONVENTION",
    "DTYPES",
    "LINEAR",
    "PAPER",
    "ROBUSTNESS",
    "ROUNDING_STEPS",
    "TOL",
    "Adapter",
    "CheckResult",
    "LayerKind",
    "NotIdentified",
    "PeftDoRA",
    "Report",
    "check_dora",
    "dtype_name",
    "find_adapter",
    "main",
    "peft_dora_factory",
    "peft_unavailable_reason",
    "reference_forward",
    "tolerance",
]
