"""Writing files so that a reader never sees half of one: the one place the harness does it.

Every writer goes through a temporary file (or folder) beside the target and an atomic rename, so a
crash, a full disk or Ctrl-C leaves the old file intact and no partial file behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Iterator


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Yields a temporary file in `path`'s folder; renamed over `path` when the block ends normally,
    removed when it raises."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as out:
            yield out
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide shared files (stats, weights) from other users
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_write(path, "wb") as out:
        out.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_write(path, "w") as out:
        out.write(text)
    return Path(path)


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    with open(src, "rb") as inp, atomic_write(dst, "wb") as out:
        shutil.copyfileobj(inp, out, 1 << 20)
    return Path(dst)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a fresh temporary folder beside `path` to fill; it becomes `path` when the block ends
    normally and is removed when it raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def scratch_folder(parent: str | os.PathLike, name: str) -> Iterator[Path]:
    """Yields a fresh hidden folder in `parent` (named after `name`) to build files in and move them
    out of; removed with whatever is left in it when the block ends, however it ends."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
