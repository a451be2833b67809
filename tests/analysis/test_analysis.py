"""analysis/: MLflow -> pandas, power-law fits, figures and the generated report.

Synthetic sweeps are logged into a real SQLite MLflow store with the layout harness/tracking.py
and harness/trial/loop.py write (parent run tagged ditscale.sweep; child runs with trial_id, family,
size, patch, objective, attention, model, ditscale.status, mlflow.parentRunId; the flattened config
as params; per-step metrics including samples_seen and train_gflops), then read back by analysis.

`check_report(tracking_uri, experiment, out_dir)` is the reusable part: it builds the report of any
study and asserts every file exists and was logged to the sweep's parent run.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from analysis import runs, scaling
from tests.support.chromium import CDP as _CDP
from tests.support.chromium import chromium_or_skip
from tests.support.chromium import keep_artifacts as _keep_artifacts
from tests.support.chromium import keep_artifacts_file as _keep_artifacts_file
from tests.support.paths import ROOT
from tests.support.synthetic import (  # synthetic sweeps in a real MLflow store; the report's check
    BATCH,
    DIT_GFLOPS,
    DIT_PARAMS_M,
    TRUE_A,
    TRUE_ALPHA,
    TRUE_E,
    check_report,
    log_synthetic_sweep,
)
from tests.support.synthetic import client as _client
from tests.support.synthetic import law_loss as _law_loss

# --- a synthetic sweep in real MLflow -------------------------------------------------------------


def _law_configs() -> list[dict]:
    """DiT S/B/L/XL x patch 2/4/8 x two training lengths: 24 trials over 3.5 decades of compute."""
    return [{"family": "dit", "size": s, "patch": p, "steps": steps, "gflops": g, "params": DIT_PARAMS_M[s] * 1e6}
            for (s, p), g in DIT_GFLOPS.items() for steps in (2000, 20000)]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    return {"uri": f"sqlite:///{root / 'mlflow.db'}", "root": root}


@pytest.fixture(scope="module")
def law_sweep(store):
    info = log_synthetic_sweep(store["uri"], "law", _law_configs(), _law_loss, n_logs=4, n_evals=1, seed=0,
                               artifact_root=store["root"])
    return store["uri"], "law", info


# --- runs.py ------------------------------------------------------------------------------------


def test_load_trials_one_row_per_trial_with_config_and_compute(law_sweep):
    uri, exp, info = law_sweep
    trials = runs.load_trials(uri, exp)
    assert len(trials) == 24 and trials["trial_id"].is_unique
    assert set(trials["trial_id"]) == set(info["runs"])
    row = trials[(trials["size"] == "B") & (trials["patch"] == 4) & (trials["train.steps"] == 20000)].iloc[0]
    assert row["family"] == "dit" and row["arch"] == "dit" and row["status"] == "finished"
    assert row["model.size"] == "B" and row["model.patch"] == 4 and row["train.batch_size"] == BATCH
    assert row["forward_gflops"] == pytest.approx(5.56)  # train_gflops / samples_seen / 3
    assert row["train_gflops"] == pytest.approx(3 * 5.56 * BATCH * 20000)
    assert row["steps"] == 20000 and np.isnan(row["params"])  # not logged here
    assert row["best_loss"] <= row["final_loss"] and "final_val_loss" in trials

    h = runs.load_histories(uri, exp, keys=["loss", "train_gflops"])
    assert list(h.columns[:5]) == ["run_id", "trial_id", "key", "step", "value"]
    assert set(h["key"]) == {"loss", "train_gflops"} and len(h) == 24 * 4 * 2


def test_newest_run_of_a_trial_wins_and_parent_filter(store):
    uri = store["uri"]
    cfgs = [{"family": "dit", "size": s, "patch": 4, "steps": 100, "gflops": DIT_GFLOPS[(s, 4)]} for s in ("S", "B")]
    first = log_synthetic_sweep(uri, "rerun", cfgs, _law_loss, n_logs=2, n_evals=0)
    time.sleep(0.01)
    second = log_synthetic_sweep(uri, "rerun", cfgs[:1], _law_loss, n_logs=2, n_evals=0)
    all_trials = runs.load_trials(uri, "rerun")
    assert len(all_trials) == 2
    tid = next(iter(second["runs"]))
    assert all_trials.set_index("trial_id").loc[tid, "run_id"] == second["runs"][tid]
    only_second = runs.load_trials(uri, "rerun", parent_run_id=second["parent"])
    assert list(only_second["trial_id"]) == [tid]
    assert runs.find_parent_run(uri, "rerun") == second["parent"]
    assert len(runs.load_trials(uri, "rerun", parent_run_id=first["parent"])) == 2
    with pytest.raises(LookupError, match="no MLflow experiment"):
        runs.load_trials(uri, "no-such-study")


def test_fd_metric_names():
    assert runs.describe_fd_metric("fid")["is_fid"]
    d = runs.describe_fd_metric("fd_lenet_cfg1.5")
    assert d["extractor"] == "lenet" and d["cfg"] == 1.5 and not d["is_fid"] and "not FID" in d["name"]
    assert runs.describe_fd_metric("fd_dinov2_vitb14")["extractor"] == "dinov2_vitb14"
    assert runs.describe_fd_metric("loss") is None
    assert runs.primary_fd_metric(["loss", "fd_lenet_cfg1.0", "fd_lenet_cfg1.5"])["key"] == "fd_lenet_cfg1.5"
    assert runs.primary_fd_metric(["fid_cfg1.5", "fd_lenet", "fid"])["key"] == "fid"


def test_default_tracking_uri(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert runs.default_tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert runs.default_tracking_uri() == "http://127.0.0.1:5000"
    assert runs.default_tracking_uri("sqlite:///rel.db") == f"sqlite:///{tmp_path / 'rel.db'}"


# --- scaling/ ---------------------------------------------------------------------------------

def test_power_law_recovered_from_mlflow_runs(law_sweep):
    uri, exp, _ = law_sweep
    trials = runs.load_trials(uri, exp)
    (gf,) = scaling.fit_groups(trials, "train_gflops", "final_val_loss", by=["arch"], bootstrap=1000, seed=0)
    fit = gf.fit
    print(f"\nalpha: true {TRUE_ALPHA}, fitted {fit.alpha:.4f} {fit.alpha_ci}; E: true {TRUE_E}, fitted {fit.E:.4f} "
          f"{fit.E_ci}; A: true {TRUE_A:.4g}, fitted {fit.A:.4g}; R2 {fit.r2:.5f}; n {fit.n}")
    assert fit.ok and fit.warning is None and fit.n == 24
    assert abs(fit.alpha / TRUE_ALPHA - 1) < 0.03
    assert fit.alpha_ci[0] <= TRUE_ALPHA <= fit.alpha_ci[1]
    assert fit.E_ci[0] <= TRUE_E <= fit.E_ci[1] and fit.A_ci[0] <= fit.A <= fit.A_ci[1]
    assert fit.r2 > 0.99
    x = np.array(fit.x_range)
    lo, hi = fit.band(x)
    assert np.all(lo <= fit.predict(x)) and np.all(fit.predict(x) <= hi)


def test_two_point_grid_gives_a_warning_not_a_fit():
    fit = scaling.fit_power_law([1e9, 1e10], [0.5, 0.4])
    assert not fit.ok and "under-determined" in fit.warning
    assert np.isnan(fit.alpha) and np.isnan(fit.A) and np.isnan(fit.E) and fit.alpha_ci is None
    # three points cannot fix three parameters (E, A, alpha) either; they can fix a pure power law
    assert "under-determined" in scaling.fit_power_law([1, 10, 100], [3.0, 2.0, 1.5]).warning
    assert scaling.fit_power_law([1, 10, 100], [3.0, 1.5, 0.75], irreducible=False, bootstrap=50).ok
    noisy = scaling.fit_power_law(np.logspace(0, 3, 8), [1, 3, 0.5, 2, 0.7, 4, 1, 2])
    assert not noisy.ok and "poor fit" in noisy.warning


def test_frontier_and_compute_optimal_size():
    """Chinchilla-like curves L = E + A N^-a + B D^-b with C ∝ N D: N_opt ∝ C^(b / (a + b)) = C^0.5."""
    rows = []
    for n in np.logspace(7, 10, 7):
        d = np.logspace(6, 12, 40)
        loss = 1.0 + 400 * n ** -0.35 + 400 * d ** -0.35
        rows.append(pd.DataFrame({"trial_id": f"n{n:.0f}", "compute": 3 * n * d, "value": loss}))
    curves = pd.concat(rows)
    size = pd.Series({f"n{n:.0f}": n for n in np.logspace(7, 10, 7)})
    fr = scaling.compute_frontier(curves, size, bootstrap=100)
    assert len(fr.envelope) > 50 and (np.diff(fr.envelope["value"]) <= 1e-12).all()
    assert fr.optimal_size_fit is not None and fr.optimal_size_fit.ok, fr.note
    assert fr.optimal_size_fit.a == pytest.approx(0.5, abs=0.05)
    # two sizes cannot locate an optimum: the frontier says so instead of fitting
    two = scaling.compute_frontier(curves[curves["trial_id"].isin(size.index[:2])], size[:2], bootstrap=10)
    assert two.optimal_size_fit is None and "needs at least 3 sizes" in two.note


# --- the report ----------------------------------------------------------------------------------

def _chinchilla_loss(cfg, step, compute, rng):
    d = step * BATCH
    return (0.2 + 3.0 * cfg["gflops"] ** -0.3 + 20.0 * d ** -0.3) * (1 + 0.005 * rng.standard_normal())


def _fd(cfg, step, compute, rng):
    return (5.0 + 400.0 * compute ** -0.15) * (1 + 0.01 * rng.standard_normal())


def _report_configs() -> list[dict]:
    dit = [{"family": "dit", "size": s, "patch": p, "steps": 4000, "gflops": DIT_GFLOPS[(s, p)],
            "params": DIT_PARAMS_M[s] * 1e6} for s in ("S", "B", "L", "XL") for p in (2, 4, 8)]
    mm = [{"family": "mmdit", "size": "d12", "patch": 2, "attention": a, "objective": "ddpm", "steps": 4000,
           "gflops": 26.0 if a == "joint" else 30.0, "params": 150e6} for a in ("joint", "split")]
    return dit + mm


@pytest.fixture(scope="module")
def report_sweep(store):
    info = log_synthetic_sweep(store["uri"], "report-study", _report_configs(), _chinchilla_loss, _fd, n_logs=8,
                               n_evals=4, seed=1, params_metric=True, artifact_root=store["root"])
    return store["uri"], "report-study", info


@pytest.fixture(scope="module")
def built_report(report_sweep, tmp_path_factory):
    uri, exp, info = report_sweep
    out = tmp_path_factory.mktemp("report") / exp
    expect = ["loss_vs_steps_by_size.png", "loss_vs_steps_by_patch.png", "fd_lenet_cfg1.5_vs_steps_by_size.png",
              "fd_lenet_cfg1.5_vs_steps_by_patch.png", "fd_lenet_cfg1.5_vs_compute.png", "fit_loss_vs_compute.png",
              "fit_loss_vs_compute_by_patch.png", "fit_loss_vs_params.png", "fit_loss_vs_params_by_patch.png",
              "fit_fd_lenet_cfg1.5_vs_forward_gflops.png", "frontier_dit.png", "dit_vs_mmdit.png",
              "image_metrics_vs_loss.png"]
    index = check_report(uri, exp, out, expect_figures=expect, bootstrap=200)
    _keep_artifacts(out)
    return index, info


def test_report_renders_every_figure_and_states_conventions(built_report):
    index, info = built_report
    html, md = index.read_text(), (index.parent / "report.md").read_text()
    for text in (html, md):
        assert "3 × forward" in text and "fd_lenet_cfg1.5" in text and "stand-in" in text
        assert "validation loss" in text and "α" in text
        assert "FID vs" not in text  # only a stand-in Fréchet distance was logged: never called FID
    fits = json.loads((index.parent / "fits.json").read_text())
    loss_vs_compute = [f for f in fits if f["relation"] == "loss vs training compute" and f["group"] == "arch=dit"]
    assert loss_vs_compute and loss_vs_compute[0]["fitted"] and loss_vs_compute[0]["alpha_ci"]
    # each MM-DiT variant is a single trial: its laws are reported as under-determined, not fitted
    mm = [f for f in fits if f["group"].startswith("arch=mmdit")]
    assert mm and all(not f["fitted"] and "under-determined" in f["warning"] for f in mm if f["n"] < 4)
    assert "under-determined" in html and "under-determined" in md


def test_report_cli(store, tmp_path, monkeypatch):
    from harness.cli import main

    uri = store["uri"]
    cfgs = [{"family": "dit", "size": s, "patch": 8, "steps": 300, "gflops": DIT_GFLOPS[(s, 8)]} for s in ("S", "B")]
    info = log_synthetic_sweep(uri, "cli-study", cfgs, _law_loss, n_logs=3, n_evals=1)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # the default when --tracking-uri is not given
    out = tmp_path / "cli-report"
    assert main(["report", "--experiment", "cli-study", "--parent-run", info["parent"], "--out", str(out)]) == 0
    assert (out / "index.html").is_file() and (out / "trials.parquet").is_file()
    assert main(["report", "--experiment", "no-such-study", "--tracking-uri", uri, "--out", str(tmp_path / "x")]) == 2


def test_report_without_evaluation_or_second_architecture(store, tmp_path):
    """Figures whose data are absent are skipped with a note; a 2-point grid warns instead of fitting."""
    cfgs = [{"family": "dit", "size": s, "patch": 4, "steps": 500, "gflops": DIT_GFLOPS[(s, 4)]} for s in ("S", "B")]
    log_synthetic_sweep(store["uri"], "tiny", cfgs, _law_loss, n_logs=3, n_evals=0)
    index = check_report(store["uri"], "tiny", tmp_path / "tiny", bootstrap=50)
    md = (index.parent / "report.md").read_text()
    # report.md writes < and > as entities (runs' text made inert in Markdown)
    assert "under-determined" in md and "no fid or fd_&lt;extractor&gt; metric was logged" in md
    assert "single architecture" in md and not (index.parent / "dit_vs_mmdit.png").exists()


# --- DiT's findings: gaps tested against the measured noise -------------------------------------------

def _findings_trials(losses: dict, se: float | dict | None = None) -> pd.DataFrame:
    """A finished-trials table as analysis.runs.load_trials gives it, for study.dit_findings.
    losses: {(size, patch): final val_loss, or a list of them — one trial per train.seed};
    se: every trial's se_val_loss, or {(size, patch): se}, or None (not logged: old runs)."""
    rows = []
    for (size, patch), values in losses.items():
        for seed, loss in enumerate(values if isinstance(values, list) else [values]):
            row = {"trial_id": f"{size}-{patch}-{seed}", "arch": "dit", "family": "dit", "size": size, "patch": patch,
                   "size_rank": runs.size_rank(size, "dit"), "train_gflops": 1.0, "model.size": size,
                   "model.patch": patch, "train.seed": seed, "final_val_loss": loss}
            s = se.get((size, patch)) if isinstance(se, dict) else se
            if se is not None:
                row["final_se_val_loss"] = np.nan if s is None else s
            rows.append(row)
    t = pd.DataFrame(rows)
    t.attrs["config_keys"] = ["model.size", "model.patch", "train.seed"]
    return t


def _findings(trials: pd.DataFrame) -> dict:
    from analysis import study

    se_col = "final_se_val_loss" if "final_se_val_loss" in trials else None
    found = study.dit_findings(trials, "final_val_loss", None, se_col=se_col)
    return {f["finding"]: f for f in found}


def test_findings_held_unresolved_and_did_not_hold_against_the_validation_se():
    from analysis import study

    # se 0.001 for every trial: 2σ of a gap = 2 · √2 · 0.001 = 0.00283
    f = _findings(_findings_trials({("d1w64", 4): 0.200, ("d2w64", 4): 0.190, ("d3w96", 4): 0.170,
                                    ("d1w64", 2): 0.1995, ("d2w64", 2): 0.180, ("d3w96", 2): 0.150}, se=0.001))
    size, patch = f[study.SIZE_FINDING], f[study.PATCH_FINDING]
    assert size["held"] is True
    assert ("dit, patch 4: size d1w64: 0.2 → size d2w64: 0.19 (Δ −0.01, 2σ 0.00283) → size d3w96: 0.17 "
            "(Δ −0.02, 2σ 0.00283)") in size["evidence"]
    assert size["evidence"].endswith("gaps tested against 2σ of the noise (each trial's validation-draw SE, unpaired: conservative)")
    # patch 4 -> 2 at d1w64 falls by 0.0005, far inside 2σ: not resolved, although it fell
    assert patch["held"] == study.UNRESOLVED and patch["held"] is not True
    assert "dit, size d1w64: patch 4: 0.2 → patch 2: 0.1995 (Δ −0.0005, 2σ 0.00283: within noise)" in patch["evidence"]
    assert "dit, size d3w96: patch 4: 0.17 → patch 2: 0.15 (Δ −0.02, 2σ 0.00283)" in patch["evidence"]

    # a rise beyond 2σ: did not hold; a rise inside it is not a reversal, only unresolved
    worse = _findings(_findings_trials({("d1w64", 4): 0.200, ("d2w64", 4): 0.205, ("d3w96", 4): 0.170}, se=0.001))
    assert worse[study.SIZE_FINDING]["held"] is False
    assert "size d2w64: 0.205 (Δ +0.005, 2σ 0.00283: worse)" in worse[study.SIZE_FINDING]["evidence"]
    inside = _findings(_findings_trials({("d1w64", 4): 0.200, ("d2w64", 4): 0.201, ("d3w96", 4): 0.170}, se=0.001))
    assert inside[study.SIZE_FINDING]["held"] == study.UNRESOLVED
    assert "(Δ +0.001, 2σ 0.00283: within noise)" in inside[study.SIZE_FINDING]["evidence"]
    # one configuration alone per size: nothing to compare across patches
    assert worse[study.PATCH_FINDING]["held"] is None


