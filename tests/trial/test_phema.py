"""Post-hoc EMA (EDM2, arXiv 2312.02696): the power-function EMA and its reconstruction (models/phema.py),
the study fields (train.posthoc_ema) and `ditscale ema reconstruct` on a trial folder. The end-to-end
check (a real trial killed with SIGKILL and resumed, reconstructed, loaded strictly) extends
tests/trial/test_train.py::test_kill_and_resume_continues_the_same_run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from models.phema import (
    PowerFunctionEMA,
    ema_beta,
    gamma_to_sigma_rel,
    sigma_rel_to_gamma,
    solve_weights,
    solve_weights_and_error,
)
from tests.support.phema import EMA_CHOICE, POSTHOC  # also run by test_train's kill-and-resume trial


def _walk(steps: int, every: int, tracked=(0.05, 0.10), direct=(0.07,), n=1000, seed=0):
    """A deterministic parameter trajectory (a Gaussian random walk of n weights) with the tracked
    profiles' snapshots every `every` steps and directly tracked profiles; returns
    (snapshots [((step, sigma), tensor)], direct EMA, the tracked EMA)."""
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Linear(n, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    tracker, reference = PowerFunctionEMA(model, tracked), PowerFunctionEMA(model, direct)
    snaps = []
    for t in range(1, steps + 1):
        with torch.no_grad():
            model.weight.add_(torch.randn(1, n, generator=g))
        tracker.update(model)
        reference.update(model)
        if t % every == 0:
            snaps += [((t, s), tracker.snapshot(s)["shadow"]["weight"].clone()) for s in tracker.sigma_rels]
    return snaps, reference, tracker


def test_sigma_rel_gamma_relation_matches_edm2():
    # EDM2 (section 3.1): sigma_rel 0.05 <-> gamma 16.97, 0.10 <-> 6.94.
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    for s in (0.01, 0.05, 0.2, 0.3):
        assert gamma_to_sigma_rel(sigma_rel_to_gamma(s)) == pytest.approx(s, rel=1e-12)
    assert ema_beta(1, 6.94) == 0.0  # the first update drops the initialisation
    assert ema_beta(10, 2.0) == pytest.approx(0.9 ** 3)


@pytest.mark.parametrize("bad", [0.0, -0.1, 0.31, float("nan"), float("inf"), "x"])
def test_sigma_rel_outside_its_range_is_a_clear_value_error(bad):
    model = torch.nn.Linear(2, 1)
    with pytest.raises(ValueError, match=r"sigma_rels\[1\].*must be in \(0, 0.3\]|not a number"):
        PowerFunctionEMA(model, [0.05, bad])
    with pytest.raises(ValueError, match="target"):
        solve_weights([(10, 0.05)], (10, bad))


def test_reconstruction_matches_a_directly_tracked_profile():
    """0.07 reconstructed at the last step from 20 snapshots each of 0.05 and 0.10 over 2000 steps, against
    0.07 tracked directly. EDM2 reports near-exact reconstructions between the tracked profiles; the
    measured error is 0.10-0.11 % of the distance between the 0.07 and 0.05 EMAs (seeds 0-2), i.e. of
    what choosing the wrong sigma_rel moves the weights; 1 % leaves a 10x margin and would still catch a
    wrong gamma, beta or inner product (every 500 steps, i.e. 4 snapshots, already gives 12 %)."""
    snaps, reference, tracker = _walk(2000, 100)
    weights, fit_error = solve_weights_and_error([key for key, _ in snaps], (2000, 0.07))
    rebuilt = sum(w * v.double() for w, (_, v) in zip(weights, snaps))
    direct = reference.shadows[0]["weight"].double()
    near = tracker.shadows[0]["weight"].double()  # sigma_rel 0.05
    error = float((rebuilt - direct).norm() / (direct - near).norm())
    assert error < 0.01, error
    assert fit_error < 0.01, fit_error  # the profiles themselves: 0.25 % relative L2
    assert sum(weights) == pytest.approx(1.0, abs=1e-9)


def test_tracked_profile_at_a_snapshot_step_gets_all_the_weight():
    snapshots = [(step, s) for step in (500, 1000, 1500, 2000) for s in (0.05, 0.10)]
    for target in [(1000, 0.05), (2000, 0.10)]:
        weights, fit_error = solve_weights_and_error(snapshots, target)
        own = snapshots.index(target)
        assert weights[own] == pytest.approx(1.0, abs=1e-6)
        assert max(abs(w) for i, w in enumerate(weights) if i != own) < 1e-6
        assert fit_error < 1e-6
    # Between the tracked widths the weights stay tame and sum to 1; repeated snapshots do not break it.
    weights = solve_weights(snapshots + snapshots[:2], (2000, 0.07))
    assert sum(weights) == pytest.approx(1.0, abs=1e-9) and max(abs(w) for w in weights) < 5


def test_state_dict_round_trip_continues_identically():
    """A resumed trial (load_state_dict from a checkpoint mid-run) writes the same snapshots as an
    uninterrupted one: the shadows and the step count are all the state there is."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    steps = [{n: torch.randn_like(p) for n, p in model.named_parameters()} for _ in range(30)]

    def step(ema, i):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.add_(steps[i][n])
        ema.update(model)

    with torch.no_grad():
        start = {n: p.clone() for n, p in model.named_parameters()}
    whole = PowerFunctionEMA(model, (0.05, 0.1))
    for i in range(30):
        step(whole, i)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(start[n])
    first = PowerFunctionEMA(model, (0.05, 0.1))
    for i in range(12):
        step(first, i)
    saved = {"sigma_rels": first.state_dict()["sigma_rels"], "num_updates": first.num_updates,
             "shadows": [{k: v.clone() for k, v in s.items()} for s in first.shadows]}
    resumed = PowerFunctionEMA(model, (0.05, 0.1))
    resumed.load_state_dict(saved)
    for i in range(12, 30):
        step(resumed, i)
    for s in (0.05, 0.1):
        a, b = whole.snapshot(s), resumed.snapshot(s)
        assert a["step"] == b["step"] == 30
        assert all(torch.equal(a["shadow"][k], b["shadow"][k]) for k in a["shadow"])
    with pytest.raises(ValueError, match="sigma_rels"):
        PowerFunctionEMA(model, (0.05, 0.2)).load_state_dict(saved)


