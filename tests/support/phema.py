"""Post-hoc EMA checks that tests/trial/test_train.py::test_kill_and_resume_continues_the_same_run runs on its
real trial (train POSTHOC, eval EMA_CHOICE): the snapshots after a SIGKILL and a resume, `ditscale eval`'s
choice of the EMA, and the final evaluation's EMA chosen by validation loss (tests/trial/test_phema.py holds the
post-hoc EMA's own tests)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.support.study import ditscale

POSTHOC = {"ema_decay": 0.9999, "posthoc_ema": {"sigma_rels": [0.05, 0.10], "snapshot_every": 10}}


def snapshot_files(trial_dir) -> dict[str, object]:
    return {p.name: p for p in sorted((trial_dir / "phema").glob("*.pt"))}


def saved_posthoc_state(tmp_path, name: str, step: int) -> dict:
    """What a SIGKILLed trial left at the checkpoint it will resume from (`step`): the post-hoc EMA state
    in that checkpoint (read before the resumed run prunes it) and the bytes of its snapshots up to `step`."""
    tag = next((tmp_path / "runs" / name).glob(f"*/checkpoints/step-{step:08d}"))
    files = snapshot_files(tag.parent.parent)
    return {"state": torch.load(tag / "phema.pt", weights_only=True),
            "files": {n: p.read_bytes() for n, p in files.items() if int(n[-11:-3]) <= step}}


def check_snapshots_after_kill_and_resume(tmp_path, study, name: str, resumed_from: int, steps: int,
                                          saved: dict) -> None:
    """Called by tests/trial/test_train.py::test_kill_and_resume_continues_the_same_run after its trial (train
    POSTHOC, snapshot_every 10) was SIGKILLed and resumed from `resumed_from` to `steps`.

    A resumed trial draws a fresh data stream (harness/trial/batches.py), so its weights after the resume
    differ from an uninterrupted run's by design. What must hold: the snapshots up to the resumed checkpoint
    are left as the killed run wrote them (which, by the seeded determinism test_same_seed_same_loss_history
    checks, are an uninterrupted run's), and the state saved with that checkpoint is exactly those profiles
    at that step; the resumed run continues them at the right step (a profile restarted at t = 1 fails the
    step check in PosthocEMA.update) and leaves every snapshot step covered; snapshots the killed run wrote
    after its checkpoint are rewritten. Then `ditscale ema reconstruct` writes a state dict that loads
    strictly and evaluates, and `ditscale eval` chooses the EMA as the trial did
    (check_eval_command_chooses_as_the_trial_did)."""
    from harness.config import expand_grid, load_study
    from harness.trial.build import build_trial

    trial_dir = next((tmp_path / "runs" / name).glob("*/phema")).parent
    files = snapshot_files(trial_dir)
    assert sorted(files) == sorted(f"{s:g}-{n:08d}.pt" for s in (0.05, 0.1) for n in range(10, steps + 1, 10))
    for path in files.values():
        snap = torch.load(path, weights_only=True)
        assert f"{snap['sigma_rel']:g}-{snap['step']:08d}.pt" == path.name
    assert len(saved["files"]) == 2 * (resumed_from // 10)
    for n, data in saved["files"].items():
        assert files[n].read_bytes() == data, n
    state = saved["state"]
    assert state["num_updates"] == resumed_from and state["sigma_rels"] == [0.05, 0.1]
    for k, s in enumerate((0.05, 0.1)):
        last = torch.load(files[f"{s:g}-{resumed_from:08d}.pt"], weights_only=True)["shadow"]
        assert all(torch.equal(state["shadows"][k][key], last[key]) for key in last)

    out = tmp_path / "ema-0.07.pt"
    plan = json.loads(ditscale("ema", "reconstruct", str(trial_dir), "--sigma-rel", "0.07", "--out", str(out),
                               "--json", cwd=tmp_path).stdout)
    assert plan["step"] == steps and len(plan["snapshots"]) == 2 * (steps // 10)
    assert sum(s["weight"] for s in plan["snapshots"]) == pytest.approx(1.0, abs=1e-9)
    trial = expand_grid(load_study(study))[0]
    torch.manual_seed(0)
    model = build_trial(trial, "cpu").denoiser
    model.load_state_dict(torch.load(out, weights_only=True), strict=True)
    model.eval()
    with torch.no_grad():
        y = model(torch.randn(2, 1, 16, 16), torch.tensor([10.0, 500.0]), y=torch.tensor([1, 2]))
    assert torch.isfinite(y).all()
    check_eval_command_chooses_as_the_trial_did(tmp_path, study, name, steps)


def check_eval_command_chooses_as_the_trial_did(tmp_path, study, name: str, steps: int) -> None:
    """`ditscale eval` of the trained trial (eval EMA_CHOICE) honours eval.ema_sigma_rels as the end of the
    trial did: each width rebuilt at the checkpoint's step and scored by its validation loss (the trial's
    numbers: the same weights, the same fixed samples), the full evaluation on the best, the param and tag
    logged. It logs into a second MLflow store (--set tracking.uri, not part of the trial's identity: the same
    trial folder), so that the trial's own run keeps its one final evaluation for check_ema_choice."""
    from mlflow.tracking import MlflowClient

    from harness.trial.posthoc_ema import BEST_PARAM, FINAL_EMA_TAG

    other = f"sqlite:///{tmp_path / 'eval.db'}"
    proc = ditscale("eval", str(study), "--json", "--set", f"tracking.uri={other}", cwd=tmp_path)
    metrics = json.loads(proc.stdout)["metrics"]
    per_sigma = {s: metrics[f"val_loss_ema{s:g}"] for s in EMA_CHOICE["ema_sigma_rels"]}
    best = min(per_sigma, key=per_sigma.get)
    assert metrics["val_loss"] == pytest.approx(per_sigma[best], rel=1e-6), (metrics, per_sigma)
    assert "post-hoc EMA val_loss by sigma_rel" in proc.stderr
    trained_client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (trained,) = trained_client.search_runs([trained_client.get_experiment_by_name(name).experiment_id])
    for s, value in per_sigma.items():
        assert value == pytest.approx(trained.data.metrics[f"val_loss_ema{s:g}"], rel=1e-5), (s, per_sigma)
    client = MlflowClient(other)
    (run,) = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    assert run.data.params[BEST_PARAM] == f"{best:g}" == trained.data.params[BEST_PARAM]
    assert f"sigma_rel={best:g}" in run.data.tags[FINAL_EMA_TAG] and f"at step {steps}" in run.data.tags[FINAL_EMA_TAG]
    assert [m.step for m in client.get_metric_history(run.info.run_id, f"val_loss_ema{best:g}")] == [steps]