def test_findings_without_a_noise_estimate_compare_strictly_and_say_so():
    from analysis import study

    old = _findings(_findings_trials({("d1w64", 4): 0.200, ("d2w64", 4): 0.1995, ("d3w96", 4): 0.170}))
    assert old[study.SIZE_FINDING]["held"] is True  # every step fell; no noise to test it against
    assert "size d2w64: 0.1995 (Δ −0.0005) → size d3w96: 0.17 (Δ −0.0295)" in old[study.SIZE_FINDING]["evidence"]
    assert old[study.SIZE_FINDING]["evidence"].endswith("no noise estimate: gaps not tested against noise")
    rose = _findings(_findings_trials({("d1w64", 4): 0.200, ("d2w64", 4): 0.2005, ("d3w96", 4): 0.170}))
    assert rose[study.SIZE_FINDING]["held"] is False and "(Δ +0.0005: worse)" in rose[study.SIZE_FINDING]["evidence"]

    # se logged for some trials only: the steps that lack it on one side are compared strictly, and counted
    mixed = _findings(_findings_trials({("d1w64", 4): 0.200, ("d2w64", 4): 0.1995, ("d3w96", 4): 0.170},
                                       se={("d1w64", 4): 0.001, ("d2w64", 4): 0.001}))
    ev = mixed[study.SIZE_FINDING]["evidence"]
    assert mixed[study.SIZE_FINDING]["held"] == study.UNRESOLVED
    assert "(Δ −0.0005, 2σ 0.00283: within noise)" in ev and "size d3w96: 0.17 (Δ −0.0295)" in ev
    assert ev.endswith("(each trial's validation-draw SE, unpaired: conservative); 1 step(s) without a noise estimate compared strictly")


def test_findings_count_the_replicate_spread_in_the_noise():
    """Three train.seed replicates per configuration, losses m − 0.003, m, m + 0.003: SD 0.003, so the
    replicates add 0.003² / 3 = 3e-6 to a configuration's variance."""
    from analysis import study

    def reps(m):
        return [m - 0.003, m, m + 0.003]

    # replicates alone (old runs without se): σ_gap = √(2 · 3e-6) = 0.00245, 2σ 0.0049
    only = _findings(_findings_trials({("d1w64", 4): reps(0.2), ("d2w64", 4): reps(0.19)}))
    assert only[study.SIZE_FINDING]["held"] is True
    assert "size d1w64: 0.2 → size d2w64: 0.19 (Δ −0.01, 2σ 0.0049)" in only[study.SIZE_FINDING]["evidence"]
    assert only[study.SIZE_FINDING]["evidence"].endswith("(replicate spread where a configuration has 3 seeds)")

    # a gap of 0.005 clears 2σ of the validation SE alone (0.00283) ...
    single = _findings(_findings_trials({("d1w64", 4): 0.2, ("d2w64", 4): 0.195}, se=0.001))
    assert single[study.SIZE_FINDING]["held"] is True
    # ... but not once the seeds' spread is added: σ² = 0.001² + 3e-6 = 4e-6 each, 2σ = 2 · √8e-6 = 0.00566
    both = _findings(_findings_trials({("d1w64", 4): reps(0.2), ("d2w64", 4): reps(0.195)}, se=0.001))
    ev = both[study.SIZE_FINDING]["evidence"]
    assert both[study.SIZE_FINDING]["held"] == study.UNRESOLVED
    assert "size d2w64: 0.195 (Δ −0.005, 2σ 0.00566: within noise)" in ev
    assert ev.endswith("(each trial's validation-draw SE, unpaired: conservative + replicate spread where a configuration has 3 seeds)")


def test_findings_pair_the_per_sample_losses_when_every_trial_has_them():
    """Every trial scored the same 256 samples: a steep common trend over t (the images' and the
    timesteps' difficulty, shared) plus each configuration's offset plus small per-sample noise (sd
    0.002). Each trial's se (0.01) hides a 0.005 gap; the paired differences resolve it."""
    from analysis import study

    rng = np.random.default_rng(0)
    n = 256
    t = (np.arange(n) + 0.5) / n
    shared = 0.5 - 0.4 * t + 0.05 * rng.standard_normal(n)  # what every trial shares
    means = {("d1w64", 4): 0.200, ("d2w64", 4): 0.195, ("d3w96", 4): 0.1948}
    trials = _findings_trials(means, se=0.01)
    samples = {}
    for row in trials.itertuples():
        loss = shared - shared.mean() + row.final_val_loss + 0.002 * rng.standard_normal(n)
        samples[row.trial_id] = pd.DataFrame({"sample": np.arange(n), "t": t, "loss": loss})
    unpaired = {f["finding"]: f for f in study.dit_findings(trials, "final_val_loss", None, se_col="final_se_val_loss")}
    assert unpaired[study.SIZE_FINDING]["held"] == study.UNRESOLVED  # 2σ = 2 · √2 · 0.01 = 0.028 > 0.005
    found = {f["finding"]: f for f in study.dit_findings(trials, "final_val_loss", None, se_col="final_se_val_loss",
                                                           samples=samples)}
    ev = found[study.SIZE_FINDING]["evidence"]
    # paired: σ of the per-sample difference's mean ≈ √2 · 0.002 / √256 = 0.00018, 2σ ≈ 0.0004
    first = re.search(r"size d2w64: [0-9.]+ \(Δ −0\.00[0-9]+, 2σ ([0-9.e-]+)\)", ev)
    assert first and 0.0002 < float(first.group(1)) < 0.0008, ev
    # the 0.0002 step d2w64 -> d3w96 stays inside even the paired noise
    assert found[study.SIZE_FINDING]["held"] == study.UNRESOLVED and ": within noise)" in ev
    assert ev.endswith("(paired per-sample validation losses)")
    # a trial whose table scored other samples (another eval.seed) cannot be paired: back to its se
    shifted = dict(samples)
    shifted["d3w96-4-0"] = samples["d3w96-4-0"].assign(t=np.roll(t, 1))
    mixed = study.dit_findings(trials, "final_val_loss", None, se_col="final_se_val_loss", samples=shifted)
    ev = mixed[0]["evidence"]
    assert "(paired per-sample validation losses + each trial's validation-draw SE, unpaired: conservative)" in ev


def test_fd_finding_says_how_much_of_its_ranking_is_sampling_noise():
    from analysis import study

    trials = _findings_trials({("d1w64", 4): 0.2, ("d2w64", 4): 0.19, ("d3w96", 4): 0.17, ("d4w128", 4): 0.15})
    trials["train_gflops"] = [1.0, 2.0, 4.0, 8.0]
    trials["final_fd_x_cfg1.0"] = [2000.0, 1990.0, 1500.0, 1000.0]
    plain = study.dit_findings(trials, "final_val_loss", "final_fd_x_cfg1.0")[-1]
    assert plain["held"] is True and plain["evidence"].endswith("= -1.000 over 4 trials")
    # σ 10 each: 2σ of a pair = 28.3; only 2000 vs 1990 is closer than that
    trials["final_se_fd_x_cfg1.0"] = [10.0, 10.0, 10.0, 10.0]
    found = study.dit_findings(trials, "final_val_loss", "final_fd_x_cfg1.0")[-1]
    assert found["held"] is True
    assert found["evidence"].endswith("the FD's spread over sampling draws: σ 10–10 (median 10); 1 of 6 pairs of "
                                      "trials differ by less than 2σ (their order is not resolved)")


