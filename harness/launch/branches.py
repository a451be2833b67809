"""Cooldown branches: WSD trials that differ only in length train one shared trunk.

Hagele et al. 2024 ("Scaling Laws and Compute-Optimal Training Beyond Fixed Training Durations",
arXiv 2405.18392) showed that a constant learning rate followed by a short cooldown matches a cosine
schedule, so one long constant-LR run, with a cooldown branched from it at each budget, gives every
budget of an isoFLOP grid for about the price of the longest one.

Plan: trials with `train.schedule: wsd` and `train.branch: true` are grouped by everything but their
length (harness/study.py: length_free_key). A group of two or more gets a trunk: the same
trial with the warm-up and then a constant LR, trained to the last branch point and checkpointed at
every branch point (`train.save_at`). A branch is the user's trial unchanged: it starts from the
trunk's checkpoint at (its steps - its cooldown steps), where its own WSD schedule starts to cool
down, and from there on is an ordinary trial (own MLflow run tagged `branch_of`, evaluated, resumable,
restarted on failure). Before its branch point a WSD trial's LR is the trunk's, step for step.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from harness.checks import DEFAULT_COOLDOWN, cooldown_steps
from harness.config import StudyError, TrialConfig
from harness.paths import BRANCH_MARKER, checkpoint_root
from harness.study import length_free_key

# The checkpoint layout without torch: planning (and `ditscale sweep --dry-run`) imports this module.
from harness.trial.checkpoint_files import EMA_FILE, LATEST, TAG_PATTERN, prepare_checkpoint_root, tag_for
from harness.trial.divergence import divergence_step

TRUNK_ROLE = "trunk"
# What a branch needs of its trunk (trunk_need): start from it; train the trunk again up to its branch
# point (rewind_trunk); nothing (the branch is concluded as diverged with its trunk); the trunk's own run,
# not yet concluded, trains it anyway.
READY, REWIND, DIVERGED, TRAIN = "ready", "rewind", "diverged", "train"


@dataclass
class Trunk:
    trial: TrialConfig                                   # the constant-LR run the branches start from
    branches: list[TrialConfig] = field(default_factory=list)


def branch_point(trial: TrialConfig) -> int:
    """The step where a WSD trial's cooldown begins: its LR up to here is the trunk's."""
    return trial.train.steps - cooldown_steps(trial.train)


def plan_branches(trials: list[TrialConfig]) -> tuple[list[Trunk], list[TrialConfig]]:
    """(trunks with their branches, trials that train alone). Trials must have their steps resolved.
    Raises StudyError, one line per trial, when a branch would start at step 0 (no trunk to branch from)."""
    groups: dict[str, list[TrialConfig]] = {}
    alone = []
    for trial in trials:
        if trial.train.schedule == "wsd" and trial.train.branch:
            groups.setdefault(length_free_key(trial), []).append(trial)
        else:
            alone.append(trial)
    trunks, problems = [], []
    for members in groups.values():
        if len(members) < 2:
            alone += members
            continue
        if any(branch_point(t) < 1 for t in members):
            problems.append(_no_trunk_step([t for t in members if branch_point(t) < 1]))
            continue
        trunks.append(Trunk(_trunk_of(members), sorted(members, key=branch_point)))
    if problems:
        raise StudyError(problems)
    return trunks, alone


def _no_trunk_step(trials: list[TrialConfig]) -> str:
    """One line for the branches of a group whose cooldown takes every step: they would start at step 0,
    where a trunk has no checkpoint (it would also have no steps to train)."""
    t = trials[0].train
    field_name, value = (("train.cooldown_steps", t.cooldown_steps) if t.cooldown_steps is not None
                         else ("train.cooldown", t.cooldown if t.cooldown is not None else f"{DEFAULT_COOLDOWN} (default)"))
    which = ", ".join(f"{x.trial_id} ({x.train.steps} steps)" for x in trials)
    return (f"{field_name}: {value} leaves no step before the cooldown of {trials[0].model_name} trial(s) {which}: "
            "a WSD branch starts from its trunk's checkpoint at its steps - cooldown, here step 0; shorten the "
            "cooldown, add train.warmup_steps, or set train.branch: false")


def _trunk_of(members: list[TrialConfig]) -> TrialConfig:
    points = sorted({branch_point(t) for t in members})
    raw = members[0].model_dump(mode="python")
    train = raw["train"]
    train.update(steps=points[-1], flops=None, schedule="warmup" if train["warmup_steps"] else "constant",
                 cooldown=None, cooldown_steps=None, branch=False, save_at=points)
    # The trunk is a means, not a result: no sampling-based evaluation (the branches are evaluated).
    raw["eval"].update(fid_samples=0, every=None)
    return TrialConfig.model_validate(raw)


def plan_compute(trunks: list[Trunk], alone: list[TrialConfig], gflops_per_step) -> tuple[float, float]:
    """(training GFLOPs of the branched plan, of the same trials trained independently).
    gflops_per_step(trial) is one optimizer step's training compute."""
    independent = sum(t.train.steps * gflops_per_step(t) for t in alone)
    branched = independent
    for trunk in trunks:
        per_step = gflops_per_step(trunk.trial)
        independent += sum(b.train.steps for b in trunk.branches) * per_step
        branched += (trunk.trial.train.steps + sum(cooldown_steps(b.train) for b in trunk.branches)) * per_step
    return branched, independent


