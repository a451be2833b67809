"""Compute budgets: the step count of a trial defined by `train.flops`.

Liang et al. 2024 ("Scaling Laws for Diffusion Transformers") train every model size at fixed compute
budgets with steps = budget / cost per step at a fixed batch; a grid over `train.flops` x model sizes
is such an isoFLOP design. Compute is counted exactly as the logged `train_gflops` (models/flops.py:
3 x forward multiply-adds x images, the DiT paper's convention), so a trial's final `train_gflops`
x 1e9 is its budget to within half a step.
"""

from __future__ import annotations

import json

from harness.checks import check_schedule
from harness.config import StudyError, TrialConfig
from harness.trial.build import dataset_info
from models.flops import training_gflops

# More optimizer steps than any training run takes (DiT-XL/2's 7M steps x 1e5): a budget that buys more
# is a typo (an exponent off), and its step count would overflow the schedule and the plan's columns.
MAX_STEPS = 10**12


def flops_per_step(trial: TrialConfig) -> float:
    """Training FLOPs (multiply-adds) of one optimizer step: 3 x forward x global batch."""
    forward = dataset_info(trial, need_manifest=False).forward_gflops
    return training_gflops(forward, trial.train.batch_size) * 1e9


def resolve_budgets(trials: list[TrialConfig]) -> list[TrialConfig]:
    """Set train.steps of every budget trial (in place; returns the list). Raises StudyError naming
    the field and the trial when a budget buys less than one step, or when two budgets of a grid give
    the same step count for the same model (the isoFLOP points would coincide)."""
    problems, seen = [], {}
    for index, trial in enumerate(trials):
        budget = trial.train.flops
        if budget is None:
            continue
        per_step = flops_per_step(trial)
        steps = round(budget / per_step)
        where = f"trial {index} ({trial.model_name}, {trial.trial_id})"
        if steps < 1:
            problems.append(f"train.flops: {budget:.3g} buys less than one step of {trial.model_name} "
                            f"({per_step:.3g} FLOPs per step at batch {trial.train.batch_size}); {where}")
            continue
        if steps > MAX_STEPS:
            problems.append(f"train.flops: {budget:.3g} buys {steps:.3g} steps of {trial.model_name}, more than "
                            f"{MAX_STEPS:.0e} ({per_step:.3g} FLOPs per step at batch {trial.train.batch_size}); {where}")
            continue
        same_model = length_free_key(trial)
        if (same_model, steps) in seen:
            other_index, other = seen[(same_model, steps)]
            problems.append(f"train.flops: {other.train.flops:.3g} (trial {other_index}) and {budget:.3g} "
                            f"({where}) both give {steps} steps; space the budgets further apart")
        seen[(same_model, steps)] = (index, trial)
        trial.train.steps = steps
        problems += [f"{p} ({where}, {steps} steps from train.flops)" for p in check_schedule(trial.train)]
    if problems:
        raise StudyError(problems)
    return trials


def length_free_key(trial: TrialConfig) -> str:
    """The trial without its length (train.steps / train.flops): trials with equal keys differ only
    in how long they train — the groups a WSD trunk can serve."""
    identity = trial.identity()
    identity["train"] = {k: v for k, v in identity["train"].items() if k not in ("steps", "flops")}
    return json.dumps(identity, sort_keys=True)