def _isoflop_fd_trials(budgets: dict, budget_key: str | None = "train.flops") -> pd.DataFrame:
    """Trials of an isoFLOP design: budgets {train.flops label: (train_gflops, {size: FD})}, several
    sizes per budget. With budget_key None the same trials are a fixed-step grid (train.steps varies)."""
    rows = []
    for label, (compute, fds) in budgets.items():
        for size, fd in fds.items():
            rows.append({"trial_id": f"{size}-{label}", "arch": "dit", "family": "dit", "size": size, "patch": 4,
                         "size_rank": runs.size_rank(size, "dit"), "train_gflops": compute, "model.size": size,
                         "model.patch": 4, "train.steps": str(int(compute)), "final_val_loss": 0.2,
                         "final_fd_x_cfg1.0": fd, **({budget_key: label} if budget_key else {})})
    t = pd.DataFrame(rows)
    t.attrs["config_keys"] = ["model.size", "model.patch", "train.steps"] + ([budget_key] if budget_key else [])
    return t


# the shape of an isoFLOP study: at each budget the small and large sizes are far from optimal (high FD), so
# across all 9 trials FD hardly follows compute, while each budget's best FD falls strictly with the budget
ISOFLOP_FDS = {"7.5e+10": (75.0, {"d1w32": 2400.0, "d1w64": 3200.0, "d2w96": 9000.0}),
               "1.5e+11": (150.0, {"d1w32": 2380.0, "d1w64": 1900.0, "d2w96": 5000.0}),
               "3e+11": (300.0, {"d1w32": 2390.0, "d1w64": 1800.0, "d2w96": 1700.0})}


def test_fd_finding_is_judged_on_the_frontier_of_an_isoflop_design():
    from analysis import study

    trials = _isoflop_fd_trials(ISOFLOP_FDS)
    found = study.dit_findings(trials, "final_val_loss", "final_fd_x_cfg1.0", "FD")[-1]
    assert "judged on the compute-optimal frontier" in found["finding"]
    assert found["held"] is True and "Spearman = -1.000 over 3 budgets" in found["evidence"]
    assert "C 75: 2400 (d1w32) → C 150: 1900 (d1w64) → C 300: 1700 (d2w96)" in found["evidence"]
    assert study.is_isoflop_design(trials)
    # the same trials as a fixed-step grid keep today's judgement: Spearman over every trial
    fixed = _isoflop_fd_trials(ISOFLOP_FDS, budget_key=None)
    assert not study.is_isoflop_design(fixed)
    plain = study.dit_findings(fixed, "final_val_loss", "final_fd_x_cfg1.0", "FD")[-1]
    rho = study.spearman(fixed["train_gflops"], fixed["final_fd_x_cfg1.0"])
    assert plain["finding"] == "FD falls with training compute (Spearman ≤ −0.8)"
    assert plain["evidence"] == f"Spearman(final_fd_x_cfg1.0, train_gflops) = {rho:.3f} over 9 trials"
    assert plain["held"] is False and rho > -0.8
    # two budgets: a frontier of 2 points shows no trend — not applicable, never "did not hold"
    two = dict(list(ISOFLOP_FDS.items())[:2])
    na = study.dit_findings(_isoflop_fd_trials(two), "final_val_loss", "final_fd_x_cfg1.0", "FD")[-1]
    assert na["held"] == study.NOT_APPLICABLE and na["evidence"].startswith("not applicable")
    from analysis.sections import held
    assert held(na["held"]) == "not applicable"


def test_report_shows_the_unresolved_state_and_the_new_metric_is_not_a_loss(store, tmp_path):
    """A sweep that logs se_val_loss: the metric reaches the trials (final value only), is never taken
    for a loss, and a patch gap inside the noise is reported as not resolved."""
    from analysis.sections import UNRESOLVED_TEXT

    loss = {("S", 4): 0.300, ("B", 4): 0.250, ("L", 4): 0.200, ("XL", 4): 0.170,
            ("S", 2): 0.2995, ("B", 2): 0.230, ("L", 2): 0.180, ("XL", 2): 0.150}
    cfgs = [{"family": "dit", "size": s, "patch": p, "steps": 400, "gflops": DIT_GFLOPS[(s, p)],
             "params": DIT_PARAMS_M[s] * 1e6} for s, p in loss]
    log_synthetic_sweep(store["uri"], "noise-study", cfgs, lambda c, *_: loss[(c["size"], c["patch"])], n_logs=3,
                        n_evals=1, params_metric=True, se_fn=lambda *_: 0.002)
    for key in ("se_val_loss", "final_se_val_loss"):
        assert not runs.LOWER_IS_BETTER.match(key) and not runs.HISTORY_KEYS.match(key), key
    trials = runs.load_trials(store["uri"], "noise-study")
    assert (trials["final_se_val_loss"] == 0.002).all()
    assert "best_se_val_loss" not in trials and "best_val_loss" in trials

    index = check_report(store["uri"], "noise-study", tmp_path / "noise", bootstrap=50)
    html, md = index.read_text(), (index.parent / "report.md").read_text()
    assert "validation loss (final)" in md  # the y-axis is still val_loss, not its standard error
    assert f"<td class='unresolved'>{UNRESOLVED_TEXT}</td>" in html
    assert f"| a smaller patch is better at fixed model size | {UNRESOLVED_TEXT} |" in md
    assert "| bigger is better at fixed patch size | held |" in md
    assert "(Δ −0.0005, 2σ 0.00566: within noise)" in md  # 2 · √2 · 0.002
    assert "exceeds 2σ" in md and "exceeds 2σ" in html
    assert "final_se_val_loss" in pd.read_csv(index.parent / "trials.csv")


# --- the HTML in a real browser -------------------------------------------------------------------

