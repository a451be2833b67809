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

Scaling laws from budget studies (the report's answer): `fit_loss_surface` (Chinchilla approach 3,
Hoffmann et al. 2022, fitted as Besiroglu et al. 2024 recommend), `fit_isoflop_optima` (approach 2;
Liang et al. 2024 for DiT; its biases: Czech et al. 2026), `compare_optimal_exponents` (do the two
agree?), `holdout_prediction` (the largest budget predicted from the others) and `fit_loss_to_fd`.
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
MIN_DISTINCT_X = 4  # a law is claimed only from at least this many distinct x values


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
                  min_r2: float = MIN_R2, level: float = CI_LEVEL, min_distinct_x: int | None = None) -> PowerLawFit:
    """Fit y = E + A · x^(−α) (E ≡ 0 when irreducible=False) with bootstrap intervals.

    Non-finite and non-positive points are dropped. Returns a PowerLawFit whose `warning` is set —
    and whose parameters are NaN — when the fit is under-determined or poor (R² < min_r2).
    min_distinct_x: the fewest distinct x values fitted (default: parameters + 1, at least 3); the
    report claims laws only from MIN_DISTINCT_X = 4.
    """
    x, y = _clean(x, y)
    k = 3 if irreducible else 2
    n = int(x.size)
    res = PowerLawFit(n=n, n_params=k, irreducible=irreducible)
    n_distinct = int(np.unique(x).size)
    need = max(3, k + 1, min_distinct_x or 0)
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
    samples: np.ndarray | None = field(default=None, repr=False)  # rows (k, a) of the interval's draws
    k_ci: tuple[float, float] | None = None

    @property
    def ok(self) -> bool:
        return self.warning is None and math.isfinite(self.a)

    def predict(self, x) -> np.ndarray:
        return self.k * np.asarray(x, dtype=float) ** self.a

    def band(self, x, level: float = CI_LEVEL) -> tuple[np.ndarray, np.ndarray]:
        """Pointwise interval of k · x^a at x from the draws (NaN without draws)."""
        x = np.asarray(x, dtype=float)
        if self.samples is None or len(self.samples) < 2:
            nan = np.full(x.shape, np.nan)
            return nan, nan
        with np.errstate(over="ignore", invalid="ignore"):
            ys = self.samples[:, :1] * x.reshape(1, -1) ** self.samples[:, 1:2]
        q = (1 - level) / 2
        return (np.nanquantile(ys, q, axis=0).reshape(x.shape), np.nanquantile(ys, 1 - q, axis=0).reshape(x.shape))

    def describe(self, x: str = "x", y: str = "y") -> str:
        if not self.ok:
            return f"no fit: {self.warning}"
        return f"{y} = {_g(self.k)} · {x}^{self.a:.4g}; exponent {self.a:.4g} {_ci(self.a_ci)} (n = {self.n})"

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
               irreducible: bool = True, bootstrap: int = 1000, seed: int = 0,
               min_distinct_x: int = MIN_DISTINCT_X, distinct_axes: list[str] | tuple[str, ...] = ()) -> list[GroupFit]:
    """One power law of column y against column x for each group of `by` (all trials when empty).
    Groups whose x or y are all missing are left out; thin groups come back with a warning.

    A law is claimed only from at least `min_distinct_x` distinct x values. `distinct_axes`: columns
    (e.g. patch) whose different values are different experiments: a group in which two points share
    an x but differ in one of them is not fitted (they are not repeats; fit per that axis instead)."""
    if x not in trials or y not in trials or trials.empty:
        return []
    by = [c for c in by if c in trials]
    other = [c for c in distinct_axes if c in trials and c not in by]
    groups = trials.groupby(by, sort=True, dropna=False) if by else [((), trials)]
    out = []
    for key, df in groups:
        key = key if isinstance(key, tuple) else (key,)
        pts = df[["trial_id", x, y] + other]
        xs, ys = pd.to_numeric(pts[x], errors="coerce"), pd.to_numeric(pts[y], errors="coerce")
        keep = xs.notna() & ys.notna() & (xs > 0) & (ys > 0)
        if not keep.any():
            continue
        mixed = [c for c in other if (pts[keep].groupby(xs[keep])[c].nunique(dropna=False) > 1).any()]
        if mixed:
            fit = PowerLawFit(n=int(keep.sum()), n_params=3 if irreducible else 2, irreducible=irreducible,
                              warning=f"not pooled: points at the same x differ in {', '.join(mixed)} (different "
                                      f"experiments, not repeats); see the fits per {', '.join(mixed)}")
        else:
            fit = fit_power_law(xs[keep].to_numpy(), ys[keep].to_numpy(), irreducible=irreducible,
                                bootstrap=bootstrap, seed=seed, min_distinct_x=min_distinct_x)
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


