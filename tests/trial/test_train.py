"""One trial on real DeepSpeed (gloo, CPU), logged to a real MLflow: `ditscale train` alone and under
torchrun, ZeRO-2 and ZeRO-3, kill and resume, determinism, SQLite and an HTTP tracking server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import ditscale, tiny_study, write_study
from tests.support.phema import (
    EMA_CHOICE,
    POSTHOC,
    check_ema_choice,
    check_snapshots_after_kill_and_resume,
    saved_posthoc_state,
)
from tests.support.procs import free_port as _free_port
from tests.support.procs import torchrun as _torchrun


def _runs(uri: str, experiment: str):
    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r} at {uri}"
    return client, client.search_runs([exp.experiment_id], filter_string="tags.trial_id != ''")


def _loss_history(client, run_id: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.step)]


def _checkpoints(storage: Path, name: str) -> list[str]:
    return sorted(p.name for p in storage.glob(f"{name}/*/checkpoints/step-*"))


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_torchrun_two_ranks_loss_falls_and_checkpoints(tmp_path, digits_dir, stage):
    name = f"zero{stage}"
    study = write_study(tmp_path / "s.yaml", tiny_study(
        digits_dir, name, train={"zero_stage": stage, "steps": 30, "keep_checkpoints": 3},
        resources={"workers_per_trial": 2}))
    _torchrun(study, tmp_path)
    client, runs = _runs(f"sqlite:///{tmp_path / 'mlflow.db'}", name)
    assert len(runs) == 1, "rank 0 alone logs: exactly one run"
    run = runs[0]
    history = _loss_history(client, run.info.run_id)
    assert [s for s, _ in history] == [5, 10, 15, 20, 25, 30]
    first, last = history[0][1], history[-1][1]
    assert last < 0.7 * first, f"loss did not fall: {history}"
    assert run.data.tags["ditscale.status"] == "finished" and run.info.status == "FINISHED"
    assert _checkpoints(tmp_path / "runs", name) == ["step-00000010", "step-00000020", "step-00000030"]
    ckpt = next((tmp_path / "runs").glob(f"{name}/*/checkpoints/step-00000030"))
    assert (ckpt / "ema.pt").is_file()
    # ZeRO partitions optimizer state per rank: one file per rank in the DeepSpeed checkpoint.
    assert len(list(ckpt.glob("*optim_states.pt"))) == 2
    m = run.data.metrics
    assert m["samples_seen"] == 30 * 32 and m["img_per_s"] > 0
    # Training compute is 3 x forward multiply-adds x images seen (README), the forward counted by
    # models.flops for the trial's model at the data's geometry.
    from harness.config import expand_grid, load_study
    from models.flops import count_model

    trial = expand_grid(load_study(study))[0]
    forward = count_model(trial.model_name, input_size=16, in_channels=1, num_classes=10,
                          learn_sigma=trial.model.learn_sigma).gflops
    assert m["forward_gflops"] == pytest.approx(forward, rel=1e-9)
    assert m["train_gflops"] == pytest.approx(3 * forward * 30 * 32, rel=1e-9)
    assert 0 <= m["data_wait_frac"] <= 1 and m["corrupt_samples"] == 0 and m["startup_s"] > 0
    assert m["params"] > 0 and m["forward_gflops"] > 0 and m["grad_norm"] > 0


@pytest.mark.slow
def test_kill_and_resume_continues_the_same_run(tmp_path, digits_dir):
    name = "resume"
    # Killed as soon as its first checkpoint (step 10) appears: the 110 steps left (11 checkpoints and 22
    # post-hoc EMA snapshots more) take seconds here, so the kill lands mid-training; 300 steps only made
    # the resumed half longer (63 s of CPU).
    steps = 120
    study = write_study(tmp_path / "s.yaml", tiny_study(
        digits_dir, name, train={"steps": steps, "checkpoint_every": 10, "log_every": 5, **POSTHOC}, eval=EMA_CHOICE))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", "train", str(study)], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not _checkpoints(tmp_path / "runs", name) and time.time() < deadline:
            time.sleep(0.2)
        assert _checkpoints(tmp_path / "runs", name), "no checkpoint appeared"
    finally:
        proc.send_signal(signal.SIGKILL)  # no clean shutdown: as a crash or an OOM kill
        proc.wait()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client, runs = _runs(uri, name)
    assert len(runs) == 1 and runs[0].data.tags["ditscale.status"] == "running"
    resumed_from = int(_checkpoints(tmp_path / "runs", name)[-1].split("-")[1])
    assert resumed_from < steps
    saved_phema = saved_posthoc_state(tmp_path, name, resumed_from)  # before the resumed run prunes it

    out = ditscale("train", str(study), cwd=tmp_path).stdout
    assert f"finished at step {steps}" in out
    client, runs = _runs(uri, name)
    assert len(runs) == 1, "resuming must continue the trial's run, not open a second one"
    logged = [s for s, _ in _loss_history(client, runs[0].info.run_id)]
    after = [s for s in logged if s > resumed_from]
    assert after and after[0] == resumed_from + 5 and logged[-1] == steps, logged
    assert runs[0].data.tags["ditscale.status"] == "finished"
    # Post-hoc EMA (train.posthoc_ema) across the kill, then `ditscale ema reconstruct`: tests/trial/test_phema.py.
    check_snapshots_after_kill_and_resume(tmp_path, study, name, resumed_from, steps, saved_phema)
    # eval.ema_sigma_rels: the final evaluation used the best width's reconstruction: tests/trial/test_phema.py.
    check_ema_choice(client, runs[0])


_FAIL_FINAL_EVAL = """
import sys
import harness.evaluation.evaluator
from harness.config import expand_grid, load_study
from harness.trial.loop import train_trial

