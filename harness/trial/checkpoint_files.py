"""The names and folders of a trial's checkpoints, without torch (the layout: harness/trial/checkpoint.py).

Torch-free on purpose: the sweep's planning (harness/launch/branches.py: which trunk checkpoint a WSD
branch starts from, `ditscale sweep --dry-run`) needs the layout but trains nothing, and importing torch
costs seconds and hundreds of MB. harness/trial/checkpoint.py, which saves and loads with torch and
DeepSpeed, imports these from here, so each name has one home.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from harness.errors import UserError
from harness.files import not_writable_message, write_refused

EMA_FILE = "ema.pt"
LATEST = "latest"
TAG_PATTERN = re.compile(r"step-(\d+)")
PRUNING_PREFIX = ".pruning-"  # a tag being removed is renamed first: never half a tag under a step-* name
SAVING_PREFIX = ".saving-"    # a tag being written: renamed to its step-* name once complete


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def tag_step(name: str) -> int | None:
    """The step of a step-* tag name (None for any other name)."""
    match = TAG_PATTERN.fullmatch(name)
    return int(match.group(1)) if match else None


def prepare_checkpoint_root(root: Path) -> Path:
    """Create the trial folder and its checkpoints/ folder, both mode 0700 (chmod, so the umask does not
    matter; a folder that already exists, e.g. made by Ray or an older version, is tightened too)."""
    try:
        for folder in (root.parent, root):
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            if folder.stat().st_uid == os.geteuid():
                os.chmod(folder, 0o700)
    except OSError as err:  # `ditscale train` checks this up front; a sweep's trial meets it here
        if not write_refused(err):
            raise
        raise UserError(not_writable_message(root, "resources.storage", err.strerror or str(err))) from None
    return root
