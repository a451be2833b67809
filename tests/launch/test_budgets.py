"""Compute-budgeted trials (train.flops), warmup-stable-decay schedules with cooldown branches from a
shared trunk, and divergence: planning rules checked directly, the sweep on real Ray + DeepSpeed."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import pytest

from tests.support import ditscale, tiny_study, write_study
from tests.support.behaviours import Behaviours


def _trials(digits_dir, tmp_path, grid=None, **train):
    from harness.config import expand_grid, load_study

    base = {"steps": None, **train} if "flops" in train else train
    study = tiny_study(digits_dir, "budget", train=base, grid=grid or {},
                       resources={"workers_per_trial": 1, "storage": str(tmp_path / "runs")})
    study["train"] = {k: v for k, v in study["train"].items() if v is not None}
    return expand_grid(load_study(write_study(tmp_path / "s.yaml", study)))


def _per_step(trial) -> float:
    """One optimizer step's training FLOPs, counted independently of the harness: 3 x forward x batch."""
    from models.flops import count_model

    forward = count_model(trial.model_name, input_size=16, in_channels=1, num_classes=10,
                          learn_sigma=trial.model.learn_sigma).gflops * 1e9
    return 3 * forward * trial.train.batch_size


def test_budget_gives_steps_rounded_to_the_nearest_step(digits_dir, tmp_path):
    from harness.study import resolve_budgets

    trials = _trials(digits_dir, tmp_path, flops=1.0, grid={"train.flops": [7.3e11, 2.2e12], "model.size": ["XXS", "XS"]})
    ids_before = [t.trial_id for t in trials]
    resolve_budgets(trials)
    for trial in trials:
        assert trial.train.steps == round(trial.train.flops / _per_step(trial))
        assert trial.train.steps >= 1
    assert [t.trial_id for t in trials] == ids_before, "resolving the steps must not change a trial's identity"
    xxs = [t for t in trials if t.model.size == "XXS"]
    assert xxs[1].train.steps > xxs[0].train.steps
    # an isoFLOP design: a bigger model gets fewer steps for the same budget
    same_budget = sorted((t for t in trials if t.train.flops == 2.2e12), key=lambda t: t.model.size)
    assert same_budget[0].train.steps != same_budget[1].train.steps


def test_exactly_one_of_steps_and_flops(digits_dir, tmp_path):
    from harness.config import StudyError

    with pytest.raises(StudyError, match=r"train.steps / train.flops: give exactly one"):
        _trials(digits_dir, tmp_path, steps=30, flops=1e12)
    with pytest.raises(StudyError, match=r"train.steps / train.flops: give exactly one"):
        _trials(digits_dir, tmp_path, steps=None)


def test_budget_too_small_and_coinciding_budgets_name_the_field_and_trial(digits_dir, tmp_path):
    from harness.config import StudyError
    from harness.study import resolve_budgets

    trials = _trials(digits_dir, tmp_path, flops=1.0)
    with pytest.raises(StudyError, match=r"train.flops: 1 buys less than one step of DiT-XXS/4 .*trial 0"):
        resolve_budgets(trials)
    per_step = _per_step(_trials(digits_dir, tmp_path, steps=10)[0])
    trials = _trials(digits_dir, tmp_path, flops=1.0, grid={"train.flops": [20 * per_step, 20.2 * per_step]})
    with pytest.raises(StudyError, match=r"train.flops: .* both give 20 steps"):
        resolve_budgets(trials)


def test_wsd_schedule_warmup_stable_and_cooldown_shapes(digits_dir, tmp_path):
    from harness.trial.engine import lr_multiplier

    (trial,) = _trials(digits_dir, tmp_path, steps=100, schedule="wsd", warmup_steps=10, cooldown=0.2)
    f = lr_multiplier(trial)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(50) == 1.0 and f(79) == 1.0  # stable until the last 20 steps
    assert f(80) == pytest.approx(1.0) and f(85) == pytest.approx(1 - math.sqrt(5 / 20))
    assert f(99) == pytest.approx(1 - math.sqrt(19 / 20))
    (linear,) = _trials(digits_dir, tmp_path, steps=100, schedule="wsd", cooldown_steps=40, cooldown_shape="linear")
    g = lr_multiplier(linear)
    assert g(59) == 1.0 and g(70) == pytest.approx(0.75)


def test_schedule_mistakes_are_reported_with_their_fields(digits_dir, tmp_path):
    from harness.config import StudyError

    with pytest.raises(StudyError, match=r"train.cooldown / train.cooldown_steps: give one"):
        _trials(digits_dir, tmp_path, steps=100, schedule="wsd", cooldown=0.2, cooldown_steps=5)
    with pytest.raises(StudyError, match=r"train.cooldown: only train.schedule: wsd"):
        _trials(digits_dir, tmp_path, steps=100, cooldown=0.2)
    with pytest.raises(StudyError, match=r"train.cooldown_steps: warm-up \(10\) \+ cooldown \(95\) exceed"):
        _trials(digits_dir, tmp_path, steps=100, schedule="wsd", warmup_steps=10, cooldown_steps=95)


def test_branch_plan_groups_trials_that_differ_only_in_length(digits_dir, tmp_path):
    from harness.launch.branches import branch_point, plan_branches, plan_compute

    trials = _trials(digits_dir, tmp_path, steps=40, schedule="wsd", warmup_steps=4, cooldown=0.25,
                     grid={"train.steps": [40, 80, 120], "model.size": ["XXS", "XS"]})
    trials.append(_trials(digits_dir, tmp_path, steps=60, schedule="wsd", branch=False)[0])
    trunks, alone = plan_branches(trials)
    assert len(trunks) == 2 and len(alone) == 1  # one trunk per model size; branch: false trains alone
    for trunk in trunks:
        assert [branch_point(b) for b in trunk.branches] == [30, 60, 90]
        t = trunk.trial.train
        assert (t.steps, t.schedule, t.warmup_steps, t.save_at, t.flops) == (90, "warmup", 4, [30, 60, 90], None)
        assert {b.model.size for b in trunk.branches} == {trunk.trial.model.size}
        assert trunk.trial.trial_id not in {b.trial_id for b in trunk.branches}
    branched, independent = plan_compute(trunks, alone, lambda trial: 1.0)
    # per size: trunk 90 + cooldowns 10 + 20 + 30 vs 40 + 80 + 120; plus the lone trial in both
    assert (branched, independent) == (2 * 150 + 60, 2 * 240 + 60)


def test_dry_run_prints_budgets_steps_images_and_the_branched_compute(digits_dir, tmp_path):
    study = tiny_study(digits_dir, "isoflop-dry", train={"steps": None, "flops": 6e11, "schedule": "wsd",
                                                         "cooldown": 0.2},
                       grid={"train.flops": [6e11, 1.2e12, 2.4e12]})
    study["train"].pop("steps")
    out = ditscale("sweep", str(write_study(tmp_path / "s.yaml", study)), "--dry-run", cwd=tmp_path).stdout
    assert "budget" in out and "img/param" in out and "6e+11" in out
    assert "WSD branches: 1 trunk(s) serve 3 trials" in out and "trained independently" in out


def test_dry_run_of_a_branched_study_imports_no_torch(digits_dir, tmp_path):
    """`ditscale sweep --dry-run` plans WSD trunks (harness/launch/branches.py, which needs the checkpoint
    layout) without importing torch, DeepSpeed, Ray or MLflow: it used to import torch through
    harness/trial/checkpoint.py and harness/trial/engine.py."""

    study = tiny_study(digits_dir, "dry-torch", train={"steps": 40, "schedule": "wsd", "cooldown": 0.25},
                       grid={"train.steps": [40, 80]})
    path = write_study(tmp_path / "s.yaml", study)
    code = ("import sys\nfrom harness.cli import main\n"
            f"assert main(['sweep', {str(path)!r}, '--dry-run']) == 0\n"
            "print('heavy', [m for m in ('torch', 'deepspeed', 'ray', 'mlflow') if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "WSD branches: 1 trunk(s) serve 2 trials" in proc.stdout, proc.stdout
    assert proc.stdout.splitlines()[-1] == "heavy []", proc.stdout[-2000:]


@pytest.mark.slow
def test_branches_match_standalone_and_divergence_is_a_concluded_status(digits_dir, tmp_path):
    """Two WSD lengths branched from one trunk on real Ray + DeepSpeed: each branch is its own MLflow
    trial run (tag branch_of = the trunk), with the same params as a standalone trial, and ends at the
    validation loss of the same trial trained standalone, within that trial's run-to-run noise.
    Issue 26: a second trunk (learning rate far too high) diverges, and its branches conclude as
    `diverged (trunk <id>)`, not as errors (the sweep exits 0); a finished trunk whose checkpoints were
    deleted is trained again when a branch still needs them."""

    import mlflow

    train = {"steps": 60, "schedule": "wsd", "warmup_steps": 5, "cooldown": 0.25, "lr": 2e-3, "log_every": 5,
             "checkpoint_every": 1000, "divergence_factor": 3.0}
    ev = {"val_batches": 2, "batch_size": 64}
    branched = tiny_study(digits_dir, "branches", train=train, eval=ev,
                          grid={"train.steps": [40, 60], "train.lr": [2e-3, 50.0]})
    # The standalone trials share their sweep with a trial whose learning rate is far too high: it must
    # stop as diverged while the sweep goes on (one Ray start-up for both checks).
    alone = tiny_study(digits_dir, "branches-alone", train={**train, "branch": False},
                       eval=ev, grid={"train.steps": [60], "train.seed": [0, 1], "train.lr": [2e-3, 50.0]},
                       exclude=[{"train.seed": 1, "train.lr": 50.0}])
    paths = {study["name"]: write_study(tmp_path / f"{study['name']}.yaml", study) for study in (branched, alone)}
    ditscale("sweep", str(paths["branches"]), "--no-report", cwd=tmp_path, timeout=1500)  # exits 0
    first = ditscale("sweep", str(paths["branches-alone"]), "--no-report", cwd=tmp_path, timeout=1500, check=False)
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")

    def runs(name):
        exp = client.get_experiment_by_name(name)
        return client.search_runs([exp.experiment_id], filter_string="tags.trial_id != ''")

    got = runs("branches")
    healthy = [r for r in got if r.data.params["train.lr"] != "50.0"]
    trunk = [r for r in healthy if r.data.tags.get("ditscale.role") == "trunk"]
    branches = [r for r in healthy if "branch_of" in r.data.tags]
    bad_trunks = [r for r in got if r.data.params["train.lr"] == "50.0" and r.data.tags.get("ditscale.role") == "trunk"]
    assert len(bad_trunks) == 1, [r.data.tags for r in got]  # the one diverging trunk: the checks below read it
    bad_trunk = bad_trunks[0]
    bad_id = bad_trunk.data.tags["trial_id"]
    bad_branches = [r for r in got if r.data.tags.get("branch_of") == bad_id]
    alone_runs = runs("branches-alone")
    standalone = {int(r.data.params["train.seed"]): r for r in alone_runs if r.data.params["train.lr"] != "50.0"}
    long_branch = next((r for r in branches if r.data.params["train.steps"] == "60"), None)
    checks = Behaviours()  # eight behaviours of these two sweeps, each reported by name

    with checks("each branch is its own finished trial run of the one trunk (tag branch_of)"):
        assert len(trunk) == 1 and len(branches) == 2 and len(healthy) == 3 and len(got) == 6
        assert {r.data.tags["branch_of"] for r in branches} == {trunk[0].data.tags["trial_id"]}
        assert all(r.data.tags["ditscale.status"] == "finished" for r in healthy)
    with checks("a diverged trunk's branches conclude as diverged, naming the trunk, each in its own run"):
        assert bad_trunk.data.tags["ditscale.status"].startswith("diverged: "), bad_trunk.data.tags
        assert [r.data.tags["ditscale.status"] for r in bad_branches] == [f"diverged (trunk {bad_id})"] * 2
    with checks("a branch has a standalone trial's params and trains its steps"):
        assert set(branches[0].data.params) == set(standalone[0].data.params), "a branch has a standalone trial's params"
        assert long_branch.data.metrics["step"] == 60 and long_branch.data.metrics["samples_seen"] == 60 * 32
    with checks("a branch ends at the standalone trial's val_loss within run-to-run noise"):
        noise = abs(standalone[0].data.metrics["val_loss"] - standalone[1].data.metrics["val_loss"])
        gap = abs(long_branch.data.metrics["val_loss"] - standalone[0].data.metrics["val_loss"])
        print(f"\nval_loss: branch {long_branch.data.metrics['val_loss']:.4f}, standalone seed 0 "
              f"{standalone[0].data.metrics['val_loss']:.4f}, seed 1 {standalone[1].data.metrics['val_loss']:.4f}; "
              f"gap {gap:.4f}, run-to-run noise {noise:.4f}")
        assert gap <= max(2 * noise, 0.02 * standalone[0].data.metrics["val_loss"]), (gap, noise)
    # The divergence rule's state (harness/trial/divergence.py) counts every step once, step 1 (judged on
    # its own) included, and travels in the checkpoint.
    with checks("the divergence state counts every step and travels in the checkpoint"):
        import torch

        final = (tmp_path / "runs" / "branches-alone" / standalone[0].data.tags["trial_id"] / "checkpoints"
                 / "step-00000060" / "mp_rank_00_model_states.pt")
        smoothed = torch.load(final, weights_only=False, map_location="cpu")["smoothed_loss"]
        assert smoothed["steps"] == 60 and 0 < smoothed["minimum"] < 3 * standalone[0].data.metrics["loss"], smoothed

    # Divergence: the trial with a learning rate far too high stopped as diverged; the sweep went on
    # (and exited 0), and a second sweep does not train it again.
    with checks("a diverged trial stops, the sweep goes on and exits 0, a second sweep does not train it"):
        statuses = {(r.data.params["train.lr"], r.data.params["train.seed"]): r.data.tags["ditscale.status"]
                    for r in alone_runs}
        assert statuses[("50.0", "0")].startswith("diverged"), statuses
        assert statuses[("50.0", "0")].count(" at step ") == 1, statuses
        assert all(v == "finished" for k, v in statuses.items() if k[0] != "50.0"), statuses
        assert first.returncode == 0, first.stderr[-3000:]
        again = ditscale("sweep", str(paths["branches-alone"]), "--no-report", cwd=tmp_path, timeout=600)
        assert "3 of 3 trials already finished or diverged" in again.stdout

    # Heal: the long branch is lost (its run failed, its folder gone) and so are the finished trunk's
    # checkpoints: the next sweep trains the trunk again, then the branch; the diverged ones stay concluded.
    with checks("a lost branch whose trunk's checkpoints are gone is trained again, trunk first"):
        client.set_tag(long_branch.info.run_id, "ditscale.status", "failed: node lost")
        study_runs = tmp_path / "runs" / "branches"
        shutil.rmtree(study_runs / long_branch.data.tags["trial_id"])
        shutil.rmtree(study_runs / trunk[0].data.tags["trial_id"] / "checkpoints")
        healed = ditscale("sweep", str(paths["branches"]), "--no-report", cwd=tmp_path, timeout=1500)
        assert f"trunk {trunk[0].data.tags['trial_id']}: its checkpoint at step 45 is gone" in healed.stdout, healed.stdout
        assert "3 of 4 trials already finished or diverged" in healed.stdout  # the 2 diverged ones among them
        after = {r.data.tags["trial_id"]: r.data.tags["ditscale.status"] for r in runs("branches")}
        assert after[long_branch.data.tags["trial_id"]] == "finished" and after[trunk[0].data.tags["trial_id"]] == "finished"
        assert (study_runs / trunk[0].data.tags["trial_id"] / "checkpoints" / "step-00000045").is_dir()
        assert [after[r.data.tags["trial_id"]] for r in bad_branches] == [f"diverged (trunk {bad_id})"] * 2
    # The retrained trunk logged its steps a second time into its run: the run says where it went back
    # (harness/trial/checkpoint.py record_rewind) and the analysis reads the latest pass only.
    with checks("a retrained trunk's run reads as one series, its latest pass"):
        from analysis.runs import load_histories

        trunk_run = client.get_run(trunk[0].info.run_id)
        assert [step for step, _ in json.loads(trunk_run.data.tags["ditscale.rewinds"])] == [0], trunk_run.data.tags
        raw = [m.step for m in client.get_metric_history(trunk_run.info.run_id, "loss")]
        read = load_histories(f"sqlite:///{tmp_path / 'mlflow.db'}", "branches", keys=["loss"], runs=[trunk_run])
        assert len(raw) > len(read) and read["step"].is_unique and sorted(read["step"]) == sorted(set(raw)), raw
    checks.done()
