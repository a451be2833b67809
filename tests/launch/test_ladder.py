"""Issue 27 item 3, the pre-registered ladder run: `ladder: {budgets: [...]}` in a study. Its validation,
the prediction and snap on a synthetic law, the registration's never-overwrite rule and the report's
error arithmetic are checked directly; one real sweep (Ray, DeepSpeed, MLflow) checks that the prediction
is in MLflow before the ladder run's first training metric and survives a second sweep and the report."""

from __future__ import annotations

import json
import math
import re
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import yaml

from tests.support import ditscale, tiny_study, write_study

SIZES = ["d1w32", "d1w64", "d2w64", "d2w96"]  # the surface L(N, D) needs >= 4 sizes and >= 10 runs
BUDGETS = [5e8, 1e9, 2e9]


def _isoflop_study(digits_dir, tmp_path, name="ladder", ladder=None, **sections):
    study = tiny_study(digits_dir, name, train={"steps": None, "flops": BUDGETS[0], "log_every": 5,
                                               "checkpoint_every": 1000},
                       eval={"val_batches": 1, "batch_size": 64},
                       resources={"workers_per_trial": 1, "storage": str(tmp_path / "runs")},
                       grid={"model.size": SIZES, "train.flops": BUDGETS}, **sections)
    study["train"] = {k: v for k, v in study["train"].items() if v is not None}
    if ladder is not None:
        study["ladder"] = ladder
    return write_study(tmp_path / f"{name}.yaml", study)


# --- the study section ------------------------------------------------------------------------------


@pytest.mark.parametrize("budgets, message", [
    ([1.5e9], r"ladder.budgets: 1.5e\+09 is not above the grid's largest budget 2e\+09"),
    ([2e9], r"ladder.budgets: 2e\+09 is not above"),
    ([float("nan")], r"^ladder.budgets.0: "),
    ([float("inf")], r"^ladder.budgets.0: "),
    ([-1.0], r"^ladder.budgets.0: "),
    ("1.6e10", r"^ladder.budgets: "),
])
def test_bad_ladder_budgets_are_one_line_naming_the_field(digits_dir, tmp_path, budgets, message):
    from harness.config import StudyError, load_study

    path = _isoflop_study(digits_dir, tmp_path, ladder={"budgets": budgets})
    with pytest.raises(StudyError, match=message) as err:
        load_study(path)
    assert len(str(err.value).splitlines()) == 1, str(err.value)


def test_a_ladder_needs_a_budget_design(digits_dir, tmp_path):
    from harness.config import StudyError, load_study

    study = tiny_study(digits_dir, "steps", grid={"model.size": SIZES})
    study["ladder"] = {"budgets": [1e12]}
    with pytest.raises(StudyError, match=r"^ladder.budgets: a ladder extrapolates an isoFLOP design") as err:
        load_study(write_study(tmp_path / "s.yaml", study))
    assert len(str(err.value).splitlines()) == 1


def test_a_ladder_leaves_the_grid_and_its_trial_ids_alone(digits_dir, tmp_path):
    from harness.config import expand_grid, load_study

    plain = expand_grid(load_study(_isoflop_study(digits_dir, tmp_path, name="plain")))
    laddered = expand_grid(load_study(_isoflop_study(digits_dir, tmp_path, name="plain", ladder={"budgets": [1.6e10]})))
    assert [t.trial_id for t in laddered] == [t.trial_id for t in plain] and len(plain) == 12


def test_the_dry_run_says_the_ladder_comes_after_the_grid(digits_dir, tmp_path, capsys):
    from harness.launch.sweep import run_sweep

    path = _isoflop_study(digits_dir, tmp_path, ladder={"budgets": [8e9]})
    assert run_sweep(str(path), dry_run=True)["planned"] == 12
    out = capsys.readouterr().out
    assert "ladder: 1 trial(s) at 8e+09 (4x) the grid's largest budget" in out, out[-2000:]


@pytest.mark.parametrize("axis, values", [("model.patch", [2, 4]), ("objective.kind", ["ddpm", "rectified_flow"]),
                                          ("train.batch_size", [16, 32])])
