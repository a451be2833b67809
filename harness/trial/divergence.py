"""When a trial has diverged: its loss is not finite, or its *smoothed* loss rose above
`train.divergence_factor` x the lowest smoothed loss seen so far.

The estimator is an exponential moving average of the per-step training loss with a time constant of
SMOOTHING_STEPS optimizer steps, bias-corrected as Adam's moments are (Kingma & Ba 2015, section 3:
divide by 1 - decay^steps, so the first steps are an average of what was seen, not pulled towards 0),
judged only after WARMUP_STEPS steps (the first steps' average is a few batches; Adam's first updates
can raise the loss for a moment). Its minimum is taken from the first step on, so a loss that blows up
during the warm-up and stays finite is still caught when the warm-up ends.

Why smoothed: a diffusion loss at a small batch is very noisy from step to step — DDPM's loss at
batch 32 with uniform timesteps has a step-to-step standard deviation of ~35 % of its mean (a DiT-XXS on
the digits, measured), so the lowest single window of a few hundred steps is far below the loss's
level, and a rule on single windows against their running minimum fired on healthy trials (issue 26:
"loss 0.1736 > 3 x its running minimum 0.0544" at step 122 of a healthy trunk). An EMA over N steps has
a standard deviation of about sd / sqrt(2N - 1) (~3.5 % of the mean at N = 50), so its running minimum
sits close to the loss's true level. Why an EMA rather than a running median: it needs two numbers of
state (kept in the checkpoint, so a resumed trial judges alike), it weights log windows by their steps
whatever `train.log_every` is, and a real divergence — a loss that grows by orders of magnitude —
crosses the threshold within a few steps, where a median waits for half its window whatever the size
of the jump. A single outlier step moves the EMA by 1/N of its size: harmless. A jump to r x the
loss's level (r > factor) crosses the threshold after N ln((r - 1) / (r - factor)) steps: 4 steps for
r = 30, 55 for r = 4 (at factor 3).

Measured (tests/trial/test_divergence_and_branches.py, on the real traces in tests/data/loss_traces.json):
on 8 healthy DDPM and rectified-flow runs at batch 32 (4,037 steps; at log_every 1, 5 and 20) it never
fired, the smoothed loss rising at most 1.21 x its minimum (1.12 at the usual learning rates); the
single-window rule fired on 5 of them (DDPM at steps 77-136). On 8 runs that blow up (learning rate
30x-50,000x) it stopped each at the non-finite step (3-4) or at the end of the warm-up (step 20), 1-18
steps after the loss left its level, at log_every 1, 5, 10 and 20.

A non-finite loss stops the trial at once, warm-up or not. The judgement uses the window loss that the
loop reads anyway (one host sync per log interval), plus, once per fresh trial, the loss of its first
step on its own (harness/trial/loop.py: Trainer._judge_first_step), so the minimum starts at the initial
loss even when `train.log_every` is large: a blow-up inside the first log window is still caught.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

SMOOTHING_STEPS = 50   # EMA time constant in optimizer steps (decay 1 - 1/50 per step)
WARMUP_STEPS = 20      # steps averaged before the smoothed loss is judged


@dataclass
class SmoothedLoss:
    """The estimator's state (it travels in the checkpoint's trial state)."""

    ema: float = 0.0           # the moving average before bias correction
    steps: int = 0             # optimizer steps averaged so far
    minimum: float = math.inf  # lowest bias-corrected average seen so far

    @property
    def value(self) -> float:
        """The bias-corrected moving average (NaN before any step)."""
        if self.steps == 0:
            return math.nan
        return self.ema / (1.0 - _decay() ** self.steps)

    def update(self, loss: float, steps: int) -> None:
        """Fold in the mean loss of a window of `steps` optimizer steps (a log interval): the window
        counts as `steps` updates with its mean, so the average does not depend on train.log_every."""
        steps = max(1, steps)
        keep = _decay() ** steps
        self.ema = keep * self.ema + (1.0 - keep) * loss
        self.steps += steps

    def judge(self, loss: float, steps: int, factor: float | None, at_step: int) -> str | None:
        """Update with a window (`steps` steps, mean `loss`, ending at optimizer step `at_step`) and
        return `diverged: <why> at step N` or None. `factor` None or 0: only non-finite losses stop."""
        if not math.isfinite(loss):
            return f"diverged: non-finite loss ({loss}) at step {at_step}"
        self.update(loss, steps)
        smoothed = self.value
        if factor and self.steps >= WARMUP_STEPS and smoothed > factor * self.minimum:
            return (f"diverged: smoothed loss {smoothed:.4g} > {factor:g} x its minimum {self.minimum:.4g} "
                    f"(moving average over ~{SMOOTHING_STEPS} steps) at step {at_step}")
        self.minimum = min(self.minimum, smoothed)
        return None

    def to_dict(self) -> dict:
        return {"ema": self.ema, "steps": self.steps, "minimum": self.minimum}

    @classmethod
    def from_dict(cls, data: dict | None) -> "SmoothedLoss":
        if not data:
            return cls()
        return cls(ema=float(data["ema"]), steps=int(data["steps"]), minimum=float(data["minimum"]))


# The step that SmoothedLoss.judge names at the end of every `diverged: ...` status it returns.
_DIVERGED_AT = re.compile(r"diverged: .* at step (\d+)")


def divergence_step(status: str) -> int | None:
    """The optimizer step at which a trial stopped as diverged, read from its status (the MLflow tag
    ditscale.status, written from judge's message); None for any other status, or one without a step."""
    match = _DIVERGED_AT.fullmatch(status.strip())
    return int(match.group(1)) if match else None


def _decay() -> float:
    return 1.0 - 1.0 / SMOOTHING_STEPS


def first_alarm(losses, factor: float | None, log_every: int = 1) -> int | None:
    """The step at which a fresh trial with these per-step losses would stop as diverged (None: never),
    judged as harness/trial/loop.py judges it: step 1 alone, then windows of `log_every` steps (their
    mean; the first window without step 1). For measuring the rule on recorded traces (tests, README)."""
    judge = SmoothedLoss()
    if losses and judge.judge(losses[0], 1, factor, 1) is not None:
        return 1
    for end in range(log_every, len(losses) + 1, log_every):
        window = losses[max(1, end - log_every):end]
        if window and judge.judge(sum(window) / len(window), len(window), factor, end) is not None:
            return end
    return None
