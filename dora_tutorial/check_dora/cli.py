"""The command line: ``python -m dora_tutorial.check_dora TARGET [--peft] ...``."""

import argparse
import difflib
import importlib
import importlib.util
import json
import os
import sys
import traceback
from pathlib import Path

from .checker import check_dora
from .peft import peft_dora_factory, peft_unavailable_reason
from .tolerances import DTYPES

_DESCRIPTION = """\
Check a DoRA layer against the paper, the official code and Hugging Face PEFT, check by check.

  python -m dora_tutorial.check_dora my_module.py:MyDoRA        # MyDoRA(linear, rank, alpha)
  python -m dora_tutorial.check_dora package.module:make_layer  # any such factory
  python -m dora_tutorial.check_dora --peft                     # PEFT's DoRA
  python -m dora_tutorial.check_dora --conv2d my_module.py:MyConvDoRA  # (conv, rank, alpha)
  python -m dora_tutorial.check_dora --peft --dtype bfloat16 --json

Run it with this repository's root on the path (or from it): the target, and the modules it
imports, are found from the working directory, as Python finds them. From Python:
report = check_dora(MyDoRA); print(report); report.passed; report.to_dict()."""

_MANUAL = """\
The reference (DoRA, arXiv 2402.09353, as the official code and PEFT implement it), for an
nn.Linear with weight W0 (out, in), bias b, rank r and alpha:
  V  = W0 + (alpha / r) B A,  A: (r, in) random,  B: (out, r) zeros at initialisation
  W' = m * V / ||V||,  ||V|| the norm of each OUTPUT row, m: (out,) = ||W0|| at initialisation
  y  = x W'^T + b  (the bias is not rescaled);  ||V|| is a constant in backward (.detach())
The paper writes W as (in, out): its "column" norms are per output neuron. Normalising per
input column is a different method.

How a layer is read, without knowing its attribute names: the factory is called on an
nn.Linear on the CPU (float64 unless --dtype says otherwise), the layer is used in training
mode, and its weight and bias are read from its outputs on one-hot inputs. A, B and m are found
among its parameters by shape and initial values (B zeros; m the row norms of W0, or its column
norms: the wrong variant, which the report names); where they cannot be found, checks 2-12 are
not run. The checks set A, B and m to known values and compare with the reference computed in
float64 from the layer's own parameters. Below float64 the tolerances follow the dtype's
rounding; a layer built in float64 that computes in float32 inside is held to float32's.
Dropout (9) is checked only for a factory that takes dropout=p, merging (10, 12) only for a
layer with merged_weight(), merge_and_unload() or merge(); otherwise they are not applicable.

Each check isolates one convention: the others use the layer's own axis (2), scaling (4), bias
placement (5) and detach (6), so a layer scaling by alpha instead of alpha / r fails check 4
only; check 7 compares everything else with the formula. Every check is of one kind:
  paper       not DoRA as the paper defines it (axis, normalisation, bias, formula, merging)
  convention  differs from the official code and PEFT (alpha / r, detach, initialisation,
              dropout): still DoRA, but PEFT adapters and tuned learning rates do not transfer
  robustness  zero weight rows, half precision, a magnitude that does not train on a bfloat16
              or float16 base, a merge that rounds more than once

--conv2d: the factory gets an nn.Conv2d (3x3, stride 2, padding 1), whose kernel is read as the
matrix (out, in * 9); A and B may be kernels (PEFT's layout) and m (1, out, 1, 1).

exit status: 0 every check passes; 1 a check of kind 'paper' fails; 3 a check of kind
'convention' fails and none of kind 'paper'; 4 only checks of kind 'robustness' fail; 2 usage
error, a layer whose A, B and m cannot be identified, or nothing checked (--peft alone, PEFT
unusable). With several layers, the most serious found: 2, then 1, 3, 4."""


class _UsageError(Exception):
    """A target that cannot be loaded; the message says what to do."""


