"""The command line: ``python -m dora_tutorial.check_dora TARGET [--peft] ...``; --help is the
manual."""

import argparse
import importlib
import json
import runpy
import sys
import types

from .checker import CHECKS, check_dora
from .peft import PeftDoRA, peft_unavailable_reason
from .tolerances import DTYPES

_DESCRIPTION = """\
Check a DoRA layer against the paper, the official code and Hugging Face PEFT, check by check.

  python -m dora_tutorial.check_dora my_module.py:MyDoRA  # or package.module:make_layer
  python -m dora_tutorial.check_dora --peft --dtype bfloat16 --json  # PEFT's DoRA"""

_MANUAL = """\
The reference (arXiv 2402.09353, the official code, PEFT), for an nn.Linear W0 (out, in), b:
  V  = W0 + (alpha / r) B A,  A: (r, in) random,  B: (out, r) zeros at initialisation
  W' = m * V / ||V||,  ||V|| the norm of each OUTPUT row, m: (out,) = ||W0|| at initialisation
  y  = x W'^T + b  (the bias is not rescaled);  ||V|| is a constant in backward (.detach())

The factory gets an nn.Linear (--conv2d: an nn.Conv2d, 3x3, stride 2, padding 1, its kernel
read as the matrix (out, in * 9)) in float64 unless --dtype says otherwise. The layer's weight
and bias are read from its outputs on one-hot inputs; A, B and m are found by shape and initial
values, never by name (where they are not, only the first check runs). Each check compares with
the float64 reference within the rounding of the layer's dtype.

The checks:
{checks}
paper: not DoRA as the paper defines it. convention: differs from the official code and PEFT.
robustness: zero weight rows, half precision, merges that round more than once.

exit status: 0 every check passes; 1 a check of kind 'paper' fails; 3 a check of kind
'convention' fails and none of kind 'paper'; 4 only checks of kind 'robustness' fail; 2 usage
error, a layer whose A, B and m cannot be identified, or nothing checked. With several layers,
the most serious: 2, then 1, 3, 4."""


def _load_factory(target: str):
    """The callable a FILE.py:NAME or package.module:NAME target names (NAME may be dotted)."""
    where, _, attr = target.rpartition(":")
    if not where or not attr:
        raise ValueError(f"expected FILE.py:NAME or module:NAME, got {target!r}")
    try:
        if where.endswith(".py"):
            obj = types.SimpleNamespace(**runpy.run_path(where, run_name=where[:-3]))
        else:
            obj = importlib.import_module(where)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except Exception as e:
        raise ValueError(f"cannot load {target}: {type(e).__name__}: {e}") from e
    if not callable(obj):
        raise ValueError(f"{target} is a {type(obj).__name__}, not a class or function")
    return obj


def main(argv=None) -> int:
    checks = "\n".join(f"  {i:2}. {c.title} [{c.kind}]" for i, c in enumerate(CHECKS, 1))
    parser = argparse.ArgumentParser(
        prog="python -m dora_tutorial.check_dora",
        description=_DESCRIPTION,
        epilog=_MANUAL.format(checks=checks),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    target = "FILE.py:NAME or package.module:NAME, called as NAME(linear, rank, alpha)"
    parser.add_argument("target", nargs="?", help=target)
    parser.add_argument("--peft", action="store_true", help="also check Hugging Face PEFT's DoRA")
    parser.add_argument(
        "--conv2d", action="store_true", help="NAME(conv, rank, alpha) on nn.Conv2d"
    )
    parser.add_argument("--dtype", choices=list(DTYPES), default="float64", help="of the layers")
    parser.add_argument("--json", action="store_true", help="every check's kind, result, numbers")
    args = parser.parse_args(argv)
    if args.target is None and not args.peft:
        parser.error("give FILE.py:NAME or module:NAME, or --peft")
    on = " on nn.Conv2d" if args.conv2d else ""
    layers, skipped = [], []
    if args.target is not None:
        try:
            layers.append((_load_factory(args.target), args.target.rpartition(":")[2] + on))
        except ValueError as e:
            print(f"check_dora: error: {e}", file=sys.stderr)
            return 2
    if args.peft and (reason := peft_unavailable_reason()) is not None:
        skipped.append(f"PEFT's DoRA: skipped: {reason}")  # one line, and the rest goes on
        print(skipped[-1], file=sys.stderr)
    elif args.peft:
        import peft

        layers.append((PeftDoRA, f"PEFT {peft.__version__}{on}"))
    reports = []
    for factory, name in layers:
        kind = "conv2d" if args.conv2d else "linear"
        reports.append(check_dora(factory, name=name, kind=kind, dtype=args.dtype))
        if not args.json:
            print(f"{reports[-1]}\n  ({reports[-1].seconds:.1f} s)", flush=True)
    statuses = {r.exit_status for r in reports}  # the most serious: 2, then 1, 3, 4
    status = next((s for s in (2, 1, 3, 4) if s in statuses), 0 if statuses else 2)
    if args.json:
        out = {"reports": [r.to_dict() for r in reports], "skipped": skipped}
        print(json.dumps({**out, "exit_status": status}, indent=2))
    return status
