"""Chinchilla's approach 2: a parabola of loss over log N per compute budget, and laws through its vertices.

Hoffmann et al. 2022 ("Training Compute-Optimal Large Language Models", arXiv 2203.15556); for
diffusion transformers Liang et al. 2024 ("Scaling Laws for Diffusion Transformers", arXiv
2410.08184). The parabola is a local approximation whose vertex is biased when the size grid is
wide or off-centre or when α ≠ β (Czech et al. 2026, arXiv 2603.22339): every budget says how wide
its grid is and how far off-centre its vertex lies. Compare with approach 3 (surface.py) through
prediction.compare_optimal_exponents.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .common import CI_LEVEL, percentile_interval
from .powerlaw import ExponentFit


def _t_quantile(dof: int, level: float) -> float:
    from scipy.stats import t as student_t

    return float(student_t.ppf(0.5 + level / 2, dof)) if dof > 0 else math.nan


def _loglog_with_errors(x, y, se_log=None, draws: int = 1000, seed: int = 0, level: float = CI_LEVEL,
                        min_points: int = 3) -> ExponentFit:
    """y = k · x^a by least squares on (log x, log y), with an interval from parametric draws: each
    log y_i is redrawn with its own standard error (se_log) plus the residual scatter the fit leaves
    beyond those errors, and refitted."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    se = np.zeros_like(x) if se_log is None else np.nan_to_num(np.asarray(se_log, dtype=float), nan=0.0)
    keep = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    x, y, se = x[keep], y[keep], se[keep]
    res = ExponentFit(n=int(x.size))
    if np.unique(x).size < min_points:
        res.warning = f"under-determined: {np.unique(x).size} point(s); a law needs at least {min_points}"
        return res
    lx0 = float(np.mean(np.log(x)))
    u, ly = np.log(x) - lx0, np.log(y)
    a, c0 = np.polyfit(u, ly, 1)
    resid = ly - (c0 + a * u)
    ss_tot = float(np.sum((ly - ly.mean()) ** 2))
    res.r2 = 1 - float(np.sum(resid ** 2)) / ss_tot if ss_tot > 0 else math.nan
    res.a, res.k = float(a), float(math.exp(c0 - a * lx0))
    dof = x.size - 2
    extra = max(0.0, float(np.sum(resid ** 2)) / dof - float(np.mean(se ** 2))) if dof > 0 else 0.0
    sd = np.sqrt(se ** 2 + extra)
    if draws and np.any(sd > 0):
        rng = np.random.default_rng(seed)
        fitted = c0 + a * u
        sims = fitted[None, :] + rng.standard_normal((int(draws), x.size)) * sd[None, :]
        A = np.column_stack([np.ones_like(u), u])
        coef = np.linalg.lstsq(A, sims.T, rcond=None)[0]  # rows: intercept, slope
        ks = np.exp(coef[0] - coef[1] * lx0)
        res.samples = np.column_stack([ks, coef[1]])
        res.a_ci, res.k_ci = percentile_interval(coef[1], level), percentile_interval(ks, level)
    elif draws:
        res.a_ci, res.k_ci = (res.a, res.a), (res.k, res.k)
        res.samples = np.array([[res.k, res.a], [res.k, res.a]])
    return res


def _positive_interval(value: float, se: float, tq: float) -> tuple[float, float]:
    """The interval of a positive quantity (a loss) from its standard error, taken on its log by the
    delta method — value · exp(±tq · se / value) — so it is asymmetric and never reaches zero, where
    value ± tq · se would print negative losses when the error is large. A non-positive vertex (the
    parabola dips below zero: not a loss at all) has no interval."""
    if not (value > 0 and math.isfinite(se)):
        return math.nan, math.nan
    s = tq * se / value
    return value * math.exp(-s), value * math.exp(s)


@dataclass
class IsoflopOptima:
    """Approach 2: per budget a parabola of loss over log N, its vertex (N_opt, L_opt) with an
    interval, whether the size grid brackets it; then N_opt(C) = k·C^a and L_opt(C) = k·C^a over the
    bracketed budgets."""

    budgets: pd.DataFrame  # one row per budget (see fit_isoflop_optima)
    points: pd.DataFrame  # budget, compute, n, loss (replicate mean), loss_std, n_rep
    n_opt_fit: ExponentFit | None = None
    l_opt_fit: ExponentFit | None = None
    notes: list[str] = field(default_factory=list)
    level: float = CI_LEVEL

    @property
    def used(self) -> pd.DataFrame:
        return self.budgets[self.budgets["bracketed"]]

    def as_dict(self) -> dict:
        return {"budgets": self.budgets.to_dict(orient="records"),
                "n_opt_fit": self.n_opt_fit.as_dict() if self.n_opt_fit else None,
                "l_opt_fit": self.l_opt_fit.as_dict() if self.l_opt_fit else None, "notes": list(self.notes)}