def _import_file(path: Path):
    """Import a Python file as a module (its imports found as Python finds them)."""
    name = path.stem if path.stem not in sys.modules else f"_check_dora_target_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise _UsageError(f"cannot import {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _load_factory(target: str):
    """The object a FILE.py:NAME or package.module:NAME target names (NAME may be dotted)."""
    where, colon, attr = target.rpartition(":")
    if not colon or not where or not attr:
        raise _UsageError(f"expected FILE.py:NAME or module:NAME, got {target!r}")
    is_file = where.endswith(".py") or "/" in where or os.sep in where
    if is_file and not Path(where).is_file():
        raise _UsageError(f"no such file: {where}")
    try:
        module = _import_file(Path(where)) if is_file else importlib.import_module(where)
    except _UsageError:
        raise
    except Exception as e:
        if isinstance(e, ModuleNotFoundError) and e.name and where.startswith(e.name):
            raise _UsageError(
                f"no module named {where!r} (run from the folder that holds it, or give the "
                f"file: path/to/{where.replace('.', '/')}.py:{attr})"
            ) from e
        frames = traceback.extract_tb(e.__traceback__)
        at = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
        raise _UsageError(f"importing {where} failed: {type(e).__name__}: {e}{at}") from e
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise _UsageError(f"{where} has no {attr!r}{_suggest(module, attr)}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise _UsageError(f"{target} is a {type(obj).__name__}, not a class or function")
    return obj


def _suggest(module, attr):
    """The classes and functions a module defines, the closest to attr first."""
    own = (n for n, v in vars(module).items() if getattr(v, "__module__", 0) == module.__name__)
    defined = sorted(n for n in own if callable(getattr(module, n)))
    if not defined:
        return "; it defines no class or function"
    close = difflib.get_close_matches(attr, defined, n=1)
    return (f"; did you mean {close[0]!r}?" if close else "") + f" It defines: {', '.join(defined)}"


def _parser():
    parser = argparse.ArgumentParser(
        prog="check_dora.py",
        description=_DESCRIPTION,
        epilog=_MANUAL,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    target = "FILE.py:NAME or package.module:NAME, called as NAME(linear, rank, alpha)"
    for flag, options in [
        ("target", {"nargs": "?", "help": target}),
        ("--peft", {"action": "store_true", "help": "also check Hugging Face PEFT's DoRA"}),
        ("--conv2d", {"action": "store_true", "help": "NAME(conv, rank, alpha) on an nn.Conv2d"}),
        ("--dtype", {"choices": list(DTYPES), "default": "float64", "help": "of layers, inputs"}),
        ("--json", {"action": "store_true", "help": "every check's kind, result and numbers"}),
    ]:
        parser.add_argument(flag, **options)
    return parser


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.target is None and not args.peft:
        parser.error("give FILE.py:NAME or module:NAME, or --peft")
    kind = "conv2d" if args.conv2d else "linear"
    on = " on nn.Conv2d" if args.conv2d else ""
    layers, skipped = [], []
    if args.target is not None:
        try:
            layers.append((_load_factory(args.target), args.target.rpartition(":")[2] + on))
        except _UsageError as e:
            print(f"check_dora.py: error: {e}", file=sys.stderr)
            return 2
    if args.peft:
        reason = peft_unavailable_reason()
        if reason is not None:  # one line, and the rest goes on
            skipped.append(f"PEFT's DoRA: skipped: {reason}")
            print(skipped[-1], file=sys.stderr)
        else:
            import peft

            layers.append((peft_dora_factory, f"PEFT {peft.__version__}{on}"))
    reports = []
    for factory, name in layers:
        reports.append(check_dora(factory, name=name, kind=kind, dtype=args.dtype))
        if not args.json:
            print(reports[-1])
            print(f"  ({reports[-1].seconds:.1f} s)", flush=True)
    status = _exit_status(reports)
    if args.json:
        out = {"reports": [r.to_dict() for r in reports], "skipped": skipped}
        print(json.dumps({**out, "exit_status": status}, indent=2))
    return status


def _exit_status(reports) -> int:
    """The most serious status of the reports (2, then 1, 3, 4); 2 when there are none."""
    statuses = {r.exit_status for r in reports}
    return next((s for s in (2, 1, 3, 4) if s in statuses), 0 if statuses else 2)