def trunk_checkpoint(trunk: TrialConfig, branch: TrialConfig) -> Path:
    """The trunk's checkpoint folder the branch starts from (its branch point's tag)."""
    return checkpoint_root(trunk) / tag_for(branch_point(branch))


def branch_ready(trunk: TrialConfig, branch: TrialConfig) -> bool:
    """Whether the branch can start or resume: it has checkpoints of its own, or its trunk has the
    one at its branch point (its EMA file there: save_checkpoint writes a tag under a hidden name, the EMA
    last, and renames it to step-* once every rank's files are in, so a step-* folder is complete)."""
    return (checkpoint_root(branch) / LATEST).is_file() or (trunk_checkpoint(trunk, branch) / EMA_FILE).is_file()


def trunk_need(trunk_status: str, point: int, ready: bool) -> str:
    """What a branch starting at step `point` needs of a trunk whose MLflow status is `trunk_status`
    (branch_ready says `ready`): READY, REWIND, DIVERGED or TRAIN.

    A trunk that concluded but lacks the checkpoint (a deleted folder) is trained again through the
    branch point when it passed that point in health: it finished, or it diverged only at a later step
    (the loop judges a step before checkpointing it, so the checkpoint of the step that diverged is never
    written: that step and later ones are the diverged ones). A branch point at or after the divergence,
    or a diverged status that names no step, concludes the branch as diverged with its trunk."""
    if ready:
        return READY
    if trunk_status == "finished":
        return REWIND
    if trunk_status.startswith("diverged"):
        step = divergence_step(trunk_status)
        return REWIND if step is not None and point < step else DIVERGED
    return TRAIN


def rewind_trunk(trunk: TrialConfig, step: int) -> str | None:
    """Make the trunk train again through `step` (a branch point whose checkpoint is gone): DeepSpeed's
    `latest` is pointed at its newest complete tag before `step`, or removed when there is none (the trunk
    then starts from scratch). Later tags are left; the trunk writes them again. Returns the tag it will
    resume from (None: from the start)."""
    root = checkpoint_root(trunk)
    if not root.is_dir():
        return None
    earlier = sorted(int(m.group(1)) for p in root.iterdir()
                     if (m := TAG_PATTERN.fullmatch(p.name)) and int(m.group(1)) < step and (p / EMA_FILE).is_file())
    if not earlier:
        (root / LATEST).unlink(missing_ok=True)
        return None
    tag = tag_for(earlier[-1])
    pending = root / f".{LATEST}.rewind"
    pending.write_text(tag)
    os.replace(pending, root / LATEST)  # atomic: never a half-written pointer
    return tag


def seed_branch(trunk: TrialConfig, branch: TrialConfig) -> bool:
    """Give the branch the trunk's checkpoint at its branch point, unless it has checkpoints of its own
    (then it resumes from those). Returns False when the trunk has no such checkpoint (the trunk failed)."""
    root = checkpoint_root(branch)
    if (root / "latest").is_file():
        return True
    step = branch_point(branch)
    tag = tag_for(step)
    source = trunk_checkpoint(trunk, branch)
    if not (source / EMA_FILE).is_file():
        return False
    prepare_checkpoint_root(root)  # 0700, as the trial itself would make it
    target = root / tag
    if target.exists():
        shutil.rmtree(target)  # a copy interrupted earlier: start it again
    shutil.copytree(source, target)
    (root / BRANCH_MARKER).write_text(json.dumps({"trunk": trunk.trial_id, "step": step}))
    (root / "latest").write_text(tag)  # last, as DeepSpeed does: the copy is complete
    return True
