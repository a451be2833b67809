"""One trial: the DeepSpeed training loop with EMA, checkpoints, automatic resume, evaluation and metrics.

The same `train_trial` runs alone (`ditscale train`), under `torchrun`, and as the loop of each Ray
Train worker (harness/launch/sweep.py). Only rank 0 talks to MLflow. It reads top to bottom:

    train_trial         set up (process group, model, DeepSpeed engine, EMA, resume, MLflow run), then
    Trainer.run         per step: train_step; at its interval each of log, checkpoint, evaluate, report

Checkpoints (harness/trial/checkpoint.py) live in the trial folder (harness/paths.py).
"""

from __future__ import annotations

import random
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as tdist

from harness.common.process_group import DistInfo, broadcast_object, setup_distributed
from harness.config import TrialConfig
from harness.evaluation.evaluator import Evaluator
from harness.hardware import achieved_tflops, peak_tflops
from harness.paths import checkpoint_root, stop_file, trial_dir
from harness.tracking import RunLogger, open_trial_run, resolve_tracking_uri
from harness.trial.batches import TrainBatches
from harness.trial.build import build_trial
from harness.trial.checkpoint import (
    TrialState,
    came_from_trunk,
    prepare_checkpoint_root,
    record_rewind,
    resume,
    save_checkpoint,
)
from harness.trial.engine import build_engine
from harness.trial.posthoc_ema import EMAChoice, PosthocEMA, ema_chooser, log_ema_choice
from harness.trial.startup import StartupPhases
from harness.trial.stopping import StopRequests
from models.ema import EMA
from models.flops import training_gflops

Report = Callable[[dict, "Path | None"], None]
ChooseEMA = Callable[[torch.nn.Module, int], EMAChoice]


@dataclass
class TrialResult:
    status: str  # finished | failed: <reason> | killed
    step: int
    run_id: str | None
    metrics: dict = field(default_factory=dict)
    startup_s: float = 0.0


def train_trial(
    trial: TrialConfig,
    *,
    parent_run_id: str | None = None,
    report: Report | None = None,
    started_at: float | None = None,
    should_stop: Callable[[], bool] | None = None,
    resume_from: dict | None = None,
    early_marks: dict[str, float] | None = None,
    run_id: str | None = None,
) -> TrialResult:
    """Train one trial to `train.steps`, resuming from its latest checkpoint when there is one.

    report(metrics, checkpoint_dir) is called on every rank at each log interval (checkpoint_dir set
    when a checkpoint was just written) — the Ray Train worker passes `ray.train.report` through it.
    started_at is a wall-clock time (time.time()) when the trial began, for `startup_s`.
    resume_from {"root", "tag"} names a DeepSpeed checkpoint (from Ray's checkpoint pointer); without
    it the trial folder's newest checkpoint is used, if any. early_marks {phase: seconds since
    started_at} are start-up phases the caller timed (the sweep: Tune trial, Ray Train workers).
    run_id is the trial's MLflow run when the caller opened it (the sweep does, in its warm Tune trial
    process); without it rank 0 opens or finds the run itself.
    """
    phases = StartupPhases(started_at or time.time(), early_marks)
    phases.mark("imports")
    dist = setup_distributed(use_gpu=trial.resources.gpus_per_worker > 0)
    phases.mark("process_group")
    ckpt_root = checkpoint_root(trial)
    if dist.is_main:
        prepare_checkpoint_root(ckpt_root)  # the trial folder and checkpoints/: mode 0700

    _seed_everything(trial.train.seed)  # identical initial weights on every rank
    built = build_trial(trial, dist.device)
    phases.mark("model")
    engine, _, scheduler = build_engine(built.denoiser, trial, dist.world_size)
    phases.mark("deepspeed")
    _register_input_cast(engine.module)
    gather = _zero3_gather if trial.train.zero_stage == 3 else None
    ema = EMA(engine.module, decay=trial.train.ema_decay, warmup=trial.train.ema_warmup, gather=gather)
    posthoc = (PosthocEMA(trial, trial_dir(trial), engine.module, dist.is_main, gather=gather)
               if trial.train.posthoc_ema.sigma_rels else None)  # train.posthoc_ema: EDM2's profiles, snapshots
    evaluator = Evaluator(trial, built.info, built.conditioner, built.objective, dist)

    choose_ema = ema_chooser(trial, built, dist, trial_dir(trial), gather) if trial.eval.ema_sigma_rels else None
    state = resume(engine, ema, dist, ckpt_root, resume_from, phema=posthoc.ema if posthoc else None)
    if came_from_trunk(ckpt_root, state.step):
        state.run_id = None  # the trunk's run: a branch logs into its own
    state.run_id = run_id or state.run_id
    if state.step == 0:
        _seed_everything(trial.train.seed * 1000 + dist.rank + 1)  # per-rank noise and timesteps
    phases.mark("resume")

    hostnames = _worker_hostnames()  # every rank takes part
    logger = None
    if dist.is_main:
        uri = resolve_tracking_uri(trial.tracking.uri)
        if run_id is None:
            state.run_id = open_trial_run(trial, uri, run_id=state.run_id, parent_run_id=parent_run_id)
        logger = RunLogger(uri, state.run_id, system_metrics=trial.tracking.system_metrics)
        record_rewind(logger.client, state.run_id, state.step)  # before logging: a rewound trunk logs steps again
        # Model size as metrics, so analysis can fit loss against parameters and compute.
        logger.log_metrics({"params": float(built.info.params), "forward_gflops": built.info.forward_gflops},
                           state.step)
        # A tag, not a param: a resumed trial may run on other hosts.
        logger.set_tag("worker_hostnames", ",".join(hostnames))
    if run_id is None:
        state.run_id = broadcast_object(state.run_id)
    phases.mark("mlflow")

    batches = TrainBatches(trial, built.conditioner, dist, resume_count=state.resumes)
    trainer = Trainer(trial, dist, engine, scheduler, ema, built.objective, batches, evaluator, logger, report,
                      state, phases, built.info.forward_gflops, posthoc=posthoc, choose_ema=choose_ema)
    status = "finished"
    try:
        with StopRequests(stop_file(trial), dist, should_stop) as stops:
            status = trainer.run(stops)
    except Exception as err:
        status = f"failed: {type(err).__name__}: {err}"
        raise
    finally:
        batches.close()
        # DeepSpeed's gradient hooks live on autograd nodes, which Python's garbage collector cannot
        # see: without this a process that trains trial after trial (the sweep's in-process trials)
        # keeps every finished trial's model and optimizer (~250 MB per DiT-XS trial, measured).
        engine.destroy()
        if logger is not None:
            logger.close(status)
    last = trainer.last
    return TrialResult(status, state.step, state.run_id, last, last.get("startup_s", 0.0))


