"""Where the reader's code runs: the release check, the device and its clock, seeds, printed
text wrapped to a notebook's output area, and PEFT as an optional part."""

import contextlib
import os
import random
import textwrap
import time
import traceback
import types
from pathlib import Path

import numpy as np
import torch

__version__ = "0.2.0"  # the release this project belongs to; DoRA.ipynb asks for the same one

REPO = Path(__file__).resolve().parents[1]
WIDTH = 96  # printed sentences are wrapped to fit a notebook's output area


def require_version(release: str) -> None:
    """Stop with a clear message unless this helpers.py is from ``release`` (e.g. "v0.2.0"):
    a mismatch would otherwise fail later, far from the cause."""
    if release.removeprefix("v") != __version__:
        raise ImportError(
            f"helpers.py is version {__version__} ({REPO / 'helpers.py'}) but this notebook needs "
            f"{release}: put the helpers.py of release {release} next to the notebook (on "
            "Colab: delete the folder 'project' and re-run the first cell)"
        )


def pick_device(prefer: str | None = None) -> torch.device:
    """CUDA, else MPS if it really works, else CPU; ``prefer`` or ``DORA_DEVICE`` forces one."""
    choice = prefer or os.environ.get("DORA_DEVICE")
    if choice:
        return torch.device(choice)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("mps" if _mps_works() else "cpu")


def _mps_works() -> bool:
    """MPS can be 'available' and still fail on first use; try one tiny op."""
    try:
        if not torch.backends.mps.is_available():
            return False
        return bool((torch.ones(2, device="mps") * 2).sum().item() == 4)
    except Exception:
        return False


def sync(device: torch.device | str) -> None:
    """Wait for ``device``'s queued work, so a clock read measures work done, not queued."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def timed(fn, device: torch.device | str) -> tuple[float, object]:
    """(seconds, result) of ``fn()``, with ``device`` synchronised before both clock reads."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (CPU and every GPU)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def wrap(text: str, indent: str = "") -> str:
    """``text`` wrapped to ``WIDTH`` columns; continuation lines indented by ``indent``."""
    return textwrap.fill(text, WIDTH, subsequent_indent=indent, break_on_hyphens=False)


_OPTIONAL_PACKAGES = ("peft", "transformers", "torchao", "accelerate")  # PEFT and what it loads


@contextlib.contextmanager
def optional_part(what: str):
    """``with optional_part("the comparison with PEFT") as part: ...``: an exception raised
    inside an optional package (PEFT imports but fails in use) ends the block with one line and
    is kept as ``part.skipped``; any other exception (this project's code) goes on up."""
    part = types.SimpleNamespace(skipped=None)
    try:
        yield part
    except Exception as error:
        modules = (
            f.f_globals.get("__name__", "") for f, _ in traceback.walk_tb(error.__traceback__)
        )
        if not any(name.partition(".")[0] in _OPTIONAL_PACKAGES for name in modules):
            raise
        part.skipped = error
        text = " ".join(str(error).split())[:160]
        print(wrap(f"Skipping {what}: PEFT fails in use ({type(error).__name__}: {text})."))


def import_peft():
    """PEFT's ``PeftModel``, or None with a line saying why: an installed peft can fail to import
    with any exception, not just ImportError (NameError with torch 2.5 and transformers 5)."""
    import warnings

    try:
        with warnings.catch_warnings():  # tqdm, imported by peft, warns when ipywidgets is missing
            warnings.filterwarnings("ignore", message="IProgress not found")
            from peft import PeftModel
    except Exception as err:
        print(wrap(f"Skipping the comparison with PEFT: cannot import peft ({err!r})."))
        return None
    return PeftModel
