"""Writing files and folders so that a crash never leaves half of one under its final name.

Shards and indexes, checkpoint markers, the metrics file trimmed on resume, eval and WER
reports, exports and the demo's assets go through here: written to a hidden temporary name
beside the target, flushed and fsynced, then renamed over it, so readers see the old version or
the new one. (Append-only logs such as metrics.jsonl are appended to, line by line, instead.)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_file(folder: Path, name: str) -> tuple[int, Path]:
    """A hidden temporary file beside `name`, readable like a normal file (mkstemp makes 0600)."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    os.fchmod(fd, 0o666 & ~_umask())
    return fd, Path(tmp)


@contextlib.contextmanager
def atomic_file(path: str | Path, durable: bool = True) -> Iterator[BinaryIO]:
    """A binary file to write `path` through: a temporary file in the same folder, renamed over
    `path` only if the block finishes (removed otherwise). `durable`: fsync the file and the
    folder too; False for many small files whose set is marked complete elsewhere (the demo
    corpus's clips, by its spec.json)."""
    path = Path(path)
    fd, tmp = temp_file(path.parent, path.name)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `path` via a temporary file in the same folder and `os.replace`."""
    with atomic_file(path) as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    """`atomic_write_bytes` of UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, payload: Any, indent: int | None = 2) -> None:
    """`payload` as JSON (non-ASCII kept, newline at the end), written atomically."""
    atomic_write_text(path, json.dumps(payload, indent=indent, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def staged_dir(out: str | Path) -> Iterator[Path]:
    """A temporary folder beside `out` that replaces it only if the block finishes: a crash
    never leaves a half-written folder under the final name (and removes the temporary one)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; outputs are shared
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read 1 MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