# -- in a trial folder ----------------------------------------------------------------------------------

def _trial(sigma_rels=(0.05, 0.1), every=10, steps=35):
    cfg = SimpleNamespace(sigma_rels=list(sigma_rels), snapshot_every=every)
    return SimpleNamespace(train=SimpleNamespace(posthoc_ema=cfg, steps=steps))


def _train_folder(trial_dir, steps=35, start=0, state=None, seed=0):
    """A trial folder's post-hoc EMA as the training loop writes it (harness/trial/posthoc_ema.PosthocEMA),
    for a small model whose weights take random steps; returns (the tracker, the model)."""
    from harness.trial.posthoc_ema import PosthocEMA

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))  # a persistent buffer too
    posthoc = PosthocEMA(_trial(steps=steps), trial_dir, model, is_main=True)
    if state is not None:
        posthoc.ema.load_state_dict(state)
    for step in range(start + 1, steps + 1):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        posthoc.update(model, step)
    return posthoc, model


def test_snapshots_in_a_trial_folder_and_their_reconstruction(tmp_path):
    from harness.trial.posthoc_ema import plan_reconstruction, reconstruct

    posthoc, model = _train_folder(tmp_path)
    names = sorted(p.name for p in (tmp_path / "phema").iterdir())
    assert names == ["0.05-00000010.pt", "0.05-00000020.pt", "0.05-00000030.pt", "0.05-00000035.pt",
                     "0.1-00000010.pt", "0.1-00000020.pt", "0.1-00000030.pt", "0.1-00000035.pt", "profiles.json"]
    assert json.loads((tmp_path / "phema" / "profiles.json").read_text())["dtype"] == "float32"
    # A tracked profile at its own snapshot step comes back as that snapshot (weight ~1).
    plan = plan_reconstruction(tmp_path, 0.1, 30)
    assert [s.step for s in plan.snapshots] == [10, 20, 30, 10, 20, 30]
    state = reconstruct(plan)
    snap = torch.load(tmp_path / "phema" / "0.1-00000030.pt", weights_only=True)
    for name, value in snap["shadow"].items():
        torch.testing.assert_close(state[name], value, rtol=1e-5, atol=1e-5)
    # The default step is the last (35, the trial's end); the result loads strictly into the model.
    plan = plan_reconstruction(tmp_path, 0.07)
    assert plan.step == 35 and len(plan.snapshots) == 8
    model.load_state_dict(reconstruct(plan), strict=True)


