"""Power-law fits with bootstrap intervals, and the compute-optimal frontier.

The law is y = E + A · x^(−α) (E: the irreducible term, 0 when `irreducible=False`). It is fitted
by `scipy.optimize.curve_fit` in log space — log y = log(E + A·x^(−α)) — with x rescaled by its
geometric mean so the optimiser sees numbers near 1 whatever the units (training compute runs to
1e12 GFLOPs). Bounds: A > 0, α > 0, 0 ≤ E < min(y). Several starting points (E at a few fractions of
min y, A and α from a straight line through log(y − E)) guard against local minima.

Intervals are percentile bootstraps over the points (resampled with replacement, refitted). A fit is
*not claimed* — its parameters are NaN and `warning` says why — when it is under-determined (fewer
than 3 points, or fewer points than parameters + 1) or when it explains the data poorly
(R² < 0.9, in log space). Every caller shows `warning` rather than a number in that case.

Frontier: the lower envelope of the loss-vs-compute curves of all trials (the best loss any size
reached at each compute), isoFLOP slices of those curves (loss against model size at fixed
compute), the compute-optimal size per slice (a parabola in log size, as in Hoffmann et al.'s
approach 2) and, when at least three slices have their optimum inside the grid, N_opt ∝ C^a.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.optimize import OptimizeWarning, curve_fit

MIN_R2 = 0.9
CI_LEVEL = 0.95


# --- the power law -------------------------------------------------------------------------------


@dataclass
class PowerLawFit:
    """y = E + A · x^(−α). When `warning` is set, no law is claimed: A, alpha, E are NaN."""

    A: float = math.nan
    alpha: float = math.nan
    E: float = math.nan
    A_ci: tuple[float, float] | None = None
    alpha_ci: tuple[float, float] | None = None
    E_ci: tuple[float, float] | None = None
    r2: float = math.nan
    n: int = 0
    n_params: int = 3
    irreducible: bool = True
    warning: str | None = None
    x_range: tuple[float, float] | None = None
    n_bootstrap: int = 0  # bootstrap refits that succeeded
    samples: np.ndarray | None = field(default=None, repr=False)  # rows (A, alpha, E)

    @property
    def ok(self) -> bool:
        return self.warning is None and math.isfinite(self.alpha)

    def predict(self, x) -> np.ndarray:
        x = np.asarray(x, dtype=float)
        return self.E + self.A * x ** (-self.alpha)

    def band(self, x, level: float = CI_LEVEL) -> tuple[np.ndarray, np.ndarray]:
        """Pointwise bootstrap band of the fitted curve at x (NaN when there are no samples)."""
        x = np.asarray(x, dtype=float)
        if self.samples is None or len(self.samples) < 2:
            nan = np.full_like(x, np.nan)
            return nan, nan
        A, a, E = self.samples[:, :1], self.samples[:, 1:2], self.samples[:, 2:3]
        with np.errstate(over="ignore", invalid="ignore"):
            curves = E + A * x[None, :] ** (-a)
        q = (1 - level) / 2
        return np.nanquantile(curves, q, axis=0), np.nanquantile(curves, 1 - q, axis=0)

    def as_dict(self) -> dict:
        out = {k: getattr(self, k) for k in ("A", "alpha", "E", "A_ci", "alpha_ci", "E_ci", "r2", "n", "n_params",
                                              "irreducible", "warning", "x_range", "n_bootstrap")}
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in out.items()}

    def describe(self, x: str = "x", y: str = "y") -> str:
        """One line: the law with its 95 % intervals, or the warning."""
        if not self.ok:
            return f"no fit: {self.warning}"
        law = f"{y} = {_g(self.E)} + {_g(self.A)} · {x}^(−{self.alpha:.4g})" if self.irreducible else \
            f"{y} = {_g(self.A)} · {x}^(−{self.alpha:.4g})"
        parts = [f"α = {self.alpha:.4g} {_ci(self.alpha_ci)}", f"A = {_g(self.A)} {_ci(self.A_ci)}"]
        if self.irreducible:
            parts.append(f"E = {_g(self.E)} {_ci(self.E_ci)}")
        return f"{law}; " + ", ".join(parts) + f"; R² = {self.r2:.4f}, n = {self.n} (95 % bootstrap intervals, " \
                                               f"{self.n_bootstrap} resamples)"


def _g(v: float) -> str:
    return f"{v:.4g}" if v is not None and math.isfinite(v) else "nan"


def _ci(ci) -> str:
    return f"[{_g(ci[0])}, {_g(ci[1])}]" if ci else "[n/a]"


def _clean(x, y) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, dtype=float).ravel(), np.asarray(y, dtype=float).ravel()
    if x.shape != y.shape:
        raise ValueError(f"x and y differ in length ({x.size} vs {y.size})")
    keep = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    return x[keep], y[keep]


def _model_irreducible(u, log_a, alpha, e):
    return np.log(e + np.exp(log_a - alpha * u))


def _jac_irreducible(u, log_a, alpha, e):
    r = np.exp(log_a - alpha * u)
    d = 1.0 / (e + r)
    return np.column_stack([r * d, -u * r * d, d])


def _model_pure(u, log_a, alpha):
    return log_a - alpha * u


def _jac_pure(u, log_a, alpha):
    return np.column_stack([np.ones_like(u), -u])


def _bounds(y: np.ndarray, irreducible: bool):
    lo, hi = [-200.0, 1e-6], [200.0, 10.0]
    if irreducible:
        lo.append(0.0)
        hi.append(float(np.min(y)) * (1 - 1e-9))
    return lo, hi


def _starts(u: np.ndarray, y: np.ndarray, irreducible: bool) -> list[list[float]]:
    lo, hi = _bounds(y, irreducible)
    starts = []
    for frac in ((0.0, 0.3, 0.6, 0.85, 0.97) if irreducible else (0.0,)):
        e0 = frac * float(np.min(y))
        slope, intercept = np.polyfit(u, np.log(y - e0), 1)
        alpha0 = float(np.clip(-slope, 0.01, 5.0))
        log_a0 = float(np.clip(intercept, lo[0] + 1, hi[0] - 1))
        p0 = [log_a0, alpha0] + ([float(np.clip(e0, 0.0, hi[2] * 0.999))] if irreducible else [])
        starts.append(p0)
    return starts


def _curve_fit(u, ly, p0, bounds, irreducible, max_nfev=2000):
    model, jac = (_model_irreducible, _jac_irreducible) if irreducible else (_model_pure, _jac_pure)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OptimizeWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        popt, _ = curve_fit(model, u, ly, p0=p0, jac=jac, bounds=bounds, method="trf", max_nfev=max_nfev)
    resid = ly - model(u, *popt)
    return popt, float(np.sum(resid ** 2))


def _refit(u, ly, y, irreducible, p0, try_lm=True):
    """A bootstrap refit from the full data's optimum: Levenberg-Marquardt (MINPACK, ~10x faster than
    the bounded solver) when it settles quickly inside the bounds, else the bounded trust-region fit.
    try_lm=False when the optimum sits on a bound (E = 0), where LM would wander outside."""
    bounds = _bounds(y, irreducible)
    model, jac = (_model_irreducible, _jac_irreducible) if irreducible else (_model_pure, _jac_pure)
    if try_lm:
        try:
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                warnings.simplefilter("ignore", OptimizeWarning)
                warnings.simplefilter("ignore", RuntimeWarning)
                popt, _ = curve_fit(model, u, ly, p0=p0, jac=jac, method="lm", maxfev=60)
            if np.all(np.isfinite(popt)) and all(lo <= v <= hi for v, lo, hi in zip(popt, *bounds)):
                return popt
        except (RuntimeError, ValueError):
            pass
    # a resample this solver cannot settle quickly (e.g. 3 distinct points for 3 parameters) is dropped
    return _best_fit(u, ly, y, irreducible, starts=[list(p0)], max_nfev=100)[0]


def _best_fit(u, ly, y, irreducible, starts=None, max_nfev=2000):
    bounds = _bounds(y, irreducible)
    best, best_sse, last_err = None, math.inf, None
    for p0 in starts or _starts(u, y, irreducible):
        # keep each start strictly inside the bounds of this (possibly resampled) data set
        p0 = [float(np.clip(p, lo + 1e-12 * max(1.0, abs(lo)), hi - 1e-9 * max(1.0, abs(hi))))
              for p, lo, hi in zip(p0, *bounds)]
        try:
            popt, sse = _curve_fit(u, ly, p0, bounds, irreducible, max_nfev)
        except (RuntimeError, ValueError) as err:
            last_err = err
            continue
        if np.all(np.isfinite(popt)) and sse < best_sse:
            best, best_sse = popt, sse
    if best is None:
        raise RuntimeError(f"curve_fit did not converge ({last_err})")
    return best, best_sse


def fit_power_law(x, y, irreducible: bool = True, bootstrap: int = 1000, seed: int = 0,
                  min_r2: float = MIN_R2, level: float = CI_LEVEL) -> PowerLawFit:
    """Fit y = E + A · x^(−α) (E ≡ 0 when irreducible=False) with bootstrap intervals.

    Non-finite and non-positive points are dropped. Returns a PowerLawFit whose `warning` is set —
    and whose parameters are NaN — when the fit is under-determined or poor (R² < min_r2).
    """
    x, y = _clean(x, y)
    k = 3 if irreducible else 2
    n = int(x.size)
    res = PowerLawFit(n=n, n_params=k, irreducible=irreducible)
    n_distinct = int(np.unique(x).size)
    need = max(3, k + 1)
    if n_distinct < need:
        res.warning = (f"under-determined: {n_distinct} distinct point(s) for {k} parameters "
                       f"(need at least {need}); no law is claimed")
        return res
    res.x_range = (float(x.min()), float(x.max()))
    x0 = float(np.exp(np.mean(np.log(x))))
    u, ly = np.log(x / x0), np.log(y)
    ss_tot = float(np.sum((ly - ly.mean()) ** 2))
    if ss_tot <= 0:
        res.warning = "y is constant: no power law to fit"
        return res
    try:
        popt, sse = _best_fit(u, ly, y, irreducible)
    except RuntimeError as err:
        res.warning = f"the fit failed: {err}"
        return res
    res.r2 = 1 - sse / ss_tot
    if not res.r2 >= min_r2:
        res.warning = f"poor fit: R² = {res.r2:.3f} < {min_r2} (log space); no law is claimed"
        return res

    def natural(p):  # (log A', alpha, E) with x rescaled -> (A, alpha, E) in the caller's units
        return math.exp(p[0] + p[1] * math.log(x0)), float(p[1]), float(p[2]) if irreducible else 0.0

    res.A, res.alpha, res.E = natural(popt)
    if bootstrap and bootstrap > 0:
        rng = np.random.default_rng(seed)
        samples = []
        on_bound = bool(irreducible and popt[2] <= 1e-6 * float(np.min(y)))
        for _ in range(int(bootstrap)):
            idx = rng.integers(0, n, n)
            if np.unique(x[idx]).size < k:
                continue
            try:
                p = _refit(u[idx], ly[idx], y[idx], irreducible, popt, try_lm=on_bound is False)
            except RuntimeError:
                continue
            samples.append(natural(p))
        if samples:
            s = np.asarray(samples, dtype=float)
            q = (1 - level) / 2
            lo, hi = np.nanquantile(s, q, axis=0), np.nanquantile(s, 1 - q, axis=0)
            res.samples, res.n_bootstrap = s, len(s)
            res.A_ci, res.alpha_ci = (float(lo[0]), float(hi[0])), (float(lo[1]), float(hi[1]))
            res.E_ci = (float(lo[2]), float(hi[2])) if irreducible else None
    return res


# --- exponents of increasing laws (N_opt ∝ C^a) ---------------------------------------------------


@dataclass
class ExponentFit:
    """y = k · x^a (a of either sign), fitted as a line in log-log space."""

    a: float = math.nan
    k: float = math.nan
    a_ci: tuple[float, float] | None = None
    r2: float = math.nan
    n: int = 0
    warning: str | None = None

    @property
    def ok(self) -> bool:
        return self.warning is None and math.isfinite(self.a)

    def predict(self, x) -> np.ndarray:
        return self.k * np.asarray(x, dtype=float) ** self.a

    def as_dict(self) -> dict:
        return {"a": self.a, "k": self.k, "a_ci": list(self.a_ci) if self.a_ci else None, "r2": self.r2,
                "n": self.n, "warning": self.warning}


def _line(u, c0, a):
    return c0 + a * u


def fit_exponent(x, y, bootstrap: int = 1000, seed: int = 0, level: float = CI_LEVEL) -> ExponentFit:
    x, y = _clean(x, y)
    res = ExponentFit(n=int(x.size))
    if np.unique(x).size < 3:
        res.warning = f"under-determined: {np.unique(x).size} distinct point(s); need at least 3"
        return res
    x0 = float(np.exp(np.mean(np.log(x))))
    u, ly = np.log(x / x0), np.log(y)

    def fit(uu, yy):
        popt, _ = curve_fit(_line, uu, yy, p0=[float(np.mean(yy)), 0.5])
        return popt

    popt = fit(u, ly)
    ss_tot = float(np.sum((ly - ly.mean()) ** 2))
    res.r2 = 1 - float(np.sum((ly - _line(u, *popt)) ** 2)) / ss_tot if ss_tot > 0 else math.nan
    res.a, res.k = float(popt[1]), float(math.exp(popt[0] - popt[1] * math.log(x0)))
    if bootstrap:
        rng = np.random.default_rng(seed)
        a_s = []
        for _ in range(int(bootstrap)):
            idx = rng.integers(0, x.size, x.size)
            if np.unique(u[idx]).size < 2:
                continue
            a_s.append(fit(u[idx], ly[idx])[1])
        if a_s:
            q = (1 - level) / 2
            res.a_ci = (float(np.quantile(a_s, q)), float(np.quantile(a_s, 1 - q)))
    return res


# --- fits per group ------------------------------------------------------------------------------


@dataclass
class GroupFit:
    """One fitted law for one group of trials (e.g. family=dit, patch=2)."""

    group: dict
    x: str
    y: str
    fit: PowerLawFit
    points: pd.DataFrame = field(repr=False)  # trial_id, x, y of the points that were fitted

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.group.items()) or "all trials"


def fit_groups(trials: pd.DataFrame, x: str, y: str, by: list[str] | tuple[str, ...] = (),
               irreducible: bool = True, bootstrap: int = 1000, seed: int = 0) -> list[GroupFit]:
    """One power law of column y against column x for each group of `by` (all trials when empty).
    Groups whose x or y are all missing are left out; thin groups come back with a warning."""
    if x not in trials or y not in trials or trials.empty:
        return []
    by = [c for c in by if c in trials]
    groups = trials.groupby(by, sort=True, dropna=False) if by else [((), trials)]
    out = []
    for key, df in groups:
        key = key if isinstance(key, tuple) else (key,)
        pts = df[["trial_id", x, y]]
        xs, ys = pd.to_numeric(pts[x], errors="coerce"), pd.to_numeric(pts[y], errors="coerce")
        keep = xs.notna() & ys.notna() & (xs > 0) & (ys > 0)
        if not keep.any():
            continue
        fit = fit_power_law(xs[keep].to_numpy(), ys[keep].to_numpy(), irreducible=irreducible,
                            bootstrap=bootstrap, seed=seed)
        points = pd.DataFrame({"trial_id": pts["trial_id"][keep].to_numpy(), "x": xs[keep].to_numpy(),
                               "y": ys[keep].to_numpy()})
        out.append(GroupFit(dict(zip(by, key)), x, y, fit, points))
    return out


# --- the compute-optimal frontier -----------------------------------------------------------------


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
