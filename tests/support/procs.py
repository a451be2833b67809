"""Processes the tests start: two ranks of `ditscale train` under torchrun, and their free ports."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from harness.common.net import free_port

__all__ = ["free_port", "torchrun"]


def torchrun(study: Path, cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    """`ditscale train STUDY` on two ranks (torch.distributed.run, a free rendezvous port); asserts exit 0."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), "-m", "harness.cli", "train", str(study), *extra]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, text=True, capture_output=True, timeout=900)
    assert proc.returncode == 0, f"torchrun exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc
