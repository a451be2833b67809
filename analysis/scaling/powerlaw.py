"""One power law y = E + A · x^(−α), its exponent-only cousin y = k · x^a, and one law per group of trials.

The law (E: the irreducible term, 0 when `irreducible=False`) is fitted by `scipy.optimize.curve_fit`
in log space — log y = log(E + A·x^(−α)) — with x rescaled by its geometric mean so the optimiser sees
numbers near 1 whatever the units (training compute runs to 1e12 GFLOPs). Bounds: A > 0, α > 0,
0 ≤ E < min(y). Several starting points (E at a few fractions of min y, A and α from a straight line
through log(y − E)) guard against local minima.

Intervals are percentile bootstraps over the points (resampled with replacement, refitted). A fit is
*not claimed* — its parameters are NaN and `warning` says why — when it is under-determined (fewer
than 3 points, or fewer points than parameters + 1) or when it explains the data poorly
(R² < 0.9, in log space). Every caller shows `warning` rather than a number in that case.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.optimize import OptimizeWarning, curve_fit

from .common import (CI_LEVEL, MIN_DISTINCT_X, MIN_R2, bootstrap_draws, finite_positive, format_interval,
                     format_number, lists_for_tuples, not_identified, percentile_band, percentile_interval)


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
        return percentile_band(curves, level, skip_nan=True)

    def identification(self) -> list[str]:
        """Why the exponent is not identified (empty: it is): its interval reaches the fitter's bound on α
        or is wider than α (common.not_identified)."""
        if not self.ok:
            return []
        why = not_identified("α", self.alpha, self.alpha_ci, _ALPHA_BOUNDS)
        return [why] if why else []

    def as_dict(self) -> dict:
        out = lists_for_tuples({k: getattr(self, k) for k in (
            "A", "alpha", "E", "A_ci", "alpha_ci", "E_ci", "r2", "n", "n_params", "irreducible", "warning", "x_range",
            "n_bootstrap")})
        out["not_identified"] = self.identification() or None
        return out

    def describe(self, x: str = "x", y: str = "y") -> str:
        """One line: the law with its 95 % intervals, or the warning."""
        if not self.ok:
            return f"no fit: {self.warning}"
        g, ci = format_number, format_interval
        law = f"{y} = {g(self.E)} + {g(self.A)} · {x}^(−{self.alpha:.4g})" if self.irreducible else \
            f"{y} = {g(self.A)} · {x}^(−{self.alpha:.4g})"
        parts = [f"α = {self.alpha:.4g} {ci(self.alpha_ci)}", f"A = {g(self.A)} {ci(self.A_ci)}"]
        if self.irreducible:
            parts.append(f"E = {g(self.E)} {ci(self.E_ci)}")
        return f"{law}; " + ", ".join(parts) + f"; R² = {self.r2:.4f}, n = {self.n} (95 % bootstrap intervals, " \
                                               f"{self.n_bootstrap} resamples)"


# --- the least-squares fit in log space (u = log(x / geometric mean of x), p = (log A', α[, E])) -------


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


_ALPHA_BOUNDS = (1e-6, 10.0)  # the box of α in the fit


def _bounds(y: np.ndarray, irreducible: bool):
    lo, hi = [-200.0, _ALPHA_BOUNDS[0]], [200.0, _ALPHA_BOUNDS[1]]
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
    x, y = finite_positive(x, y)
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
    on_bound = bool(irreducible and popt[2] <= 1e-6 * float(np.min(y)))

    def refit(idx):
        if np.unique(x[idx]).size < k:
            return None
        try:
            return natural(_refit(u[idx], ly[idx], y[idx], irreducible, popt, try_lm=on_bound is False))
        except RuntimeError:
            return None

    samples = bootstrap_draws(refit, n, bootstrap, seed)
    if samples:
        s = np.asarray(samples, dtype=float)
        lo, hi = percentile_band(s, level, skip_nan=True)
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
        lo, hi = percentile_band(ys, level, skip_nan=True)
        return lo.reshape(x.shape), hi.reshape(x.shape)

    def describe(self, x: str = "x", y: str = "y") -> str:
        if not self.ok:
            return f"no fit: {self.warning}"
        return (f"{y} = {format_number(self.k)} · {x}^{self.a:.4g}; exponent {self.a:.4g} "
                f"{format_interval(self.a_ci)} (n = {self.n})")

    def identification(self, name: str = "the exponent") -> list[str]:
        """Why the exponent is not identified (empty: it is): its interval is wider than |a|, which also
        covers an interval that straddles zero (common.not_identified). The line has no bounds."""
        if not self.ok:
            return []
        why = not_identified(name, self.a, self.a_ci)
        return [why] if why else []

    def as_dict(self) -> dict:
        return {"a": self.a, "k": self.k, "a_ci": list(self.a_ci) if self.a_ci else None, "r2": self.r2,
                "n": self.n, "warning": self.warning, "not_identified": self.identification() or None}


def _line(u, c0, a):
    return c0 + a * u


def fit_exponent(x, y, bootstrap: int = 1000, seed: int = 0, level: float = CI_LEVEL) -> ExponentFit:
    x, y = finite_positive(x, y)
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

    def refit(idx):  # the exponent of one resample; a resample at a single x has no slope
        return fit(u[idx], ly[idx])[1] if np.unique(u[idx]).size >= 2 else None

    exponents = bootstrap_draws(refit, x.size, bootstrap, seed)
    if exponents:
        res.a_ci = percentile_interval(exponents, level)
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