def _noise(y: np.ndarray, resid: np.ndarray, m: np.ndarray, std: np.ndarray) -> tuple[float, np.ndarray, int, str]:
    """(s², weights, degrees of freedom, "seeds" | "residuals" | "") of one budget's parabola: the pooled
    within-size variance of single runs when sizes have replicates (each mean weighted 1/m), else the
    residual variance, else none."""
    rep_dof, dof_res = int((m - 1).sum()), len(y) - 3
    if rep_dof > 0:  # pooled within-size variance of single runs -> variance of each mean
        return float(((m - 1) * std ** 2).sum() / rep_dof), 1.0 / m, rep_dof, "seeds"
    if dof_res > 0:
        return float(resid @ resid) / dof_res, np.ones_like(y), dof_res, "residuals"
    return 0.0, np.ones_like(y), 0, ""


def _budget_parabola(b, g: pd.DataFrame, n: str, cval: float, level: float,
                     min_sizes: int) -> tuple[dict, pd.DataFrame]:
    """One budget of fit_isoflop_optima: (its row of the budget table, its points with the parabola's
    fitted values). `g`: the budget's (size, mean loss, std, count) rows, by size."""
    x, y, m = np.log(g[n].to_numpy(float)), g["mean"].to_numpy(float), g["count"].to_numpy(float)
    pts = pd.DataFrame({"budget": b, "compute": cval, "n": g[n].to_numpy(float), "loss": y,
                        "loss_std": g["std"].to_numpy(float), "n_rep": m.astype(int), "fitted": math.nan})
    i_best = int(np.argmin(y))
    row = {"budget": b, "compute": cval, "n_sizes": int(len(g)), "n_runs": int(m.sum()),
           "best_n": float(np.exp(x[i_best])), "best_loss": float(y[i_best]),
           "n_opt": math.nan, "n_opt_lo": math.nan, "n_opt_hi": math.nan, "log_n_opt_se": math.nan,
           "loss_opt": math.nan, "loss_opt_lo": math.nan, "loss_opt_hi": math.nan,
           "coef": None, "noise": math.nan, "noise_from": "",
           "grid_decades": float((x.max() - x.min()) / math.log(10)),
           "offset_decades": math.nan, "rms_resid": math.nan, "bracketed": False, "note": ""}
    if len(g) < min_sizes:
        row["note"] = f"{len(g)} size(s): a parabola needs at least {min_sizes}; add sizes"
        return row, pts
    X = np.column_stack([x ** 2, x, np.ones_like(x)])
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    c2, c1, c0 = (float(c) for c in coef)
    row["coef"] = [c2, c1, c0]
    resid = y - X @ coef
    pts["fitted"] = X @ coef
    # how far the parabola misses the measured means (the figure's residual panel shows each point)
    row["rms_resid"] = float(np.sqrt(np.mean(resid ** 2)))
    s2, w, dof, row["noise_from"] = _noise(y, resid, m, g["std"].to_numpy(float))
    row["noise"] = math.sqrt(s2)
    edge = "below" if i_best == 0 else "above" if i_best == len(g) - 1 else None
    if c2 <= 0:
        row["note"] = "optimum not bracketed: the losses do not curve upwards; add sizes on both sides"
        return row, pts
    v = -c1 / (2 * c2)
    if edge is None and not (x.min() < v < x.max()):
        edge = "below" if v <= x.min() else "above"
    # delta method: Var(coef) = s² (XᵀX)⁻¹ Xᵀ W X (XᵀX)⁻¹ with W = diag(w) (replicate means: w = 1/m)
    xtx_inv = np.linalg.pinv(X.T @ X)
    cov = s2 * xtx_inv @ (X.T * w) @ X @ xtx_inv
    gv = np.array([c1 / (2 * c2 ** 2), -1 / (2 * c2), 0.0])
    gl = np.array([c1 ** 2 / (4 * c2 ** 2), -c1 / (2 * c2), 1.0])
    se_v = math.sqrt(max(0.0, float(gv @ cov @ gv)))
    se_l = math.sqrt(max(0.0, float(gl @ cov @ gl)))
    tq = _t_quantile(dof, level) if s2 > 0 else 0.0
    row.update(n_opt=math.exp(v), log_n_opt_se=se_v, n_opt_lo=math.exp(v - tq * se_v),
               n_opt_hi=math.exp(v + tq * se_v), loss_opt=c0 - c1 ** 2 / (4 * c2),
               offset_decades=float((v - (x.min() + x.max()) / 2) / math.log(10)))
    row["loss_opt_lo"], row["loss_opt_hi"] = _positive_interval(row["loss_opt"], se_l, tq)
    row["loss_opt_se"] = se_l
    if edge is not None:
        row["note"] = (f"optimum not bracketed: add a size {edge} "
                       f"({'smallest' if edge == 'below' else 'largest'} trained size is the best or the "
                       f"vertex lies outside the grid); not used in the N_opt fit")
    else:
        row["bracketed"] = True
    return row, pts