def test_report_html_loads_in_headless_chromium(built_report, tmp_path):
    binary = chromium_or_skip()
    index, _ = built_report
    browser = _CDP(binary, tmp_path / "profile")
    try:
        session = browser.open_page(index.resolve().as_uri(), viewport=(1280, 2000))
        loaded = browser.images(session)
        shot = browser.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": False},
                            session=session)
        title = browser.evaluate(session, "document.title")
        headings = browser.evaluate(
            session, "Array.from(document.querySelectorAll('h3, h4')).map(h => h.textContent).join('\\n')")
    finally:
        browser.close()

    screenshot = tmp_path / "report-screenshot.png"
    screenshot.write_bytes(base64.b64decode(shot["data"]))
    _keep_artifacts_file(screenshot)
    errors = browser.errors()
    assert not errors, json.dumps(errors, indent=1)[:4000]
    assert loaded and all(ok for _, ok in loaded), f"images that did not load: {[s for s, ok in loaded if not ok]}"
    assert len(loaded) == len(list(index.parent.glob("*.png")))
    assert title == "Scaling report: report-study"
    # the loss -> image metric section (fd_lenet_cfg*, kid) is there and its figure loaded
    assert "Loss → image metrics: is the loss a proxy?" in headings, headings
    assert "image_metrics_vs_loss.png" in {src for src, ok in loaded if ok}, loaded
    assert screenshot.stat().st_size > 10_000
    print(f"\nscreenshot: {screenshot}")


# the torch-free contract modules analysis may import from harness/ and models/ (one home per rule)
CONTRACT_MODULES = {"harness", "harness.errors", "harness.tracking", "harness.credentials", "harness.evaluation",
                    "harness.evaluation.noise", "models", "models.registry", "models.flops"}


