"""`ditscale bench --startup`: what one sweep trial costs before its first training step, here.

Runs a real sweep (embedded Ray, Tune, Ray Train, DeepSpeed, MLflow) of a few 3-step DiT-XXS trials on
the built-in digits, one trial at a time, in a temporary folder, and prints each trial's `startup_s`
with its phases, read back from MLflow. Modes: `in-process` (single-worker trials in Tune's reused
trial process, the default for such trials) and `workers` (a Ray Train worker group per trial, what
multi-worker trials always get).
"""

from __future__ import annotations

import os
import statistics
import tempfile
from pathlib import Path

import yaml

from harness.data import pack_dataset
from harness.errors import UserError
from harness.launch.sweep import run_sweep

MODES = ("in-process", "workers")
# harness/trial/loop.py's phase marks, in the order they happen
PHASES = ("tune_trial", "ray_workers", "imports", "process_group", "model", "deepspeed", "resume", "mlflow",
          "first_batch", "first_step")


def _study(data: Path, name: str, trials: int, workers: int, reuse: bool) -> dict:
    return {
        "name": name,
        "data": {"shards": str(data / "train-{000000..000001}.tar"), "image_size": 16, "channels": 1,
                 "num_workers": 0},
        "model": {"family": "dit", "size": "XXS", "patch": 4},
        "train": {"steps": 3, "batch_size": 8 * workers, "precision": "fp32", "zero_stage": 2,
                  "log_every": 1, "checkpoint_every": 1000, "ema_decay": 0.9},
        "eval": {"fid_samples": 0, "val_batches": 0},
        "resources": {"workers_per_trial": workers, "reuse_trial_process": reuse},
        "tracking": {"system_metrics": False},
        "grid": {"train.seed": list(range(trials))},  # distinct trials of identical cost
    }


def _phases(uri: str, experiment: str) -> list[dict]:
    """Per trial, in the order they ran: startup_s and its startup_<phase>_s parts."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], filter_string="tags.trial_id != ''",
                              order_by=["attributes.start_time ASC"])
    return [{k[len("startup_"):-2] if k != "startup_s" else "total": v for k, v in r.data.metrics.items()
             if k.startswith("startup_")} for r in runs]


def _print(mode: str, rows: list[dict]) -> None:
    seen = {k for row in rows for k in row if k != "total"}
    phases = [p for p in PHASES if p in seen] + sorted(seen - set(PHASES))
    print(f"\n{mode}: start-up per trial, seconds (trial start to first training step)")
    print(f"{'trial':>5} {'total':>7} " + " ".join(f"{p:>{max(7, len(p))}}" for p in phases))
    for i, row in enumerate(rows):
        print(f"{i:>5} {row['total']:>7.2f} " + " ".join(f"{row.get(p, 0.0):>{max(7, len(p))}.2f}" for p in phases))
    later = [r["total"] for r in rows[1:]]
    if later:
        print(f"first {rows[0]['total']:.2f} s; later trials median {statistics.median(later):.2f} s "
              f"(min {min(later):.2f}, max {max(later):.2f})")


def run_startup_bench(trials: int = 4, workers: int = 1, modes: tuple[str, ...] = MODES) -> dict[str, list[dict]]:
    if trials < 2:
        raise UserError("bench --startup-trials: at least 2 (the first trial of a process is the odd one)")
    if workers > 1 and "in-process" in modes:
        modes = tuple(m for m in modes if m != "in-process")
        print("bench --startup: multi-worker trials always get their own Ray Train workers; timing 'workers' only")
    results: dict[str, list[dict]] = {}
    previous = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="ditscale-startup-") as tmp:
        root = Path(tmp)
        pack_dataset("digits", str(root / "digits"), image_size=16, shard_size=500, progress=False)
        os.chdir(root)  # the sweep's storage, MLflow database and report go here, and go away after
        try:
            for mode in modes:
                name = f"startup-{mode}"
                path = root / f"{name}.yaml"
                path.write_text(yaml.safe_dump(_study(root / "digits", name, trials, workers, mode == "in-process")))
                run_sweep(str(path), max_concurrent=1, report=False)
                results[mode] = _phases(f"sqlite:///{root / 'mlflow.db'}", name)
        finally:
            os.chdir(previous)
    for mode, rows in results.items():
        _print(mode, rows)
    return results