def test_a_wsd_branch_reads_its_trunks_snapshots_up_to_the_branch_point(tmp_path):
    """harness/launch/branches.py seeds a branch with its trunk's checkpoint (phema.pt included) and leaves
    checkpoints/branched_from.json: the branch's own snapshots start after the branch point."""
    from harness.trial.posthoc_ema import plan_reconstruction

    trunk, branch = tmp_path / "trunkid", tmp_path / "branchid"
    posthoc, _ = _train_folder(trunk, steps=25)
    (branch / "checkpoints").mkdir(parents=True)
    (branch / "checkpoints" / "branched_from.json").write_text(json.dumps({"trunk": "trunkid", "step": 20}))
    state = {k: v for k, v in posthoc.ema.state_dict().items()}
    state["num_updates"] = 20  # the trunk's state at the branch point (the folder's profiles are at 25)
    _train_folder(branch, steps=40, start=20, state=state)
    plan = plan_reconstruction(branch, 0.07)
    used = {(s.step, s.path.parent.parent.name) for s in plan.snapshots}
    assert used == {(10, "trunkid"), (20, "trunkid"), (30, "branchid"), (40, "branchid")}


def _cli(capsys, *args) -> tuple[int, list[str]]:
    from harness.cli import main

    rc = main(["ema", "reconstruct", *args])
    return rc, capsys.readouterr().err.strip().splitlines()


def test_bad_input_is_one_line_naming_the_flag_or_file(tmp_path, capsys):
    _train_folder(tmp_path / "t")
    out = str(tmp_path / "r.pt")
    cases = [
        (["--sigma-rel", "0.5"], "--sigma-rel: 0.5 must be in (0, 0.3]"),
        (["--sigma-rel", "0"], "--sigma-rel: 0.0 must be in (0, 0.3]"),
        (["--sigma-rel", "0.07", "--step", "40"], "--step: 40 is beyond the last snapshot (step 35)"),
        (["--sigma-rel", "0.07", "--step", "25"], "--step: 25 is not a snapshot step"),
    ]
    for args, message in cases:
        rc, err = _cli(capsys, str(tmp_path / "t"), *args, "--out", out)
        assert rc == 2 and len(err) == 1 and message in err[0], (args, err)
    # `ditscale eval` reconstructs at its checkpoint's step, and says so (posthoc_ema.choose_at_checkpoint).
    from harness.errors import UserError
    from harness.trial.posthoc_ema import plan_reconstruction

    with pytest.raises(UserError, match=r"^--checkpoint: 25 is not a snapshot step"):
        plan_reconstruction(tmp_path / "t", 0.07, 25, step_from="--checkpoint")
    (tmp_path / "t" / "phema" / "0.1-00000020.pt").unlink()
    rc, err = _cli(capsys, str(tmp_path / "t"), "--sigma-rel", "0.07", "--out", out)
    assert rc == 2 and len(err) == 1 and "0.1-00000020.pt: snapshot missing" in err[0], err
    (tmp_path / "t" / "phema" / "0.05-00000030.pt").write_bytes(b"truncated")
    rc, err = _cli(capsys, str(tmp_path / "t"), "--sigma-rel", "0.05", "--step", "10", "--out", out)
    assert rc == 0  # only steps <= 10 are read
    rc, err = _cli(capsys, str(tmp_path / "t"), "--sigma-rel", "0.07", "--step", "35", "--out", out)
    assert rc == 2 and len(err) == 1 and "snapshot missing" in err[0]
    (tmp_path / "u").mkdir()
    rc, err = _cli(capsys, str(tmp_path / "u"), "--sigma-rel", "0.07", "--out", out)
    assert rc == 2 and len(err) == 1 and f"{tmp_path / 'u' / 'phema'}: no post-hoc EMA snapshots" in err[0], err
    _train_folder(tmp_path / "v")
    (tmp_path / "v" / "phema" / "0.05-00000030.pt").write_bytes(b"truncated")
    rc, err = _cli(capsys, str(tmp_path / "v"), "--sigma-rel", "0.07", "--out", out)
    assert rc == 2 and len(err) == 1 and "0.05-00000030.pt: unreadable snapshot" in err[0], err