# --- Chinchilla approach 3: the loss surface L(N, D) = E + A/N^α + B/D^β --------------------------

HUBER_DELTA = 1e-3


@dataclass
class LossSurfaceFit:
    """L(N, D) = E + A / N^α + B / D^β (N: parameters, D: images seen) and the compute-optimal
    allocation it implies for C = k · N · D. When `warning` is set no surface is claimed."""

    E: float = math.nan
    A: float = math.nan
    alpha: float = math.nan
    B: float = math.nan
    beta: float = math.nan
    E_ci: tuple[float, float] | None = None
    A_ci: tuple[float, float] | None = None
    alpha_ci: tuple[float, float] | None = None
    B_ci: tuple[float, float] | None = None
    beta_ci: tuple[float, float] | None = None
    a_ci: tuple[float, float] | None = None  # of the N_opt exponent β / (α + β)
    k: float = 1.0  # C = k · N · D
    n: int = 0
    n_groups: int = 0
    objective: float = math.nan  # Σ Huber_δ(log residual) at the optimum
    n_starts: int = 0
    n_converged: int = 0  # starts L-BFGS-B reported as converged
    n_at_best: int = 0  # starts that reached the best objective (relative 1e-4)
    spread: dict = field(default_factory=dict)  # parameter -> (min, max) over optima within 1 % of the best
    n_bootstrap: int = 0
    samples: np.ndarray | None = field(default=None, repr=False)  # rows (E, A, alpha, B, beta)
    n_range: tuple[float, float] | None = None
    d_range: tuple[float, float] | None = None
    warning: str | None = None
    level: float = CI_LEVEL

    @property
    def ok(self) -> bool:
        return self.warning is None and math.isfinite(self.alpha)

    def predict(self, n, d) -> np.ndarray:
        n, d = np.asarray(n, dtype=float), np.asarray(d, dtype=float)
        return self.E + self.A * n ** (-self.alpha) + self.B * d ** (-self.beta)

    def _sample_predict(self, n, d) -> np.ndarray:
        s = self.samples
        n, d = np.asarray(n, dtype=float).reshape(1, -1), np.asarray(d, dtype=float).reshape(1, -1)
        with np.errstate(over="ignore", invalid="ignore"):
            return s[:, :1] + s[:, 1:2] * n ** (-s[:, 2:3]) + s[:, 3:4] * d ** (-s[:, 4:5])

    def band(self, n, d) -> tuple[np.ndarray, np.ndarray]:
        """Pointwise bootstrap interval of the predicted loss at (n, d)."""
        shape = np.broadcast(np.asarray(n), np.asarray(d)).shape
        n, d = np.broadcast_to(n, shape).ravel(), np.broadcast_to(d, shape).ravel()
        if self.samples is None or len(self.samples) < 2:
            nan = np.full(shape, np.nan)
            return nan, nan
        q = (1 - self.level) / 2
        ys = self._sample_predict(n, d)
        return np.nanquantile(ys, q, axis=0).reshape(shape), np.nanquantile(ys, 1 - q, axis=0).reshape(shape)

    # compute-optimal allocation: minimise L(N, C / (k N)) over N
    @property
    def a(self) -> float:
        """N_opt ∝ C^a with a = β / (α + β); D_opt ∝ C^b with b = α / (α + β)."""
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:
        return self.alpha / (self.alpha + self.beta)

    @staticmethod
    def _alloc(c, k, E, A, alpha, B, beta):
        g = (alpha * A / (beta * B)) ** (1.0 / (alpha + beta))
        cc = np.asarray(c, dtype=float) / k
        n_opt = g * cc ** (beta / (alpha + beta))
        d_opt = cc ** (alpha / (alpha + beta)) / g
        return n_opt, d_opt, E + A * n_opt ** (-alpha) + B * d_opt ** (-beta)

    def n_opt(self, c) -> np.ndarray:
        return self._alloc(c, self.k, self.E, self.A, self.alpha, self.B, self.beta)[0]

    def d_opt(self, c) -> np.ndarray:
        return self._alloc(c, self.k, self.E, self.A, self.alpha, self.B, self.beta)[1]

    def loss_opt(self, c) -> np.ndarray:
        return self._alloc(c, self.k, self.E, self.A, self.alpha, self.B, self.beta)[2]

    def allocation(self, c: float) -> dict:
        """N_opt, D_opt and the loss there at compute c, each with its bootstrap interval."""
        n, d, loss = (float(v) for v in self._alloc(c, self.k, self.E, self.A, self.alpha, self.B, self.beta))
        out = {"compute": float(c), "n_opt": n, "d_opt": d, "loss_opt": loss,
               "n_opt_ci": None, "d_opt_ci": None, "loss_opt_ci": None}
        if self.samples is not None and len(self.samples) >= 2:
            s = self.samples
            with np.errstate(all="ignore"):
                ns, ds, ls = self._alloc(c, self.k, s[:, 0], s[:, 1], s[:, 2], s[:, 3], s[:, 4])
            q = (1 - self.level) / 2
            for key, v in (("n_opt_ci", ns), ("d_opt_ci", ds), ("loss_opt_ci", ls)):
                v = v[np.isfinite(v)]
                if v.size >= 2:
                    out[key] = (float(np.quantile(v, q)), float(np.quantile(v, 1 - q)))
        return out

    def as_dict(self) -> dict:
        keys = ("E", "A", "alpha", "B", "beta", "E_ci", "A_ci", "alpha_ci", "B_ci", "beta_ci", "a_ci", "k", "n",
                "n_groups", "objective", "n_starts", "n_converged", "n_at_best", "n_bootstrap", "n_range", "d_range",
                "warning")
        out = {k: getattr(self, k) for k in keys}
        out["a"] = self.a if self.ok else None
        out["spread"] = {k: list(v) for k, v in self.spread.items()}
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in out.items()}

    def describe(self, n: str = "N", d: str = "D") -> str:
        if not self.ok:
            return f"no fit: {self.warning}"
        return (f"L = {_g(self.E)} + {_g(self.A)}/{n}^{self.alpha:.4g} + {_g(self.B)}/{d}^{self.beta:.4g}; "
                f"α = {self.alpha:.4g} {_ci(self.alpha_ci)}, β = {self.beta:.4g} {_ci(self.beta_ci)}, "
                f"E = {_g(self.E)} {_ci(self.E_ci)}; N_opt ∝ C^{self.a:.4g} {_ci(self.a_ci)} "
                f"({self.n} points, {self.n_bootstrap} bootstrap refits)")


