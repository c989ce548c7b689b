"""Check any DoRA layer against the paper, the official code and Hugging Face PEFT.

    report = check_dora(MyDoRA)   # MyDoRA(linear, rank, alpha), or any such factory
    print(report)                 # one line per check: pass or FAIL, its kind, what it means

or ``python -m dora_tutorial.check_dora my_module.py:MyDoRA`` (``--help`` is the manual).
The core: reference.py (the formula and what the checks share), adapter.py (finding A, B and m),
formula_checks.py and training_and_merging_checks.py, checker.py (the list of checks, check_dora
and its Report); around it tolerances.py, conv.py (--conv2d), peft.py (--peft) and cli.py.
"""

from .checker import CHECKS, Report, check_dora
from .cli import main
from .peft import PeftDoRA, peft_unavailable_reason
from .reference import CONVENTION, PAPER, ROBUSTNESS

__all__ = ["CHECKS", "CONVENTION", "PAPER", "ROBUSTNESS", "Report", "check_dora", "main"]
__all__ += ["PeftDoRA", "peft_unavailable_reason"]