def test_study_fields(tmp_path):
    """train.posthoc_ema: off by default (and then the trial id is as before the field existed); both it
    and a non-default train.ema_decay, or too few snapshots, are one line naming the fields."""
    from harness.config import StudyError, expand_grid, load_study
    from tests.support import tiny_study, write_study

    def load(train):
        study = tiny_study(tmp_path, "p", train=train)
        return expand_grid(load_study(write_study(tmp_path / "s.yaml", study), check_files=False))[0]

    plain = load({})
    assert "posthoc_ema" not in plain.identity()["train"] and not plain.train.posthoc_ema.sigma_rels
    on = load(POSTHOC)
    assert on.train.posthoc_ema.sigma_rels == [0.05, 0.1] and on.identity()["train"]["posthoc_ema"]
    problems = {
        "train.ema_decay / train.posthoc_ema": {**POSTHOC, "ema_decay": 0.99},
        "train.posthoc_ema.snapshot_every: 16 leaves 1 snapshot(s)": {**POSTHOC, "posthoc_ema": {
            "sigma_rels": [0.05], "snapshot_every": 16}},
        "train.posthoc_ema.snapshot_every: required": {**POSTHOC, "posthoc_ema": {"sigma_rels": [0.05]}},
        "train.posthoc_ema.sigma_rels.1:": {**POSTHOC, "posthoc_ema": {"sigma_rels": [0.05, 0.31],
                                                                        "snapshot_every": 10}},
    }
    for expected, train in problems.items():
        with pytest.raises(StudyError) as err:
            load(train)
        assert len(err.value.problems) == 1 and err.value.problems[0].startswith(expected), err.value.problems


# -- eval.ema_sigma_rels: the final evaluation's EMA chosen by validation loss ----------------------------

def test_the_width_with_the_lowest_validation_loss_is_chosen(tmp_path):
    """choose_sigma_rel (one process): each width's EMA is rebuilt and scored in the model, whose own
    weights come back afterwards; the best (lowest loss, a NaN never) is left in the holder."""

    from harness.trial.posthoc_ema import choose_sigma_rel, plan_reconstruction, reconstruct, val_loss_metric

    _, model = _train_folder(tmp_path)
    own = {k: v.clone() for k, v in model.state_dict().items()}
    rebuilt = {s: reconstruct(plan_reconstruction(tmp_path, s, 35)) for s in (0.03, 0.07, 0.2)}
    # A "validation loss" that prefers the 0.07 reconstruction: the distance of the weights from it.
    target = rebuilt[0.07]["0.weight"]
    seen = []

    def validate(m):
        seen.append(m[0].weight.detach().clone())
        return float((m[0].weight.detach() - target).norm())

    one = SimpleNamespace(is_main=True, world_size=1)
    choice = choose_sigma_rel(tmp_path, [0.03, 0.07, 0.2], 35, model, validate, one)
    for s, w in zip((0.03, 0.07, 0.2), seen):  # each width's rebuilt weights were in the model when scored
        torch.testing.assert_close(w, rebuilt[s]["0.weight"])
    assert choice.best == 0.07 and choice.val_losses[0.07] == 0.0 and choice.val_losses[0.03] > 0
    assert choice.snapshots == 8 and choice.step == 35
    assert set(choice.metrics()) == {"val_loss_ema0.03", "val_loss_ema0.07", "val_loss_ema0.2", "posthoc_ema_seconds"}
    assert val_loss_metric(0.1) == "val_loss_ema0.1" and "sigma_rel=0.07" in choice.tag()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in own.items())  # restored
    with choice.weights.swapped_into(model):
        torch.testing.assert_close(model[0].weight.detach(), target)
    # A NaN loss is never the best, even listed first.
    losses = iter([math.nan, 1.0])
    nan_first = choose_sigma_rel(tmp_path, [0.03, 0.2], 35, model, lambda m: next(losses), one)
    assert nan_first.best == 0.2