class ThroughputWindow:
    """Loss and speed over one log interval. The loss is summed on the device: reading it (`close`)
    is the one host sync per interval, and its mean is taken over every rank, so all ranks log (and
    judge divergence on) the same number."""

    def __init__(self, dist: DistInfo):
        self.dist = dist
        self.loss_sum = torch.zeros((), device=dist.device)
        self.reset()

    def reset(self) -> None:
        self.loss_sum.zero_()
        self.losses, self.steps, self.samples, self.data_wait = 0, 0, 0, 0.0
        self.started = time.perf_counter()

    def exclude(self, seconds: float) -> None:
        """Time spent on something else (evaluation) is not training throughput."""
        self.started += seconds

    def mean_loss(self) -> float:
        """The window's mean loss so far over every rank (a collective and a host sync)."""
        total = torch.stack([self.loss_sum, torch.tensor(float(self.losses), device=self.loss_sum.device)])
        if self.dist.world_size > 1:
            tdist.all_reduce(total)
        return (total[0] / total[1].clamp(min=1)).item()

    def close(self) -> dict:
        elapsed = time.perf_counter() - self.started
        out = {"loss": self.mean_loss(), "img_per_s": self.samples / elapsed,
               "data_wait_frac": self.data_wait / elapsed, "steps": self.steps}
        self.reset()
        return out


