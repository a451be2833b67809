"""Ray worker-process setup hook: import the heavy modules a trial needs while the process starts.

Ray starts Python worker processes ahead of demand (at `ray.init`, and while trials run); importing
torch, DeepSpeed and MLflow there takes those seconds off each trial's start-up instead of
spending them after the trial's workers are placed.
"""

from __future__ import annotations

import os


def preload() -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not _has_gpu() else "cuda")
    import deepspeed  # noqa: F401  (imports torch)
    import mlflow  # noqa: F401

    import harness.train  # noqa: F401


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()