def test_analysis_imports_no_torch_and_only_the_contract_modules():
    """analysis loads no torch, and from harness/ and models/ only the torch-free contract modules:
    the MLflow conventions, the preset sizes, the compute rule and the evaluator's noise estimator."""
    code = ("import sys, json, analysis.runs, analysis.scaling, analysis.plots, analysis.report, analysis.study, "
            "analysis.loss_metric; "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'harness', 'models'))))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    loaded = set(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert not {m for m in loaded if m.split(".")[0] == "torch"}, sorted(loaded)
    assert loaded <= CONTRACT_MODULES, f"analysis imports more than the contract: {sorted(loaded - CONTRACT_MODULES)}"
    assert {"harness.tracking", "harness.evaluation.noise", "models.registry", "models.flops"} <= loaded  # imported, not copied


def test_history_keys_include_fid_kid_and_their_stand_ins():
    from analysis.runs import HISTORY_KEYS

    for key in ("loss", "val_loss", "fid_cfg1.5", "kid_cfg1.5", "fd_lenet_cfg1.0", "kd_lenet_cfg1.0"):
        assert HISTORY_KEYS.match(key), key
    for key in ("lr", "grad_norm", "img_per_s", "startup_s"):
        assert not HISTORY_KEYS.match(key), key


# --- malformed per-sample validation losses ------------------------------------------------------

def test_one_malformed_per_sample_loss_file_is_skipped_with_a_warning(store, tmp_path, caplog):
    """Real MLflow (SQLite + file artifacts): four trials, each with its per-sample validation losses;
    one file has a string in `t`, one a nested list in `loss`. Each is skipped with a warning naming its
    run and file; the good tables are used (the loss finding is still judged, paired where possible),
    and the report has its findings and fits."""

    loss = {("S", 4): 0.300, ("B", 4): 0.250, ("L", 4): 0.200, ("XL", 4): 0.170}
    cfgs = [{"family": "dit", "size": s, "patch": p, "steps": 400, "gflops": DIT_GFLOPS[(s, p)],
             "params": DIT_PARAMS_M[s] * 1e6} for s, p in loss]
    info = log_synthetic_sweep(store["uri"], "malformed-samples", cfgs, lambda c, *_: loss[(c["size"], c["patch"])],
                               n_logs=3, n_evals=1, params_metric=True, se_fn=lambda *_: 0.002,
                               artifact_root=store["root"])
    c, n = _client(store["uri"]), 64
    good = {"sample": list(range(n)), "t": [(i + 0.5) / n for i in range(n)], "loss": [0.2] * n}
    run_ids = list(info["runs"].values())
    bad = {run_ids[1]: {**good, "t": ["0.5"] + good["t"][1:]},            # a string in t
           run_ids[2]: {**good, "loss": [[0.2, 0.3]] + good["loss"][1:]}}  # a nested list in loss
    for run_id in run_ids:
        c.log_dict(run_id, bad.get(run_id, good), "val_losses/step-00000400.json")
    trials = runs.load_trials(store["uri"], "malformed-samples")
    with caplog.at_level(logging.WARNING, logger="analysis"):
        samples = runs.load_val_samples(store["uri"], trials)
    by_run = dict(zip(trials["run_id"], trials["trial_id"]))
    assert set(samples) == {by_run[r] for r in run_ids if r not in bad}
    assert all(samples[t]["t"].dtype == float and samples[t]["loss"].dtype == float for t in samples)
    for run_id in bad:
        assert any(run_id in r.getMessage() and "val_losses/step-00000400.json" in r.getMessage()
                   for r in caplog.records), [r.getMessage() for r in caplog.records]
    # the findings' noise helper never sees the malformed tables, even when handed them directly
    from analysis import study

    raw = {by_run[r]: pd.DataFrame(bad.get(r, good)) for r in run_ids}
    found = {f["finding"]: f for f in study.dit_findings(trials, "final_val_loss", None,
                                                           se_col="final_se_val_loss", samples=raw)}
    assert found[study.SIZE_FINDING]["held"] is True

    index = check_report(store["uri"], "malformed-samples", tmp_path / "malformed", bootstrap=50)
    md = (index.parent / "report.md").read_text()
    assert "| bigger is better at fixed patch size | held |" in md


# --- FDs of different detectors; the report's files and text ------------------------------------

def _small_fd_sweep(store, experiment: str) -> dict:
    sizes = ("S", "B", "L", "XL")
    cfgs = [{"family": "dit", "size": s, "patch": 4, "steps": 400, "gflops": DIT_GFLOPS[(s, 4)],
             "params": DIT_PARAMS_M[s] * 1e6} for s in sizes]
    loss = {"S": 0.3, "B": 0.25, "L": 0.2, "XL": 0.17}
    return log_synthetic_sweep(store["uri"], experiment, cfgs, lambda c, *_: loss[c["size"]],
                               lambda c, *_: 100.0 * loss[c["size"]], n_logs=3, n_evals=1, params_metric=True)


def test_report_refuses_to_rank_or_fit_fds_of_different_detectors(store, tmp_path):
    """Two trials' FDs from one stand-in's weights, two from another's (ditscale.detector differs, as
    when the stand-in was trained on two machines): the FD finding says it refuses, no FD law is
    fitted; with one detector for all it ranks them."""
    from harness.tracking import DETECTOR_TAG

    info = _small_fd_sweep(store, "two-detectors")
    c = _client(store["uri"])
    for i, run_id in enumerate(info["runs"].values()):
        c.set_tag(run_id, DETECTOR_TAG, "lenet@aaaaaaaaaa" if i % 2 else "lenet@bbbbbbbbbb")
    trials = runs.load_trials(store["uri"], "two-detectors")
    assert sorted(set(trials["detector"])) == ["lenet@aaaaaaaaaa", "lenet@bbbbbbbbbb"]
    index = check_report(store["uri"], "two-detectors", tmp_path / "two", bootstrap=50)
    md = (index.parent / "report.md").read_text()
    fd_row = next(line for line in md.splitlines() if line.startswith("| fd_lenet") and "training compute" in line)
    assert "not ranked or fitted" in fd_row and "2 different detectors (lenet@aaaaaaaaaa, lenet@bbbbbbbbbb)" in fd_row
    assert "Spearman" not in fd_row
    fits = json.loads((index.parent / "fits.json").read_text())
    assert not any("fd_lenet" in json.dumps(f.get("y", "")) for f in fits), fits

    for run_id in info["runs"].values():
        c.set_tag(run_id, DETECTOR_TAG, "lenet@aaaaaaaaaa")
    index = check_report(store["uri"], "two-detectors", tmp_path / "one", bootstrap=50)
    md = (index.parent / "report.md").read_text()
    assert "not ranked or fitted" not in md and "Spearman(final_fd_lenet" in md


def test_report_replaces_planted_links_and_escapes_html_in_markdown(store, tmp_path):
    """--out holds index.html (and a figure's name) as symlinks to someone else's files: the report
    replaces the links and never writes into their targets. A run's model tag holding <script> comes
    out inert in report.md (and in index.html, as before)."""
    info = _small_fd_sweep(store, "hostile")
    c = _client(store["uri"])
    c.set_tag(next(iter(info["runs"].values())), "model", "DiT-S/4<script>alert(1)</script>")
    out = tmp_path / "out"
    out.mkdir()
    victims = {name: tmp_path / f"victim-{name}" for name in ("index.html", "report.md", "loss_vs_steps_by_size.png")}
    for name, victim in victims.items():
        victim.write_text("not yours")
        (out / name).symlink_to(victim)
    index = check_report(store["uri"], "hostile", out, bootstrap=50)
    assert all(v.read_text() == "not yours" for v in victims.values())
    assert not any((out / name).is_symlink() for name in victims)
    md = (out / "report.md").read_text()
    assert "<script" not in md and "&lt;script&gt;alert(1)&lt;/script&gt;" in md
    assert "<script" not in index.read_text()


def test_both_renderings_escape_what_the_user_named():
    """The templates (analysis/templates/) keep the escaping rules: report.md turns &, < and > into entities
    everywhere and escapes | and line breaks in table cells; index.html is autoescaped. A study and a trial
    named with |, <, & and * come out as text in both, and the warning columns keep their classes."""
    from analysis import blocks as doc
    from analysis.findings import Report
    from analysis.render import render
    from analysis.sections import UNRESOLVED_TEXT

    name = "a|b <i>x</i> & *y*"
    rep = Report(name, "sqlite:///x.db", "abc123", pd.DataFrame({"t": [1, 2]}))
    blocks = [doc.h2(f"About {name}"), doc.para("<script>alert(1)</script>", True), doc.ul([name]),
              doc.table(["finding", "result"], [[name, "did not hold"], ["line\nbreak", UNRESOLVED_TEXT],
                                                ["ok", "⚠ not bracketed"]], 1),
              doc.figure(doc.Figure("f.png", f"fig {name}", "cap <b>"))]
    md = render(rep, blocks, "report.md.j2", now="NOW")
    assert md.startswith("# Scaling report: a|b &lt;i&gt;x&lt;/i&gt; &amp; *y*\n\nGenerated NOW from MLflow "
                         "`sqlite:///x.db`, experiment `a|b &lt;i&gt;x&lt;/i&gt; &amp; *y*`, sweep parent run "
                         "`abc123`; 2 trials.\n"), md
    assert "## About a|b &lt;i&gt;x&lt;/i&gt; &amp; *y*\n" in md
    assert "**&lt;script&gt;alert(1)&lt;/script&gt;**\n" in md and "<script" not in md and "<i>" not in md
    assert "- a|b &lt;i&gt;x&lt;/i&gt; &amp; *y*\n" in md
    assert ("| finding | result |\n|---|---|\n| a\\|b &lt;i&gt;x&lt;/i&gt; &amp; *y* | did not hold |\n"
            "| line break | not resolved (within noise) |\n") in md
    assert "#### fig a|b &lt;i&gt;x&lt;/i&gt; &amp; *y*\n\n![fig a|b &lt;i&gt;x&lt;/i&gt; &amp; *y*](f.png)" in md
    assert "*cap &lt;b&gt;*" in md
    page = render(rep, blocks, "index.html.j2", now="NOW")
    assert "<script" not in page and "<i>" not in page and "<b>" not in page
    assert "<h1>Scaling report: a|b &lt;i&gt;x&lt;/i&gt; &amp; *y*</h1>" in page
    assert "<p class='warn'><strong>&lt;script&gt;alert(1)&lt;/script&gt;</strong></p>" in page
    assert "<td class='warn'>did not hold</td>" in page and "<td class='warn'>⚠ not bracketed</td>" in page
    assert f"<td class='unresolved'>{UNRESOLVED_TEXT}</td>" in page and "<td>a|b &lt;i&gt;" in page
    assert "<img src='f.png' alt='fig a|b &lt;i&gt;x&lt;/i&gt; &amp; *y*'>" in page
    assert "<style>" in page and ".unresolved{" in page  # the CSS is inlined: the page needs no other file


def test_templates_ship_with_the_package():
    """pyproject's package-data lists analysis/templates/, so a normal (non-editable) install finds them."""
    from analysis.render import TEMPLATES

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = data["tool"]["setuptools"]["package-data"]["analysis"]
    assert {"report.md.j2", "index.html.j2", "report.css"} <= {p.name for p in TEMPLATES.iterdir()}
    assert all(any(p.relative_to(TEMPLATES.parent).match(g) for g in patterns) for p in TEMPLATES.iterdir())


# --- loss -> image metrics across trials (issue 30 item 2) ------------------------------------------

# final validation loss per (size, patch); the image metrics are logged beside it at the last step
_PROXY_LOSS = {("XL", 2): 0.22, ("XL", 4): 0.25, ("L", 2): 0.27, ("L", 4): 0.30,
               ("B", 2): 0.33, ("B", 4): 0.37, ("S", 2): 0.40, ("S", 4): 0.45}
# cmmd in the order of rising loss: ranks 6 2 4 8 1 5 3 7, Spearman 1 − 6·76/(8·63) ≈ 0.095 (unrelated)
_NOISE_CMMD = [0.9, 0.2, 0.5, 1.1, 0.1, 0.7, 0.3, 1.0]


def _proxy_study(store, experiment: str, keys: list[tuple]) -> dict:
    """A sweep with val_loss from _PROXY_LOSS and, at the last step, fid_cfg1.5 rising with the loss
    (2 + 300·loss², monotone) and cmmd_cfg1.5 unrelated to it."""
    cfgs = [{"family": "dit", "size": s, "patch": p, "steps": 400, "gflops": DIT_GFLOPS[(s, p)],
             "params": DIT_PARAMS_M[s] * 1e6} for s, p in keys]
    info = log_synthetic_sweep(store["uri"], experiment, cfgs, lambda c, *_: _PROXY_LOSS[(c["size"], c["patch"])],
                               n_logs=3, n_evals=1, params_metric=True)
    c = _client(store["uri"])
    noise = dict(zip(sorted(_PROXY_LOSS, key=_PROXY_LOSS.get), _NOISE_CMMD))
    for run_id in info["runs"].values():
        tags = c.get_run(run_id).data.tags
        key = (tags["size"], int(tags["patch"]))
        c.log_metric(run_id, "fid_cfg1.5", 2.0 + 300.0 * _PROXY_LOSS[key] ** 2, step=400)
        c.log_metric(run_id, "cmmd_cfg1.5", noise[key], step=400)
    return info


def _from_mlflow(store, info, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(final val_loss, final metric) of every trial, read straight from the MLflow runs."""
    c = _client(store["uri"])
    data = [c.get_run(r).data.metrics for r in info["runs"].values()]
    return np.array([m["val_loss"] for m in data]), np.array([m[metric] for m in data])


def test_loss_metric_section_says_which_metric_the_loss_predicts(store, tmp_path):
    """fid_cfg1.5 rises monotonically with the loss (good proxy), cmmd_cfg1.5 is unrelated (not a proxy):
    the section says so, with Spearman and Pearson equal to scipy's on the MLflow metrics, per patch
    group too, and the figure is written and referenced."""
    from scipy.stats import pearsonr, spearmanr

    info = _proxy_study(store, "proxy-study", list(_PROXY_LOSS))
    index = check_report(store["uri"], "proxy-study", tmp_path / "proxy", bootstrap=200,
                         expect_figures=["image_metrics_vs_loss.png"])
    html, md = index.read_text(), (index.parent / "report.md").read_text()
    lines = {m: next(x for x in md.splitlines() if x.startswith(f"- {m}: ")) for m in ("fid_cfg1.5", "cmmd_cfg1.5")}
    for metric, verdict in (("fid_cfg1.5", "good proxy"), ("cmmd_cfg1.5", "not a proxy")):
        loss, value = _from_mlflow(store, info, metric)
        rho, r = spearmanr(loss, value).statistic, pearsonr(loss, value).statistic
        half = 1.959964 / np.sqrt(len(loss) - 3)  # Fisher z
        lo, hi = np.tanh(np.arctanh(r) - half), np.tanh(np.arctanh(r) + half)
        line = lines[metric]
        assert line.startswith(f"- {metric}: {verdict} — Spearman ρ = {rho:.3f} "), line
        assert f"Pearson r = {r:.3f} [{lo:.3f}, {hi:.3f}] over 8 trials" in line, line
        assert f"{verdict} — Spearman" in html
    assert "ρ = 1.000 [1.000, 1.000]" in lines["fid_cfg1.5"]  # a monotone relation: every resample ranks alike
    cmmd_ci = re.search(r"ρ = 0\.095 \[(-?[\d.]+), (-?[\d.]+)\]", lines["cmmd_cfg1.5"])
    assert cmmd_ci and float(cmmd_ci[1]) < 0 < float(cmmd_ci[2])  # the interval holds 0: the rule's "not a proxy"
    for patch in (2, 4):  # 4 trials per patch size: a row each
        assert f"| fid_cfg1.5 | DiT, patch {patch} | 4 | 1.000 " in md
    loss, fid = _from_mlflow(store, info, "fid_cfg1.5")
    b, log_a = np.polyfit(np.log(loss), np.log(fid), 1)  # the fitted relation: least squares in log-log
    row = next(x for x in md.splitlines() if x.startswith("| fid_cfg1.5 | all trials | 8 | 1.000 [1.000, 1.000] |"))
    assert row.endswith(f"| metric = {np.exp(log_a):.4g} · loss^{b:.3g} |"), row
    assert "Esser et al. 2024" in md and "Fisher" in md and "bootstrap" in md
    assert "src='image_metrics_vs_loss.png'" in html and "](image_metrics_vs_loss.png)" in md
    assert (index.parent / "image_metrics_vs_loss.png").stat().st_size > 10_000


def test_loss_metric_section_with_too_few_trials_says_nothing_but_that(store, tmp_path):
    _proxy_study(store, "proxy-three", [("S", 2), ("B", 2), ("L", 2)])
    index = check_report(store["uri"], "proxy-three", tmp_path / "three", bootstrap=50)
    md = (index.parent / "report.md").read_text()
    for metric in ("fid_cfg1.5", "cmmd_cfg1.5"):
        assert (f"- {metric}: too few trials (3, fewer than 4) to say whether the loss is a proxy for it in this "
                "study.") in md
    assert "proxy —" not in md and "Spearman ρ = " not in md
