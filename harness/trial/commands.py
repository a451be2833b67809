"""Arguments and handlers of `ditscale train` (one trial of a study in this process, or under torchrun) and
`ditscale eval` (a trained trial's checkpoint evaluated). The handlers import the training loop and the
evaluation (torch, DeepSpeed), so that `ditscale --help` stays instant."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from harness.config import parse_override
from harness.files import require_writable
from harness.options import add_set_option, choose_trial
from harness.study import load_trials
from harness.tracking import check_tracking_uri, resolve_tracking_uri, set_study_file


def _cmd_train(args: argparse.Namespace) -> int:
    trials = load_trials(args.config, args.set).trials
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


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a trained trial (val loss, FID, samples) from its checkpoint",
                       description="Sample from the trial's EMA weights and log val_loss, fid_cfg* (or the named "
                                   "stand-in fd_<extractor>_cfg*), kid and sample grids into its MLflow run. "
                                   "With eval.ema_sigma_rels (a trial trained with train.posthoc_ema) the EMA is "
                                   "instead, as at the end of a trial, the listed width with the lowest validation "
                                   "loss, rebuilt from the trial folder's snapshots at the checkpoint's step "
                                   "(val_loss_ema<width> for each, param eval.ema_sigma_rel_best). "
                                   "Runs alone or under torchrun (sampling is spread over the ranks).")
    p.add_argument("config", help="study YAML file")
    p.add_argument("--trial", type=int, default=None,
                   help="index of the grid point (needed when the study has several)")
    p.add_argument("--checkpoint", default=None,
                   help="a checkpoints/step-XXXXXXXX folder (default: the trial's newest checkpoint whose EMA "
                        "weights load, as a resumed trial chooses)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--no-log", action="store_true", help="print the metrics only; log nothing to MLflow")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    add_set_option(p, help="override a study field (repeatable). eval.* overrides change how the trial is evaluated "
                           "(e.g. --set eval.fid_samples=50000), not which trial: its checkpoint and run stay the same")
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args: argparse.Namespace) -> int:
    eval_sets = [text for text in args.set if parse_override(text)[0].startswith("eval.")]
    trials = load_trials(args.config, [text for text in args.set if text not in eval_sets]).trials
    trial = choose_trial(trials, args.trial)
    if not args.no_log:
        check_tracking_uri(resolve_tracking_uri(trial.tracking.uri))
    from harness.trial.evaluate_checkpoint import evaluate_checkpoint  # torch: only when evaluating

    metrics, images, run_id = evaluate_checkpoint(trial, args.checkpoint, device=args.device, log=not args.no_log,
                                                  eval_overrides=eval_sets)
    if args.json:
        print(json.dumps({"trial_id": trial.trial_id, "run_id": run_id, "metrics": metrics,
                          "images": sorted(k for k in images if k.endswith(".png")),
                          "tables": sorted(k for k in images if not k.endswith(".png"))}, indent=2))
    else:
        for key in sorted(metrics):
            print(f"{key:28s} {metrics[key]:.6g}")
        if run_id:
            grids = sum(1 for name in images if name.endswith(".png"))
            tables = len(images) - grids
            print(f"logged to MLflow run {run_id} ({grids} sample grid(s)"
                  + (", the per-sample validation losses)" if tables else ")"))
    return 0
