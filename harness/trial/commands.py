"""Arguments and handler of `ditscale train`: one trial of a study in this process, or under torchrun.
The handler imports the training loop (torch, DeepSpeed), so that `ditscale --help` stays instant."""

from __future__ import annotations

import argparse

from harness.config import expand_grid, load_study
from harness.options import add_set_option, choose_trial
from harness.tracking import check_tracking_uri, resolve_tracking_uri


def _cmd_train(args: argparse.Namespace) -> int:
    study = load_study(args.config, args.set)
    from harness.trial.budget import resolve_budgets  # torch: budgets count the model's FLOPs

    trial = choose_trial(resolve_budgets(expand_grid(study)), args.trial, "or run them all with `ditscale sweep`")
    check_tracking_uri(resolve_tracking_uri(trial.tracking.uri))
    from harness.trial.loop import train_trial  # torch and DeepSpeed: only when a trial is trained

    result = train_trial(trial)
    print(f"trial {trial.trial_id}: {result.status} at step {result.step}; MLflow run {result.run_id}")
    return 0 if result.status in ("finished", "killed") else 1


def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train one trial of a study (alone or under torchrun)")
    p.add_argument("config", help="study YAML file")
    p.add_argument("--trial", type=int, default=None, help="index of the grid point to train (see --dry-run of sweep)")
    add_set_option(p)
    p.set_defaults(func=_cmd_train)
