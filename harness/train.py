"""One trial: the DeepSpeed training loop with EMA, checkpoints, automatic resume and metrics.

The same `train_trial` function runs alone (`ditscale train`), under `torchrun`, and as the loop
of each Ray Train worker (harness/sweep.py). Only rank 0 talks to MLflow.

Trial folder: `<resources.storage>/<study name>/<trial_id>/`
    checkpoints/<tag>/     DeepSpeed checkpoint (all ranks) + ema.pt (rank 0) + client state
    checkpoints/latest     DeepSpeed's pointer to the newest tag
"""

from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from harness.config import TrialConfig
from harness.distributed import DistInfo, broadcast_object, setup_distributed
from harness.engine import build_engine
from harness.hardware import peak_tflops

CHECKPOINTS = "checkpoints"


@dataclass
class TrialResult:
    status: str  # finished | failed: <reason> | killed
    step: int
    run_id: str | None
    metrics: dict = field(default_factory=dict)
    startup_s: float = 0.0


def trial_dir(trial: TrialConfig) -> Path:
    return Path(trial.resources.storage).resolve() / trial.name / trial.trial_id


def stop_file(trial: TrialConfig) -> Path:
    """Creating this file asks every running trial of the study to checkpoint and stop (Slurm's
    warning signal, a user's Ctrl-C on the sweep): the trials end as `killed` and resume later."""
    return Path(trial.resources.storage).resolve() / trial.name / "STOP"


class _StopFlag:
    """SIGTERM/SIGUSR1 (Slurm's warning signal, a preempting scheduler) -> checkpoint and stop cleanly."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def install(self) -> None:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return  # signals can only be handled on the main thread (Ray workers use their own path)
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def train_trial(
    trial: TrialConfig,
    *,
    parent_run_id: str | None = None,
    report: Callable[[dict, Path | None], None] | None = None,
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
    from harness.denoiser import build_denoiser, dataset_info
    from harness.trainer_data import TrainBatches
    from models.ema import EMA
    from models.objectives import build_objective

    started_at = started_at or time.time()
    phases = _Phases(started_at, early_marks)
    phases.mark("imports")
    dist = setup_distributed(use_gpu=trial.resources.gpus_per_worker > 0)
    phases.mark("process_group")
    folder = trial_dir(trial)
    ckpt_root = folder / CHECKPOINTS
    if dist.is_main:
        ckpt_root.mkdir(parents=True, exist_ok=True)

    # Identical initial weights on every rank; per-rank randomness (noise, timesteps) after.
    _seed_everything(trial.train.seed)
    frozen = None
    if trial.data.conditioning == "text" and trial.data.text_encoder not in ("builtin", "precomputed"):
        from harness.conditioning import load_frozen_encoder

        frozen = load_frozen_encoder(trial, dist.device)
    info = dataset_info(trial, frozen_encoder=frozen)
    objective = build_objective_for(trial, build_objective)
    denoiser, conditioner = build_denoiser(trial, info, dist.device, frozen_encoder=frozen)
    phases.mark("model")
    engine, _, scheduler = build_engine(denoiser, trial, dist.world_size)
    phases.mark("deepspeed")
    _register_input_cast(engine.module)
    gather = _zero3_gather if trial.train.zero_stage == 3 else None
    ema = EMA(engine.module, decay=trial.train.ema_decay, warmup=trial.train.ema_warmup, gather=gather)
    from harness.evaluate import Evaluator

    evaluator = Evaluator(trial, info, conditioner, objective, dist)

    # --- resume ---------------------------------------------------------------------------------
    opened_run = run_id
    step, samples_seen, resumes, saved_run = _resume(engine, ema, dist, ckpt_root, resume_from)
    run_id = opened_run or saved_run
    if step == 0:
        _seed_everything(trial.train.seed * 1000 + dist.rank + 1)
    phases.mark("resume")

    logger = None
    if dist.is_main:
        from harness.tracking import RunLogger, open_trial_run, resolve_tracking_uri

        uri = resolve_tracking_uri(trial.tracking.uri)
        if opened_run is None:
            run_id = open_trial_run(trial, uri, run_id=run_id, parent_run_id=parent_run_id)
        logger = RunLogger(uri, run_id, system_metrics=trial.tracking.system_metrics)
        # Model size as metrics, so analysis can fit loss against parameters and compute.
        logger.log_metrics({"params": float(info.params), "forward_gflops": info.forward_gflops}, step)
    if opened_run is None:
        run_id = broadcast_object(run_id)
    phases.mark("mlflow")

    batches = TrainBatches(trial, conditioner, dist, resume_count=resumes)
    stop = _StopFlag()
    stop.install()
    flops_per_image = 3 * 2 * info.forward_gflops * 1e9  # training FLOPs: 3 x forward, 2 per multiply-add
    peak = peak_tflops(dist.device, trial.train.precision)
    status, last = "finished", {}
    try:
        status, step, samples_seen, last = _loop(
            trial, dist, engine, scheduler, ema, objective, batches, logger, ckpt_root, report, stop,
            should_stop, step, samples_seen, run_id, resumes, flops_per_image, peak, info.forward_gflops,
            phases, evaluator,
        )
    except Exception as err:
        status = f"failed: {type(err).__name__}: {err}"
        raise
    finally:
        stop.restore()
        batches.close()
        # DeepSpeed's gradient hooks live on autograd nodes, which Python's garbage collector cannot
        # see: without this a process that trains trial after trial (the sweep's in-process trials)
        # keeps every finished trial's model and optimizer (~250 MB per DiT-XS trial, measured).
        engine.destroy()
        if logger is not None:
            logger.close(status)
    return TrialResult(status, step, run_id, last, last.get("startup_s", 0.0))


def _resume(engine, ema, dist: DistInfo, ckpt_root: Path, resume_from: dict | None):
    """Load the newest checkpoint, if any: (step, samples_seen, resumes, MLflow run id), else zeros.

    The trial folder's `latest` (written by DeepSpeed after a complete save) is preferred: Ray's
    pointer (`resume_from`) is the newest checkpoint Ray had recorded, which lags when a job was killed
    between a save and its report. The pointer serves when the folder has no `latest`."""
    if (ckpt_root / "latest").is_file():
        root, tag = str(ckpt_root), None
    elif resume_from is not None:
        root, tag = resume_from["root"], resume_from["tag"]
    else:
        return 0, 0, 0, None
    path, client = engine.load_checkpoint(root, tag=tag)
    if path is None:
        return 0, 0, 0, None
    tag_dir = Path(path).parent if Path(path).is_file() else Path(path)  # DeepSpeed returns a file
    ema.load_state_dict(torch.load(tag_dir / "ema.pt", weights_only=True, map_location="cpu"))
    _set_rng_state(client["rng"][dist.rank] if dist.rank < len(client["rng"]) else client["rng"][0])
    return client["step"], client["samples_seen"], client.get("resumes", 0) + 1, client.get("run_id")


class _Phases:
    """Where a trial's start-up time goes: wall-clock seconds from `started_at` to each mark."""

    def __init__(self, started_at: float, early: dict[str, float] | None = None):
        self.started_at, self.marks = started_at, dict(early or {})  # early: marks taken by the caller

    def mark(self, name: str) -> None:
        self.marks[name] = time.time() - self.started_at

    def total(self) -> float:
        return max(self.marks.values())

    def metrics(self) -> dict[str, float]:
        out, previous = {"startup_s": self.total()}, 0.0
        for name, at in self.marks.items():
            out[f"startup_{name}_s"] = at - previous  # duration of the phase that ended at this mark
            previous = at
        return out

    def summary(self) -> str:
        parts = [f"{k[len('startup_'):-2]} {v:.1f}" for k, v in self.metrics().items() if k != "startup_s"]
        return f"{self.total():.1f} s (" + ", ".join(parts) + ")"