def test_a_best_width_at_the_edge_of_the_list_is_one_warning_line():
    """Short runs often choose the smallest listed width (README: half the smoke trials chose 0.02): the
    loss was still falling there, so the optimum may lie outside eval.ema_sigma_rels. One line naming the
    field, once per choice; none for an inner best, a single width, a NaN, or a largest width of 0.3 (no
    profile is wider)."""
    from harness.trial.posthoc_ema import EMAChoice, log_ema_choice

    def choice(losses: dict[float, float]) -> EMAChoice:
        best = min((s for s in losses if math.isfinite(losses[s])), key=losses.get, default=next(iter(losses)))
        return EMAChoice(best, losses, weights=None, step=100, snapshots=8, seconds=0.5)

    low = choice({0.02: 0.10, 0.05: 0.11, 0.1: 0.12}).edge_warning()
    assert low == ("warning: eval.ema_sigma_rels: the best sigma_rel, 0.02, is the smallest listed "
                   "([0.02, 0.05, 0.1]), so the best width may lie below it; extend eval.ema_sigma_rels past it")
    high = choice({0.05: 0.12, 0.2: 0.10}).edge_warning()
    assert "0.2, is the largest listed" in high and "above it (up to 0.3)" in high
    inner, single, at_most, nans = {0.02: 0.11, 0.05: 0.10, 0.1: 0.12}, {0.05: 0.1}, {0.1: 0.2, 0.3: 0.1}, {
        0.05: math.nan, 0.1: math.nan}
    for quiet in (inner, single, at_most, nans):
        assert choice(quiet).edge_warning() is None, quiet
    lines: list[str] = []
    log_ema_choice(None, choice({0.02: 0.10, 0.05: 0.11, 0.1: 0.12}), lines.append)
    assert len(lines) == 2 and lines[0].startswith("post-hoc EMA val_loss by sigma_rel 0.02: 0.1 ") and lines[1] == low
    lines.clear()
    log_ema_choice(None, choice({0.02: 0.11, 0.05: 0.10, 0.1: 0.12}), lines.append)
    assert len(lines) == 1 and "warning" not in lines[0]


def _choose_on_rank(rank: int, folder: str, out: str) -> None:
    """One of two gloo ranks: only rank 0's trial folder holds snapshots (rank 1's is empty, as on another
    node), and rank 1's validation loss ranks the widths the other way round."""

    import torch.distributed as tdist

    from harness.trial.posthoc_ema import choose_sigma_rel

    tdist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
        sign = 1.0 if rank == 0 else -1.0
        trial_dir = Path(folder) / ("t" if rank == 0 else "elsewhere")
        choice = choose_sigma_rel(trial_dir, [0.03, 0.2], 35, model, lambda m: sign * float(m[0].weight.sum()),
                                  SimpleNamespace(is_main=rank == 0, world_size=2))
        torch.save({"best": choice.best, "losses": choice.val_losses, "shadow": choice.weights.shadow},
                   f"{out}/rank{rank}.pt")
    finally:
        tdist.destroy_process_group()


