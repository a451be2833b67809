"""Shared fixtures: real WebDataset shards of the built-in digits, and tiny study files on them."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """digits at 16x16, 1 channel, 10 classes, captions; 4 train shards + 1 val shard."""
    from harness.data import pack_dataset

    out = tmp_path_factory.mktemp("digits") / "digits"
    pack_dataset("digits", str(out), image_size=16, shard_size=500, progress=False)
    return out


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
    """Run the real CLI in a subprocess (as a user would), in `cwd`."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("MLFLOW_TRACKING_URI", None) if env is None or "MLFLOW_TRACKING_URI" not in env else None
    proc = subprocess.run([sys.executable, "-m", "harness.cli", *args], cwd=cwd, env=full_env, text=True,
                          capture_output=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"ditscale {' '.join(args)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                             f"\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


# --- the one-node Slurm cluster (tests/test_slurm*.py, test_credentials.py) ------------------------------
# One session fixture here, not imported into test modules: an imported session fixture is a separate
# instance per module, and two clusters on the test cluster's fixed ports cannot both start.

SLURM_START = ROOT / "slurm" / "testing" / "start-local-cluster.sh"
SLURM_STOP = ROOT / "slurm" / "testing" / "stop-local-cluster.sh"


@pytest.fixture(scope="session")
def slurm_cluster():
    """SLURM_CONF of a running one-node cluster (started here, stopped at the end of the session)."""
    path = f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin"  # the daemons live in sbin
    missing = [c for c in ("slurmctld", "slurmd", "munged", "sbatch") if shutil.which(c, path=path) is None]
    problem = None
    if missing:
        problem = f"Slurm is not installed ({', '.join(missing)} missing; apt-get install slurm-wlm munge)"
    elif os.geteuid() != 0:
        problem = "the test cluster's slurmd must run as root"
    if problem:
        if os.environ.get("DITSCALE_REQUIRE_SLURM") == "1":
            pytest.fail(f"DITSCALE_REQUIRE_SLURM=1 but {problem}")
        pytest.skip(problem)
    # DITSCALE_SLURM_STATE: a cluster the start script made earlier (its folder), reused and left running.
    state = os.environ.get("DITSCALE_SLURM_STATE", "")
    conf = Path(state) / "slurm.conf"
    already = bool(state) and conf.is_file() and subprocess.run(
        ["scontrol", "ping"], env={**os.environ, "SLURM_CONF": str(conf)}, capture_output=True).returncode == 0
    t0 = time.monotonic()
    proc = subprocess.run([str(SLURM_START), *([state] if state else [])], capture_output=True, text=True, timeout=180)
    exported = cluster_exports(proc.stdout)
    state = exported.get("DITSCALE_SLURM_STATE", state)
    try:
        assert proc.returncode == 0, f"the test cluster did not start:\n{proc.stdout}\n{proc.stderr}"
        print(f"slurm test cluster in {state}: up after {time.monotonic() - t0:.1f}s", file=sys.stderr)
        yield exported["SLURM_CONF"]
    finally:
        if not already and state:
            subprocess.run([str(SLURM_STOP), state], capture_output=True, timeout=120)
            shutil.rmtree(state, ignore_errors=True)


def cluster_exports(stdout: str) -> dict:
    """The `export NAME=VALUE` lines a start script printed (values quoted for the shell): its state
    folder (DITSCALE_SLURM_STATE / DITSCALE_NETNS_STATE, printed first, so also by a failed start) and,
    once the cluster is up, SLURM_CONF."""
    return {name: shlex.split(value)[0] for name, value in re.findall(r"^export (\w+)=(.+)$", stdout, re.MULTILINE)}