def test_a_grid_that_varies_another_axis_is_refused_before_anything_runs(digits_dir, tmp_path, capsys, axis, values):
    """A ladder extrapolates one law; the report fits one per patch (objective, ...): pooling them into one
    prediction is refused in validation and in the dry run, in one line naming ladder.budgets and the axis
    (harness/one_law.py one_law_problems says why refuse rather than one ladder per group)."""
    from harness.cli import main
    from harness.config import StudyError, load_study

    path = _isoflop_study(digits_dir, tmp_path, ladder={"budgets": [8e9]})
    raw = yaml.safe_load(path.read_text())
    raw["grid"][axis] = values
    write_study(path, raw)
    with pytest.raises(StudyError, match=rf"^ladder.budgets: the grid varies {axis} \({values[0]}, {values[1]}\) "
                                         "besides size, budget, learning rate and seed") as err:
        load_study(path)
    assert len(str(err.value).splitlines()) == 1, str(err.value)
    assert main(["sweep", str(path), "--dry-run"]) != 0
    assert f"ladder.budgets: the grid varies {axis}" in capsys.readouterr().err
    del raw["ladder"]  # the same grid without a ladder is an ordinary study: the refusal is the ladder's
    assert len(load_study(write_study(path, raw)).grid[axis]) == 2


def test_a_grid_over_lr_seed_and_size_tied_settings_is_one_law():
    """What the fits fold into one law (the LR tuned per size, seeds averaged, a setting tied one-to-one to
    the size) passes; a patch tied to the size is still its own experiment."""
    from harness.one_law import one_law_problems, varying_fields
    from harness.schema import TrialConfig

    def trial(size, flops, **train):
        return TrialConfig.model_validate({"name": "s", "data": {"shards": "x-{0..1}.tar", "image_size": 16,
                                                                 "channels": 1},
                                           "model": {"size": size, "patch": train.pop("patch", 4)},
                                           "train": {"flops": flops, "batch_size": 32, **train}})

    grid = [trial(s, c, lr=lr, seed=seed, warmup_steps=w)
            for s, w in (("d1w32", 10), ("d2w64", 20)) for c in (1e9, 2e9) for lr in (1e-3, 2e-3) for seed in (0, 1)]
    assert varying_fields(grid) == {} and one_law_problems(grid) == []
    tied_patch = [trial("d1w32", 1e9, patch=2), trial("d2w64", 1e9, patch=4)]
    assert list(varying_fields(tied_patch)) == ["model.patch"] and len(one_law_problems(tied_patch)) == 1


