"""One sweep of a study at a time: a lock in the study's storage folder, and who holds it."""

from __future__ import annotations

import contextlib
import os
import socket
import time

from filelock import FileLock, Timeout

from harness.config import TrialConfig
from harness.errors import UserError
from harness.paths import study_dir

LOCK_FILE = ".sweep.lock"


@contextlib.contextmanager
def study_lock(trial: TrialConfig):
    """One sweep of a study at a time: an exclusive, non-blocking lock on <storage>/<study>/.sweep.lock
    (released when the sweep ends, or by the OS when its process dies), and beside it who holds it
    (host, pid, start time). A second sweep of the same study exits with one line naming the holder."""
    folder = study_dir(trial.resources.storage, trial.name)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"resources.storage: cannot create the study folder {folder}: {err.strerror}") from None
    path = folder / LOCK_FILE
    owner = folder / f"{LOCK_FILE}.owner"
    lock = FileLock(path, thread_local=False)
    try:
        lock.acquire(blocking=False)
    except Timeout:
        try:
            holder = owner.read_text().strip() or "holder unknown"
        except OSError:
            holder = "holder unknown"
        raise UserError(f"another sweep of study {trial.name!r} is running ({holder}); wait for it to end or "
                        f"stop it (its lock: {path})") from None
    try:
        owner.write_text(f"host {socket.gethostname()}, pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        yield path
    finally:
        owner.unlink(missing_ok=True)
        lock.release()
