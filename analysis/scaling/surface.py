"""Chinchilla's approach 3: the loss surface L(N, D) = E + A/N^α + B/D^β fitted to every run at once.

Hoffmann et al. 2022 ("Training Compute-Optimal Large Language Models", arXiv 2203.15556), fitted as
Besiroglu et al. 2024 ("Chinchilla Scaling: A replication attempt", arXiv 2404.10102) recommend: a
Huber loss on log-loss residuals, summed, L-BFGS-B from a grid of starts with tight tolerances, the
parameters never rounded. N: parameters; D: training images seen (not tokens). The surface implies the
compute-optimal allocation N_opt(C), D_opt(C) for C = k · N · D; fit_loss_surface says how.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import numpy as np

from .common import (
    CI_LEVEL,
    MIN_DISTINCT_X,
    bootstrap_draws,
    format_interval,
    format_number,
    lists_for_tuples,
    not_identified,
    percentile_band,
    percentile_interval,
)

HUBER_DELTA = 1e-3  # as in Hoffmann et al.: log residuals beyond δ count linearly, so an outlier run weighs less


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

    def sample_predict(self, n, d) -> np.ndarray:
        """The loss at (n, d) under every bootstrap draw: one row per draw."""
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
        lo, hi = percentile_band(self.sample_predict(n, d), self.level, skip_nan=True)
        return lo.reshape(shape), hi.reshape(shape)

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
            for key, v in (("n_opt_ci", ns), ("d_opt_ci", ds), ("loss_opt_ci", ls)):
                v = v[np.isfinite(v)]
                if v.size >= 2:
                    out[key] = percentile_interval(v, self.level)
        return out

    def identification(self) -> list[str]:
        """Why the surface is not identified (empty: it is): an exponent's interval reaches the fitter's
        bound for α and β, or α, β or the N_opt exponent a has an interval wider than its estimate
        (common.not_identified). E, A and B are not judged: their scale follows the exponents."""
        if not self.ok:
            return []
        exp_bounds = _SURFACE_BOUNDS[2]
        why = [not_identified("α", self.alpha, self.alpha_ci, exp_bounds),
               not_identified("β", self.beta, self.beta_ci, exp_bounds),
               not_identified("a (N_opt ∝ C^a)", self.a, self.a_ci)]
        return [w for w in why if w]

    @property
    def identified(self) -> bool:
        return self.ok and not self.identification()

    def as_dict(self) -> dict:
        keys = ("E", "A", "alpha", "B", "beta", "E_ci", "A_ci", "alpha_ci", "B_ci", "beta_ci", "a_ci", "k", "n",
                "n_groups", "objective", "n_starts", "n_converged", "n_at_best", "n_bootstrap", "n_range", "d_range",
                "warning")
        out = {k: getattr(self, k) for k in keys}
        out["a"] = self.a if self.ok else None
        out["spread"] = {k: list(v) for k, v in self.spread.items()}
        out["identified"] = self.identified
        out["not_identified"] = self.identification() or None
        return lists_for_tuples(out)

    def describe(self, n: str = "N", d: str = "D") -> str:
        if not self.ok:
            return f"no fit: {self.warning}"
        g, ci = format_number, format_interval
        return (f"L = {g(self.E)} + {g(self.A)}/{n}^{self.alpha:.4g} + {g(self.B)}/{d}^{self.beta:.4g}; "
                f"α = {self.alpha:.4g} {ci(self.alpha_ci)}, β = {self.beta:.4g} {ci(self.beta_ci)}, "
                f"E = {g(self.E)} {ci(self.E_ci)}; N_opt ∝ C^{self.a:.4g} {ci(self.a_ci)} "
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
    or D values, or fewer runs than 2 × 5 parameters.

    (Over 80 lines for this docstring: the method's choices and their sources; the code is ~50 lines.)"""
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

    # refit each resample from the full fit's best two distinct optima, not from the whole grid of starts
    refit_starts = []
    for _, p, _ in optima:
        if not any(np.allclose(p, q, rtol=1e-3, atol=1e-3) for q in refit_starts):
            refit_starts.append(p)
        if len(refit_starts) == 2:
            break

    def refit(idx):
        if np.unique(n[idx]).size < 3 or np.unique(d[idx]).size < 3:
            return None
        # resampled data move the centre; refit in the full data's centred units
        opt = _surface_minimise(u[idx], v[idx], ly[idx], refit_starts, delta)
        return natural(opt[0][1]) if opt else None

    samples = bootstrap_draws(refit, n.size, bootstrap, seed, groups=gidx)
    if len(samples) >= 2:
        s = np.asarray(samples)
        res.samples, res.n_bootstrap = s, len(s)
        lo, hi = percentile_band(s, level)
        res.E_ci, res.A_ci, res.alpha_ci, res.B_ci, res.beta_ci = ((float(a), float(b)) for a, b in zip(lo, hi))
        res.a_ci = percentile_interval(s[:, 4] / (s[:, 2] + s[:, 4]), level)
    return res
