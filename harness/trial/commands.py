"""Arguments and handler of `ditscale train`: one trial of a study in this process, or under torchrun.
The handler imports the training loop (torch, DeepSpeed), so that `ditscale --help` stays instant."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from harness.config import expand_grid, load_study
from harness.files import require_writable
from harness.options import add_set_option, choose_trial
from harness.tracking import check_tracking_uri, resolve_tracking_uri, set_study_file


def _cmd_train(args: argparse.Namespace) -> int:
    study = load_study(args.config, args.set)
    from harness.trial.budget import resolve_budgets  # torch: budgets count the model's FLOPs

    trials = resolve_budgets(expand_grid(study))
    trial = choose_trial(trials, args.trial, "or run them all with `ditscale sweep`")
    uri = resolve_tracking_uri(trial.tracking.uri)
    check_tracking_uri(uri)
    check_outputs(trial, uri)
    set_study_file(args.config)  # the runs table's Source column: the study file
    from harness.trial.loop import train_trial  # torch and DeepSpeed: only when a trial is trained

    result = train_trial(trial)
    where = "" if " at step " in result.status else f" at step {result.step}"  # a divergence names its step
    print(f"trial {trial.trial_id}: {result.status}{where}; MLflow run {result.run_id}")
    if result.run_id and os.environ.get("RANK", "0") == "0":  # only rank 0 talks to MLflow (torchrun sets RANK)
        from harness.tracking_view import study_link

        link = study_link(uri, trial.name, trials)  # saves the runs table's view of the study
        if link:
            print(f"MLflow UI, the study's training runs: {link}")
    return 0 if result.status in ("finished", "killed") else 1


def check_outputs(trial, uri: str) -> None:
    """The folders a trial writes, checked before anything is built (a read-only one was an OSError
    traceback from deep in the loop): its trial folder under resources.storage, and a local MLflow
    database's folder (SQLite also writes a journal beside the file)."""
    from harness.paths import trial_dir

    require_writable(trial_dir(trial), "resources.storage", shown=trial.resources.storage)
    if uri.startswith("sqlite:///"):
        database = Path(uri[len("sqlite:///"):])
        require_writable(database.parent, "tracking.uri", shown=database)


def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train one trial of a study (alone or under torchrun)")
    p.add_argument("config", help="study YAML file")
    p.add_argument("--trial", type=int, default=None, help="index of the grid point to train (see --dry-run of sweep)")
    add_set_option(p)
    p.set_defaults(func=_cmd_train)
