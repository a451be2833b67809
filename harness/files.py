"""Writing files so that a reader never sees half of one: the one place the harness does it.

Every writer goes through a temporary file (or folder) beside the target and an atomic rename, so a
crash, a full disk or Ctrl-C leaves the old file intact and no partial file behind. Also here: the
up-front check that an output folder can be written (one line naming the flag or field that chose
it, instead of an OSError traceback halfway through) and the recognition of a full disk.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import IO, Iterator

from harness.errors import UserError

# Errors that mean "this folder cannot be written" (not a bug): a read-only mount, permissions, an
# immutable folder (chattr +i), a path through a regular file.
_REFUSED = (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EEXIST)
_FULL = (errno.ENOSPC, errno.EDQUOT)
_NEARLY_FULL = 1 << 20  # bytes free below which a failed write is put down to a full disk


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


def write_once(path: str | os.PathLike, text: str) -> bool:
    """`text` into `path` only if no file has that name, complete or not at all: written to a temporary
    file, fsynced, then hard-linked to `path` (link() fails when the name exists, atomically). False when
    `path` exists. For write-once records (a ladder's registered prediction, a bracketing addition): an
    O_EXCL create written in place would leave a truncated record after a kill or a full disk, which
    then blocks that record for good."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        Path(tmp).unlink(missing_ok=True)


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
    out of; removed with whatever is left in it when the block ends, however it ends (a SIGKILL aside:
    its owner file lets reap_scratch_folders remove it later)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=parent))
    try:
        (tmp / OWNER_FILE).write_text(json.dumps(_this_process()))
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- can this folder be written? ------------------------------------------------------------------

def _nearest_existing(folder: Path) -> Path:
    while not os.path.lexists(folder) and folder != folder.parent:
        folder = folder.parent
    return folder


def unwritable(folder: str | os.PathLike) -> str | None:
    """Why files cannot be created in `folder` (or, when it does not exist yet, in the nearest folder
    above it that does, where it would be made), else None. It tries: an unnamed temporary file
    (O_TMPFILE, nothing visible is left), because permission bits do not stop root while a read-only
    mount or an immutable folder does."""
    probe = _nearest_existing(Path(folder).absolute())
    if not probe.is_dir():
        return f"{probe} is not a folder"
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as err:
        return f"{probe}: {err.strerror or err}"
    return None


def not_writable_message(folder: str | os.PathLike, what: str, reason: str) -> str:
    """The one line for an output folder that cannot be written; `what` is the flag or the dotted
    config field that chose it."""
    return f"{what} {folder}: cannot write there ({reason}); choose a writable folder"


def require_writable(folder: str | os.PathLike, what: str, error: type[UserError] = UserError,
                     shown: str | os.PathLike | None = None) -> None:
    """Raise `error` (one line naming `what` and `shown`, the folder the user gave, default `folder`)
    when `folder` cannot be written: checked before any work."""
    reason = unwritable(folder)
    if reason is not None:
        raise error(not_writable_message(folder if shown is None else shown, what, reason))


def write_refused(err: BaseException, folder: str | os.PathLike | None = None) -> bool:
    """Whether `err` says a folder cannot be written (read-only, permissions), not that it is full;
    with `folder`, only when the path it names is `folder`, inside it or above it (not an input file)."""
    if not isinstance(err, OSError) or err.errno not in _REFUSED:
        return False
    if folder is None:
        return True
    if not err.filename:
        return False
    path, folder = Path(os.fsdecode(err.filename)).resolve(), Path(folder).resolve()
    return path == folder or path in folder.parents or folder in path.parents


def disk_full(err: BaseException, folder: str | os.PathLike) -> bool:
    """Whether `err` (raised while writing into `folder`) means the disk is full. torch.save reports a
    full disk as RuntimeError "[enforce fail at inline_container.cc:...] unexpected pos" without an
    errno, so the free space (shutil.disk_usage, checked before the partial files are removed) decides
    where the errno does not."""
    if isinstance(err, OSError) and err.errno is not None:
        return err.errno in _FULL
    try:
        return shutil.disk_usage(_nearest_existing(Path(folder).absolute())).free < _NEARLY_FULL
    except OSError:
        return False


# --- scratch folders a killed process left behind ------------------------------------------------

OWNER_FILE = ".owner"  # inside a scratch folder: which process made it (to tell a dead one's leftovers)


def process_start_time(pid: int) -> str | None:
    """The process's start time (clock ticks after boot, field 22 of /proc/PID/stat, proc(5)): with the
    pid it names one process, so a reused pid is told apart. None: no such process (or no /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # fields after the command name start at field 3


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _this_process() -> dict:
    return {"host": socket.gethostname(), "boot": _boot_id(), "pid": os.getpid(),
            "start": process_start_time(os.getpid())}


def _provably_dead(folder: Path) -> bool:
    """Whether `folder` is ours (this user's, a real folder) and its owner file names a process of this
    host that is no longer running: its boot is over, or its pid is gone or now another process."""
    try:
        info = os.lstat(folder)
        owner = folder / OWNER_FILE
        if not folder.is_dir() or folder.is_symlink() or owner.is_symlink() or info.st_uid != os.geteuid():
            return False
        marker = json.loads(owner.read_text())
    except (OSError, ValueError):
        return False  # no owner file (yet, or an older version's folder): nothing proves it dead
    if not isinstance(marker, dict) or marker.get("host") != socket.gethostname() or marker.get("start") is None:
        return False
    if marker.get("boot") is not None and marker.get("boot") != _boot_id():
        return True
    pid = marker.get("pid")
    return isinstance(pid, int) and pid != os.getpid() and process_start_time(pid) != marker["start"]


def reap_scratch_folders(parent: str | os.PathLike, name: str) -> list[Path]:
    """Remove the scratch folders of `name` in `parent` (scratch_folder's) whose process is provably dead
    (killed with SIGKILL, a lost node): their files are nobody's. Returns those removed."""
    removed = []
    for folder in sorted(Path(parent).glob(f".{glob.escape(name)}.*.partial")):
        if _provably_dead(folder):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed
