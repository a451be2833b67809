"""Issue 26: divergence judged on a smoothed loss (no false alarms on healthy small-batch diffusion
losses, real divergences still caught), WSD trunks that heal, impossible branch points and absurd
config values rejected before anything starts.

The loss traces in tests/fixtures/loss_traces.json are the per-step training losses of real tiny trainings
(`ditscale train` with log_every 1: DiT-XXS/4 on the built-in digits and shapes at 16x16, batch 32, fp32
on CPU, DDPM and rectified flow). "healthy": lr 1e-3 / 2e-3 for 600 steps (one DDPM run stopped at 437),
and lr 3e-2 (30x) for 300 steps, which this model still trains at. "diverging": lr 6e-2 (30x the
shapes run's 2e-3) to 50, which blow up (then collapse to the trivial loss 1.0, or go non-finite).
The sweep with a diverging trunk and a trunk whose checkpoints were deleted is in tests/launch/test_budgets.py.
"""

from __future__ import annotations

import json
import math

import pytest

from tests.support import tiny_study, write_study
from tests.support.paths import FIXTURES

TRACES = FIXTURES / "loss_traces.json"
FACTOR = 3.0  # the budget trials' default (harness/config.py: DEFAULT_BUDGET_DIVERGENCE)


def _traces(kind: str) -> dict[str, list[float]]:
    """name -> per-step losses (MLflow stores an infinite loss as the largest float: read back as inf)."""
    return {name: [math.inf if x >= 1e308 else x for x in t["loss"]]
            for name, t in json.loads(TRACES.read_text()).items() if t["kind"] == kind}


def _old_rule_alarm(losses: list[float], factor: float) -> int | None:
    """The rule before issue 26: each window against factor x the running minimum of single windows."""
    low = math.inf
    for step, loss in enumerate(losses, 1):
        if loss > factor * low:
            return step
        low = min(low, loss)
    return None


# --- 1. the divergence rule ------------------------------------------------------------------------------


def test_no_false_alarm_on_healthy_ddpm_and_rectified_flow_traces():
    """Healthy DDPM and rectified-flow losses at batch 32, log_every 1, 600 steps: the smoothed rule never
    fires (at log_every 1, 5 and 20), with a wide margin; the single-window rule fired on the DDPM ones."""
    from harness.trial.divergence import WARMUP_STEPS, SmoothedLoss, first_alarm

    healthy = _traces("healthy")
    assert sum(len(t) >= 400 for t in healthy.values()) >= 4
    assert {n.split("-")[0] for n in healthy} == {"ddpm", "rf"}
    worst = 0.0
    for name, losses in healthy.items():
        for log_every in (1, 5, 20):
            assert first_alarm(losses, FACTOR, log_every) is None, (name, log_every)
        judge = SmoothedLoss()
        for step, loss in enumerate(losses, 1):
            judge.judge(loss, 1, None, step)
            if step >= WARMUP_STEPS:  # what the rule judges
                worst = max(worst, judge.value / judge.minimum)
    assert worst < FACTOR / 2, f"smoothed loss rose to {worst:.2f} x its minimum on a healthy trace"
    fired = [n for n, t in healthy.items() if n.startswith("ddpm") and _old_rule_alarm(t, FACTOR)]
    assert fired, "the traces should include the case the single-window rule got wrong"
    print(f"\nhealthy traces: {len(healthy)}, highest smoothed/minimum {worst:.3f}; the single-window rule fired "
          f"on {len(fired)} of them, at steps {[_old_rule_alarm(healthy[n], FACTOR) for n in fired]}")


def _onset(losses: list[float], factor: float) -> int:
    """Where a trace leaves its level: the first step whose loss is non-finite or above factor x the
    lowest loss before it."""
    low = math.inf
    for step, loss in enumerate(losses, 1):
        if not loss <= factor * low:  # NaN and inf included
            return step
        low = min(low, loss)
    raise AssertionError("the trace never leaves its level")


def test_real_divergence_and_nan_are_caught_within_a_bounded_delay():
    """Real blow-ups (learning rate 300x-1000x the healthy one, DDPM and rectified flow: DiT-XXS at 30x
    trains normally, see the healthy traces) stop within a few steps of the warm-up's end; a NaN stops
    the trial at its own step; a jump to r x the loss's level is caught within the EMA's crossing time
    N ln((r - 1) / (r - factor)) steps, whenever it happens."""
    from harness.trial.divergence import SMOOTHING_STEPS, WARMUP_STEPS, SmoothedLoss, first_alarm

    diverging = _traces("diverging")
    assert len(diverging) >= 3 and {n.split("-")[0] for n in diverging} == {"ddpm", "rf"}
    for name, losses in diverging.items():
        alarm, onset = first_alarm(losses, FACTOR), _onset(losses, FACTOR)
        print(f"\n{name}: left its level at step {onset}, stopped at step {alarm} (delay {alarm - onset} steps)")
        assert alarm <= max(onset, WARMUP_STEPS) + 2, (name, onset, alarm)
        if len(losses) > 100:  # a blow-up inside the first log window is caught too (step 1 is judged alone)
            for log_every in (5, 10, 20):
                late = first_alarm(losses, FACTOR, log_every)
                assert late is not None and late <= max(onset, WARMUP_STEPS) + log_every, (name, log_every, late)

    for r in (4, 10, 30, 1000):  # the level 0.1, then r x 0.1 from step 201 on
        alarm = first_alarm([0.1] * 200 + [0.1 * r] * 400, FACTOR)
        bound = math.ceil(SMOOTHING_STEPS * math.log((r - 1) / (r - FACTOR)))
        assert alarm is not None and 0 < alarm - 200 <= bound + 1, (r, alarm, bound)
    # A spike of one step (x30) is not a divergence
    assert first_alarm([0.1] * 200 + [3.0] + [0.1] * 200, FACTOR) is None

    # NaN: at once, and the status names the step once
    judge = SmoothedLoss()
    for step in range(1, 300):
        assert judge.judge(0.1, 1, FACTOR, step) is None
    status = judge.judge(float("nan"), 1, FACTOR, 300)
    assert status.startswith("diverged: non-finite loss") and status.count("at step") == 1 and status.endswith("300")
    assert SmoothedLoss().judge(float("inf"), 1, FACTOR, 2).startswith("diverged: non-finite")  # in the warm-up too
    # A factor of None (train.steps trials): only non-finite losses stop
    assert first_alarm([0.1] * 200 + [3.0] * 100, None) is None


def test_the_estimator_state_resumes_exactly():
    """A trial resumed from its checkpoint's state judges as an uninterrupted one would."""
    from harness.trial.divergence import SmoothedLoss

    losses = next(iter(_traces("healthy").values()))
    whole, first = SmoothedLoss(), SmoothedLoss()
    for step, loss in enumerate(losses, 1):
        whole.judge(loss, 1, FACTOR, step)
        if step <= 250:
            first.judge(loss, 1, FACTOR, step)
    resumed = SmoothedLoss.from_dict(json.loads(json.dumps(first.to_dict())))
    for step, loss in enumerate(losses[250:], 251):
        resumed.judge(loss, 1, FACTOR, step)
    assert resumed.to_dict() == pytest.approx(whole.to_dict())


# --- 2. WSD branch points and trunks that heal ------------------------------------------------------------


def _wsd_trials(digits_dir, tmp_path, steps=(40, 60), **train):
    from harness.config import expand_grid, load_study
    from harness.launch.plan import plan_rows

    study = tiny_study(digits_dir, "wsd-plan", train={"schedule": "wsd", "steps": steps[0], **train},
                       grid={"train.steps": list(steps)}, resources={"storage": str(tmp_path / "runs")},
                       tracking={"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "system_metrics": False})
    path = write_study(tmp_path / "wsd.yaml", study)
    trials = expand_grid(load_study(path))
    plan_rows(trials)
    return path, trials


@pytest.mark.parametrize("train, field", [({"cooldown": 0.999}, "train.cooldown"),
                                          ({"cooldown_steps": 40}, "train.cooldown_steps")])
def test_a_branch_point_at_step_0_is_rejected_by_the_dry_run_naming_the_field(digits_dir, tmp_path, train, field):
    from harness.config import StudyError
    from harness.launch.sweep import run_sweep

    study = tiny_study(digits_dir, "wsd-zero", train={"schedule": "wsd", "steps": 40, **train},
                       grid={"train.steps": [40, 60]})
    with pytest.raises(StudyError) as err:
        run_sweep(str(write_study(tmp_path / "zero.yaml", study)), dry_run=True)
    message = str(err.value)
    assert message.startswith(f"{field}: ") and "step 0" in message and "\n" not in message, message


def test_a_missing_trunk_checkpoint_rewinds_the_trunk(digits_dir, tmp_path):
    """rewind_trunk on real folders: `latest` points at the newest complete tag before the missing
    branch point (the trunk trains again through it), or goes when there is none."""
    from harness.launch.branches import branch_ready, plan_branches, rewind_trunk, seed_branch
    from harness.paths import checkpoint_root

    _, trials = _wsd_trials(digits_dir, tmp_path, steps=(40, 80), cooldown=0.25)
    (trunk,) = plan_branches(trials)[0]
    short, long = trunk.branches
    root = checkpoint_root(trunk.trial)
    assert not branch_ready(trunk.trial, short)
    for step in (10, 30, 50, 60):
        (root / f"step-{step:08d}").mkdir(parents=True)
        (root / f"step-{step:08d}" / "ema.pt").write_bytes(b"x")
    (root / "latest").write_text("step-00000060")
    assert branch_ready(trunk.trial, short) and branch_ready(trunk.trial, long)  # points 30 and 60
    (root / "step-00000030" / "ema.pt").unlink()  # a deleted (or half-deleted) branch point
    assert not branch_ready(trunk.trial, short) and not seed_branch(trunk.trial, short)
    assert rewind_trunk(trunk.trial, 30) == "step-00000010"
    assert (root / "latest").read_text() == "step-00000010"
    assert rewind_trunk(trunk.trial, 10) is None and not (root / "latest").exists()
    # a trunk whose folder is gone altogether: nothing to rewind, it trains from the start
    assert rewind_trunk(trials[0], 5) is None


def test_branches_a_trunk_cannot_serve_are_settled_in_mlflow_without_ray(digits_dir, tmp_path, capsys):
    """A diverged trunk concludes its branches as `diverged (trunk <id>)` (concluded: the sweep exits 0,
    the report excludes them by name); a trunk that still lacks the checkpoint fails its branch with one
    line naming the trunk's folder. Real MLflow (sqlite)."""
    import pandas as pd

    from analysis.study import split_usable
    from harness.launch.branches import plan_branches
    from harness.launch.sweep import settle_branches
    from harness.paths import checkpoint_root
    from harness.tracking import RunLogger, concluded, open_trial_run, sweep_state

    _, trials = _wsd_trials(digits_dir, tmp_path, steps=(40, 80), cooldown=0.25)
    (trunk,) = plan_branches(trials)[0]
    uri = trunk.trial.tracking.uri
    trunk_of = {b.trial_id: trunk.trial for b in trunk.branches}
    RunLogger(uri, open_trial_run(trunk.trial, uri)).close("diverged: smoothed loss 9 > 3 x its minimum 1 at step 50")
    # the trunk diverged at step 50: the 40-step branch (point 30) has its checkpoint and trains
    tag = checkpoint_root(trunk.trial) / "step-00000030"
    tag.mkdir(parents=True)
    (tag / "ema.pt").write_bytes(b"x")
    state = sweep_state(uri, trunk.trial.name, [trunk.trial])
    ready, settled = settle_branches(trunk.branches, trunk_of, state, set(), uri, None)
    short, long = trunk.branches
    assert [b.trial_id for b in ready] == [short.trial_id]
    assert settled == {long.trial_id: f"diverged (trunk {trunk.trial.trial_id})"}
    after = sweep_state(uri, trunk.trial.name, trials)
    assert after[long.trial_id] == f"diverged (trunk {trunk.trial.trial_id})" and concluded(after[long.trial_id])
    table = pd.DataFrame([{"label": "DiT-XXS/4 80 steps", "trial_id": long.trial_id, "status": after[long.trial_id]}])
    usable, excluded = split_usable(table)
    assert usable.empty and excluded[0]["reason"].startswith("diverged") and excluded[0]["trial_id"] == long.trial_id

    # a finished trunk retrained in this sweep that still has no checkpoint at the branch point
    RunLogger(uri, open_trial_run(trunk.trial, uri)).close("finished")
    state = sweep_state(uri, trunk.trial.name, [trunk.trial])
    _, settled = settle_branches([long], trunk_of, state, {trunk.trial.trial_id}, uri, None)
    line = settled[long.trial_id]
    assert line.startswith("failed: ") and "\n" not in line and "after training it again" in line
    assert str(checkpoint_root(trunk.trial).parent) in line
    assert not concluded(sweep_state(uri, trunk.trial.name, [long])[long.trial_id])
    assert line in capsys.readouterr().out


@pytest.mark.parametrize("status, point, ready, need", [
    ("finished", 30, True, "ready"),
    ("diverged: smoothed loss 9 > 3 x its minimum 1 at step 50", 60, True, "ready"),  # its own checkpoints
    ("finished", 30, False, "rewind"),
    ("diverged: smoothed loss 9 > 3 x its minimum 1 (moving average over ~50 steps) at step 50", 30, False, "rewind"),
    ("diverged: non-finite loss (nan) at step 50", 49, False, "rewind"),
    ("diverged: non-finite loss (nan) at step 50", 50, False, "diverged"),  # step 50 was never checkpointed
    ("diverged: smoothed loss 9 > 3 x its minimum 1 at step 50", 60, False, "diverged"),
    ("diverged: loss 0.17 > 3 x its running minimum 0.05", 30, False, "diverged"),  # no step named: as before
    ("failed: node lost", 30, False, "train"),
    ("running", 30, False, "train"),
    ("new", 30, False, "train"),
])
def test_trunk_need_retrains_a_trunk_that_diverged_after_the_branch_point(status, point, ready, need):
    """A branch whose trunk checkpoint is gone is diverged only when its point is at or after the step
    where the trunk diverged; before it, the trunk passed the point in health and is trained again."""
    from harness.launch.branches import trunk_need
    from harness.trial.divergence import SmoothedLoss, divergence_step

    assert trunk_need(status, point, ready) == need
    # the step is read from the very message the rule writes
    judge = SmoothedLoss()
    for step in range(1, 100):
        judge.judge(0.1, 1, FACTOR, step)
    assert divergence_step(judge.judge(5.0, 1, FACTOR, 100) or "") is None  # one step x50: not yet
    message = next(m for step in range(101, 200) if (m := judge.judge(5.0, 1, FACTOR, step)))
    assert divergence_step(message) == int(message.rsplit(" ", 1)[1]) > 100
    assert divergence_step(f"diverged (trunk {'a' * 12})") is None


def test_a_trunk_that_diverged_after_a_lost_branch_point_is_rewound_not_blamed(digits_dir, tmp_path, capsys):
    """The trunk diverged at step 50; the checkpoint at the 40-step branch's point (30) was deleted: the
    sweep rewinds the trunk to train it again through step 30 (before #26's follow-up its branch was
    concluded `diverged (trunk ...)`). If the retrained trunk still lacks it, the branch fails in one
    line; the 80-step branch (point 60, after the divergence) concludes as diverged. Real MLflow (sqlite)."""
    from harness.launch.branches import plan_branches
    from harness.launch.sweep import _trunks_to_retrain, settle_branches
    from harness.paths import checkpoint_root
    from harness.tracking import RunLogger, open_trial_run, sweep_state

    _, trials = _wsd_trials(digits_dir, tmp_path, steps=(40, 80), cooldown=0.25)
    (trunk,) = plan_branches(trials)[0]
    short, long = trunk.branches
    uri, tid = trunk.trial.tracking.uri, trunk.trial.trial_id
    trunk_of = {b.trial_id: trunk.trial for b in trunk.branches}
    RunLogger(uri, open_trial_run(trunk.trial, uri)).close(
        "diverged: smoothed loss 9 > 3 x its minimum 1 (moving average over ~50 steps) at step 50")
    root = checkpoint_root(trunk.trial)
    for step in (10, 20, 40):  # 30 (the short branch's point) deleted; 40 the last before the divergence
        (root / f"step-{step:08d}").mkdir(parents=True)
        (root / f"step-{step:08d}" / "ema.pt").write_bytes(b"x")
    (root / "latest").write_text("step-00000040")
    state = sweep_state(uri, trunk.trial.name, [trunk.trial])

    assert _trunks_to_retrain([short, long], trunk_of, state) == {tid}
    assert (root / "latest").read_text() == "step-00000020"  # it trains again through step 30
    assert f"trunk {tid}: its checkpoint at step 30 is gone" in capsys.readouterr().out
    # the retrained trunk (diverged again at 50) still has no step 30: the short branch fails, the long
    # one (point 60, after the divergence) is diverged with its trunk
    _, settled = settle_branches([short, long], trunk_of, state, {tid}, uri, None)
    assert settled[short.trial_id].startswith("failed: ") and "after training it again" in settled[short.trial_id]
    assert settled[long.trial_id] == f"diverged (trunk {tid})"


# --- 3. absurd config values ---------------------------------------------------------------------------------


@pytest.mark.parametrize("override, field", [
    ("train.seed=100000000000000000000000", "train.seed"),  # 1e23 as YAML's integer
    ("train.seed=1.0e+17", "train.seed"),  # x 1000 (the per-rank seed) is beyond torch's 64 bits
    ("eval.cfg_scale=[1.0, .nan]", "eval.cfg_scale"),
    ("eval.cfg_scale=[.inf]", "eval.cfg_scale"),
])
def test_absurd_seed_and_cfg_scale_are_rejected_naming_the_field(digits_dir, tmp_path, override, field):
    from harness.config import StudyError, load_study

    path = write_study(tmp_path / "s.yaml", tiny_study(digits_dir, "absurd"))
    with pytest.raises(StudyError) as err:
        load_study(path, [override])
    assert str(err.value).startswith(field), str(err.value)
    load_study(path, ["train.seed=4294967295", "eval.cfg_scale=[1.0, 4.0]"])  # the largest seed numpy takes


@pytest.mark.parametrize("flops", [".inf", ".nan", "1e300"])
def test_non_finite_or_absurd_budgets_are_rejected_naming_train_flops(digits_dir, tmp_path, flops):
    from harness.config import StudyError
    from harness.study import load_trials

    study = tiny_study(digits_dir, "absurd-budget")
    study["train"].pop("steps")
    path = write_study(tmp_path / "s.yaml", study)
    with pytest.raises(StudyError) as err:
        load_trials(path, [f"train.flops={flops}"])
    assert str(err.value).startswith("train.flops"), str(err.value)
    assert len(str(err.value).splitlines()) == 1


def test_a_rewound_run_reads_as_its_latest_pass_only(tmp_path, monkeypatch):
    """A trunk trained again from step 20 (rewind_trunk) logs steps 25.. a second time into its run:
    record_rewind marks the run before the new pass logs, and the analysis then reads one series, the
    latest (best_loss, steps, the curves), not the union of both. Real MLflow (sqlite)."""
    import mlflow
    from mlflow.entities import Metric

    from analysis import runs as analysis_runs
    from harness.trial.checkpoint import REWINDS_TAG, record_rewind

    assert analysis_runs.REWINDS_TAG == REWINDS_TAG
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = mlflow.MlflowClient(uri)
    run_id = c.create_run(c.create_experiment("rewind"), tags={"trial_id": "t" * 12}).info.run_id
    t0 = 1_700_000_000_000

    def log_pass(steps, loss, start):
        c.log_batch(run_id, metrics=[m for s in steps for m in (Metric("loss", loss(s), start + s, s),
                                                                   Metric("step", float(s), start + s, s))])

    c.log_batch(run_id, metrics=[Metric("system/cpu_utilization_percentage", 50.0, t0, 400)])  # its own steps
    assert not record_rewind(c, run_id, 0)  # a new run (system metrics apart): nothing to supersede
    assert REWINDS_TAG not in c.get_run(run_id).data.tags
    log_pass(range(5, 55, 5), lambda s: 1.0 if s <= 20 else 0.2, t0)  # the first pass, to step 50
    assert record_rewind(c, run_id, 20, now_ms=t0 + 1000)
    log_pass(range(25, 50, 5), lambda s: 0.5, t0 + 2000)  # the second pass, stopped at 45 (killed, diverged)
    assert json.loads(c.get_run(run_id).data.tags[REWINDS_TAG]) == [[20, t0 + 1000]]

    run = c.get_run(run_id)
    hist = analysis_runs.load_histories(uri, "rewind", runs=[run])
    loss = hist[hist["key"] == "loss"]
    assert loss["step"].tolist() == list(range(5, 50, 5))  # once each; the first pass's step 50 is gone
    assert loss.set_index("step")["value"].to_dict() == {s: 1.0 if s <= 20 else 0.5 for s in range(5, 50, 5)}
    assert len(hist[hist["key"] == "system/cpu_utilization_percentage"]) == 1
    reads = []  # each metric history is read from MLflow once, also for the rewound run's final values
    real_read = mlflow.MlflowClient.get_metric_history
    monkeypatch.setattr(mlflow.MlflowClient, "get_metric_history",
                        lambda self, rid, key, **kw: reads.append(key) or real_read(self, rid, key, **kw))
    trials = analysis_runs.load_trials(uri, "rewind", runs=[run])  # its own histories: loss, val_loss, ...
    assert sorted(reads) == ["loss", "step"], reads
    monkeypatch.undo()
    assert trials.loc[0, "best_loss"] == 0.5 and trials.loc[0, "steps"] == 45
    # the final values are the latest pass's too (MLflow's latest are the first pass's step 50: 0.2, 50)
    assert trials.loc[0, "final_loss"] == 0.5 and trials.loc[0, "final_step"] == 45
    assert trials.loc[0, "final_system/cpu_utilization_percentage"] == 50.0
    # a second rewind to an earlier step covers the first pair, which goes (it would cut nothing more);
    # a hand-broken tag is ignored with a warning, not an error
    assert record_rewind(c, run_id, 10, now_ms=t0 + 3000)
    assert json.loads(c.get_run(run_id).data.tags[REWINDS_TAG]) == [[10, t0 + 3000]]
    c.set_tag(run_id, REWINDS_TAG, "not json")
    assert len(analysis_runs.load_histories(uri, "rewind", runs=[c.get_run(run_id)])) == len(hist) + 12  # both passes


def test_a_rewind_is_recorded_when_only_an_evaluation_logged_beyond_the_checkpoint(tmp_path):
    """train.log_every 10, eval.every 25, a checkpoint at step 20, killed at 27: the `step` metric (Trainer.log's)
    ends at 20 but val_loss was logged at 25. Resumed at 20, the run is marked all the same, so the
    val_loss of step 25 is read once (the new pass's) and is the final one. Real MLflow (sqlite)."""
    import mlflow
    from mlflow.entities import Metric

    from analysis import runs as analysis_runs
    from harness.trial.checkpoint import REWINDS_TAG, record_rewind

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = mlflow.MlflowClient(uri)
    run_id = c.create_run(c.create_experiment("eval-beyond"), tags={"trial_id": "e" * 12}).info.run_id
    t0 = 1_700_000_000_000
    c.log_batch(run_id, metrics=[m for s in (10, 20) for m in (Metric("loss", 1.0, t0 + s, s),
                                                                Metric("step", float(s), t0 + s, s))]
                + [Metric("val_loss", 0.9, t0 + 25, 25)])  # the first pass, killed at 27
    assert record_rewind(c, run_id, 20, now_ms=t0 + 1000)
    assert json.loads(c.get_run(run_id).data.tags[REWINDS_TAG]) == [[20, t0 + 1000]]
    c.log_batch(run_id, metrics=[Metric("loss", 0.5, t0 + 2030, 30), Metric("step", 30.0, t0 + 2030, 30),
                                 Metric("val_loss", 0.4, t0 + 2025, 25)])  # the new pass, to step 30
    run = c.get_run(run_id)
    val = analysis_runs.load_histories(uri, "eval-beyond", keys=["val_loss"], runs=[run])
    assert val[["step", "value"]].values.tolist() == [[25, 0.4]]
    trials = analysis_runs.load_trials(uri, "eval-beyond", runs=[run])
    assert trials.loc[0, "final_val_loss"] == 0.4 and trials.loc[0, "best_val_loss"] == 0.4


def test_rewinds_keep_every_pair_that_cuts_something_and_warn_at_mlflows_limit(tmp_path, capsys):
    """Pairs a later pair covers (a later step <= theirs) go; the others stay, as many as MLflow's
    8000-character tag value holds, and beyond that the oldest go with a warning (not silently at 100)."""
    import mlflow
    from mlflow.entities import Metric
    from mlflow.utils.validation import MAX_TAG_VAL_LENGTH as MAX_REWIND_CHARS  # what MLflow accepts

    from harness.trial.checkpoint import REWINDS_TAG, record_rewind

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = mlflow.MlflowClient(uri)
    run_id = c.create_run(c.create_experiment("many")).info.run_id
    c.log_batch(run_id, metrics=[Metric("loss", 1.0, 0, 5000), Metric("step", 5000.0, 0, 5000)])
    for i, step in enumerate((10, 20, 30, 15)):
        assert record_rewind(c, run_id, step, now_ms=1000 + i)
    assert json.loads(c.get_run(run_id).data.tags[REWINDS_TAG]) == [[10, 1000], [15, 1003]]
    many = [[10, 1000], [15, 1003]] + [[step, 1_700_000_000_000 + step] for step in range(100, 300)]
    c.set_tag(run_id, REWINDS_TAG, json.dumps(many, separators=(",", ":")))  # preempted 200 times further on
    assert record_rewind(c, run_id, 300, now_ms=1_700_000_000_300)
    pairs = json.loads(c.get_run(run_id).data.tags[REWINDS_TAG])
    assert pairs == [*many, [300, 1_700_000_000_300]]  # all 203, more than the 100 kept before
    assert "warning" not in capsys.readouterr().err
    full = [[step, 1_800_000_000_000 + step] for step in range(1000, 2000)]
    while len(json.dumps(full, separators=(",", ":"))) > MAX_REWIND_CHARS:
        full = full[1:]  # as many as the tag holds
    c.set_tag(run_id, REWINDS_TAG, json.dumps(full, separators=(",", ":")))
    assert record_rewind(c, run_id, 2000, now_ms=1_800_000_002_000)
    text = c.get_run(run_id).data.tags[REWINDS_TAG]
    assert len(text) <= MAX_REWIND_CHARS
    pairs = json.loads(text)
    assert pairs[-1] == [2000, 1_800_000_002_000] and pairs[:-1] == full[1:]  # the newest stay, the oldest went
    assert "1 oldest were dropped" in capsys.readouterr().err
