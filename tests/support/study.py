"""Tiny studies on the built-in digits and the real CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def tiny_study(digits: Path, name: str, **sections) -> dict:
    """A one-trial study of the smallest DiT on `digits`; `sections` update its sections."""
    study = {
        "name": name,
        "data": {"shards": str(digits / "train-{000000..000003}.tar"), "val_shards": str(digits / "val-000000.tar"),
                 "image_size": 16, "channels": 1, "num_workers": 0},
        "model": {"family": "dit", "size": "XXS", "patch": 4},
        "train": {"steps": 30, "batch_size": 32, "lr": 1.0e-3, "precision": "fp32", "zero_stage": 2,
                  "log_every": 5, "checkpoint_every": 10, "ema_decay": 0.99},
        "eval": {"fid_samples": 0, "val_batches": 0},
        "resources": {"workers_per_trial": 1},
        "tracking": {"system_metrics": False},
    }
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(study.get(section), dict):
            study[section].update(values)
        else:
            study[section] = values
    return study


def write_study(path: Path, study: dict) -> Path:
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def ditscale(*args: str, cwd: Path, env: dict | None = None, timeout: float = 600,
             check: bool = True) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess (as a user would), in `cwd`. MLFLOW_TRACKING_URI and RAY_ADDRESS
    of the test process are not passed on unless `env` names them: a test's store and Ray are its own."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    full_env.update({"PYTHONUNBUFFERED": "1", **(env or {})})
    proc = subprocess.run([sys.executable, "-m", "harness.cli", *args], cwd=cwd, env=full_env, text=True,
                          capture_output=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"ditscale {' '.join(args)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                             f"\n--- stderr\n{proc.stderr[-6000:]}")
    return proc
