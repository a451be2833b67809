"""`ditscale sweep` on a real local Ray: Tune over the grid, each trial a 2-worker TorchTrainer on
DeepSpeed (gloo), MLflow parent + child runs, fault recovery, resume, dry run."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest

from tests.support import ditscale, tiny_study, write_study


def _study(digits, name):
    # a validation loss (one batch: the second worker has none to score) for the report's patch finding
    return {**tiny_study(digits, name, train={"steps": 20, "log_every": 5, "checkpoint_every": 10},
                         resources={"workers_per_trial": 2}, eval={"val_batches": 1, "batch_size": 32}),
            "grid": {"model.patch": [2, 4], "train.lr": [1.0e-3, 3.0e-4]}}


def _runs(uri, name):
    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    return client, client.search_runs([exp.experiment_id], max_results=1000)


@pytest.mark.slow
def test_grid_on_local_ray_with_fault_recovery_and_resume(tmp_path, digits_dir):
    name = "grid"
    # Three of the grid's four points (one 2-worker trial fewer to train; the exclusion is exercised too).
    study = write_study(tmp_path / "s.yaml", {**_study(digits_dir, name),
                                              "exclude": [{"model.patch": 2, "train.lr": 3.0e-4}]})
    from harness.config import expand_grid, load_study

    trials = expand_grid(load_study(study))
    faulty = trials[0].trial_id
    # One worker of the first trial raises once at step 10, right after its checkpoint.
    proc = ditscale("sweep", str(study), cwd=tmp_path, env={"DITSCALE_FAULT_AT_STEP": f"10:{faulty}"}, timeout=1500)
    out = proc.stdout + proc.stderr
    assert "injected worker failure" in out, "the fault knob did not fire"

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client, runs = _runs(uri, name)
    parents = [r for r in runs if r.data.tags.get("ditscale.sweep") == "true"]
    children = [r for r in runs if r.data.tags.get("trial_id")]
    assert len(trials) == 3 and len(parents) == 1 and len(children) == 3 and len(runs) == 4
    assert sorted(r.data.tags["trial_id"] for r in children) == sorted(t.trial_id for t in trials)
    for r in children:
        assert r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert r.data.tags["ditscale.status"] == "finished", r.data.tags
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "loss")]
        assert steps[-1] == 20 and r.data.metrics["samples_seen"] == 20 * 32
        assert r.data.metrics["startup_s"] > 0 and r.data.metrics["img_per_s"] > 0
    recovered = next(r for r in children if r.data.tags["trial_id"] == faulty)
    steps = [m.step for m in client.get_metric_history(recovered.info.run_id, "loss")]
    # Resumed from the step-10 checkpoint: steps 15, 20 logged after the restart (10 possibly twice).
    assert max(steps) == 20 and {5, 10, 15, 20} <= set(steps)
    assert (tmp_path / "runs" / name / faulty / "fault-injected").is_file()
    status = json.loads(client.download_artifacts(parents[0].info.run_id, "trial_status.json", str(tmp_path)) and
                        (tmp_path / "trial_status.json").read_text())
    assert [row["status"] for row in status] == ["finished"] * 3
    assert "mlflow ui --backend-store-uri" in proc.stdout and "Report:" in proc.stdout

    # The report of this small real sweep renders with its figures (issue 9's check, reused).
    from tests.support.synthetic import check_report

    index = check_report(uri, name, tmp_path / "report", parent_run_id=parents[0].info.run_id)
    # patch 4 vs 2 at lr 1e-3, judged from the trials' per-sample validation losses (gathered from both
    # workers, logged as artifacts, read back and paired)
    md = (index.parent / "report.md").read_text()
    finding = next(line for line in md.splitlines() if line.startswith("| a smaller patch is better"))
    assert "2σ" in finding and "(paired per-sample validation losses)" in finding, finding

    # Re-running a finished study trains nothing, starts no Ray and opens no run.
    t0 = time.time()
    again = ditscale("sweep", str(study), "--no-report", cwd=tmp_path)
    assert "3 of 3 trials already finished" in again.stdout and "nothing to train" in again.stdout
    assert "Ray" not in again.stderr.replace("ray", "")
    _, runs_after = _runs(uri, name)
    assert len(runs_after) == 4
    assert time.time() - t0 < 60


@pytest.mark.slow
def test_single_worker_trials_train_in_the_reused_tune_process_and_recover(tmp_path, digits_dir):
    """resources.workers_per_trial 1: Ray Train's local mode inside Tune's reused trial process. A
    failure there is retried by Tune and resumes from the trial folder's checkpoint, in one run."""

    name = "inproc"
    study = write_study(tmp_path / "s.yaml", {
        **tiny_study(digits_dir, name, train={"steps": 20, "log_every": 5, "checkpoint_every": 10}),
        "grid": {"model.patch": [2, 4, 8]}})
    from harness.config import expand_grid, load_study

    trials = expand_grid(load_study(study))
    faulty = trials[0].trial_id
    proc = ditscale("sweep", str(study), "--max-concurrent", "1", "--no-report", cwd=tmp_path,
                    env={"DITSCALE_FAULT_AT_STEP": f"10:{faulty}"}, timeout=900)
    out = proc.stdout + proc.stderr
    assert "injected worker failure" in out, "the fault knob did not fire"
    assert "Failed to fetch metrics" not in out, out[-3000:]  # Tune's result grid found each trial's result.json
    # The loop ran in Tune's trial processes (no Ray Train worker), and one process trained two trials.
    starts = re.findall(r"\(run_tune_trial pid=(\d+)\).*\[DiT-XXS/\d (\w{6})\] start-up", out)
    assert "RayTrainWorker" not in out and len({tid for _, tid in starts}) == 3, (starts, out[-6000:])
    per_pid = {}
    for pid, tid in starts:
        per_pid.setdefault(pid, set()).add(tid)
    assert max(len(tids) for tids in per_pid.values()) >= 2, per_pid

    client, runs = _runs(f"sqlite:///{tmp_path / 'mlflow.db'}", name)
    children = [r for r in runs if r.data.tags.get("trial_id")]
    assert len(children) == 3 and len(runs) == 4
    for r in children:
        assert r.data.tags["ditscale.status"] == "finished", r.data.tags
        assert r.data.metrics["samples_seen"] == 20 * 32
    recovered = next(r for r in children if r.data.tags["trial_id"] == faulty)
    steps = [m.step for m in client.get_metric_history(recovered.info.run_id, "loss")]
    assert max(steps) == 20 and {5, 10, 15, 20} <= set(steps)
    assert (tmp_path / "runs" / name / faulty / "fault-injected").is_file()