def build_objective_for(trial: TrialConfig, build_objective):
    o = trial.objective
    if o.kind == "ddpm":
        return build_objective("ddpm")
    return build_objective(
        "rectified_flow", timestep_sampling=o.timestep_sampling, logit_mean=o.logit_mean, logit_std=o.logit_std,
        shift=o.shift, shift_training=o.shift_training,
    )


def _zero3_gather(params, modifier_rank=None):
    import deepspeed

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


def _loop(trial, dist: DistInfo, engine, scheduler, ema, objective, batches, logger, ckpt_root, report, stop,
          should_stop, step, samples_seen, run_id, resumes, flops_per_image, peak, forward_gflops,
          phases: "_Phases", evaluator=None):
    t = trial.train
    stop_path = stop_file(trial)
    accumulation = engine.gradient_accumulation_steps()
    global_batch = t.batch_size
    loss_sum = torch.zeros((), device=dist.device)
    loss_count = 0
    window_start, data_wait = time.perf_counter(), 0.0
    window_samples = 0
    last: dict = {}
    first_step_done = False
    engine.train()
    if step >= t.steps and evaluator is not None and evaluator.due(step, final=True):
        # Resumed from the final checkpoint: the trial was stopped or killed after it, maybe before or
        # during the final evaluation. Evaluating again gives the same numbers (fixed seeds).
        last.update(_evaluate(trial, engine, ema, evaluator, logger, step))
        if report is not None:
            report(dict(last), None)
    while step < t.steps:
        for _ in range(accumulation):
            wait_start = time.perf_counter()
            x0, cond = batches.next()
            data_wait += time.perf_counter() - wait_start
            if not first_step_done:
                phases.mark("first_batch")
            loss = objective.loss(engine, x0, cond)
            engine.backward(loss)
            engine.step()
            loss_sum += loss.detach().float()
            loss_count += 1
        step += 1
        samples_seen += global_batch
        window_samples += global_batch
        ema.update(engine.module)
        if not first_step_done:
            first_step_done = True
            phases.mark("first_step")
            last["startup_s"] = phases.total()
            if logger is not None:
                logger.log_metrics(phases.metrics(), step)
                print(f"[{trial.model_name} {trial.trial_id[:6]}] start-up {phases.summary()}", flush=True)

        # Stop requests (signal, stop file, caller) are agreed on by all ranks at log intervals,
        # where the loop syncs with the host anyway.
        stopping = step % t.log_every == 0 and _stop_requested(
            stop_path, dist, stop.requested or (should_stop is not None and should_stop()))
        log_now = step % t.log_every == 0 or step == t.steps or stopping
        ckpt_now = step % t.checkpoint_every == 0 or step == t.steps or stopping
        if log_now:
            elapsed = time.perf_counter() - window_start
            mean_loss = (loss_sum / max(1, loss_count)).item()  # the one host sync per log interval
            grad_norm = engine.get_global_grad_norm()
            img_s = window_samples / elapsed
            tflops = img_s * flops_per_image / 1e12
            metrics = {
                "loss": mean_loss,
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "img_per_s": img_s,
                "tflops": tflops,
                "mfu": tflops / (peak * dist.world_size) if peak else None,
                "data_wait_frac": data_wait / elapsed,
                "corrupt_samples": float(batches.corrupt_count()),
                "samples_seen": float(samples_seen),
                "train_gflops": 3 * forward_gflops * samples_seen,  # multiply-adds, DiT paper convention
                "step": float(step),
            }
            last.update({k: v for k, v in metrics.items() if v is not None})
            if logger is not None:
                logger.log_metrics(metrics, step)
                print(f"[{trial.model_name} {trial.trial_id[:6]}] step {step}/{t.steps} loss {mean_loss:.4f} "
                      f"lr {metrics['lr']:.2e} {img_s:.1f} img/s data-wait {100 * metrics['data_wait_frac']:.0f}%",
                      flush=True)
            loss_sum.zero_()
            loss_count, window_samples, data_wait = 0, 0, 0.0
            window_start = time.perf_counter()
            if not math.isfinite(mean_loss):
                return f"failed: non-finite loss at step {step}", step, samples_seen, last
        checkpoint = None
        if ckpt_now:
            checkpoint = _save_checkpoint(engine, ema, dist, ckpt_root, step, samples_seen, run_id, resumes)
        evaluated = evaluator is not None and not stopping and evaluator.due(step, final=step == t.steps)
        if evaluated:  # every rank: sampling is spread over them (harness/evaluate.py)
            eval_started = time.perf_counter()
            last.update(_evaluate(trial, engine, ema, evaluator, logger, step))
            window_start += time.perf_counter() - eval_started  # evaluation time is not training throughput
        if report is not None and (log_now or checkpoint is not None or evaluated):
            report(dict(last), checkpoint)
        if stopping:
            return "killed", step, samples_seen, last
    return "finished", step, samples_seen, last