def fit_isoflop_optima(df: pd.DataFrame, budget: str = "budget", n: str = "n", loss: str = "loss",
                       compute: str | None = "compute", bootstrap: int = 1000, seed: int = 0,
                       level: float = CI_LEVEL, min_sizes: int = 3, min_budgets: int = 3) -> IsoflopOptima:
    """Chinchilla's approach 2 (Hoffmann et al. 2022; for diffusion transformers Liang et al. 2024,
    "Scaling Laws for Diffusion Transformers", arXiv 2410.08184, whose N_opt ∝ C^0.5681 came from
    such parabolas) from runs trained to fixed compute budgets.

    df: one row per run with columns `budget` (the budget's label, e.g. the `train.flops` param),
    `n` (parameters), `loss`, and optionally `compute` (the run's measured training compute; a
    budget's C is the median over its runs, else the label itself). Runs at the same (budget, n) —
    seeds — are averaged; their spread is the noise level of that budget.

    Per budget: loss = c₂ (log N)² + c₁ log N + c₀ by least squares; vertex log N_opt = −c₁ / (2c₂),
    L_opt = c₀ − c₁² / (4c₂); intervals from the coefficients' covariance by the delta method with
    Student-t quantiles, both on a log scale (log N_opt, and log L_opt: a loss is positive, so its
    interval is L_opt · exp(±t · se / L_opt), never below zero). Noise: the replicates' pooled
    variance when there are replicates, else the parabola's residual variance (`noise_from` says
    which); with neither the interval is empty. A budget is **not bracketed** —
    flagged, and left out of the N_opt(C) fit — when its lowest loss is at the smallest or largest
    size trained, the parabola opens downwards, or the vertex lies outside the sizes trained:
    "optimum not bracketed: add a size below / above".

    Then N_opt(C) = k·C^a and L_opt(C) = k·C^a by least squares in log-log space over the bracketed
    budgets (at least `min_budgets`), intervals from `bootstrap` parametric draws of the vertices
    (their own error plus the scatter the line leaves).

    Caveat (Czech et al. 2026, arXiv 2603.22339): the parabola is only a local approximation; its
    vertex is biased when the size grid is wide or off-centre around the optimum, or when α ≠ β in
    the loss surface. The budget table reports each grid's width and the vertex's offset from the
    grid's centre (in decades) so the bias can be judged, and `rms_resid`, the root-mean-square
    distance of the measured means from the parabola (against `noise`, the replicate or residual
    scatter: a parabola that misses an asymmetric curve has rms_resid well above the seed noise);
    compare with fit_loss_surface."""
    cols = [budget, n, loss] + ([compute] if compute and compute in df else [])
    d = df[cols].copy()
    for c in cols:
        d[c] = pd.to_numeric(d[c], errors="coerce")
    d = d[np.isfinite(d[n]) & np.isfinite(d[loss]) & (d[n] > 0) & (d[loss] > 0) & d[budget].notna()]
    agg = d.groupby([budget, n], sort=True)[loss].agg(["mean", "std", "count"]).reset_index()
    agg["std"] = agg["std"].fillna(0.0)
    c_of = (d.groupby(budget)[compute].median() if compute and compute in d else
            pd.Series({b: float(b) for b in d[budget].unique()}))
    rows, pts = [], []
    for b, g in agg.groupby(budget, sort=True):
        row, p = _budget_parabola(b, g.sort_values(n), n, float(c_of.get(b, math.nan)), level, min_sizes)
        rows.append(row)
        pts.append(p)
    budgets = pd.DataFrame(rows)
    points = pd.concat(pts, ignore_index=True) if pts else pd.DataFrame(
        columns=["budget", "compute", "n", "loss", "loss_std", "n_rep", "fitted"])
    res = IsoflopOptima(budgets, points, level=level)
    if budgets.empty:
        res.notes.append("no budget has runs")
        return res
    budgets.sort_values("compute", inplace=True, ignore_index=True)
    used = budgets[budgets["bracketed"]]
    if len(used) < min_budgets:
        res.notes.append(f"{len(used)} of {len(budgets)} budgets bracket their optimum (need {min_budgets}): "
                         "N_opt(C) and L_opt(C) are not fitted")
        return res
    res.n_opt_fit = _loglog_with_errors(used["compute"], used["n_opt"], used["log_n_opt_se"], draws=bootstrap,
                                        seed=seed, level=level, min_points=min_budgets)
    l_se = (used["loss_opt_se"] / used["loss_opt"]).to_numpy(float) if "loss_opt_se" in used else None
    res.l_opt_fit = _loglog_with_errors(used["compute"], used["loss_opt"], l_se, draws=bootstrap, seed=seed + 1,
                                        level=level, min_points=min_budgets)
    return res