def _surface_objective(p, u, v, ly, delta):
    """Σ Huber_δ(LSE(e, a − α u, b − β v) − log L) / δ and its gradient (u, v: centred log N, log D)."""
    e, a, al, b, be = p
    t1, t2 = a - al * u, b - be * v
    m = np.maximum(np.maximum(e, t1), t2)
    w0, w1, w2 = np.exp(e - m), np.exp(t1 - m), np.exp(t2 - m)
    s = w0 + w1 + w2
    r = m + np.log(s) - ly
    quad = np.abs(r) <= delta
    f = np.where(quad, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta)).sum() / delta
    g = np.where(quad, r, delta * np.sign(r)) / delta
    w0, w1, w2 = w0 / s, w1 / s, w2 / s
    grad = np.array([np.dot(g, w0), np.dot(g, w1), -np.dot(g * w1, u), np.dot(g, w2), -np.dot(g * w2, v)])
    return float(f), grad


_SURFACE_BOUNDS = [(-60.0, 60.0), (-60.0, 60.0), (1e-3, 5.0), (-60.0, 60.0), (1e-3, 5.0)]


def _surface_starts(ly: np.ndarray) -> list[np.ndarray]:
    """The grid of starting points (in centred units): E at a few fractions of the smallest loss, each
    reducible term at a few fractions of it at the data's centre, α and β from 0.1 to 1.0 (108)."""
    lmin = float(np.exp(ly.min()))
    es = np.log(lmin * np.array([0.05, 0.4, 0.9]))
    ts = np.log(lmin * np.array([0.03, 0.3]))
    exps = (0.1, 0.4, 1.0)
    return [np.array([e, a, al, b, be]) for e in es for a in ts for b in ts for al in exps for be in exps]


def _one_blas_thread():
    """L-BFGS-B on 5 parameters is several times slower when BLAS spreads its small products over
    threads; threadpoolctl (a scikit-learn dependency) pins them to one while fitting."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(1)


def _surface_minimise(u, v, ly, starts, delta):
    from scipy.optimize import minimize

    with _one_blas_thread():
        return _surface_minimise_all(minimize, u, v, ly, starts, delta)


def _surface_minimise_all(minimize, u, v, ly, starts, delta):
    out = []
    for p0 in starts:
        with np.errstate(all="ignore"):
            r = minimize(_surface_objective, p0, args=(u, v, ly, delta), jac=True, method="L-BFGS-B",
                         bounds=_SURFACE_BOUNDS, options={"ftol": 1e-13, "gtol": 1e-10, "maxiter": 5000})
        if np.all(np.isfinite(r.x)) and math.isfinite(r.fun):
            out.append((float(r.fun), np.asarray(r.x, dtype=float), bool(r.success)))
    out.sort(key=lambda t: t[0])
    return out


def fit_loss_surface(n, d, loss, bootstrap: int = 200, seed: int = 0, groups=None, k: float = 1.0,
                     delta: float = HUBER_DELTA, level: float = CI_LEVEL, min_distinct: int = MIN_DISTINCT_X,
                     starts: list | None = None) -> LossSurfaceFit:
    """Fit L(N, D) = E + A / N^α + B / D^β — Chinchilla's approach 3 (Hoffmann et al. 2022, "Training
    Compute-Optimal Large Language Models", arXiv 2203.15556), fitted as Besiroglu et al. 2024
    ("Chinchilla Scaling: A replication attempt", arXiv 2404.10102) recommend.

    - N: parameters; D: **training images seen** (samples_seen), not tokens — the same everywhere in
      the report. loss: the measured loss of each run (validation loss by default in the report).
    - Parametrisation as in Chinchilla: log L̂ = LSE(e, a − α log N, b − β log D) with E = e^e,
      A = e^a, B = e^b. Internally log N and log D are centred on their geometric means (an exact
      change of variables; A and B are converted back) so the optimiser sees numbers near 1.
    - Objective: the Huber loss (δ = 1e-3) of log L̂ − log L, **summed** over the runs (not averaged).
      It is divided by δ, a constant factor that leaves the optimum unchanged, and L-BFGS-B runs with
      ftol = 1e-13, gtol = 1e-10: a loss scale that ends the optimiser early is what mis-fitted the
      original Chinchilla parameters (Besiroglu et al.).
    - scipy's L-BFGS-B from a grid of starting points (`starts`, default 3·2·2·3·3 = 108); the best
      optimum is kept, and `spread` gives each parameter's range over the optima within 1 % of the
      best objective (a wide spread: the data do not pin that parameter down), `n_at_best` how many
      starts reached the best. Parameters are never rounded.
    - Intervals: percentile bootstrap (`level`) over runs, or over the replicate groups of `groups`
      (one label per run: runs sharing a label — seeds of one configuration — are resampled together).
      Each resample is refitted from the best optima of the full fit.
    - Compute-optimal allocation for C = k · N · D (k: compute per parameter per image in the caller's
      unit of C; the report uses C = training GFLOPs of multiply-adds, 3 × forward × images, and
      k = median of train_gflops / (params · images) over the fitted runs):
      N_opt = G (C/k)^(β/(α+β)), D_opt = G⁻¹ (C/k)^(α/(α+β)), G = (αA / (βB))^(1/(α+β)).

    No surface is claimed (`warning` set, parameters NaN) with fewer than `min_distinct` distinct N
    or D values, or fewer runs than 2 × 5 parameters."""
    n, d, loss = (np.asarray(x, dtype=float).ravel() for x in (n, d, loss))
    if not (n.shape == d.shape == loss.shape):
        raise ValueError(f"n, d and loss differ in length ({n.size}, {d.size}, {loss.size})")
    grp = np.arange(n.size) if groups is None else np.asarray(groups).ravel()
    keep = np.isfinite(n) & np.isfinite(d) & np.isfinite(loss) & (n > 0) & (d > 0) & (loss > 0)
    n, d, loss, grp = n[keep], d[keep], loss[keep], grp[keep]
    _, gidx = np.unique(grp, return_inverse=True)
    res = LossSurfaceFit(k=float(k), n=int(n.size), n_groups=int(gidx.max() + 1) if n.size else 0, level=level)
    nn, nd = int(np.unique(n).size), int(np.unique(d).size)
    if nn < min_distinct or nd < min_distinct or n.size < 10:
        res.warning = (f"under-determined: {nn} distinct N, {nd} distinct D, {n.size} runs (need ≥ {min_distinct} "
                       f"distinct N and D and ≥ 10 runs for 5 parameters); no surface is claimed")
        return res
    res.n_range, res.d_range = (float(n.min()), float(n.max())), (float(d.min()), float(d.max()))
    ln0, ld0 = float(np.mean(np.log(n))), float(np.mean(np.log(d)))
    u, v, ly = np.log(n) - ln0, np.log(d) - ld0, np.log(loss)

    def natural(p):  # centred (e, a', α, b', β) -> (E, A, α, B, β) in the caller's units, unrounded
        return np.array([math.exp(p[0]), math.exp(p[1] + p[2] * ln0), p[2], math.exp(p[3] + p[4] * ld0), p[4]])

    grid = [np.asarray(s, dtype=float) for s in (starts or _surface_starts(ly))]
    optima = _surface_minimise(u, v, ly, grid, delta)
    if not optima:
        res.warning = "the fit failed: no start converged"
        return res
    best_f, best_p, _ = optima[0]
    res.objective, res.n_starts = best_f, len(grid)
    res.n_converged = sum(ok for _, _, ok in optima)
    res.n_at_best = sum(f <= best_f + 1e-4 * max(1.0, abs(best_f)) for f, _, _ in optima)
    near = np.array([natural(p) for f, p, _ in optima if f <= best_f * 1.01 + 1e-12])
    res.spread = {name: (float(near[:, i].min()), float(near[:, i].max()))
                  for i, name in enumerate(("E", "A", "alpha", "B", "beta"))}
    res.E, res.A, res.alpha, res.B, res.beta = (float(x) for x in natural(best_p))

    if bootstrap and bootstrap > 0:
        # refit each resample from the full fit's best few distinct optima
        seeds, seen = [], []
        for f, p, _ in optima:
            if not any(np.allclose(p, q, rtol=1e-3, atol=1e-3) for q in seen):
                seen.append(p)
                seeds.append(p)
            if len(seeds) == 2:
                break
        rng = np.random.default_rng(seed)
        n_groups = res.n_groups
        members = [np.flatnonzero(gidx == g) for g in range(n_groups)]
        samples = []
        for _ in range(int(bootstrap)):
            pick = rng.integers(0, n_groups, n_groups)
            idx = np.concatenate([members[g] for g in pick])
            if np.unique(n[idx]).size < 3 or np.unique(d[idx]).size < 3:
                continue
            # resampled data move the centre; refit in the full data's centred units
            opt = _surface_minimise(u[idx], v[idx], ly[idx], seeds, delta)
            if opt:
                samples.append(natural(opt[0][1]))
        if len(samples) >= 2:
            s = np.asarray(samples)
            res.samples, res.n_bootstrap = s, len(s)
            q = (1 - level) / 2
            lo, hi = np.quantile(s, q, axis=0), np.quantile(s, 1 - q, axis=0)
            res.E_ci, res.A_ci, res.alpha_ci, res.B_ci, res.beta_ci = (
                (float(a), float(b)) for a, b in zip(lo, hi))
            a_s = s[:, 4] / (s[:, 2] + s[:, 4])
            res.a_ci = (float(np.quantile(a_s, q)), float(np.quantile(a_s, 1 - q)))
    return res


# --- Chinchilla approach 2: isoFLOP parabolas ------------------------------------------------------


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
        q = (1 - level) / 2
        res.a_ci = (float(np.quantile(coef[1], q)), float(np.quantile(coef[1], 1 - q)))
        res.k_ci = (float(np.quantile(ks, q)), float(np.quantile(ks, 1 - q)))
    elif draws:
        res.a_ci, res.k_ci = (res.a, res.a), (res.k, res.k)
        res.samples = np.array([[res.k, res.a], [res.k, res.a]])
    return res


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
    Student-t quantiles (noise: the replicates' pooled variance when there are replicates, else the
    parabola's residual variance; with neither the interval is empty). A budget is **not bracketed** —
    flagged, and left out of the N_opt(C) fit — when its lowest loss is at the smallest or largest
    size trained, the parabola opens downwards, or the vertex lies outside the sizes trained:
    "optimum not bracketed: add a size below / above".

    Then N_opt(C) = k·C^a and L_opt(C) = k·C^a by least squares in log-log space over the bracketed
    budgets (at least `min_budgets`), intervals from `bootstrap` parametric draws of the vertices
    (their own error plus the scatter the line leaves).

    Caveat (Czech et al. 2026, arXiv 2603.22339): the parabola is only a local approximation; its
    vertex is biased when the size grid is wide or off-centre around the optimum, or when α ≠ β in
    the loss surface. The budget table reports each grid's width and the vertex's offset from the
    grid's centre (in decades) so the bias can be judged; compare with fit_loss_surface."""
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
        g = g.sort_values(n)
        cval = float(c_of.get(b, math.nan))
        x, y, m = np.log(g[n].to_numpy(float)), g["mean"].to_numpy(float), g["count"].to_numpy(float)
        pts.append(pd.DataFrame({"budget": b, "compute": cval, "n": g[n].to_numpy(float), "loss": y,
                                 "loss_std": g["std"].to_numpy(float), "n_rep": m.astype(int)}))
        i_best = int(np.argmin(y))
        row = {"budget": b, "compute": cval, "n_sizes": int(len(g)), "n_runs": int(m.sum()),
               "best_n": float(np.exp(x[i_best])), "best_loss": float(y[i_best]),
               "n_opt": math.nan, "n_opt_lo": math.nan, "n_opt_hi": math.nan, "log_n_opt_se": math.nan,
               "loss_opt": math.nan, "loss_opt_lo": math.nan, "loss_opt_hi": math.nan,
               "coef": None, "noise": math.nan, "grid_decades": float((x.max() - x.min()) / math.log(10)),
               "offset_decades": math.nan, "bracketed": False, "note": ""}
        if len(g) < min_sizes:
            row["note"] = f"{len(g)} size(s): a parabola needs at least {min_sizes}; add sizes"
            rows.append(row)
            continue
        X = np.column_stack([x ** 2, x, np.ones_like(x)])
        coef, *_ = np.linalg.lstsq(X, y, rcond=None)
        c2, c1, c0 = (float(c) for c in coef)
        row["coef"] = [c2, c1, c0]
        resid = y - X @ coef
        dof_res = len(g) - 3
        rep_dof = int((m - 1).sum())
        if rep_dof > 0:  # pooled within-size variance of single runs -> variance of each mean
            s2 = float(((m - 1) * g["std"].to_numpy(float) ** 2).sum() / rep_dof)
            w = 1.0 / m
            dof = rep_dof
        elif dof_res > 0:
            s2, w, dof = float(resid @ resid) / dof_res, np.ones_like(y), dof_res
        else:
            s2, w, dof = 0.0, np.ones_like(y), 0
        row["noise"] = math.sqrt(s2)
        edge = "below" if i_best == 0 else "above" if i_best == len(g) - 1 else None
        if c2 <= 0:
            row["note"] = "optimum not bracketed: the losses do not curve upwards; add sizes on both sides"
            rows.append(row)
            continue
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
        row["loss_opt_lo"], row["loss_opt_hi"] = row["loss_opt"] - tq * se_l, row["loss_opt"] + tq * se_l
        row["loss_opt_se"] = se_l
        if edge is not None:
            row["note"] = (f"optimum not bracketed: add a size {edge} "
                           f"({'smallest' if edge == 'below' else 'largest'} trained size is the best or the "
                           f"vertex lies outside the grid); not used in the N_opt fit")
        else:
            row["bracketed"] = True
        rows.append(row)
    budgets = pd.DataFrame(rows)
    points = pd.concat(pts, ignore_index=True) if pts else pd.DataFrame(
        columns=["budget", "compute", "n", "loss", "loss_std", "n_rep"])
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