def test_every_rank_evaluates_rank_zeros_reconstruction(tmp_path):
    """Under several ranks rank 0 rebuilds (its disk holds the snapshots) and every rank receives the
    weights: each width is scored with the same weights everywhere, and all end with rank 0's best."""
    import torch.multiprocessing as mp

    from harness.trial.posthoc_ema import plan_reconstruction, reconstruct

    _train_folder(tmp_path / "t")
    mp.spawn(_choose_on_rank, args=(str(tmp_path), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["best"] == r1["best"] == min(r0["losses"], key=r0["losses"].get)  # rank 1 alone would pick the other
    assert all(r1["losses"][s] == -r0["losses"][s] for s in (0.03, 0.2))  # the same weights, scored on both
    best = reconstruct(plan_reconstruction(tmp_path / "t", r0["best"], 35))
    for name, value in r1["shadow"].items():
        torch.testing.assert_close(value, best[name])
        assert torch.equal(value, r0["shadow"][name])


def test_eval_ema_sigma_rels_fields(tmp_path):
    """eval.ema_sigma_rels: off by default (trial ids as before the field existed); it needs train.posthoc_ema
    and a validation loss; each width in (0, 0.3], no repeats: one line naming the field."""
    from harness.config import StudyError, expand_grid, load_study
    from tests.support import tiny_study, write_study

    def load(train, ev):
        study = tiny_study(tmp_path, "p", train=train, eval=ev)
        return expand_grid(load_study(write_study(tmp_path / "s.yaml", study), check_files=False))[0]

    assert "ema_sigma_rels" not in load(POSTHOC, {}).identity()["eval"]
    on = load(POSTHOC, EMA_CHOICE)
    assert on.eval.ema_sigma_rels == [0.05, 0.1] and on.identity()["eval"]["ema_sigma_rels"] == [0.05, 0.1]
    problems = {
        "eval.ema_sigma_rels: needs train.posthoc_ema": ({}, EMA_CHOICE),
        "eval.ema_sigma_rels: the best is chosen by the validation loss": (POSTHOC, {**EMA_CHOICE, "val_batches": 0}),
        "eval.ema_sigma_rels.1: Input should be less than or equal to 0.3": (POSTHOC, {**EMA_CHOICE, "ema_sigma_rels": [0.05, 0.31]}),
        "eval.ema_sigma_rels.0: Input should be greater than 0": (POSTHOC, {**EMA_CHOICE, "ema_sigma_rels": [0.0]}),
        "eval.ema_sigma_rels: [0.1, 0.1] repeats a value": (POSTHOC, {**EMA_CHOICE, "ema_sigma_rels": [0.1, 0.10]}),
    }
    for expected, (train, ev) in problems.items():
        with pytest.raises(StudyError) as err:
            load(train, ev)
        assert len(err.value.problems) == 1 and err.value.problems[0].startswith(expected), err.value.problems


# -- the report's section (analysis/posthoc_ema.py) --------------------------------------------------------

def test_analysis_names_match_the_harness():
    """analysis/ reads without torch, so it keeps copies of the metric and param names the trial logs."""
    from analysis import posthoc_ema as report_side
    from harness.trial import posthoc_ema as trial_side

    assert trial_side.val_loss_metric(0.05) == report_side.METRIC_PREFIX + "0.05"
    assert trial_side.BEST_PARAM == report_side.BEST_PARAM


def _long(best: dict[str, float], se: float = 0.001):
    """per_trial's table for one DiT trial per size, patch 4, whose loss is lowest at best[size]."""
    import pandas as pd

    rows = []
    for rank, (size, b) in enumerate(best.items()):
        for s in (0.05, 0.1, 0.2):
            rows.append({"trial_id": size, "label": f"DiT-{size}/4", "arch": "dit", "patch": 4, "size": size,
                         "size_rank": rank, "params": 1e6 * (rank + 1), "sigma_rel": s,
                         "val_loss": 0.5 + 0.01 * abs(s - b) / 0.05, "best": s == b, "se_val_loss": se})
    return pd.DataFrame(rows)


def test_the_report_says_whether_one_fixed_width_was_best_for_every_size():
    from analysis.posthoc_ema import fixed_width_cost, verdict

    same = verdict(_long({"S": 0.1, "B": 0.1, "L": 0.1}))
    assert same.startswith("A single fixed σ_rel = 0.1 was the best") and "not have biased" in same
    moving = _long({"S": 0.05, "B": 0.1, "L": 0.2})
    # The best fixed width is 0.1: it costs S 0.01 and L 0.02 (0.05 would cost L 0.03, 0.2 S 0.03).
    s, excess, who, se = fixed_width_cost(moving)
    assert s == 0.1 and excess == pytest.approx(0.02) and who == "DiT-L/4" and se == 0.001
    text = verdict(moving)
    assert text.startswith("No single σ_rel was best for every size (S: 0.05; B: 0.1; L: 0.2)"), text
    assert "σ_rel = 0.1" in text and "20.0× its se_val_loss" in text and "would have biased" in text
    assert "within the noise" in verdict(_long({"S": 0.05, "B": 0.1, "L": 0.2}, se=0.05))


def test_report_section_on_a_real_mlflow_store(tmp_path):
    """Synthetic trials in a real SQLite MLflow, as harness/trial/loop.py logs them with eval.ema_sigma_rels
    (val_loss_ema<s> at the last step, param eval.ema_sigma_rel_best): the report draws the figure and its
    table names each size's best width."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    from analysis.posthoc_ema import FIGURE
    from tests.support.synthetic import DIT_GFLOPS, DIT_PARAMS_M, check_report, log_synthetic_sweep
    from tests.support.synthetic import law_loss as _law_loss

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    best = {"S": 0.05, "B": 0.1, "L": 0.2}  # the best width grows with the size, as EDM2 found
    cfgs = [{"family": "dit", "size": s, "patch": p, "steps": 400, "gflops": DIT_GFLOPS[(s, p)],
             "params": DIT_PARAMS_M[s] * 1e6} for s in best for p in (4, 8)]
    info = log_synthetic_sweep(uri, "phema", cfgs, _law_loss, n_logs=2, n_evals=1, params_metric=True,
                               artifact_root=tmp_path, se_fn=lambda *a: 0.001)
    c = MlflowClient(uri)
    for run_id in info["runs"].values():
        size = c.get_run(run_id).data.tags["size"]
        losses = {s: 0.5 + 0.01 * abs(s - best[size]) / 0.05 for s in (0.05, 0.1, 0.2)}
        c.log_batch(run_id, metrics=[Metric(f"val_loss_ema{s:g}", v, 0, 400) for s, v in losses.items()],
                    params=[Param("eval.ema_sigma_rel_best", f"{best[size]:g}")])
    index = check_report(uri, "phema", tmp_path / "report", expect_figures=[FIGURE], bootstrap=20)
    md = (index.parent / "report.md").read_text()
    section = md.split("### Post-hoc EMA: the best EMA width per model size")[1].split("## Figures")[0]
    for size, s in best.items():
        for patch in (4, 8):
            assert f"| DiT | {patch} | {size} | {DIT_PARAMS_M[size] * 1e6:.4g} | 1 | {s:g} |" in section, section
    assert "No single σ_rel was best for every size (S: 0.05; B: 0.1; L: 0.2)" in section
    assert "final val_loss and FD" in section


def test_the_init_share_warning_is_not_given_when_the_only_evaluation_uses_the_posthoc_ema(tmp_path):
    """The sweep warns that DiT's 0.9999 over a short run keeps the random init in the evaluated EMA; with
    eval.ema_sigma_rels and no eval.every the one evaluation uses the reconstructed EMA instead, so the
    warning would be false. With eval.every the running EMA is evaluated too: the warning stays."""
    from harness.checks import ema_warnings
    from harness.config import expand_grid, load_study
    from tests.support import tiny_study, write_study

    def load(ev):
        study = tiny_study(tmp_path, "w", train=POSTHOC, eval=ev)
        return expand_grid(load_study(write_study(tmp_path / "w.yaml", study), check_files=False))

    assert ema_warnings(load(EMA_CHOICE)) == []
    assert ema_warnings(load({**EMA_CHOICE, "every": 10})) and ema_warnings(load({"val_batches": 1}))


# -- ZeRO-3 on two ranks: the same snapshots and reconstruction as ZeRO-0 -------------------------------------

_ZERO_RANKS = """
import sys
import torch
from harness.config import expand_grid, load_study
from harness.trial.loop import train_trial

# Both trials in one torchrun (one process group, DeepSpeed imported once): ZeRO-0, then ZeRO-3.
for trial in expand_grid(load_study(sys.argv[1])):
    result = train_trial(trial)  # destroys its engine when done
    assert result.status == "finished", result.status
    if torch.distributed.get_rank() == 0:
        print("TRIAL", trial.train.zero_stage, trial.trial_id, flush=True)
# An orderly exit: without it a rank can leave while gloo's threads still serve its peer, and the
# peer aborts at exit (seen once in CI, tests/models/test_mup.py).
torch.distributed.barrier()
torch.distributed.destroy_process_group()
"""


@pytest.mark.slow
def test_zero3_on_two_ranks_gives_the_reconstruction_of_zero0(tmp_path, digits_dir):
    """Two real trials on 2 gloo ranks from the same seed and data, ZeRO-0 and ZeRO-3 (partitioned weights:
    every EMA read is a gather, both EMAs from one), each tracking the post-hoc EMA profiles and choosing
    its final EMA by eval.ema_sigma_rels. The reconstruction of a width between the tracked ones, the
    running EMA and the choice must agree. Tolerance: ZeRO-3 reduce-scatters the gradients into partitions
    and steps AdamW on flat partitions where ZeRO-0 all-reduces and steps per tensor: the weights may differ
    by rounding (vectorised kernels over other memory layouts), though a sum over 2 ranks has one order and
    the measured difference is exactly 0 (fp32, gloo, 2 CPU ranks, DeepSpeed 0.19.8). The bound is 1e-4 of
    what choosing another width moves the weights (the largest difference between the 0.05 and 0.10
    reconstructions, 5.3e-4 at step 10): far above rounding, far below any error in what an EMA reads."""

    from harness.common.net import free_port
    from harness.trial.posthoc_ema import plan_reconstruction, reconstruct
    from tests.support import ROOT, tiny_study, write_study

    steps = 10  # 2 snapshots per profile (steps 5 and 10): the fewest a reconstruction takes
    study = write_study(tmp_path / "s.yaml", tiny_study(
        digits_dir, "zero", train={"steps": steps, "checkpoint_every": steps, "log_every": 5, **POSTHOC,
                                   "posthoc_ema": {"sigma_rels": [0.05, 0.10], "snapshot_every": 5}},
        eval=EMA_CHOICE, resources={"workers_per_trial": 2}, grid={"train.zero_stage": [0, 3]}))
    (tmp_path / "ranks.py").write_text(_ZERO_RANKS)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), str(tmp_path / "ranks.py"), str(study)],
                          cwd=tmp_path, env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    ids = dict(line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("TRIAL "))
    assert set(ids) == {"0", "3"}, proc.stdout[-3000:]
    folder = {stage: tmp_path / "runs" / "zero" / trial_id for stage, trial_id in ids.items()}

    rebuilt = {stage: reconstruct(plan_reconstruction(folder[stage], 0.07, steps)) for stage in folder}
    scale = {stage: max(float((reconstruct(plan_reconstruction(folder[stage], 0.05, steps))[k]
                               - reconstruct(plan_reconstruction(folder[stage], 0.10, steps))[k]).abs().max())
                        for k in rebuilt[stage]) for stage in folder}
    diff = max(float((rebuilt["3"][k] - rebuilt["0"][k]).abs().max()) for k in rebuilt["0"])
    assert set(rebuilt["3"]) == set(rebuilt["0"])
    last = {stage: folder[stage] / "checkpoints" / f"step-{steps:08d}" for stage in folder}
    running = {stage: torch.load(last[stage] / "ema.pt", weights_only=True) for stage in folder}
    ema_diff = max(float((running["3"]["shadow"][k] - running["0"]["shadow"][k]).abs().max())
                   for k in running["0"]["shadow"])
    print(f"ZeRO-3 vs ZeRO-0 on 2 ranks: reconstruction of 0.07 max |diff| {diff:.3g} "
          f"(0.05 vs 0.10: {scale['0']:.3g}), running EMA max |diff| {ema_diff:.3g}")
    assert 0 < scale["0"] and diff <= 1e-4 * scale["0"] and ema_diff <= 1e-4 * scale["0"], (diff, ema_diff, scale)
    # ZeRO-3 really partitioned the weights: each rank saved its own part of the model.
    saved = {stage: sorted(p.name for p in last[stage].glob("*model_states.pt")) for stage in folder}
    assert saved["3"] == [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in (0, 1)], saved
    assert saved["0"] == ["mp_rank_00_model_states.pt"], saved
    # The end of each trial chose its EMA alike (eval.ema_sigma_rels under ZeRO-3: gathered swaps).
    from mlflow.tracking import MlflowClient

    from harness.trial.posthoc_ema import BEST_PARAM

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = {r.data.params["train.zero_stage"]: r for r in client.search_runs(
        [client.get_experiment_by_name("zero").experiment_id])}
    assert runs["3"].data.params[BEST_PARAM] == runs["0"].data.params[BEST_PARAM]
    for s in EMA_CHOICE["ema_sigma_rels"]:
        key = f"val_loss_ema{s:g}"
        assert runs["3"].data.metrics[key] == pytest.approx(runs["0"].data.metrics[key], rel=1e-5), key
