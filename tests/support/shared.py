"""Session data built once per test run, also under pytest-xdist.

Each xdist worker is its own pytest session, so a session fixture that packs a dataset (and, beside its
shards, the stand-in detector that evaluation trains on it) ran once per worker: the two workers of
scripts/test packed digits twice and trained each stand-in twice (about 25 s of CPU for shapesdet), on
a machine whose two cores the suite keeps busy. pytest-xdist's recipe for data shared by the workers:
build it in the run's base folder, above the workers' own, under a file lock, the first worker that asks
builds and the others wait and read it (https://pytest-xdist.readthedocs.io/en/stable/how-to.html).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from harness.assets import file_lock

DONE = ".built"  # beside the folder, written last: a folder without one was left half-built, built again


def shared_folder(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """`build(folder)` once per test run (once per process without xdist); the folder it filled."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # the workers' folders are popen-gwN/ in the run's folder
        base = base.parent
    folder = base / "shared" / name
    done = folder.with_name(name + DONE)  # not inside: the folder holds only what `build` made
    with file_lock(f"{folder}.lock"):  # makes the shared/ folder too
        if not done.is_file():
            if folder.exists():
                shutil.rmtree(folder)
            build(folder)
            done.touch()
    return folder