# --- agreement of the two methods, held-out prediction, loss -> FD -------------------------------


@dataclass
class Agreement:
    """Whether approach 2's and approach 3's N_opt exponents agree within their intervals."""

    agree: bool | None
    a_isoflop: float = math.nan
    a_isoflop_ci: tuple[float, float] | None = None
    a_surface: float = math.nan
    a_surface_ci: tuple[float, float] | None = None
    z: float = math.nan  # |difference| / combined standard error
    text: str = ""

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("agree", "a_isoflop", "a_isoflop_ci", "a_surface", "a_surface_ci",
                                              "z", "text")}


def _se_from_ci(ci, level: float = CI_LEVEL) -> float:
    from scipy.stats import norm

    if not ci or not all(math.isfinite(c) for c in ci):
        return math.nan
    return (ci[1] - ci[0]) / (2 * float(norm.ppf(0.5 + level / 2)))


def compare_exponents(a1: float, ci1, a2: float, ci2, names=("isoFLOP parabolas (approach 2)",
                                                             "loss surface (approach 3)"),
                      what: str = "N_opt ∝ C^a", level: float = CI_LEVEL) -> Agreement:
    """Two estimates of one exponent agree when their difference is within the combined interval:
    |a₁ − a₂| ≤ z · sqrt(se₁² + se₂²), se from each (95 %) interval's half-width. The intervals carry
    the measured noise (replicate spread, bootstrap), so this is the noise level of the judgement."""
    from scipy.stats import norm

    res = Agreement(None, a1, tuple(ci1) if ci1 else None, a2, tuple(ci2) if ci2 else None)
    fmt = lambda a, ci: f"{a:.3f} {_ci(ci)}"  # noqa: E731
    if not (math.isfinite(a1) and math.isfinite(a2)):
        missing = [nm for nm, a in zip(names, (a1, a2)) if not math.isfinite(a)]
        res.text = f"{what}: cannot compare — no estimate from {' and '.join(missing)}"
        return res
    se = math.hypot(_se_from_ci(ci1, level), _se_from_ci(ci2, level))
    diff = abs(a1 - a2)
    if not math.isfinite(se) or se == 0:
        res.agree = bool(diff <= 1e-9 * max(1.0, abs(a1)))
        res.z = 0.0 if res.agree else math.inf
    else:
        res.z = diff / se
        res.agree = bool(res.z <= float(norm.ppf(0.5 + level / 2)))
    verdict = "agree" if res.agree else "DISAGREE"
    res.text = (f"{what}: {names[0]} a = {fmt(a1, ci1)}; {names[1]} a = {fmt(a2, ci2)} — the two methods "
                f"{verdict} (difference {diff:.3f}, {res.z:.1f} combined standard errors)")
    return res