class Trainer:
    """The loop of one trial, built by train_trial. Each `run` iteration is a train_step, then at their
    intervals the named steps log, checkpoint and evaluate, and a report to the caller (Ray)."""

    def __init__(self, trial: TrialConfig, dist: DistInfo, engine, scheduler, ema: EMA, objective,
                 batches: TrainBatches, evaluator: Evaluator, logger: RunLogger | None, report: Report | None,
                 state: TrialState, phases: StartupPhases, forward_gflops: float, posthoc: PosthocEMA | None = None,
                 choose_ema: ChooseEMA | None = None):
        self.trial, self.dist, self.engine, self.scheduler, self.ema = trial, dist, engine, scheduler, ema
        self.objective, self.batches, self.evaluator, self.logger, self.report = (
            objective, batches, evaluator, logger, report)
        self.state, self.phases, self.forward_gflops = state, phases, forward_gflops
        self.posthoc, self.choose_ema = posthoc, choose_ema
        self.cfg = trial.train
        self.peak = peak_tflops(dist.device, self.cfg.precision)
        self.window = ThroughputWindow(dist)
        self.ckpt_root = checkpoint_root(trial)
        self.tag = f"[{trial.model_name} {trial.trial_id[:6]}]"
        self.last: dict = {}  # the newest value of every metric, for the caller
        self.judged_ahead: float | None = None  # the loss of step 1 when _judge_first_step judged it alone

    def run(self, stops: StopRequests) -> str:
        """Train to train.steps. Returns the status: finished | killed | diverged: <why>."""
        cfg, state = self.cfg, self.state
        self.engine.train()
        if state.step >= cfg.steps and self.evaluator.due(state.step, final=True):
            # Resumed from the final checkpoint: the trial was stopped or killed after it, maybe before or
            # during the final evaluation. Evaluating again gives the same numbers (fixed seeds).
            self.evaluate(final=True)
            self._report(None)
        self.window.reset()
        while state.step < cfg.steps:
            self.train_step()
            # Stop requests are agreed on by all ranks at log intervals, where the loop syncs anyway.
            stopping = state.step % cfg.log_every == 0 and stops.agreed()
            final = state.step == cfg.steps
            logged = state.step % cfg.log_every == 0 or final or stopping
            if not logged and state.step == 1 and state.smoothed_loss.steps == 0:
                logged = self._judge_first_step()  # a non-finite first loss is logged and stops the trial
            if logged and (diverged := self.log()):
                return diverged
            checkpoint = None
            if state.step % cfg.checkpoint_every == 0 or final or stopping or state.step in cfg.save_at:
                checkpoint = save_checkpoint(self.engine, self.ema, self.dist, self.ckpt_root, state,
                                             keep=cfg.keep_checkpoints, also_keep=cfg.save_at,
                                             phema=self.posthoc.ema if self.posthoc else None)
            evaluated = not stopping and self.evaluator.due(state.step, final=final)
            if evaluated:  # every rank: sampling is spread over them
                eval_started = time.perf_counter()
                self.evaluate(final=final)
                self.window.exclude(time.perf_counter() - eval_started)
            if logged or checkpoint is not None or evaluated:
                self._report(checkpoint)
            if stopping:
                return "killed"
        return "finished"

    def train_step(self) -> None:
        """One optimizer step: gradient accumulation over micro-batches, then the EMA update."""
        first = "startup_s" not in self.last  # the first step of this process (resumed or not)
        for _ in range(self.engine.gradient_accumulation_steps()):
            wait_started = time.perf_counter()
            x0, cond = self.batches.next()
            self.window.data_wait += time.perf_counter() - wait_started
            if first and "first_batch" not in self.phases.marks:
                self.phases.mark("first_batch")
            loss = self.objective.loss(self.engine, x0, cond)
            self.engine.backward(loss)
            self.engine.step()
            self.window.loss_sum += loss.detach().float()
            self.window.losses += 1
        self.state.step += 1
        self.state.samples_seen += self.cfg.batch_size
        self.window.samples += self.cfg.batch_size
        self.window.steps += 1
        if self.posthoc is None:
            self.ema.update(self.engine.module)
        else:  # every rank: both EMAs from one ZeRO-3 gather; rank 0 writes the snapshots
            self.posthoc.update(self.engine.module, self.state.step, running=self.ema)
        if first:
            self.phases.mark("first_step")
            self.last["startup_s"] = self.phases.total()
            if self.logger is not None:
                self.logger.log_metrics(self.phases.metrics(), self.state.step)
                print(f"{self.tag} start-up {self.phases.summary()}", flush=True)

    def log(self) -> str | None:
        """Close the throughput window and log it (rank 0). Returns the `diverged: ...` status when the
        loss is not finite or its moving average rose above train.divergence_factor x its minimum, else None."""
        window, state = self.window.close(), self.state
        grad_norm = self.engine.get_global_grad_norm()
        tflops = achieved_tflops(window["img_per_s"], self.forward_gflops)
        metrics = {
            "loss": window["loss"],
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "img_per_s": window["img_per_s"],
            "tflops": tflops,
            "mfu": tflops / (self.peak * self.dist.world_size) if self.peak else None,
            "data_wait_frac": window["data_wait_frac"],
            "corrupt_samples": float(self.batches.corrupt_count()),
            "samples_seen": float(state.samples_seen),
            "train_gflops": training_gflops(self.forward_gflops, state.samples_seen),
            "step": float(state.step),
        }
        self.last.update({k: v for k, v in metrics.items() if v is not None})
        if self.logger is not None:
            self.logger.log_metrics(metrics, state.step)
            print(f"{self.tag} step {state.step}/{self.cfg.steps} loss {window['loss']:.4f} "
                  f"lr {metrics['lr']:.2e} {window['img_per_s']:.1f} img/s "
                  f"data-wait {100 * window['data_wait_frac']:.0f}%", flush=True)
        loss, steps = window["loss"], window["steps"]
        judged, self.judged_ahead = self.judged_ahead, None
        if judged is not None and steps > 1:  # step 1 was judged already: the rest of the window
            loss, steps = (loss * steps - judged) / (steps - 1), steps - 1
        return self._divergence(loss, steps)

    def _judge_first_step(self) -> bool:
        """A fresh trial's first step is judged on its own (one extra host sync, once per trial), so the
        divergence rule's minimum starts at the initial loss even when train.log_every is large: a loss
        that blows up within the first log window is then still caught. True when it stopped the trial."""
        loss = self.window.mean_loss()
        if self._divergence(loss, 1) is not None:
            return True
        self.judged_ahead = loss
        return False

    def _divergence(self, loss: float, steps: int) -> str | None:
        """Every rank decides alike: `loss` is the window's mean over all ranks, `steps` its optimizer
        steps. The rule and its estimator: harness/trial/divergence.py (its state is in the checkpoint,
        so a resumed trial judges alike)."""
        return self.state.smoothed_loss.judge(loss, steps, self.cfg.divergence_factor, self.state.step)

    def evaluate(self, final: bool = False) -> None:
        """The EMA weights evaluated (every rank takes part); logged by rank 0. The final evaluation of a
        trial with eval.ema_sigma_rels evaluates instead the post-hoc EMA whose width had the lowest
        validation loss (so its val_loss, FID/FD, ... are the best width's, and the report uses them)."""
        module = self.engine.module
        weights, choice = self.ema, None
        module.eval()
        try:
            if final and self.choose_ema is not None:
                choice = self.choose_ema(module, self.state.step)
                weights = choice.weights
            with weights.swapped_into(module):
                metrics, images = self.evaluator.run(module, self.state.step)
        finally:
            module.train()
        if choice is not None:
            metrics.update(choice.metrics())
            self._log_ema_choice(choice)
        self.last.update(metrics)
        if self.logger is not None:
            self.logger.log_metrics(metrics, self.state.step)
            for key, value in self.evaluator.tags().items():  # the FD's detector: comparable FDs only
                self.logger.set_tag(key, value)
            self.logger.log_evaluation_artifacts(images)
            shown = {k: v for k, v in metrics.items() if k.startswith(("val_loss", "fid", "fd_"))}
            print(f"{self.tag} eval at step {self.state.step}: " + " ".join(f"{k} {v:.4g}" for k, v in shown.items())
                  + f" ({metrics['eval_seconds']:.0f} s)", flush=True)

    def _log_ema_choice(self, choice: EMAChoice) -> None:
        """Rank 0: the param eval.ema_sigma_rel_best and a tag saying the final evaluation used it."""
        if self.logger is None:
            return
        log_ema_choice(self.logger, choice, lambda line: print(f"{self.tag} {line}", flush=True))

    def _report(self, checkpoint: Path | None) -> None:
        if self.report is not None:
            self.report(dict(self.last), checkpoint)


def _worker_hostnames() -> list[str]:
    """Every rank's host name, in rank order (a collective: every rank calls it)."""
    name = socket.gethostname()
    if not tdist.is_initialized() or tdist.get_world_size() == 1:
        return [name]
    names: list = [None] * tdist.get_world_size()
    tdist.all_gather_object(names, name)
    return names


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _zero3_gather(params, modifier_rank=None):
    import deepspeed  # loaded by then: the engine is built

    return deepspeed.zero.GatheredParameters(list(params), modifier_rank=modifier_rank)


def _register_input_cast(module: torch.nn.Module) -> None:
    """Cast floating inputs to the weights' dtype (bf16/fp16 engines) and outputs back to fp32, so
    objectives compute noise, targets and losses in fp32 whatever the training precision."""
    dtype = next(module.parameters()).dtype
    if dtype == torch.float32:
        return

    def cast_in(_, args, kwargs):
        conv = lambda v: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v  # noqa: E731
        return tuple(conv(a) for a in args), {k: conv(v) for k, v in kwargs.items()}

    module.register_forward_pre_hook(cast_in, with_kwargs=True)
    module.register_forward_hook(lambda _, __, out: out.float())
