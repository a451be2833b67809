"""The compute-optimal frontier read off learning curves (no budget study needed).

The lower envelope of the loss-vs-compute curves of all trials is the best loss any size reached at each
compute; isoFLOP slices cut those curves at fixed compute (loss against model size); the
compute-optimal size per slice is the vertex of a parabola in log size, as in Hoffmann et al. 2022's
approach 2; and when at least three slices have their optimum inside the grid, N_opt ∝ C^a is fitted
through them. Runs trained to fixed compute budgets are fitted by isoflop.py and surface.py instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .powerlaw import ExponentFit, PowerLawFit, fit_exponent, fit_power_law


def lower_envelope(curves: pd.DataFrame, n_grid: int = 200) -> pd.DataFrame:
    """The best value any trial reached at each compute: columns compute, value, trial_id.

    curves: long table with trial_id, compute, value (one curve per trial, e.g. loss vs training
    compute). Each curve is interpolated linearly in log-log space within its own range (never
    extrapolated) on a common log-spaced compute grid."""
    c = curves[(curves["compute"] > 0) & (curves["value"] > 0)].dropna(subset=["compute", "value"])
    if c.empty:
        return pd.DataFrame(columns=["compute", "value", "trial_id"])
    grid = np.logspace(np.log10(c["compute"].min()), np.log10(c["compute"].max()), n_grid)
    ids, table = [], []
    for tid, g in c.groupby("trial_id", sort=True):
        ids.append(tid)
        table.append(_interp_loglog(g["compute"].to_numpy(), g["value"].to_numpy(), grid))
    table = np.vstack(table)
    finite = np.isfinite(table).any(axis=0)
    best = np.full(grid.size, -1)
    best[finite] = np.nanargmin(table[:, finite], axis=0)
    vals = np.where(finite, table[np.maximum(best, 0), np.arange(grid.size)], np.nan)
    out = pd.DataFrame({"compute": grid, "value": vals, "trial_id": [ids[b] if b >= 0 else None for b in best]})
    return out[finite].reset_index(drop=True)


def _interp_loglog(x: np.ndarray, y: np.ndarray, at: np.ndarray) -> np.ndarray:
    order = np.argsort(x)
    x, y = x[order], y[order]
    lx, ly = np.log(x), np.log(y)
    # several logs at the same compute (e.g. a resumed run): keep the last
    lx, keep = np.unique(lx[::-1], return_index=True)
    ly = ly[::-1][keep]
    la = np.log(at)
    out = np.full(at.shape, np.nan)
    if lx.size == 1:
        out[np.isclose(la, lx[0])] = math.exp(ly[0])
        return out
    inside = (la >= lx[0]) & (la <= lx[-1])
    out[inside] = np.exp(np.interp(la[inside], lx, ly))
    return out


def isoflop_slices(curves: pd.DataFrame, size: pd.Series, budgets=None, n_budgets: int = 6,
                   min_models: int = 3) -> pd.DataFrame:
    """Value of every trial at fixed compute budgets: columns budget, trial_id, size, value.

    size: trial_id -> model size measure (parameters, or forward GFLOPs when those are not logged).
    Default budgets: up to n_budgets log-spaced budgets among those that at least `min_models`
    distinct sizes reach (a slice through fewer sizes cannot show an optimum)."""
    empty = pd.DataFrame(columns=["budget", "trial_id", "size", "value"])
    c = curves[(curves["compute"] > 0) & (curves["value"] > 0)].dropna(subset=["compute", "value"])
    c = c[c["trial_id"].isin(size.dropna().index)]
    if c.empty:
        return empty
    per_trial = {tid: (g["compute"].to_numpy(dtype=float), g["value"].to_numpy(dtype=float))
                 for tid, g in c.groupby("trial_id", sort=True)}
    if budgets is None:
        ranges = c.groupby("trial_id")["compute"].agg(["min", "max"])
        grid = np.logspace(np.log10(ranges["min"].min()), np.log10(ranges["max"].max()), 48)
        sizes_at = [size[ranges.index[(ranges["min"] <= b) & (ranges["max"] >= b)]].nunique() for b in grid]
        ok = grid[np.asarray(sizes_at) >= min_models]
        if ok.size == 0:
            return empty
        budgets = ok[np.unique(np.linspace(0, ok.size - 1, min(n_budgets, ok.size)).round().astype(int))]
    rows = []
    for b in budgets:
        for tid, (x, y) in per_trial.items():
            v = _interp_loglog(x, y, np.array([b]))[0]
            if np.isfinite(v):
                rows.append({"budget": float(b), "trial_id": tid, "size": float(size[tid]), "value": float(v)})
    return pd.DataFrame(rows, columns=["budget", "trial_id", "size", "value"])


def isoflop_optima(slices: pd.DataFrame, min_models: int = 3) -> pd.DataFrame:
    """Per budget, the size that minimises the value: a parabola in log size through the slice
    (its vertex), flagged `interior` when the vertex lies inside the sizes trained (otherwise the
    grid does not bracket the optimum and the row is only the best trained size)."""
    rows = []
    for b, g in slices.groupby("budget", sort=True):
        g = g.groupby("size", as_index=False)["value"].min()  # several configs of one size: the best
        n = len(g)
        best = g.loc[g["value"].idxmin()]
        row = {"budget": b, "n_models": n, "best_size": float(best["size"]), "best_value": float(best["value"]),
               "size_opt": math.nan, "value_opt": math.nan, "interior": False}
        if n >= min_models:
            lx = np.log(g["size"].to_numpy(dtype=float))
            a2, a1, a0 = np.polyfit(lx, g["value"].to_numpy(dtype=float), 2)
            if a2 > 0:
                v = -a1 / (2 * a2)
                if lx.min() < v < lx.max():
                    row.update(size_opt=float(math.exp(v)), value_opt=float(a0 + a1 * v + a2 * v * v), interior=True)
        rows.append(row)
    return pd.DataFrame(rows, columns=["budget", "n_models", "best_size", "best_value", "size_opt", "value_opt",
                                       "interior"])


@dataclass
class Frontier:
    """What compute_frontier found; `note` says why N_opt ∝ C^a is missing when optimal_size_fit is None."""

    envelope: pd.DataFrame
    envelope_fit: PowerLawFit
    slices: pd.DataFrame
    optima: pd.DataFrame
    size_measure: str
    optimal_size_fit: ExponentFit | None
    note: str


def compute_frontier(curves: pd.DataFrame, size: pd.Series, size_measure: str = "parameters",
                     bootstrap: int = 1000, seed: int = 0, n_budgets: int = 6, min_slices: int = 3) -> Frontier:
    """The lower envelope over compute, its power law, isoFLOP slices and N_opt ∝ C^a when the grid
    brackets the optimum in at least `min_slices` slices (else `note` says why it cannot)."""
    env = lower_envelope(curves)
    if len(env) > 30:  # the envelope is dense; fit a log-spaced subsample (its points are correlated anyway)
        env_fit_pts = env.iloc[np.unique(np.linspace(0, len(env) - 1, 30).round().astype(int))]
    else:
        env_fit_pts = env
    env_fit = fit_power_law(env_fit_pts["compute"], env_fit_pts["value"], bootstrap=bootstrap, seed=seed)
    slices = isoflop_slices(curves, size, n_budgets=n_budgets)
    optima = isoflop_optima(slices)
    n_sizes = int(size.dropna().nunique())
    interior = optima[optima["interior"]] if not optima.empty else optima
    opt_fit = None
    if n_sizes < 3:
        note = (f"the grid has {n_sizes} model size(s); an isoFLOP optimum needs at least 3 sizes trained "
                f"to overlapping compute, so N_opt ∝ C^a is not estimated")
    elif len(interior) < min_slices:
        note = (f"{len(interior)} of {len(optima)} isoFLOP slices have their optimum inside the trained sizes "
                f"(need {min_slices}): the grid does not bracket the compute-optimal size, so N_opt ∝ C^a is "
                f"not estimated (train smaller and larger models to the same compute)")
    else:
        opt_fit = fit_exponent(interior["budget"], interior["size_opt"], bootstrap=bootstrap, seed=seed)
        note = (f"N_opt ∝ C^a from {len(interior)} isoFLOP slices (size measure: {size_measure})"
                if opt_fit.ok else f"N_opt ∝ C^a: {opt_fit.warning}")
    return Frontier(env, env_fit, slices, optima, size_measure, opt_fit, note)
