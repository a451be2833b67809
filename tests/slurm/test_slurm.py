"""Slurm: rendering and submitting slurm/sweep.sbatch, and real jobs on a one-node cluster.

The fast tests render the batch script and submit it through a stand-in `sbatch`. The slow ones
start a real one-node Slurm cluster on localhost (slurm/testing/start-local-cluster.sh: munged,
slurmctld, slurmd with their own ports and state folders) and run studies on it:
`ditscale slurm submit` to COMPLETED with the runs in MLflow; `scontrol requeue` of a running job
and Slurm's warning signal (USR1, as `--signal=B:USR1@...` sends it) both lead to a resumed study
with one MLflow run per trial.

Without Slurm installed (Debian: apt-get install slurm-wlm munge) the cluster tests are skipped,
unless DITSCALE_REQUIRE_SLURM=1 (CI sets it), which turns a missing Slurm into a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

# the one-node cluster (slurm_cluster) and submit(study, *options) are fixtures in conftest
from tests.support import ROOT, ditscale, tiny_study, write_study
from tests.support.slurm import SBATCH, Job, assert_one_finished_run_per_trial, slurm

SMOKE = ROOT / "experiments" / "smoke.yaml"


# --- rendering (no Slurm needed) -----------------------------------------------------------------


def test_batch_script_is_valid_bash_with_the_documented_defaults():
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)
    text = SBATCH.read_text()
    for line in ("#SBATCH --requeue", "#SBATCH --signal=B:USR1@300", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --open-mode=append"):
        assert line in text
    # Every #SBATCH line comes before the first command (sbatch stops reading them there).
    lines = text.splitlines()
    first_cmd = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
    assert all(i < first_cmd for i, line in enumerate(lines) if line.startswith("#SBATCH"))
    assert "ditscale sweep" in text and "--address" in text and "scontrol requeue" in text
    assert "RAY_AUTH_MODE" in text and "ditscale slurm node ray" in text and "srun" in text
    # Orchestration a cluster admin reads in one pass (issue 28): what the nodes do is Python, and what
    # ditscale prints is assigned by name, never evaluated.
    assert len(lines) <= 150 and not re.search(r"^\s*eval\b|\beval \"", text, re.MULTILINE), len(lines)


def test_render_replaces_options_and_keeps_sbatch_lines_first():
    from harness.launch.slurm import SETTINGS_MARKER, render_script

    template = ("#!/bin/bash\n#SBATCH --nodes=1\n##SBATCH --gpus-per-node=8\n#SBATCH --time=24:00:00\n"
                f"{SETTINGS_MARKER}\necho hi\n")
    out = render_script(template, {"nodes": "4", "gpus-per-node": "2", "requeue": None},
                        {"DITSCALE_BIN": "/opt/my env/bin"})
    lines = out.splitlines()
    assert "#SBATCH --nodes=4" in lines and "#SBATCH --gpus-per-node=2" in lines and "#SBATCH --requeue" in lines
    assert "#SBATCH --nodes=1" not in lines and "##SBATCH --gpus-per-node=8" not in lines
    assert "#SBATCH --time=24:00:00" in lines  # untouched
    assert lines.index("#SBATCH --requeue") < lines.index(SETTINGS_MARKER)
    setting = lines[lines.index(SETTINGS_MARKER) + 1]
    assert setting == "[ -n \"${DITSCALE_BIN:-}\" ] || export DITSCALE_BIN='/opt/my env/bin'"
    subprocess.run(["bash", "-n"], input=out, text=True, check=True)


@pytest.fixture(scope="module")
def study_file(digits_dir, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("slurm-render")
    study = tiny_study(digits_dir, "slurm-render", resources={"workers_per_trial": 2, "cpus_per_worker": 2},
                       grid={"model.patch": [4, 8]})
    return write_study(folder / "study.yaml", study)


def _tree(folder: Path) -> set[Path]:
    return set(folder.rglob("*"))


def test_dry_run_prints_the_rendered_script(study_file):
    # The folder is the module's: a submit test may have written runs/ there first (tests run in any order).
    before = _tree(study_file.parent)
    out = ditscale("slurm", "submit", str(study_file), "--nodes", "2", "--gpus-per-node", "0", "--partition", "cpu",
                   "--time", "1:00:00", "--account", "proj", "--cpus-per-task", "6", "--signal-seconds", "120",
                   "--set", "train.steps=7", "--dry-run", cwd=study_file.parent).stdout
    folder = study_file.parent.resolve()
    for line in ("#SBATCH --nodes=2", "#SBATCH --partition=cpu", "#SBATCH --time=1:00:00", "#SBATCH --account=proj",
                 "#SBATCH --cpus-per-task=6", "#SBATCH --signal=B:USR1@120", "#SBATCH --requeue",
                 f"#SBATCH --chdir={folder}", f"#SBATCH --output={folder}/runs/slurm-render/slurm/slurm-%j.out",
                 "#SBATCH --job-name=ditscale-slurm-render"):
        assert line in out.splitlines(), line
    assert "--gpus-per-node" not in "\n".join(l for l in out.splitlines() if l.startswith("#SBATCH"))
    assert re.search(r"# sbatch --parsable \S+/runs/slurm-render/slurm/sweep-\d{8}-\d{6}\.sbatch "
                     rf"{re.escape(str(study_file.resolve()))} --set train.steps=7", out)
    assert _tree(study_file.parent) == before  # a dry run writes nothing


def test_default_cpus_follow_the_study_and_the_gpus(study_file):
    def cpus(*args):
        out = ditscale("slurm", "submit", str(study_file), "--dry-run", *args, cwd=study_file.parent,
                       env={"PATH": str(Path(sys.executable).parent)}).stdout  # no sinfo: no cap
        return int(re.search(r"^#SBATCH --cpus-per-task=(\d+)$", out, re.M).group(1))

    assert cpus("--nodes", "1") == 8            # 2 trials side by side x 2 workers x 2 CPUs
    assert cpus("--nodes", "2") == 4
    assert cpus("--nodes", "1", "--gpus-per-node", "4", "--set", "resources.gpus_per_worker=1") == 8  # 2 CPUs/GPU


def test_default_cpus_are_a_whole_node_when_sinfo_knows_it(study_file, tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sinfo").write_text("#!/bin/sh\necho '6 debug*'\necho '6 debug*'\necho '64 big'\n")
    (fake / "sinfo").chmod(0o755)
    env = {"PATH": f"{fake}:{Path(sys.executable).parent}"}
    out = ditscale("slurm", "submit", str(study_file), "--dry-run", cwd=study_file.parent, env=env).stdout
    assert "#SBATCH --cpus-per-task=6" in out.splitlines()
    out = ditscale("slurm", "submit", str(study_file), "--dry-run", "--partition", "big", cwd=study_file.parent,
                   env=env).stdout
    assert "#SBATCH --cpus-per-task=64" in out.splitlines()
    proc = ditscale("slurm", "submit", str(study_file), "--dry-run", "--set", "resources.cpus_per_worker=4",
                    cwd=study_file.parent, env=env, check=False)  # 2 workers x 4 CPUs > 6
    assert proc.returncode == 2 and "--nodes" in proc.stderr and "6" in proc.stderr


def test_trials_that_cannot_fit_are_refused_with_the_option_to_change(study_file):
    proc = ditscale("slurm", "submit", str(study_file), "--nodes", "1", "--gpus-per-node", "1",
                    "--set", "resources.gpus_per_worker=1", "--dry-run", cwd=study_file.parent, check=False)
    assert proc.returncode == 2
    assert "--gpus-per-node" in proc.stderr and "Traceback" not in proc.stderr
    proc = ditscale("slurm", "submit", str(study_file), "--cpus-per-task", "1", "--dry-run", cwd=study_file.parent,
                    check=False)
    assert proc.returncode == 2 and "--cpus-per-task" in proc.stderr


def test_stop_file_is_the_one_the_trials_watch(study_file):
    from harness.config import expand_grid, load_study
    from harness.paths import stop_file

    out = ditscale("slurm", "stop-file", str(study_file), "--set", "resources.storage=elsewhere",
                   cwd=study_file.parent).stdout.strip()
    cwd = os.getcwd()
    os.chdir(study_file.parent)
    try:
        trial = expand_grid(load_study(study_file, ["resources.storage=elsewhere"]))[0]
        assert Path(out) == stop_file(trial) == study_file.parent.resolve() / "elsewhere" / "slurm-render" / "STOP"
    finally:
        os.chdir(cwd)


def test_submit_saves_the_script_calls_sbatch_and_says_where_results_go(study_file, tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    record = tmp_path / "sbatch-args"
    (fake / "sbatch").write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {record}\necho '4242;cluster'\n")
    (fake / "sbatch").chmod(0o755)
    env = {"PATH": f"{fake}:{os.environ['PATH']}"}
    out = ditscale("slurm", "submit", str(study_file), "--nodes", "1", "--cpus-per-task", "8", "--set",
                   "train.steps=9", "--sbatch-arg=--qos=high", cwd=study_file.parent, env=env).stdout
    args = record.read_text().splitlines()
    assert args[:2] == ["--parsable", "--qos=high"]
    script = Path(args[2])
    assert script.parent == study_file.parent.resolve() / "runs" / "slurm-render" / "slurm" and script.is_file()
    assert "#SBATCH --cpus-per-task=8" in script.read_text()
    assert args[3:] == [str(study_file.resolve()), "--set", "train.steps=9"]
    assert "Submitted job 4242" in out
    assert f"sqlite:///{study_file.parent.resolve()}/mlflow.db" in out and "mlflow ui" in out
    assert "reports/slurm-render/index.html" in out and "slurm-4242.out" in out
    # A second submission never overwrites the first script.
    ditscale("slurm", "submit", str(study_file), "--cpus-per-task", "8", cwd=study_file.parent, env=env)
    assert len(list(script.parent.glob("sweep-*.sbatch"))) == 2


def test_submit_without_sbatch_says_where_to_run_it(study_file):
    proc = ditscale("slurm", "submit", str(study_file), "--cpus-per-task", "8", cwd=study_file.parent,
                    env={"PATH": str(Path(sys.executable).parent)}, check=False)
    assert proc.returncode == 2 and "sbatch not found" in proc.stderr and "--dry-run" in proc.stderr


# --- a real one-node cluster ---------------------------------------------------------------------


def _smoke_overrides(digits: Path) -> list[str]:
    """Shrink experiments/smoke.yaml to one short trial on the test shards."""
    raw = yaml.safe_load(SMOKE.read_text())
    sets = [f"data.shards={digits}/train-{{000000..000003}}.tar", f"data.val_shards={digits}/val-000000.tar",
            "data.channels=1",
            "train.steps=20", "train.checkpoint_every=10", "train.log_every=5", "eval.fid_samples=0",
            "eval.val_batches=1", "eval.sampling_steps=5",
            "resources.workers_per_trial=1", "resources.cpus_per_worker=1", "resources.gpus_per_worker=0",
            "tracking.uri=null", "resources.storage=runs"]
    for key, values in (raw.get("grid") or {}).items():
        sets.append(f"grid.{key}={yaml.safe_dump([values[0]], default_flow_style=True).strip()}")
    return sets


@pytest.mark.slow
def test_submit_runs_the_study_to_completed_with_its_runs_in_mlflow(submit, digits_dir, tmp_path):
    """From a submit folder whose name has a space and a quote (the batch script quotes every path)."""
    folder = tmp_path / "my study's dir"
    folder.mkdir()
    if SMOKE.is_file():  # the acceptance study, shrunk to one short trial on the test shards
        study = folder / "smoke.yaml"
        shutil.copy(SMOKE, study)
        overrides = _smoke_overrides(digits_dir)
    else:
        study = write_study(folder / "study.yaml", tiny_study(digits_dir, "slurm-submit", train={"steps": 20}))
        overrides = []
    t0 = time.monotonic()
    job = submit(study, *(a for o in overrides for a in ("--set", o)))
    info = job.wait_done(timeout=600)
    elapsed = time.monotonic() - t0
    if info["JobState"] != "COMPLETED":
        job.fail("did not complete")
    log = job.text()
    assert "Ray cluster at" in log and "1 node(s)" in log
    assert "ditscale sweep exited with 0" in log and "stopping Ray" in log
    assert_one_finished_run_per_trial(study, overrides)
    # The per-job Ray temp folder and auth token are gone.
    assert not list(Path("/tmp").glob(f"ray-{job.id}-*"))
    assert not list(study.parent.glob(f"runs/*/slurm/.ray-token-{job.id}"))
    print(f"job {job.id}: COMPLETED after {elapsed:.0f}s", file=sys.stderr)


def _long_study(digits: Path, folder: Path, name: str) -> Path:
    return write_study(folder / "study.yaml", tiny_study(
        digits, name, train={"steps": 300, "batch_size": 8, "checkpoint_every": 20, "log_every": 5}))


def _latest_step(latest: Path) -> int:
    """Step of the trial's newest checkpoint (DeepSpeed's `latest` names the tag step-XXXXXXXX), or -1."""
    try:
        return int(latest.read_text().strip().rsplit("-", 1)[-1])
    except (OSError, ValueError):
        return -1


def _wait_restart(job: Job, restarts: int) -> dict:
    return job.wait_for(f"restart {restarts}",
                        lambda i: int(i.get("Restarts", 0)) >= restarts and i.get("JobState") == "RUNNING",
                        timeout=300, poll=1)


@pytest.mark.slow
def test_preemption_requeues_and_the_study_resumes_without_duplicate_runs(submit, digits_dir, tmp_path,
                                                                          slurm_cluster):
    """Two interruptions of one job: Slurm's warning signal (USR1 to the batch shell, as
    `--signal=B:USR1@SECONDS` sends it before the time limit: the trials checkpoint, the sweep exits 3,
    the job requeues itself), then `scontrol requeue` (SIGTERM to every process, Slurm requeues).
    Each time the study resumes from its checkpoints, in the same MLflow run."""
    from harness.config import expand_grid, load_study

    study = _long_study(digits_dir, tmp_path, "slurm-preempt")
    trial = expand_grid(load_study(study))[0]
    latest = study.parent / "runs" / trial.name / trial.trial_id / "checkpoints" / "latest"
    job = submit(study)
    t0 = time.monotonic()

    # 1. The warning signal.
    job.wait_for("a first checkpoint", lambda i: _latest_step(latest) > 0, timeout=400)
    slurm(slurm_cluster, "scancel", "--batch", "--signal=USR1", job.id)
    _wait_restart(job, 1)
    log = job.text()
    if "requeueing job" not in log:
        job.fail("USR1 did not lead to a stop (exit 3) and a requeue by the job itself")
    assert "received SIGUSR1" in log and "ditscale sweep exited with 3" in log
    stopped_at = _latest_step(latest)
    t1 = time.monotonic()

    # 2. scontrol requeue, once the resumed trial has written a newer checkpoint.
    job.wait_for("a checkpoint after the first restart", lambda i: _latest_step(latest) > stopped_at, timeout=400)
    slurm(slurm_cluster, "scontrol", "requeue", job.id)
    _wait_restart(job, 2)
    t2 = time.monotonic()

    info = job.wait_done(timeout=600)
    if info["JobState"] != "COMPLETED":
        job.fail("did not complete after two requeues")
    log = job.text()
    for n in range(3):
        assert f"(restart {n})" in log
    client, runs, _ = assert_one_finished_run_per_trial(study)
    # The trial started three times in its one run, twice from a checkpoint (at a step > 1).
    starts = sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "startup_s"))
    assert len(starts) >= 3 and starts[1] > 1 and starts[2] > starts[1], starts
    assert starts[1] >= stopped_at  # nothing before the USR1 checkpoint was trained twice
    # One job = one sweep invocation: its restarts share one parent run, which ends FINISHED.
    parents = client.search_runs([runs[0].info.experiment_id], filter_string="tags.`ditscale.sweep` = 'true'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED", [p.info.status for p in parents]
    assert runs[0].data.tags["mlflow.parentRunId"] == parents[0].info.run_id
    print(f"job {job.id}: USR1 -> stopped at step {stopped_at} and running again after {t1 - t0:.0f}s; "
          f"scontrol requeue -> running again after {t2 - t1:.0f}s; COMPLETED after {time.monotonic() - t0:.0f}s; "
          f"startup_s logged at steps {starts}", file=sys.stderr)