def compare_optimal_exponents(isoflop: IsoflopOptima | None, surface: LossSurfaceFit | None) -> Agreement:
    a1 = isoflop.n_opt_fit.a if isoflop is not None and isoflop.n_opt_fit is not None and isoflop.n_opt_fit.ok \
        else math.nan
    ci1 = isoflop.n_opt_fit.a_ci if not math.isnan(a1) else None
    a2 = surface.a if surface is not None and surface.ok else math.nan
    ci2 = surface.a_ci if not math.isnan(a2) else None
    return compare_exponents(a1, ci1, a2, ci2)


def fit_loss_to_fd(loss, fd, bootstrap: int = 1000, seed: int = 0, level: float = CI_LEVEL) -> ExponentFit:
    """FD (or FID) as a function of loss across runs: FD = k · loss^a, a line in log-log space, with a
    bootstrap interval over runs. Used to carry a predicted loss to a predicted FD."""
    x, y = _clean(loss, fd)
    res = fit_exponent(x, y, bootstrap=0)
    if not res.ok:
        return res
    lx0 = float(np.mean(np.log(x)))
    u, ly = np.log(x) - lx0, np.log(y)
    if bootstrap:
        rng = np.random.default_rng(seed)
        s = []
        for _ in range(int(bootstrap)):
            idx = rng.integers(0, x.size, x.size)
            if np.unique(u[idx]).size < 2:
                continue
            a, c0 = np.polyfit(u[idx], ly[idx], 1)
            s.append((math.exp(c0 - a * lx0), a))
        if len(s) >= 2:
            res.samples = np.asarray(s)
            q = (1 - level) / 2
            res.a_ci = (float(np.quantile(res.samples[:, 1], q)), float(np.quantile(res.samples[:, 1], 1 - q)))
    return res


