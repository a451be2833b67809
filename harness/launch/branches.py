"""Cooldown branches: WSD trials that differ only in length train one shared trunk.

Hagele et al. 2024 ("Scaling Laws and Compute-Optimal Training Beyond Fixed Training Durations",
arXiv 2405.18392) showed that a constant learning rate followed by a short cooldown matches a cosine
schedule, so one long constant-LR run, with a cooldown branched from it at each budget, gives every
budget of an isoFLOP grid for about the price of the longest one.

Plan: trials with `train.schedule: wsd` and `train.branch: true` are grouped by everything but their
length (harness/trial/budget.py: length_free_key). A group of two or more gets a trunk: the same
trial with the warm-up and then a constant LR, trained to the last branch point and checkpointed at
every branch point (`train.save_at`). A branch is the user's trial unchanged: it starts from the
trunk's checkpoint at (its steps - its cooldown steps), where its own WSD schedule starts to cool
down, and from there on is an ordinary trial (own MLflow run tagged `branch_of`, evaluated, resumable,
restarted on failure). Before its branch point a WSD trial's LR is the trunk's, step for step.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field

from harness.checks import cooldown_steps
from harness.config import TrialConfig
from harness.paths import checkpoint_root
from harness.trial.checkpoint import BRANCH_MARKER, prepare_checkpoint_root
from harness.trial.budget import length_free_key

TRUNK_ROLE = "trunk"


@dataclass
class Trunk:
    trial: TrialConfig                                   # the constant-LR run the branches start from
    branches: list[TrialConfig] = field(default_factory=list)


def branch_point(trial: TrialConfig) -> int:
    """The step where a WSD trial's cooldown begins: its LR up to here is the trunk's."""
    return trial.train.steps - cooldown_steps(trial.train)


def plan_branches(trials: list[TrialConfig]) -> tuple[list[Trunk], list[TrialConfig]]:
    """(trunks with their branches, trials that train alone). Trials must have their steps resolved."""
    groups: dict[str, list[TrialConfig]] = {}
    alone = []
    for trial in trials:
        if trial.train.schedule == "wsd" and trial.train.branch:
            groups.setdefault(length_free_key(trial), []).append(trial)
        else:
            alone.append(trial)
    trunks = []
    for members in groups.values():
        if len(members) < 2:
            alone += members
            continue
        trunks.append(Trunk(_trunk_of(members), sorted(members, key=branch_point)))
    return trunks, alone


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


def seed_branch(trunk: TrialConfig, branch: TrialConfig) -> bool:
    """Give the branch the trunk's checkpoint at its branch point, unless it has checkpoints of its own
    (then it resumes from those). Returns False when the trunk has no such checkpoint (the trunk failed)."""
    root = checkpoint_root(branch)
    if (root / "latest").is_file():
        return True
    step = branch_point(branch)
    tag = f"step-{step:08d}"
    source = checkpoint_root(trunk) / tag
    if not (source / "ema.pt").is_file():
        return False
    prepare_checkpoint_root(root)  # 0700, as the trial itself would make it
    target = root / tag
    if target.exists():
        shutil.rmtree(target)  # a copy interrupted earlier: start it again
    shutil.copytree(source, target)
    (root / BRANCH_MARKER).write_text(json.dumps({"trunk": trunk.trial_id, "step": step}))
    (root / "latest").write_text(tag)  # last, as DeepSpeed does: the copy is complete
    return True
