"""Issue 19: a host lost in the middle of a study, on the namespace cluster (tests/slurm/test_netns_cluster.py).

`slurm/testing/netns-host.sh lose` kills every process of one host at once (its slurmd, the job steps
and everything they started: Ray's raylet, its workers, the trials), as a machine losing power.

1. A worker host (host 3) while a trial trains there, past a checkpoint: Ray declares the node dead,
   Tune runs the trial again on the hosts left, and it resumes from its newest checkpoint. Slurm
   declares the node DOWN while the job runs (SlurmdTimeout is 45 s on this cluster) and, with
   `#SBATCH --no-kill`, the job goes on without it and completes.
2. Host 3 returns (netns-host.sh return). A two-host job loses its head's host (Ray's head, the sweep's
   driver, the batch shell): the job cannot go on. Slurm takes the node out of the job (--no-kill), the
   other host's Ray worker finds its head gone and requeues the job, which runs again on the two hosts
   up (the one left and host 3) and resumes every unfinished trial from its checkpoint, in the same
   MLflow runs and the same parent run.

Both: each trial has exactly one MLflow run, FINISHED, and an interrupted trial trained again at most
one checkpoint interval of steps (counted from the steps it logged: every step is logged).
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.support import ROOT, ditscale, tiny_study, write_study
from tests.support.netns import SBIN, submitted
from tests.support.slurm import FINAL_STATES, Job, assert_one_finished_run_per_trial, job_info, slurm

HOST_SCRIPT = ROOT / "slurm" / "testing" / "netns-host.sh"
EVERY = 10   # train.checkpoint_every
STEPS = 60   # per trial; at batch 16 each trial trains for 15-40 s on this machine


def _study(digits: Path, folder: Path, name: str, trials: int) -> Path:
    folder.mkdir()
    return write_study(folder / "study.yaml", tiny_study(
        digits, name, train={"steps": STEPS, "batch_size": 16, "log_every": 1, "checkpoint_every": EVERY},
        resources={"cpus_per_worker": 1, "max_concurrent_trials": 3},
        grid={"train.seed": list(range(trials))}))


def _submit(cluster: dict, study: Path, nodes: int) -> Job:
    # A worker's Ray gives its lost head 10 s instead of Ray's 60 (gcs_rpc_server_reconnect_timeout_s),
    # through the job's environment: the worker must requeue the job before Slurm declares the head node
    # DOWN (45 s here, SlurmdTimeout; 300 s by default) and kills the workers' step with it.
    proc = ditscale("slurm", "submit", str(study), "--nodes", str(nodes), "--cpus-per-task", "1", cwd=study.parent,
                    env={"SLURM_CONF": cluster["conf"], "RAY_gcs_rpc_server_reconnect_timeout_s": "10"})
    return submitted(cluster, proc)


def _host(cluster: dict, action: str, i: int) -> None:
    proc = subprocess.run([str(HOST_SCRIPT), action, str(cluster["state"]), str(i)], capture_output=True, text=True,
                          timeout=60, env={"PATH": SBIN})
    assert proc.returncode == 0, f"netns-host.sh {action} {i}: {proc.stderr}"


def _client(study: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{study.parent / 'mlflow.db'}")


def _checkpoint_step(study: Path, name: str, trial_id: str) -> int:
    latest = study.parent / "runs" / name / trial_id / "checkpoints" / "latest"
    try:
        return int(latest.read_text().strip().rsplit("-", 1)[-1])
    except (OSError, ValueError):
        return -1


def _training_past_a_checkpoint(study: Path, name: str, host: str | None = None) -> dict:
    """{trial_id: run} of the trials now training (on `host`, if given) that have a checkpoint and have
    logged a step after it (so that losing them now loses steps)."""
    c = _client(study)
    try:
        exp = c.get_experiment_by_name(name)
    except Exception:  # the store is being created
        return {}
    if exp is None:
        return {}
    found = {}
    for run in c.search_runs([exp.experiment_id], filter_string="tags.trial_id != '' and attributes.status = 'RUNNING'"):
        tid = run.data.tags["trial_id"]
        if host is not None and run.data.tags.get("worker_hostnames") != host:
            continue
        ckpt = _checkpoint_step(study, name, tid)
        if ckpt >= EVERY and run.data.metrics.get("step", 0) > ckpt:
            found[tid] = run
    return found


def _wait(what: str, job: Job, ready, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while True:
        value = ready()
        if value:
            return value
        if job_info(job.conf, job.id).get("JobState") in FINAL_STATES:
            job.fail(f"ended while waiting for {what}")
        if time.monotonic() > deadline:
            job.fail(f"no {what} within {timeout:.0f}s")
        time.sleep(0.5)


def _restarts(client, run) -> tuple[list[int], list[int]]:
    """(the steps at which the trial's processes started, from its startup_s metric; the steps it logged
    more than once, i.e. trained again after a restart)."""
    starts = sorted(m.step for m in client.get_metric_history(run.info.run_id, "startup_s"))
    counts = Counter(m.step for m in client.get_metric_history(run.info.run_id, "loss"))
    return starts, sorted(step for step, n in counts.items() if n > 1)


def _assert_resumed_within_one_interval(client, run, label: str) -> str:
    starts, again = _restarts(client, run)
    assert len(starts) >= 2, f"{label}: the trial never started again (startup_s at steps {starts})"
    # It resumed from a checkpoint (not from step 1), and lost at most one checkpoint interval.
    assert starts[-1] > EVERY and (starts[-1] - 1) % EVERY == 0, f"{label}: restarted at step {starts[-1]}"
    assert len(again) <= EVERY and again == list(range(starts[-1], starts[-1] + len(again))), (
        f"{label}: steps trained twice: {again} (checkpoint every {EVERY}, restarted at step {starts[-1]})")
    return f"restarted at step {starts[-1]}, {len(again)} step(s) trained twice"


@pytest.mark.slow
def test_losing_a_worker_host_then_the_head_host(netns_cluster, digits_dir, tmp_path):
    cluster, name = netns_cluster, netns_cluster["name"]
    digits = digits_dir
    notes = []

    # --- 1. a worker host ------------------------------------------------------------------------
    study = _study(digits, tmp_path / "worker", "hostloss-worker", trials=4)
    t0 = time.monotonic()
    job = _submit(cluster, study, 3)
    try:
        victims = _wait("a trial on host 3 past a checkpoint", job,
                        lambda: _training_past_a_checkpoint(study, "hostloss-worker", f"{name}-h3"))
        (victim, before), = victims.items()
        _host(cluster, "lose", 3)
        t_lost = time.monotonic()
        state = job.wait_done(timeout=600)["JobState"]
    finally:
        if job_info(job.conf, job.id).get("JobState") not in FINAL_STATES:
            job.cancel()
    if state != "COMPLETED":
        job.fail(f"ended {state} after host 3 was lost")
    # Slurm declared h3 DOWN while the job ran, and (--no-kill) took it out of the job instead of ending it.
    ctld = (cluster["state"] / "slurmctld.log").read_text(errors="replace")
    assert f"Removing failed node h3 from JobId={job.id}" in ctld, ctld[-3000:]
    log = job.text()
    assert "nodes lost during the job: 3 allocated, 2 left" in log, log[-3000:]
    client, runs, _ = assert_one_finished_run_per_trial(study)
    run = next(r for r in runs if r.data.tags["trial_id"] == victim)
    assert f"{name}-h3" not in run.data.tags["worker_hostnames"], "the lost trial did not move to another host"
    notes.append(f"worker host lost at step {int(before.data.metrics['step'])} of trial {victim[:8]}: "
                 f"{_assert_resumed_within_one_interval(client, run, victim)} on {run.data.tags['worker_hostnames']}; "
                 f"job COMPLETED {time.monotonic() - t_lost:.0f}s after the loss ({time.monotonic() - t0:.0f}s in all)")

    # Host 3 comes back (repaired): its slurmd registers again; Slurm uses the node once it is idle.
    _host(cluster, "return", 3)

    # --- 2. the head's host ----------------------------------------------------------------------
    study = _study(digits, tmp_path / "head", "hostloss-head", trials=2)
    t0 = time.monotonic()
    job = _submit(cluster, study, 2)
    try:
        # (Start-ups differ by tens of seconds under load: one trial may be far ahead of the other.)
        _wait("a trial past a checkpoint", job, lambda: _training_past_a_checkpoint(study, "hostloss-head"))
        head = re.search(r"Ray head on h(\d)", job.text()).group(1)
        _host(cluster, "lose", int(head))
        t_lost = time.monotonic()
        # The job cannot go on; Slurm takes the lost node out of it (--no-kill), and the other node's Ray
        # worker, its head gone, requeues it. It runs again on the two hosts up (the one left and host 3).
        job.wait_for("the job to be requeued", lambda i: int(i.get("Restarts", 0)) >= 1, timeout=300, poll=1)
        t_requeued = time.monotonic()
        info = job.wait_done(timeout=600)
    finally:
        if job_info(job.conf, job.id).get("JobState") not in FINAL_STATES:
            job.cancel()
    if info["JobState"] != "COMPLETED":
        job.fail("the requeued job did not complete")
    head_state = slurm(cluster["conf"], "sinfo", "-h", "-N", "-n", f"h{head}", "-o", "%T").stdout.strip().lower()
    assert head_state.startswith("down"), head_state
    log = job.text()
    assert "is gone (its node was lost); requeueing job" in log and "(restart 1)" in log, log[-4000:]
    client, runs, _ = assert_one_finished_run_per_trial(study)
    resumed, from_scratch = [], []
    for r in runs:
        starts, again = _restarts(client, r)
        if len(starts) < 2:
            continue  # it finished before the head was lost
        if starts[-1] == 1:  # lost before its first checkpoint: trained again from the start, as it must
            assert max(again, default=0) < EVERY, (r.data.tags["trial_id"], starts, again)
            from_scratch.append(r.data.tags["trial_id"])
        else:
            resumed.append(_assert_resumed_within_one_interval(client, r, r.data.tags["trial_id"]))
    assert resumed, "no trial was resumed from a checkpoint after the head was lost"
    assert all(h.startswith(f"{name}-h") and h != f"{name}-h{head}"
               for r in runs for h in r.data.tags["worker_hostnames"].split(","))
    # One job, requeued: the same sweep invocation, one parent run, FINISHED.
    parents = client.search_runs([runs[0].info.experiment_id], filter_string="tags.`ditscale.sweep` = 'true'")
    assert [p.info.status for p in parents] == ["FINISHED"], [p.info.status for p in parents]
    notes.append(f"head host h{head} lost: job {job.id} requeued {t_requeued - t_lost:.0f}s later, resumed "
                 f"{len(resumed)} trial(s) ({'; '.join(resumed)}), {len(from_scratch)} without a checkpoint yet "
                 f"started again, COMPLETED {time.monotonic() - t_requeued:.0f}s after "
                 f"the requeue ({time.monotonic() - t0:.0f}s in all)")
    print("\n".join(notes), file=sys.stderr)