@dataclass
class HoldoutPrediction:
    """The largest budget predicted from the others, and what was measured there."""

    budget: object = None
    compute: float = math.nan
    n_fit_budgets: int = 0
    predicted: float = math.nan  # best loss among the held-out budget's sizes, from the surface
    predicted_ci: tuple[float, float] | None = None
    predicted_n: float = math.nan  # the size at which the surface predicts that best loss
    measured: float = math.nan  # best replicate-mean loss measured at that budget
    measured_std: float = math.nan
    measured_n: float = math.nan
    error_pct: float = math.nan  # 100 · (predicted − measured) / measured
    covered: bool | None = None  # measured inside the predicted interval
    isoflop_predicted: float = math.nan  # L_opt(C) from the approach-2 law fitted on the other budgets
    isoflop_predicted_ci: tuple[float, float] | None = None
    fd_key: str | None = None
    fd_predicted: float = math.nan
    fd_predicted_ci: tuple[float, float] | None = None
    fd_measured: float = math.nan
    fd_error_pct: float = math.nan
    surface: LossSurfaceFit | None = field(default=None, repr=False)
    points: pd.DataFrame | None = field(default=None, repr=False)  # the held-out sizes: n, d, measured, predicted, lo, hi
    warning: str | None = None

    @property
    def ok(self) -> bool:
        return self.warning is None and math.isfinite(self.error_pct)

    def describe(self) -> str:
        if not self.ok:
            return f"held-out prediction: not made — {self.warning}"
        txt = (f"fitted on the {self.n_fit_budgets} smaller budgets, the surface predicts the best loss at the "
               f"largest budget (C = {self.compute:.4g}) as {self.predicted:.4g} {_ci(self.predicted_ci)}; "
               f"measured {self.measured:.4g}; error {self.error_pct:+.2f} % "
               f"({'inside' if self.covered else 'outside'} the interval)")
        if math.isfinite(self.isoflop_predicted):
            txt += f"; the isoFLOP law L_opt(C) predicts {self.isoflop_predicted:.4g} {_ci(self.isoflop_predicted_ci)}"
        if math.isfinite(self.fd_error_pct):
            txt += (f"; {self.fd_key}: predicted {self.fd_predicted:.4g} {_ci(self.fd_predicted_ci)}, measured "
                    f"{self.fd_measured:.4g}, error {self.fd_error_pct:+.2f} %")
        return txt

    def as_dict(self) -> dict:
        keys = ("budget", "compute", "n_fit_budgets", "predicted", "predicted_ci", "predicted_n", "measured",
                "measured_std", "measured_n", "error_pct", "covered", "isoflop_predicted", "isoflop_predicted_ci",
                "fd_key", "fd_predicted", "fd_predicted_ci", "fd_measured", "fd_error_pct", "warning")
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in ((k, getattr(self, k)) for k in keys)}