def _evaluate(trial, engine, ema, evaluator, logger, step: int) -> dict[str, float]:
    """The EMA weights evaluated (every rank takes part); logged by rank 0. Returns the metrics."""
    with ema.swapped_into(engine.module):
        engine.module.eval()
        try:
            metrics, images = evaluator.run(engine.module, step)
        finally:
            engine.module.train()
    if logger is not None:
        logger.log_metrics(metrics, step)
        for name, image in images.items():
            logger.log_image(image, name)
        shown = {k: v for k, v in metrics.items() if k.startswith(("val_loss", "fid", "fd_"))}
        print(f"[{trial.model_name} {trial.trial_id[:6]}] eval at step {step}: "
              + " ".join(f"{k} {v:.4g}" for k, v in shown.items()) + f" ({metrics['eval_seconds']:.0f} s)", flush=True)
    return metrics


def _stop_requested(path: Path, dist: DistInfo, local: bool) -> bool:
    """Every rank must agree, or one would wait forever in the next collective: the ranks' views
    (a signal may reach one rank first; rank 0 looks at the file) are all-reduced."""
    import torch.distributed as tdist

    seen = float(local or (dist.is_main and path.exists()))
    if dist.world_size == 1:
        return bool(seen)
    flag = torch.tensor([seen], device=dist.device)
    tdist.all_reduce(flag)
    return bool(flag.item())


def _save_checkpoint(engine, ema, dist: DistInfo, root: Path, step, samples_seen, run_id, resumes) -> Path:
    """DeepSpeed checkpoint on all ranks; EMA (replicated) written by rank 0 beside it."""
    import torch.distributed as tdist

    tag = f"step-{step:08d}"
    rng = [None] * dist.world_size
    tdist.all_gather_object(rng, _rng_state())
    client = {"step": step, "samples_seen": samples_seen, "run_id": run_id, "resumes": resumes, "rng": rng}
    # EMA first, then DeepSpeed: DeepSpeed writes `latest` last, so a crash in between never
    # leaves `latest` pointing at a checkpoint without its EMA.
    path = root / tag
    if dist.is_main:
        path.mkdir(parents=True, exist_ok=True)
        torch.save(ema.state_dict(), path / "ema.pt")
    engine.save_checkpoint(str(root), tag=tag, client_state=client)
    return path
