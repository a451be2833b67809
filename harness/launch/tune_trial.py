"""One Tune trial of a sweep: a Ray Train TorchTrainer whose workers run harness/trial/loop.py's loop
on DeepSpeed (the driver is harness/launch/sweep.py).

Ray Train V2: a TorchTrainer cannot be handed to Tune; the Tune trial is a function that builds and
fits a TorchTrainer, and TuneReportCallback forwards the workers' metrics to Tune.

Start-up: Ray Train starts a controller and fresh worker processes for every fit, and each worker
then imports torch, DeepSpeed (which imports MLflow) and torch._dynamo — about 15 s per trial on a
2-core machine, whatever the model. Single-worker trials (the common case for small scaling-study
points) therefore run in Ray Train's local mode (ScalingConfig(num_workers=0)): the loop runs in the
Tune trial's own process, which Tune reuses from trial to trial (reuse_actors) and which holds the
worker's resources, so the second and later trials of a process start in well under a second. They
report to Tune directly, and a failed one is retried by Tune (FailureConfig) and resumes from its
trial folder's checkpoint. `resources.reuse_trial_process: false` turns this off; ZeRO-3 trials always
get their own worker (see runs_in_process).

Resume: within one invocation, a worker failure restarts the workers
(FailureConfig) and they reload the checkpoint named by `ray.train.get_checkpoint()` — a small
pointer to the DeepSpeed checkpoint, so gigabytes are never copied into Ray's storage.

Test knob: DITSCALE_FAULT_AT_STEP=k makes rank 0 of every trial raise once at step k (a marker file in
the trial folder makes it once), to exercise recovery; `k:ID` limits it to trials whose id starts with ID.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import tempfile
import time
from pathlib import Path

from harness.config import TrialConfig
from harness.errors import UserError
from harness.launch.branches import TRUNK_ROLE, seed_branch, trunk_checkpoint
from harness.tracking import BRANCH_OF_TAG, ROLE_TAG, RunLogger, mark_failed, open_trial_run, resolve_tracking_uri

POINTER_FILE = "deepspeed_checkpoint.json"
FAULT_ENV = "DITSCALE_FAULT_AT_STEP"


# --- the worker side -----------------------------------------------------------------------------


def _worker_loop(config: dict) -> None:
    """Runs in every Ray Train worker: the same loop as `ditscale train`, with Ray reporting."""
    entered = time.time()  # before the heavy imports (torch, DeepSpeed): start-up phase boundary
    import ray.train

    # Ray Train logs every report and checkpoint at INFO; the loop prints its own line per interval.
    logging.getLogger("ray.train").setLevel(logging.WARNING)

    from harness.trial.loop import train_trial

    trial = TrialConfig.model_validate(config["trial"])
    in_process = config.get("in_process", False)
    rank = 0 if in_process else ray.train.get_context().get_world_rank()
    probe = Path(config["storage_probe"])
    if not probe.is_file():
        raise UserError(f"resources.storage: {trial.resources.storage} is not visible from worker node "
                        f"{os.uname().nodename} (no {probe.name}); use a filesystem shared by all Ray nodes")

    resume_from = None
    checkpoint = None if in_process else ray.train.get_checkpoint()  # in-process: the trial folder's
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            resume_from = json.loads((Path(d) / POINTER_FILE).read_text())

    def report(metrics: dict, ckpt_dir: Path | None) -> None:
        fault_at, _, only = os.environ.get(FAULT_ENV, "").partition(":")
        if (fault_at and rank == 0 and metrics.get("step") == float(fault_at)
                and trial.trial_id.startswith(only)):
            marker = ckpt_dir.parent.parent / "fault-injected" if ckpt_dir else None
            if marker is not None and not marker.exists():
                marker.touch()
                raise RuntimeError(f"{FAULT_ENV}={fault_at}: injected worker failure")
        if in_process:
            # Ray Train's local mode keeps reports to itself: they go to Tune directly.
            from ray import tune

            tune.report(metrics)
        elif ckpt_dir is not None and rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                (Path(tmp) / POINTER_FILE).write_text(json.dumps({"root": str(ckpt_dir.parent),
                                                                  "tag": ckpt_dir.name}))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)

    early = {**config.get("early_marks", {}), "ray_workers": entered - config["started_at"]}
    with _process_group_scope(in_process):
        result = train_trial(trial, parent_run_id=config.get("parent_run_id"), report=report,
                             started_at=config["started_at"], resume_from=resume_from, early_marks=early,
                             run_id=config.get("run_id"))
    if result.status.startswith("failed"):
        raise RuntimeError(f"trial {trial.trial_id} {result.status}")


_TORCHRUN_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@contextlib.contextmanager
def _process_group_scope(in_process: bool):
    """In-process trials share their process with the trials after it: each leaves neither its
    process group (destroyed through DeepSpeed, which also drops the groups it cached) nor the
    torchrun variables (Ray's local mode would take them for a torchrun launch of its own)."""
    if not in_process:
        yield
        return
    saved = {k: os.environ.get(k) for k in _TORCHRUN_ENV}
    try:
        yield
    finally:
        import torch.distributed as tdist

        if tdist.is_initialized():
            import deepspeed.comm

            deepspeed.comm.destroy_process_group()
        import torch

        gc.collect()  # the finished trial's engine, optimizer state and loaders
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def storage_probe(trial: TrialConfig, parent_run_id: str) -> Path:
    """A file the driver writes into the study's storage folder; workers that cannot read it are on
    a node that does not share the filesystem (the trial folders must be shared)."""
    folder = Path(trial.resources.storage) / trial.name
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f".sweep-{parent_run_id}"
    probe.write_text(parent_run_id)
    return probe


_trials_in_this_process = 0


def _trial_start_time() -> float:
    """When this Tune trial began: its actor process's start for the first trial of the process,
    else now (Tune reuses trial actors)."""
    global _trials_in_this_process
    _trials_in_this_process += 1
    if _trials_in_this_process == 1:
        try:
            import psutil

            return psutil.Process().create_time()
        except Exception:  # psutil missing or /proc unreadable
            pass
    return time.time()


# --- the Tune trial ------------------------------------------------------------------------------


def runs_in_process(trial: TrialConfig) -> bool:
    """Single-worker trials, unless turned off, and not ZeRO-3: DeepSpeed's stage-3 engine keeps
    references (its parameter-partitioning context) that `engine.destroy()` does not release, so a
    reused process would keep every finished ZeRO-3 trial's model (measured: ~130 MB per DiT-XS trial)."""
    r = trial.resources
    return r.workers_per_trial == 1 and r.reuse_trial_process and trial.train.zero_stage != 3


def worker_resources(trial: TrialConfig) -> dict:
    r = trial.resources
    return {"CPU": r.cpus_per_worker} | ({"GPU": r.gpus_per_worker} if r.gpus_per_worker else {})


def trial_resources(trial: TrialConfig) -> dict:
    """What Tune reserves for the trial's own process: the worker's share when the trial trains in
    it; otherwise nothing the workers need (Tune refuses an all-zero request: a token 1 MiB)."""
    return worker_resources(trial) if runs_in_process(trial) else {"CPU": 0, "memory": 1024**2}


def conclude_branch(trial: TrialConfig, trunk: TrialConfig, uri: str, parent_run_id: str | None, status: str) -> str:
    """Record a branch that will not train in its own MLflow run (tagged branch_of, as a trained branch is):
    `diverged (trunk <id>)` when its trunk diverged at or before the branch point (branches.trunk_need; a
    concluded status: the report excludes it, a later sweep skips it), or `failed: <why>`. Returns the run
    id."""
    run_id = open_trial_run(trial, uri, parent_run_id=parent_run_id, tags={BRANCH_OF_TAG: trunk.trial_id})
    RunLogger(uri, run_id).close(status)
    return run_id


def run_tune_trial(config: dict, trials: dict | None = None, links: dict | None = None) -> None:
    """One Tune trial = one Ray Train run over the trial's workers. A branch first gets its trunk's
    checkpoint (links[trial_id]["trunk"]); runs are tagged as trunk or branch."""
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from harness.launch.ray_backend import DeepSpeedRendezvous

    started_at = _trial_start_time()
    config = {**config, "trial": trials[config["trial_id"]]}  # the full config travels beside Tune's table
    trial = TrialConfig.model_validate(config["trial"])
    # The run is opened here, in the Tune trial's process (reused from trial to trial, MLflow already
    # loaded) rather than in a fresh worker; found again by trial_id on a retry, never duplicated.
    uri = resolve_tracking_uri(trial.tracking.uri)
    link = (links or {}).get(trial.trial_id, {})
    tags = {ROLE_TAG: TRUNK_ROLE} if link.get("role") == "trunk" else {}
    trunk = TrialConfig.model_validate(link["trunk"]) if "trunk" in link else None
    if trunk is not None:
        tags[BRANCH_OF_TAG] = trunk.trial_id
    run_id = open_trial_run(trial, uri, parent_run_id=config.get("parent_run_id"), tags=tags)
    if trunk is not None and not seed_branch(trunk, trial):
        # The driver settles branches whose trunk cannot serve them before Ray (sweep.settle_branches):
        # reaching this means the checkpoint went away since.
        reason = f"its trunk's checkpoint {trunk_checkpoint(trunk, trial)} is missing (removed during the sweep?)"
        mark_failed(uri, run_id, reason)
        raise RuntimeError(f"trial {trial.trial_id}: {reason}")
    r = trial.resources
    use_gpu = r.gpus_per_worker > 0
    in_process = runs_in_process(trial)
    trainer = TorchTrainer(
        _worker_loop,
        # The trial starts when Tune starts its actor process (the trial's own start-up included).
        train_loop_config={**config, "started_at": started_at, "run_id": run_id, "in_process": in_process,
                           "early_marks": {"tune_trial": time.time() - started_at}},
        torch_config=DeepSpeedRendezvous(backend="nccl" if use_gpu else "gloo"),
        # num_workers=0 is Ray Train's local mode: the loop runs here, in this (reused) process, which
        # Tune gave the worker's resources (see trial_resources).
        scaling_config=ray.train.ScalingConfig(num_workers=0 if in_process else r.workers_per_trial,
                                               use_gpu=use_gpu, resources_per_worker=worker_resources(trial)),
        run_config=ray.train.RunConfig(
            name=f"{trial.name}-{trial.trial_id}",
            storage_path=str(Path(r.storage).resolve() / "_ray"),
            failure_config=ray.train.FailureConfig(max_failures=r.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=[TuneReportCallback()],
        ),
    )
    try:
        trainer.fit()
    except Exception as err:  # e.g. workers that never reached the loop (storage not shared)
        mark_failed(uri, run_id, f"{type(err).__name__}: {err}")
        raise
