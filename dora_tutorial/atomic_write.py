"""Writing files so that readers never see half of one."""

import json
import os
import shutil
import tempfile
from pathlib import Path


def write_atomic(path: Path, chunks) -> None:
    """Write byte ``chunks`` to a temp file beside ``path``, fsync, rename over ``path``; on any
    error (Ctrl-C included) the temp file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.writelines(chunks)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj) -> None:
    """``obj`` as indented JSON (one trailing newline), written with ``write_atomic``."""
    write_atomic(path, [(json.dumps(obj, indent=1, ensure_ascii=False) + "\n").encode()])


def write_atomic_dir(path: Path, files: dict[str, bytes], replaceable=frozenset()) -> None:
    """Write a directory of ``files`` ({name: bytes}) beside ``path``, then swap it in. An
    existing ``path`` is replaced only if it holds nothing but ``replaceable`` names."""
    path = Path(path)
    if path.exists():
        others = sorted(p.name for p in path.iterdir()) if path.is_dir() else [path.name]
        if not path.is_dir() or set(others) - set(replaceable):
            raise ValueError(
                f"{str(path)!r} exists and holds other things ({', '.join(others)}): "
                "write to a new or empty directory"
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    old = tmp.with_name(tmp.name + ".old")
    try:
        for name, data in files.items():
            write_atomic(tmp / name, [data])
        os.chmod(tmp, 0o755)
        if path.exists():
            os.replace(path, old)  # an existing directory cannot be renamed over: move it aside
        os.replace(tmp, path)
    except BaseException:
        if old.exists() and not path.exists():
            os.replace(old, path)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