def fail(self, model, step):
    raise RuntimeError("killed during the final evaluation")

if sys.argv[2] == "fail":
    harness.evaluation.evaluator.Evaluator.run = fail
print(train_trial(expand_grid(load_study(sys.argv[1]))[0]).status)
"""


@pytest.mark.slow
def test_resumed_at_the_last_step_still_evaluates(tmp_path, digits_dir):
    """A trial that dies after its final checkpoint but before (or during) the final evaluation is
    evaluated when it resumes, in the same run."""
    study = write_study(tmp_path / "s.yaml", tiny_study(digits_dir, "lasteval", train={"steps": 10},
                                                        eval={"val_batches": 1}))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    run = lambda mode: subprocess.run([sys.executable, "-c", _FAIL_FINAL_EVAL, str(study), mode], cwd=tmp_path,
                                      env=env, text=True, capture_output=True, timeout=300)
    first = run("fail")
    assert first.returncode != 0 and "killed during the final evaluation" in first.stderr, first.stderr[-3000:]
    assert _checkpoints(tmp_path / "runs", "lasteval") == ["step-00000010"]
    second = run("ok")
    assert second.stdout.strip().endswith("finished"), second.stderr[-3000:]
    assert "eval at step 10" in second.stdout
    client, (only,) = _runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "lasteval")
    assert [m.step for m in client.get_metric_history(only.info.run_id, "val_loss")] == [10]
    assert only.data.tags["ditscale.status"] == "finished"


_TWO_TRIALS_ONE_PROCESS = """
import gc, sys
from harness.config import expand_grid, load_study
from harness.launch.tune_trial import _process_group_scope
from harness.trial.loop import train_trial

for trial in expand_grid(load_study(sys.argv[1])):
    with _process_group_scope(in_process=True):  # as the sweep's in-process trials run
        print(train_trial(trial).status)
    gc.collect()
    alive = sorted({type(o).__name__ for o in gc.get_objects()} & {"DeepSpeedEngine", "DiT", "AdamW"})
    print("alive:", ",".join(alive) or "none")
