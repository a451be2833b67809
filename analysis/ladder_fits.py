"""The fits a ladder prediction is made from (harness/launch/ladder.py registers it): the grid's trials read
back from MLflow exactly as the report reads them, fitted with the report's settings, so that the
registered prediction is the report's law (approach 2: isoFLOP parabolas, Hoffmann et al. 2022; approach 3:
the loss surface L(N, D), Besiroglu et al. 2024). Here, in analysis/, because it reads MLflow only; the
sweep passes it to the ladder (harness/ imports analysis only from the sweep and the CLI)."""
from __future__ import annotations

import math

from analysis import runs, scaling, study
from harness.errors import UserError

GRID_LOSS_KEY = "val_loss"       # the loss predicted: the final validation loss
SURFACE_BOOTSTRAP = 200          # as the report (analysis/budget_laws.py): refits of the 5-parameter surface
ISOFLOP_BOOTSTRAP = 1000         # as the report's default bootstrap
SEED = 0                         # the report's default seed: the same fits as the report's


def grid_fits(uri: str, experiment: str, grid_ids: set[str], bootstrap: int = ISOFLOP_BOOTSTRAP,
              seed: int = SEED) -> dict:
    """The grid's trials read back from MLflow as the report reads them (analysis.runs), only finished ones
    with a final validation loss, and its fits: {rows, k, surface, isoflop, loss_fd, fd_key, trial_ids}."""
    trial_runs = [r for r in runs.trial_runs(uri, experiment) if r.data.tags.get("trial_id") in grid_ids]
    histories = runs.load_histories(uri, experiment, keys=runs.HISTORY_KEYS.pattern, runs=trial_runs)
    trials = runs.load_trials(uri, experiment, histories=histories, runs=trial_runs)
    y_col = f"final_{GRID_LOSS_KEY}"
    if trials.empty or y_col not in trials:
        raise UserError(f"ladder.budgets: the grid's trials logged no {GRID_LOSS_KEY} to fit "
                        "(set eval.val_batches > 0)")
    usable, _ = study.split_usable(trials, y_col)
    check_one_law(usable)
    fd = runs.primary_fd_metric(histories["key"].unique()) if not histories.empty else None
    fd_col = f"final_{fd['key']}" if fd is not None and f"final_{fd['key']}" in usable else None
    rows = study.budget_rows(usable, y_col, fd_col)
    k = study.compute_per_param_image(rows)
    surf = scaling.fit_loss_surface(rows["n"], rows["d"], rows["loss"], bootstrap=min(bootstrap, SURFACE_BOOTSTRAP),
                                    seed=seed, groups=rows["group"], k=k if math.isfinite(k) else 1.0)
    iso = scaling.fit_isoflop_optima(rows, bootstrap=bootstrap, seed=seed)
    loss_fd = None
    if fd_col and rows["fd"].notna().sum() >= 3:
        loss_fd = scaling.fit_loss_to_fd(rows["loss"], rows["fd"], bootstrap=bootstrap, seed=seed)
    return {"rows": rows, "k": k, "surface": surf, "isoflop": iso, "loss_fd": loss_fd,
            "fd_key": fd["key"] if fd_col else None, "trial_ids": sorted(rows["trial_id"].astype(str))}


def check_one_law(trials) -> None:
    """A ladder predicts one law; the report fits one per group of trials (analysis.study.analysis_groups:
    per patch, objective, ...). The study's validation refuses such a grid before anything runs
    (harness/one_law.py one_law_problems, which says why); this catches a grid whose logged trials still fall
    into several groups (e.g. trials of an older file in the same experiment), so that the registered
    prediction is never a law pooled across them."""
    groups = study.analysis_groups(trials)
    if len(groups) > 1:
        labels = "; ".join(study.group_label(g) for g, _ in groups)
        raise UserError(f"ladder.budgets: the grid's finished trials fall into {len(groups)} groups the report "
                        f"fits separately ({labels}); a ladder extrapolates one law, so it is not predicted from a "
                        "fit pooled across them: one study per group, each with its own ladder")
