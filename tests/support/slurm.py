"""The one-node Slurm test cluster (slurm/testing/start-local-cluster.sh) and its jobs.

The cluster itself is the session fixture `slurm_cluster` in tests/conftest.py (one per session: it
binds fixed ports); `submit` there submits a study to it. These are the plain helpers around them."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.study import ROOT

SBATCH = ROOT / "slurm" / "sweep.sbatch"
SLURM_START = ROOT / "slurm" / "testing" / "start-local-cluster.sh"
SLURM_STOP = ROOT / "slurm" / "testing" / "stop-local-cluster.sh"
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}

# What every stand-in batch job has: a Ray that does nothing and a one-node allocation on node1.
STUB_RAY = "#!/bin/sh\nexit 0\n"
STUB_SCONTROL = '#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && echo node1\nexit 0\n'


def stub_batch_env(folder: Path, scripts: dict[str, str], job_id: str, drop: tuple[str, ...]) -> dict:
    """The environment in which sweep.sbatch runs `scripts` ({command: script text}, written to
    `folder`/bin with `ray` and `scontrol` stand-ins unless given) instead of the real commands, as job
    `job_id` on node1; the variables starting with one of `drop` are not passed on (the test's own Ray,
    Slurm or tracking settings)."""
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    for name, text in {"ray": STUB_RAY, "scontrol": STUB_SCONTROL, **scripts}.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    return env | {"PATH": f"{bin_dir}:{Path(sys.executable).parent}:/usr/bin:/bin", "SLURM_JOB_ID": job_id,
                  "SLURM_JOB_NODELIST": "node1"}


def cluster_exports(stdout: str) -> dict:
    """The `export NAME=VALUE` lines a start script printed (values quoted for the shell): its state
    folder (DITSCALE_SLURM_STATE / DITSCALE_NETNS_STATE, printed first, so also by a failed start) and,
    once the cluster is up, SLURM_CONF."""
    return {name: shlex.split(value)[0] for name, value in re.findall(r"^export (\w+)=(.+)$", stdout, re.MULTILINE)}


def slurm(conf: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(args), env={**os.environ, "SLURM_CONF": conf}, capture_output=True, text=True,
                          timeout=60)
    if check:
        assert proc.returncode == 0, f"{' '.join(args)}: {proc.stderr}"
    return proc


def job_info(conf: str, job_id: str) -> dict:
    out = slurm(conf, "scontrol", "-o", "show", "job", job_id).stdout
    return dict(tok.split("=", 1) for tok in out.split() if "=" in tok)


class Job:
    def __init__(self, conf: str, job_id: str, log: Path):
        self.conf, self.id, self.log = conf, job_id, log

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.is_file() else "(no log yet)"

    def fail(self, why: str):
        pytest.fail(f"job {self.id}: {why}\n--- job {job_info(self.conf, self.id)}\n"
                    f"--- log tail\n{self.text()[-8000:]}")

    def wait_for(self, what: str, ok, timeout: float, poll: float = 0.5) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            info = job_info(self.conf, self.id)
            if ok(info):
                return info
            if info.get("JobState") in FINAL_STATES:
                self.fail(f"ended {info['JobState']} while waiting for {what}")
            if time.monotonic() > deadline:
                self.fail(f"no {what} within {timeout:.0f}s (state {info.get('JobState')})")
            time.sleep(poll)

    def wait_done(self, timeout: float) -> dict:
        return self.wait_for("the end of the job", lambda i: i.get("JobState") in FINAL_STATES, timeout, poll=2)

    def cancel(self):
        slurm(self.conf, "scancel", self.id, check=False)


def submitted_job(conf: str, submit_output: str) -> Job:
    """The Job that `ditscale slurm submit`'s output says it submitted (its log path may hold spaces)."""
    job_id = re.search(r"^Submitted job (\d+)", submit_output, re.MULTILINE)
    log = re.search(r"^  log:\s+(.+)$", submit_output, re.MULTILINE)
    assert job_id and log, submit_output
    return Job(conf, job_id.group(1), Path(log.group(1)))


def trial_runs(uri: str, experiment: str):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=uri)
    exp = c.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r} in {uri}"
    return c, c.search_runs([exp.experiment_id], filter_string="tags.trial_id != ''", max_results=1000)


def assert_one_finished_run_per_trial(study: Path, overrides=()):
    from harness.config import expand_grid, load_study

    cwd = os.getcwd()
    os.chdir(study.parent)
    try:
        s = load_study(study, list(overrides))
        trials = expand_grid(s)
    finally:
        os.chdir(cwd)
    uri = f"sqlite:///{study.parent.resolve() / 'mlflow.db'}"
    client, runs = trial_runs(uri, s.name)
    ids = [r.data.tags["trial_id"] for r in runs]
    assert sorted(ids) == sorted(t.trial_id for t in trials), f"trial runs {ids}: duplicates or missing"
    for r in runs:
        assert r.info.status == "FINISHED" and r.data.tags.get("ditscale.status") == "finished", (
            r.info.run_id, r.info.status, r.data.tags.get("ditscale.status"))
    return client, runs, trials
