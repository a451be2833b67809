"""A study, loaded once: `load_trials` reads and validates the study file (harness/config.py), expands its
grid and gives every budget trial (`train.flops`) its step count, once, for every command that runs or
plans trials: `ditscale sweep` and its dry run, `train`, `eval`, `plan`.

Compute budgets: Liang et al. 2024 ("Scaling Laws for Diffusion Transformers") train every model size at
fixed compute budgets with steps = budget / cost per step at a fixed batch; a grid over `train.flops` x
model sizes is such an isoFLOP design. Compute is counted exactly as the logged `train_gflops`
(models/flops.py: 3 x forward multiply-adds x images, the DiT paper's convention), so a trial's final
`train_gflops` x 1e9 is its budget to within half a step.

Counting needs no torch and no data: the model is counted analytically from its spec
(`ModelConfig.spec()` -> models.flops.count_model), with the number of classes from `data.num_classes`
or the shards' dataset.json (else 1000) and the text geometry the study and dataset.json give (a frozen
encoder, not loaded here, counts as SD3's). Training counts again with the real data
(harness/trial/build.dataset_info).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import NamedTuple

from harness.checks import check_schedule
from harness.config import MAX_TRIALS, StudyError, read_study
from harness.data.shards import manifest_of_shards
from harness.errors import UserError
from harness.schema import Study, TrialConfig
from models.flops import SD3_CONTEXT_DIM, SD3_POOLED_DIM, SD3_TEXT_TOKENS, ModelCount, count_model, training_gflops
from models.registry import ModelSpec

# More optimizer steps than any training run takes (DiT-XL/2's 7M steps x 1e5): a budget that buys more
# is a typo (an exponent off), and its step count would overflow the schedule and the plan's columns.
MAX_STEPS = 10**12
PLANNING_CLASSES = 1000           # a class-conditional count without data.num_classes or dataset.json
BUILTIN_TEXT = {"dim": 256, "max_length": 32, "layers": 2}   # data.text_encoder: builtin (models/text.py)


class LoadedStudy(NamedTuple):
    study: Study
    trials: list[TrialConfig]  # the grid's points, in order; budget trials with their train.steps


def load_trials(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = (), check_files: bool = True,
                max_trials: int | None = MAX_TRIALS) -> LoadedStudy:
    """The study and its trials: read, overridden, validated, expanded and budgets resolved (StudyError
    lists every problem; a budget problem is a BudgetError)."""
    study, trials = read_study(path, overrides, check_files=check_files, max_trials=max_trials)
    return LoadedStudy(study, resolve_budgets(trials))


# --- counting a trial's model --------------------------------------------------------------------------


@dataclass(frozen=True)
class TextGeometry:
    tokens: int
    context_dim: int
    pooled_dim: int


def sd3_text_geometry() -> TextGeometry:
    """SD3's text geometry: the guess for FLOP tables when the real one is not known yet."""
    return TextGeometry(SD3_TEXT_TOKENS, SD3_CONTEXT_DIM, SD3_POOLED_DIM)


def text_geometry(trial: TrialConfig, manifest: dict) -> TextGeometry:
    """Token count and widths of the text the MM-DiT reads, as the study and dataset.json say; a frozen
    encoder's is SD3's here (harness/trial/conditioning.text_geometry probes the loaded encoder)."""
    route = trial.data.text_encoder
    if route == "builtin":
        return TextGeometry(BUILTIN_TEXT["max_length"], BUILTIN_TEXT["dim"], BUILTIN_TEXT["dim"])
    if route == "precomputed":
        meta = manifest.get("text_encoder") or {}
        if not meta:
            raise UserError("data.text_encoder: precomputed, but the shards' dataset.json lists no text "
                            "embeddings; pack with `ditscale data pack ... --text-encoder SPEC`")
        return TextGeometry(int(meta["tokens"]), int(meta["token_dim"]), int(meta["pooled_dim"]))
    return sd3_text_geometry()


def count_trial(trial: TrialConfig, num_classes: int | None, text: TextGeometry | None,
                spec: ModelSpec | None = None) -> ModelCount:
    """Parameters and forward multiply-adds of the trial's model (or of `spec` in its place: another size)."""
    m, d = trial.model, trial.data
    spec = spec or m.spec()
    if spec.family == "dit":
        extra = {"num_classes": num_classes, "learn_sigma": m.learn_sigma, "class_dropout_prob": m.class_dropout_prob}
    else:
        extra = {"learn_sigma": m.learn_sigma, "text_tokens": text.tokens, "context_dim": text.context_dim,
                 "pooled_dim": text.pooled_dim}
    return count_model(spec, input_size=d.image_size, in_channels=d.channels, **extra)


@dataclass(frozen=True)
class PlannedCount:
    """A trial's model counted for planning, and what the count took from the data."""

    count: ModelCount
    manifest: dict             # the shards' dataset.json ({} when it is not here)
    num_classes: int | None    # None for captions
    text: TextGeometry | None  # MM-DiT only


def planned_count(trial: TrialConfig) -> PlannedCount:
    """The trial's count without its data: absent shards are fine (see the module docstring)."""
    manifest = manifest_of_shards(trial.data.shards)
    num_classes = trial.data.num_classes or manifest.get("num_classes") or PLANNING_CLASSES
    text = None
    if trial.model.family == "mmdit":
        # Before embeddings were packed, SD3's geometry stands in for a precomputed encoder's.
        unpacked = trial.data.text_encoder == "precomputed" and not manifest.get("text_encoder")
        text = sd3_text_geometry() if unpacked else text_geometry(trial, manifest)
    return PlannedCount(count_trial(trial, num_classes, text), manifest, num_classes, text)


# --- budgets -------------------------------------------------------------------------------------------


class BudgetError(StudyError):
    """A train.flops budget that gives no usable step count (too small, too large, coinciding, or too
    short for the schedule)."""


def flops_per_step(trial: TrialConfig) -> float:
    """Training FLOPs (multiply-adds) of one optimizer step: 3 x forward x global batch."""
    return training_gflops(planned_count(trial).count.gflops, trial.train.batch_size) * 1e9


def resolve_budgets(trials: list[TrialConfig]) -> list[TrialConfig]:
    """Set train.steps of every budget trial (in place; returns the list). Raises BudgetError naming
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
        raise BudgetError(problems)
    return trials


def length_free_key(trial: TrialConfig) -> str:
    """The trial without its length (train.steps / train.flops): trials with equal keys differ only
    in how long they train — the groups a WSD trunk can serve."""
    identity = trial.identity()
    identity["train"] = {k: v for k, v in identity["train"].items() if k not in ("steps", "flops")}
    return json.dumps(identity, sort_keys=True)