def test_dry_run_prints_the_grid_and_starts_no_ray(tmp_path, digits_dir):
    study = write_study(tmp_path / "s.yaml", _study(digits_dir, "dry"))
    code = ("import sys; from harness.launch.sweep import run_sweep; "
            f"r = run_sweep({str(study)!r}, dry_run=True); "
            "assert r == {'planned': 4, 'ran': 0}, r; "
            "assert 'ray' not in sys.modules, 'dry run imported ray'; "
            "assert 'deepspeed' not in sys.modules and 'mlflow' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert "fwd GFLOPs" in lines[0] and "train GFLOPs" in lines[0] and "workers" in lines[0]
    rows = [line for line in lines[1:5]]
    assert all("DiT-XXS/" in row for row in rows) and sum("DiT-XXS/2" in row for row in rows) == 2
    assert "multiply-adds" in proc.stdout
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()


def test_bad_study_is_rejected_before_ray(tmp_path, digits_dir):
    bad = _study(digits_dir, "bad")
    bad["train"]["batch_size"] = 31  # not divisible by 2 workers
    study = write_study(tmp_path / "s.yaml", bad)
    t0 = time.time()
    proc = ditscale("sweep", str(study), cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "train.batch_size" in proc.stderr and "Traceback" not in proc.stderr
    assert time.time() - t0 < 20 and not (tmp_path / "mlflow.db").exists()