EMA_CHOICE = {"val_batches": 1, "ema_sigma_rels": [0.05, 0.1]}  # the eval section of the end-to-end trial


def check_ema_choice(client, run) -> None:
    """Called by tests/trial/test_train.py::test_kill_and_resume_continues_the_same_run (eval EMA_CHOICE): at the
    last step each width's validation loss is logged, the param names the argmin, and the final val_loss
    (the full evaluation's) is that width's."""
    from harness.trial.posthoc_ema import BEST_PARAM, FINAL_EMA_TAG

    steps = int(run.data.params["train.steps"])
    per_sigma = {}
    for s in EMA_CHOICE["ema_sigma_rels"]:
        history = client.get_metric_history(run.info.run_id, f"val_loss_ema{s:g}")
        assert [m.step for m in history] == [steps], history
        per_sigma[s] = history[0].value
    best = min(per_sigma, key=per_sigma.get)
    assert per_sigma[0.05] != per_sigma[0.1]  # two different EMAs, so the choice means something
    assert run.data.params[BEST_PARAM] == f"{best:g}", (run.data.params[BEST_PARAM], per_sigma)
    (final,) = client.get_metric_history(run.info.run_id, "val_loss")
    assert final.step == steps and final.value == pytest.approx(per_sigma[best], rel=1e-6)
    assert f"sigma_rel={best:g}" in run.data.tags[FINAL_EMA_TAG]
    assert run.data.metrics["posthoc_ema_seconds"] > 0
    print(f"eval.ema_sigma_rels at step {steps}: val_loss {per_sigma}, best {best:g}, "
          f"{run.data.metrics['posthoc_ema_seconds']:.2f} s to choose, final evaluation "
          f"{run.data.metrics['eval_seconds']:.2f} s")
