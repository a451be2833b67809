"""Where a study's files live: trial folders, checkpoints, the stop file, Slurm files, the report.

Everything is resolved against the current directory (as `ditscale sweep` does); a Slurm job runs in
the directory `submit` was called from (`#SBATCH --chdir`), so the driver and every node agree.

    <resources.storage>/<study name>/            the study folder
        <trial_id>/checkpoints/<tag>/            DeepSpeed checkpoint + ema.pt (harness/trial/checkpoint.py)
        STOP                                     creating it asks every running trial to checkpoint and stop
        slurm/                                   rendered sbatch scripts, job logs, the per-job Ray token
    reports/<study name>/index.html              the scaling report (analysis/report.py writes it)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from harness.tracking import resolve_tracking_uri, safe_folder_name

CHECKPOINTS = "checkpoints"
BRANCH_MARKER = "branched_from.json"  # in a WSD branch's checkpoints/: {"trunk": trial id, "step": branch point}
STOP_FILE_NAME = "STOP"
REPORTS = "reports"


def study_dir(storage: str | Path, name: str) -> Path:
    return Path(storage).resolve() / name


def trial_dir(trial) -> Path:
    """The trial's own folder: its checkpoints and the markers the sweep's test knobs leave."""
    return study_dir(trial.resources.storage, trial.name) / trial.trial_id


def checkpoint_root(trial) -> Path:
    return trial_dir(trial) / CHECKPOINTS


def stop_file(trial) -> Path:
    """Creating this file asks every running trial of the study to checkpoint and stop (Slurm's
    warning signal, a user's Ctrl-C on the sweep): the trials end as `killed` and resume later."""
    return study_dir(trial.resources.storage, trial.name) / STOP_FILE_NAME


def report_dir(name: str) -> Path:
    """Where `ditscale sweep` and `ditscale report` write a study's report (in the working directory):
    reports/<name>, the name made one safe folder name (harness.tracking.safe_folder_name, the rule
    analysis/report.py applies too), so no study name writes outside reports/."""
    return Path.cwd() / REPORTS / safe_folder_name(name)


@dataclass
class StudyPaths:
    name: str
    storage: Path      # resources.storage, absolute
    study_dir: Path    # <storage>/<name>: trial folders, the STOP file, slurm/
    stop_file: Path
    slurm_dir: Path    # rendered scripts, job logs, the per-job Ray token
    tracking_uri: str
    report: Path       # reports/<name>/index.html


def study_paths(study) -> StudyPaths:
    folder = study_dir(study.resources.storage, study.name)
    return StudyPaths(
        name=study.name, storage=Path(study.resources.storage).resolve(), study_dir=folder,
        stop_file=stop_file(study), slurm_dir=folder / "slurm",
        tracking_uri=resolve_tracking_uri(study.tracking.uri), report=report_dir(study.name) / "index.html",
    )