def test_the_ladders_fit_refuses_logged_trials_of_several_groups():
    """The fit behind a registration (analysis.ladder_fits) checks the logged trials too: trials that the
    report fits as two laws (two patches) are never pooled into one prediction; an LR axis is one law."""
    from analysis.ladder_fits import check_one_law
    from harness.errors import UserError

    def frame(patches, lrs):
        n = len(patches)
        return pd.DataFrame({"arch": ["dit"] * n, "size": ["d1w32", "d2w64"] * (n // 2), "patch": patches,
                             "objective": ["ddpm"] * n, "model.size": ["d1w32", "d2w64"] * (n // 2),
                             "model.patch": patches, "train.flops": ["1e9"] * n, "train.lr": lrs})

    check_one_law(frame(["4"] * 4, ["0.001", "0.001", "0.002", "0.002"]))
    with pytest.raises(UserError, match=r"^ladder.budgets: the grid's finished trials fall into 2 groups .*patch 2.*"
                                        r"patch 4") as err:
        check_one_law(frame(["2", "2", "4", "4"], ["0.001"] * 4))
    assert len(str(err.value).splitlines()) == 1


def test_set_overrides_the_ladder_and_bracketing_like_any_study_field(digits_dir, tmp_path, capsys):
    """`--set ladder.budgets=[...]` (and bracket.max_extra_sizes) reach the study, validated as if written in
    the file; they stay study sections, not grid axes, and a misspelt key is still an unknown field."""
    from harness.cli import main
    from harness.config import StudyError, load_study

    path = _isoflop_study(digits_dir, tmp_path)
    assert load_study(path, overrides=["ladder.budgets=[8e9, 1.6e10]"]).ladder.budgets == [8e9, 1.6e10]
    assert load_study(path, overrides=["bracket.max_extra_sizes=2"]).bracket.max_extra_sizes == 2
    for text, message in [("ladder.budgets=[1e9]", r"^ladder.budgets: 1e\+09 is not above the grid's largest"),
                          ("ladder.budget=[8e9]", r"^--set ladder.budget: unknown field$"),
                          ("grid.ladder.budgets=[8e9]", r"^grid.ladder.budgets: not a study field$")]:
        with pytest.raises(StudyError, match=message) as err:
            load_study(path, overrides=[text])
        assert len(str(err.value).splitlines()) == 1, str(err.value)
    assert main(["sweep", str(path), "--dry-run", "--set", "ladder.budgets=[8e9]"]) == 0
    assert "ladder: 1 trial(s) at 8e+09 (4x) the grid's largest budget" in capsys.readouterr().out


# --- the prediction ----------------------------------------------------------------------------------


def _synthetic_fits(seed=0):
    """The grid's fits (as analysis.ladder_fits.grid_fits returns them) on a known law
    L = 0.5 + 400/N^0.5 + 3000/D^0.5 with C = 6 N D: N_opt(C) = sqrt(C / 6 · 400 / 3000)... exactly
    (αA/βB)^(1/(α+β)) · (C/k)^(β/(α+β))."""
    from analysis import scaling

    rng = np.random.default_rng(seed)
    k, rows = 6.0, []
    for c in (1e9, 4e9, 1.6e10):
        n_opt = (400 / 3000) ** 1.0 * (c / k) ** 0.5
        for f in np.geomspace(1 / 8, 8, 7):
            n = n_opt * f
            d = c / (k * n)
            loss = (0.5 + 400 / n ** 0.5 + 3000 / d ** 0.5) * math.exp(rng.normal(0, 0.002))
            rows.append({"budget": c * 1e9, "compute": c, "n": n, "d": d, "loss": loss, "fd": np.nan,
                         "group": f"{c}-{f}", "trial_id": f"t{len(rows)}"})
    rows = pd.DataFrame(rows)
    surf = scaling.fit_loss_surface(rows["n"], rows["d"], rows["loss"], bootstrap=20, seed=0, groups=rows["group"],
                                    k=k)
    iso = scaling.fit_isoflop_optima(rows, bootstrap=200, seed=0)
    return {"rows": rows, "k": k, "surface": surf, "isoflop": iso, "loss_fd": None, "fd_key": None,
            "trial_ids": list(rows["trial_id"])}


def test_prediction_snaps_to_the_nearest_geometry_and_states_the_snaps_cost():
    from harness.launch.ladder import predict

    fits = _synthetic_fits()
    budget = 1.6e20  # FLOPs: C = 1.6e11 GFLOPs, 10x the largest fitted budget
    c = budget / 1e9
    true_n = (400 / 3000) * (c / 6) ** 0.5
    geoms = [(int(p), f"g{i}") for i, p in enumerate(np.geomspace(1e3, 1e8, 21))]  # ~1.78x apart
    data = predict(fits, budget, lambda up_to: [g for g in geoms if g[0] <= 2 * up_to])
    a3, a2, s, p = data["approach3"], data["approach2"], data["snap"], data["prediction"]
    assert data["ratio"] == pytest.approx(10) and data["largest_fitted_budget"] == 1.6e19
    assert a3["n_opt"] == pytest.approx(true_n, rel=0.1) and a2["n_opt"] == pytest.approx(true_n, rel=0.25)
    assert a3["n_opt_ci"][0] <= a3["n_opt"] <= a3["n_opt_ci"][1]
    assert a2["n_opt_ci"][0] <= a2["n_opt"] <= a2["n_opt_ci"][1]
    nearest = min(geoms, key=lambda g: abs(math.log(g[0] / a3["n_opt"])))
    assert (s["params"], s["size"]) == nearest and s["from"].startswith("approach 3")
    # the surface's loss at the snapped N (and the budget's D) vs at N_opt: N_opt minimises it along C
    surf = fits["surface"]
    assert s["loss_at_snap"] == pytest.approx(float(surf.predict(s["params"], c / (6 * s["params"]))))
    assert s["effect"] == pytest.approx(s["loss_at_snap"] - a3["loss"]) and s["effect"] >= -1e-12
    true_loss = 0.5 + 400 / s["params"] ** 0.5 + 3000 / (c / (6 * s["params"])) ** 0.5
    assert p["lo"] <= p["loss"] <= p["hi"] and p["loss"] == pytest.approx(true_loss, rel=0.02)
    assert data["fd"]["key"] is None and data["fd"]["note"].startswith("none")


def test_without_any_fitted_law_nothing_is_registered():
    from analysis import scaling
    from harness.errors import UserError
    from harness.launch.ladder import predict

    rows = pd.DataFrame({"budget": [1e18] * 3, "compute": [1e9] * 3, "n": [1e3, 2e3, 4e3], "d": [1e5] * 3,
                         "loss": [1.0, 0.9, 0.8], "group": ["a", "b", "c"], "trial_id": ["a", "b", "c"]})
    surf = scaling.fit_loss_surface(rows["n"], rows["d"], rows["loss"], bootstrap=0)
    fits = {"rows": rows, "k": 6.0, "surface": surf,
            "isoflop": scaling.fit_isoflop_optima(rows, bootstrap=10), "loss_fd": None, "fd_key": None}
    with pytest.raises(UserError, match=r"^ladder.budgets: 1e\+19 cannot be predicted"):
        predict(fits, 1e19, lambda up_to: [(1000, "g")])


def test_snap_is_nearest_in_log_n():
    from harness.launch.ladder import snap

    geoms = [(100, "a"), (300, "b"), (1000, "c")]
    assert snap(170, geoms) == (100, "a") and snap(180, geoms) == (300, "b") and snap(1e6, geoms) == (1000, "c")
    # a flat N term (the surface's α at its bound): N_opt = 0, smaller is always better -> the smallest geometry
    assert snap(0.0, geoms) == (100, "a")
    with pytest.raises(ValueError):
        snap(float("nan"), geoms)


# --- registration --------------------------------------------------------------------------------------


def test_the_ladder_copies_the_settings_of_the_best_trial_at_the_largest_budget():
    """With an LR axis the fits keep each (budget, size)'s best LR, so the prediction is a loss at a tuned LR:
    the ladder trial must train at the LR of the best fitted trial at the largest budget, not the first grid
    trial's (review finding: dit_isoflop.yaml has train.lr: [1e-4, 2e-4, 4e-4])."""
    from harness.launch.ladder import settings_source

    grid = [SimpleNamespace(trial_id=t) for t in ("a", "b", "c", "d")]
    rows = pd.DataFrame({"budget": ["1e9", "1e9", "4e9", "4e9"], "loss": [0.1, 0.5, 0.4, 0.3],
                         "trial_id": ["a", "b", "c", "d"]})
    assert settings_source({"rows": rows}, grid, grid[0]).trial_id == "d"  # lowest loss at 4e9, not a's 0.1
    assert settings_source({"rows": rows.iloc[:0]}, grid, grid[0]).trial_id == "a"


def test_records_hold_no_database_password_and_are_whole_or_absent(tmp_path):
    """A postgresql://user:pw@ URI keeps its password in the URI (only HTTP ones are taken out): the ladder's
    and bracketing's records and artifacts write the trial through public_config. Records are written once and
    whole (temp file + link): a second write leaves the first intact and no partial file behind."""
    from harness.credentials import public_config
    from harness.files import write_once

    dump = public_config({"tracking": {"uri": "postgresql://alice:s3cretPW@db:5432/mlflow"}, "model": {}})
    assert "s3cretPW" not in json.dumps(dump) and dump["tracking"]["uri"].startswith("postgresql://***@db")
    path = tmp_path / "r.json"
    assert write_once(path, "first") and not write_once(path, "second")
    assert path.read_text() == "first" and [p.name for p in tmp_path.iterdir()] == ["r.json"]



def test_a_registration_is_never_overwritten_and_is_found_by_its_budget(tmp_path):
    from harness.errors import UserError
    from harness.launch.ladder import find_registration, write_registration

    folder = tmp_path / "ladder"
    path = write_registration(folder, {"trial_id": "abc", "budget": 1.6e10, "prediction": {"loss": 0.3}})
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        write_registration(folder, {"trial_id": "abc", "budget": 1.6e10, "prediction": {"loss": 0.9}})
    assert path.read_bytes() == before
    assert find_registration(folder, 1.6e10 * (1 + 1e-12))[1]["prediction"]["loss"] == 0.3
    assert find_registration(folder, 3.2e10) is None and find_registration(tmp_path / "none", 1.6e10) is None
    (folder / "broken.json").write_text("{")
    with pytest.raises(UserError, match=r"^ladder.budgets: the registration .*broken.json is unreadable"):
        find_registration(folder, 3.2e10)


# --- the report's arithmetic ----------------------------------------------------------------------------


def _run(metrics: dict, status="finished"):
    """A record shaped like MLflow's Run (data.metrics, data.tags): outcome() reads only these."""
    return SimpleNamespace(data=SimpleNamespace(metrics=metrics, tags={"ditscale.status": status}))


def test_the_error_is_measured_minus_predicted_over_measured_and_the_better_method_is_named():
    from analysis.extrapolation import outcome

    reg = {"approach2": {"loss": 0.40}, "approach3": {"loss": 0.30}}
    o = outcome(_run({"prediction_loss": 0.31, "prediction_loss_lo": 0.29, "prediction_loss_hi": 0.33,
                      "val_loss": 0.34}), reg)
    assert o["error_pct"] == pytest.approx(100 * (0.34 - 0.31) / 0.34) and o["inside"] is False
    assert o["iso_error_pct"] == pytest.approx(100 * (0.34 - 0.40) / 0.34)
    assert o["better"].startswith("approach 3")
    o = outcome(_run({"prediction_loss": 0.31, "prediction_loss_lo": 0.29, "prediction_loss_hi": 0.45,
                      "val_loss": 0.40}), reg)
    assert o["inside"] is True and o["better"].startswith("approach 2")
    unfinished = outcome(_run({"prediction_loss": 0.31, "val_loss": 0.5}, status="running"), reg)
    assert unfinished["measured"] is None and unfinished["error_pct"] is None


# --- end to end -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_ladder_is_registered_before_it_trains_and_the_registration_survives(digits_dir, tmp_path):
    """A 4 sizes x 3 budgets isoFLOP grid (the fewest the surface fits) plus a ladder at 2x its largest budget,
    on real Ray + DeepSpeed + MLflow: the ladder run (tag ditscale.role=ladder) holds prediction_loss[_lo, _hi]
    logged before its first training metric, the registration file exists, a second sweep and the report leave
    both unchanged, and the report's Extrapolation error is (measured − predicted) / measured from MLflow.

    Bracketing (issue 27 item 2, bracket.max_extra_sizes: 1) rides on the same sweep: the grid leaves d1w32 out
    of the smallest budget, so that budget's sizes (d1w64 .. d2w96) sit ~6-12x above its optimum (d1w32 wins
    every budget at this scale) and its minimum is at its smallest size. The sweep adds d1w32 there (the
    smaller side), trains it, and stops at the limit; the other budgets' minimum is d1w32, below which no DiT
    geometry exists (one line each). The added trial restores the 12-trial grid the ladder fits."""

    import mlflow

    from analysis.report import build_report

    path = _isoflop_study(digits_dir, tmp_path, ladder={"budgets": [4e9]}, bracket={"max_extra_sizes": 1},
                          exclude=[{"model.size": "d1w32", "train.flops": BUDGETS[0]}])
    first = ditscale("sweep", str(path), "--no-report", cwd=tmp_path, timeout=1500)
    assert "ladder 4e+09 (2x the largest fitted budget)" in first.stdout, first.stdout[-3000:]
    out = first.stdout
    assert "bracket: minimum at the smallest size d1w64 at 5e+08: adding DiT" in out, out[-3000:]
    for budget in ("1e+09", "2e+09"):
        assert (f"bracket: budget {budget}: minimum at the smallest size d1w32 at {budget}, and no smaller geometry "
                "is left") in out
    limit = ("bracket: budget 5e+08: minimum at the smallest size d1w32 at 5e+08 after 1 added size(s) "
             "(bracket.max_extra_sizes = 1): left unbracketed")
    assert out.count(limit) == 1 and out.index("adding DiT") < out.index(limit) < out.index("ladder 4e+09 (")
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("ladder")
    (added,) = client.search_runs([exp.experiment_id], filter_string="tags.`ditscale.added_by` = 'bracket'")
    assert added.data.tags["size"] == "d1w32" and float(added.data.params["train.flops"]) == BUDGETS[0]
    assert added.data.tags["ditscale.added_why"] == "minimum at the smallest size d1w64 at 5e+08"
    assert added.data.tags["ditscale.status"] == "finished" and "val_loss" in added.data.metrics
    (record,) = (tmp_path / "runs" / "ladder" / "bracket").glob("*.json")
    assert record.name == f"{added.data.tags['trial_id']}.json"
    (run,) = client.search_runs([exp.experiment_id], filter_string="tags.`ditscale.role` = 'ladder'")
    assert run.data.tags["ditscale.status"] == "finished", run.data.tags
    assert float(run.data.params["train.flops"]) == 4e9
    predicted = {k: client.get_metric_history(run.info.run_id, k)
                 for k in ("prediction_loss", "prediction_loss_lo", "prediction_loss_hi")}
    assert all(len(h) == 1 for h in predicted.values()), predicted
    registered_at = max(h[0].timestamp for h in predicted.values())
    trained = [m.timestamp for key in ("loss", "train_gflops", "samples_seen", "step")
               for m in client.get_metric_history(run.info.run_id, key)]
    assert trained and registered_at < min(trained), (registered_at, min(trained))
    lo, p, hi = (predicted[k][0].value for k in ("prediction_loss_lo", "prediction_loss", "prediction_loss_hi"))
    assert 0 < lo <= p <= hi
    (file,) = (tmp_path / "runs" / "ladder" / "ladder").glob("*.json")
    assert file.name == f"{run.data.tags['trial_id']}.json"
    reg = json.loads(file.read_text())
    assert reg["prediction"]["loss"] == pytest.approx(p) and reg["trial"]["model"]["size"] == run.data.tags["size"]
    assert run.data.tags["trial_id"] not in reg["fitted_trials"] and len(reg["fitted_trials"]) == 12
    assert added.data.tags["trial_id"] in reg["fitted_trials"]  # an added size is a trial of the study
    before = file.read_bytes()

    again = ditscale("sweep", str(path), "--no-report", cwd=tmp_path, timeout=600)
    assert "ladder 4e+09: keeping the prediction registered" in again.stdout, again.stdout[-2000:]
    assert "11 of 11 trials already finished" in again.stdout and limit in again.stdout
    assert "adding DiT" not in again.stdout and len(list(record.parent.glob("*.json"))) == 1  # never added twice
    assert len(client.search_runs([exp.experiment_id], filter_string="tags.`ditscale.added_by` = 'bracket'")) == 1
    index = build_report(f"sqlite:///{tmp_path / 'mlflow.db'}", "ladder", out_dir=tmp_path / "report", bootstrap=50)
    assert file.read_bytes() == before
    after = {k: client.get_metric_history(run.info.run_id, k) for k in predicted}
    assert {k: [(m.value, m.timestamp) for m in h] for k, h in after.items()} == \
        {k: [(m.value, m.timestamp) for m in h] for k, h in predicted.items()}

    md = (index.parent / "report.md").read_text()
    assert md.index("## Extrapolation") < md.index("## What the study found")
    measured = client.get_run(run.info.run_id).data.metrics["val_loss"]
    line = next(x for x in md.splitlines() if x.startswith("| 4e+09 |"))
    stated = float(re.search(r"\| ([+-]\d+\.\d+) % \|", line).group(1))
    assert abs(stated) == pytest.approx(round(100 * abs(measured - p) / measured, 2), abs=0.006), (line, measured, p)
    assert "| 2× |" in line
    # the report names the added size and why, and the budget still unbracketed stays flagged
    assert "### Sizes added by bracketing" in md, md[-3000:]
    added_line = next(x for x in md.splitlines() if x.startswith("| 5e+08 | d1w32 |"))
    assert "minimum at the smallest size d1w64 at 5e+08" in added_line
    assert "Still unbracketed, flagged in the isoFLOP budgets table" in md
    assert any(x.startswith("| ") and ("500000000" in x or "5e+08" in x) and "⚠" in x for x in md.splitlines())
    # the ladder run is left out of the fits: not in the trials table the fits use
    trials = (index.parent / "trials.csv").read_text()
    assert run.data.tags["trial_id"] not in trials