def holdout_prediction(df: pd.DataFrame, budget: str = "budget", compute: str = "compute", n: str = "n",
                       d: str = "d", loss: str = "loss", group: str | None = "group", fd: str | None = None,
                       k: float = 1.0, bootstrap: int = 200, seed: int = 0, level: float = CI_LEVEL,
                       min_budgets: int = 3) -> HoldoutPrediction:
    """Hold out the largest budget, fit the others, predict the held-out budget's best loss (and FD).

    df: one row per run with `budget`, `compute`, `n` (parameters), `d` (images), `loss`, optionally
    `group` (replicate label) and the FD column `fd`. The loss surface (fit_loss_surface) is fitted on
    every other budget; its prediction at each (N, D) trained at the held-out budget gives the predicted
    best loss there = the minimum over those sizes (interval: the bootstrap distribution of that
    minimum). Measured: the lowest replicate-mean loss at the held-out budget. error % = 100 ·
    (predicted − measured) / measured. The approach-2 law L_opt(C) from the other budgets is given
    beside it when it can be fitted. With `fd`, a loss → FD relation (fit_loss_to_fd) over the other
    budgets' runs turns the predicted loss into a predicted FD, compared with the lowest FD measured
    at the held-out budget. As Liang et al. 2024 checked their law on a larger budget than they fitted."""
    out = HoldoutPrediction()
    data = df.copy()
    for c in (compute, n, d, loss):
        data[c] = pd.to_numeric(data[c], errors="coerce")
    data = data[np.isfinite(data[n]) & np.isfinite(data[d]) & np.isfinite(data[loss]) & data[budget].notna()]
    c_of = data.groupby(budget)[compute].median().sort_values()
    if len(c_of) < min_budgets:
        out.warning = f"{len(c_of)} budget(s): a held-out prediction needs at least {min_budgets}"
        return out
    held = c_of.index[-1]
    out.budget, out.compute, out.n_fit_budgets = held, float(c_of.iloc[-1]), len(c_of) - 1
    train, test = data[data[budget] != held], data[data[budget] == held]
    groups = train[group].to_numpy() if group and group in train else None
    surf = fit_loss_surface(train[n], train[d], train[loss], bootstrap=bootstrap, seed=seed, groups=groups, k=k,
                            level=level)
    out.surface = surf
    if not surf.ok:
        out.warning = f"the surface fitted on the smaller budgets is not claimed ({surf.warning})"
        return out
    t = test.groupby(n, as_index=False).agg(d=(d, "median"), measured=(loss, "mean"), std=(loss, "std"))
    pred = surf.predict(t[n].to_numpy(float), t["d"].to_numpy(float))
    lo, hi = surf.band(t[n].to_numpy(float), t["d"].to_numpy(float))
    t["predicted"], t["lo"], t["hi"] = pred, lo, hi
    out.points = t.rename(columns={n: "n"})
    i = int(np.argmin(pred))
    out.predicted, out.predicted_n = float(pred[i]), float(t[n].iloc[i])
    if surf.samples is not None:
        mins = np.nanmin(surf._sample_predict(t[n].to_numpy(float), t["d"].to_numpy(float)), axis=1)
        q = (1 - level) / 2
        out.predicted_ci = (float(np.quantile(mins, q)), float(np.quantile(mins, 1 - q)))
    j = int(np.argmin(t["measured"].to_numpy(float)))
    out.measured, out.measured_n = float(t["measured"].iloc[j]), float(t[n].iloc[j])
    out.measured_std = float(t["std"].iloc[j]) if math.isfinite(t["std"].iloc[j]) else math.nan
    out.error_pct = 100.0 * (out.predicted - out.measured) / out.measured
    if out.predicted_ci:
        out.covered = bool(out.predicted_ci[0] <= out.measured <= out.predicted_ci[1])
    iso = fit_isoflop_optima(train.assign(**{budget: train[budget]}), budget=budget, n=n, loss=loss, compute=compute,
                             bootstrap=max(bootstrap, 200), seed=seed, level=level, min_budgets=min_budgets - 1)
    if iso.l_opt_fit is not None and iso.l_opt_fit.ok:
        out.isoflop_predicted = float(iso.l_opt_fit.predict(out.compute))
        lo2, hi2 = iso.l_opt_fit.band(np.array([out.compute]))
        if np.isfinite(lo2[0]):
            out.isoflop_predicted_ci = (float(lo2[0]), float(hi2[0]))
    if fd and fd in data and data[fd].notna().any():
        rel = fit_loss_to_fd(train[loss], pd.to_numeric(train[fd], errors="coerce"), bootstrap=max(bootstrap, 200),
                             seed=seed)
        measured_fd = pd.to_numeric(test[fd], errors="coerce").dropna()
        if rel.ok and not measured_fd.empty:
            out.fd_key = fd
            out.fd_predicted = float(rel.predict(out.predicted))
            out.fd_measured = float(test.groupby(n)[fd].mean().min())
            out.fd_error_pct = 100.0 * (out.fd_predicted - out.fd_measured) / out.fd_measured
            ends = [out.predicted] + list(out.predicted_ci or [])
            vals = []
            for x in ends:
                lo3, hi3 = rel.band(np.array([x]))
                vals += [float(rel.predict(x))] + [v for v in (lo3[0], hi3[0]) if np.isfinite(v)]
            out.fd_predicted_ci = (min(vals), max(vals))
    return out
