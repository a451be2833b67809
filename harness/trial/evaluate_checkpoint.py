"""A trained trial evaluated from a saved checkpoint (`ditscale eval`), the same way training does.

The EMA weights of the checkpoint go into the trial's model (harness/trial/build.py builds it as
training does) and the Evaluator runs on them, alone or under torchrun (sampling spread over the
ranks); rank 0 logs into the trial's MLflow run. The checkpoint is chosen as a resumed trial chooses
one (harness/trial/checkpoint.py, choose_checkpoint): a newest tag whose EMA cannot be read or loaded
is named in a warning and the next older one is used. With eval.ema_sigma_rels the weights evaluated are
the best post-hoc EMA width's at the checkpoint's step, chosen as at the end of a trial
(harness/trial/posthoc_ema.py, choose_at_checkpoint).
"""

from __future__ import annotations

import os

import torch

from harness.common.process_group import DistInfo, setup_distributed
from harness.config import override_trial
from harness.evaluation.evaluator import Evaluator
from harness.tracking import STATUS_TAG, RunLogger, experiment_id, find_trial_run, open_trial_run, resolve_tracking_uri
from harness.trial.build import build_trial
from harness.trial.checkpoint import EMA_FILE, choose_checkpoint, ema_unreadable, eval_candidates, step_of_checkpoint
from harness.trial.posthoc_ema import choose_at_checkpoint, log_checkpoint_choice
from models.ema import EMA


def evaluate_checkpoint(trial, checkpoint: str | None = None, *, device: str | None = None, log: bool = True,
                        progress: bool | None = None, eval_overrides: list[str] | tuple[str, ...] = (),
                        ) -> tuple[dict[str, float], dict, str | None]:
    """Evaluate a trial's EMA weights from a checkpoint; log into the trial's MLflow run (rank 0).
    `eval_overrides` ("eval.key=value") change the evaluation, not the trial whose checkpoint and run
    are used. Returns (metrics, images, run id)."""
    candidates = eval_candidates(trial, checkpoint)  # none at all: one line before anything is built
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist = setup_distributed(use_gpu=torch.cuda.is_available() and device != "cpu")
    else:
        dist = DistInfo(0, 1, 0, torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")))
    torch.manual_seed(trial.train.seed)
    built = build_trial(trial, dist.device)
    model = built.denoiser
    ema = EMA(model, decay=trial.train.ema_decay)

    def load(tag_dir):
        ema.load_state_dict(torch.load(tag_dir / EMA_FILE, map_location="cpu", weights_only=True))

    hint = ("give another --checkpoint folder" if checkpoint else
            "train the trial again (`ditscale train` / `ditscale sweep`) or pass --checkpoint")
    path, _ = choose_checkpoint(candidates, dist, load, purpose="evaluated", hint=hint, check=ema_unreadable,
                                named=f"--checkpoint {checkpoint}" if checkpoint else None)
    step = step_of_checkpoint(path)
    ema.copy_to(model)
    model.to(dist.device).eval()
    evaluated = override_trial(trial, eval_overrides)
    choice = choose_at_checkpoint(trial, evaluated, built, dist, model, step)  # eval.ema_sigma_rels: the best width
    evaluator = Evaluator(evaluated, built.info, built.conditioner, built.objective, dist, progress=progress)
    metrics, images = evaluator.run(model, step)
    metrics.update(choice.metrics() if choice is not None else {})
    run_id = None
    if log and dist.is_main:
        run_id = log_evaluation(trial, metrics, images, step, evaluator.tags())
    if dist.is_main:
        log_checkpoint_choice(trial, run_id, choice)
    return metrics, images, run_id


def log_evaluation(trial, metrics: dict, images: dict, step: int, tags: dict | None = None) -> str:
    """Into the trial's MLflow run (found by its trial_id tag; created when there is none), with the
    evaluator's tags (the FD's detector identity, so the report never ranks FDs of different detectors)."""
    uri = resolve_tracking_uri(trial.tracking.uri)
    run = find_trial_run(uri, experiment_id(uri, trial.name), trial.trial_id)
    if run is not None:
        run_id = run.info.run_id
        logger = RunLogger(uri, run_id)
    else:
        run_id = open_trial_run(trial, uri)
        logger = RunLogger(uri, run_id)
        logger.set_tag(STATUS_TAG, "evaluated")  # not trained here: a later sweep resumes it from the checkpoint
    for key, value in (tags or {}).items():
        logger.set_tag(key, value)
    logger.log_metrics(metrics, step)
    logger.log_evaluation_artifacts(images)
    return run_id