"""


@pytest.mark.slow
def test_a_process_that_trains_trial_after_trial_keeps_none_of_them(tmp_path, digits_dir):
    """The sweep reuses a process for single-worker trials: a finished trial's engine, model and
    optimizer must go (DeepSpeed's hooks sit on autograd nodes, out of the garbage collector's reach,
    until engine.destroy())."""
    study = write_study(tmp_path / "s.yaml", {**tiny_study(digits_dir, "reuse", train={"steps": 5}),
                                              "grid": {"model.patch": [2, 4]}})
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run([sys.executable, "-c", _TWO_TRIALS_ONE_PROCESS, str(study)], cwd=tmp_path, env=env,
                          text=True, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line in ("finished", "alive: none") or line.startswith("alive:")]
    assert lines == ["finished", "alive: none", "finished", "alive: none"], proc.stdout[-2000:]


@pytest.mark.slow
def test_same_seed_same_loss_history(tmp_path, digits_dir):
    histories = []
    for i in range(2):
        folder = tmp_path / f"run{i}"
        folder.mkdir()
        study = write_study(folder / "s.yaml", tiny_study(digits_dir, "det", train={"steps": 15}))
        ditscale("train", str(study), cwd=folder)
        client, runs = _runs(f"sqlite:///{folder / 'mlflow.db'}", "det")
        histories.append(_loss_history(client, runs[0].info.run_id))
    assert len(histories[0]) == 3
    assert histories[0] == histories[1]


def test_unreachable_tracking_server_fails_before_training(tmp_path, digits_dir):
    study = write_study(tmp_path / "s.yaml", tiny_study(digits_dir, "nowhere",
                                                        tracking={"uri": f"http://127.0.0.1:{_free_port()}"}))
    t0 = time.time()
    proc = ditscale("train", str(study), cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert "tracking.uri" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists(), "nothing may start when the server is unreachable"
    assert time.time() - t0 < 30


def test_sqlite_default_params_identical_keys_across_trials(tmp_path, digits_dir):
    """Flattened params: the same keys for every trial of a study (so the MLflow UI compares them)."""
    from harness.config import expand_grid, load_study

    study = write_study(tmp_path / "s.yaml", {**tiny_study(digits_dir, "keys"),
                                              "grid": {"model": [{"family": "dit", "size": "XXS"},
                                                                 {"family": "mmdit", "size": "d2"}],
                                                       "train.lr": [1e-3, 3e-4]}})
    trials = expand_grid(load_study(study))
    keys = {tuple(sorted(t.flat_params())) for t in trials}
    assert len(trials) == 4 and len(keys) == 1
    assert len({t.trial_id for t in trials}) == 4


def test_activation_checkpointing_keeps_layout_and_gradients():
    import torch

    from harness.trial.engine import checkpoint_blocks
    from models.registry import build_model

    torch.manual_seed(0)
    for name, cond in (("DiT-XXS/2", None), ("MMDiT-d2/2", "text")):
        # label/caption dropout off: both passes must see the same inputs
        kwargs = {"num_classes": 3, "class_dropout_prob": 0.0} if cond is None else {"context_dim": 8, "pooled_dim": 8}
        m = build_model(name, input_size=8, in_channels=1, **kwargs)
        params = [p for p in m.parameters() if p.requires_grad]
        with torch.no_grad():
            for p in params:
                p.normal_(std=0.05)
        x, t = torch.randn(4, 1, 8, 8), torch.randint(0, 1000, (4,))
        inputs = {"y": torch.randint(0, 3, (4,))} if cond is None else {
            "context": torch.randn(4, 5, 8), "pooled": torch.randn(4, 8)}
        keys = list(m.state_dict())
        m(x, t, **inputs).square().mean().backward()
        reference = [p.grad.clone() for p in params]
        m.zero_grad()
        assert checkpoint_blocks(m) == 1 and list(m.state_dict()) == keys
        m(x, t, **inputs).square().mean().backward()
        assert all(torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(reference, params))


@pytest.mark.slow
def test_bf16_zero3_checkpointed_cosine_run(tmp_path, digits_dir):
    """The other engine options together on one rank: bf16, ZeRO-3, activation checkpointing,
    warm-up + cosine, clipping, micro-batches with gradient accumulation, MM-DiT with captions."""
    study = write_study(tmp_path / "s.yaml", tiny_study(
        digits_dir, "options", model={"family": "mmdit", "size": "d2", "patch": 4},
        train={"steps": 10, "precision": "bf16", "zero_stage": 3, "activation_checkpointing": True,
               "schedule": "cosine", "warmup_steps": 3, "grad_clip": 1.0, "micro_batch_size": 16}))
    ditscale("train", str(study), cwd=tmp_path)
    client, runs = _runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "options")
    run = runs[0]
    lrs = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "lr"), key=lambda m: m.step)]
    assert lrs[-1] < lrs[0] <= 1e-3, lrs  # cosine decay after warm-up
    losses = [v for _, v in _loss_history(client, run.info.run_id)]
    assert all(0 < v < 10 for v in losses)
    assert run.data.params["model.family"] == "mmdit" and run.data.params["data.conditioning"] == "text"
