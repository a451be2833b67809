"""Whether the laws hold: the two compute-optimal exponents compared, the largest budget predicted from
the others, and a predicted loss carried to a predicted FD.

Approach 2 (isoflop.py) and approach 3 (surface.py) estimate one exponent, N_opt ∝ C^a; they should
agree within their intervals (when they do not, suspect the parabolas' biases: Czech et al. 2026,
arXiv 2603.22339). A law is believed when it predicts what it was not fitted on: the largest budget
is held out, predicted and measured, as Liang et al. 2024 ("Scaling Laws for Diffusion Transformers",
arXiv 2410.08184) checked their law on a larger budget than they fitted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .common import CI_LEVEL, bootstrap_draws, finite_positive, format_interval, lists_for_tuples, percentile_interval
from .isoflop import IsoflopOptima, fit_isoflop_optima
from .powerlaw import ExponentFit, fit_exponent
from .surface import LossSurfaceFit, fit_loss_surface

# agreement is informative only when at least one interval is narrower than this fraction of its estimate:
# ±25 % of a ≈ 0.5 is the spread of published N_opt exponents (Kaplan et al. 2020: 0.73; Hoffmann et al.
# 2022: 0.50; Liang et al. 2024: 0.57), the difference a comparison of the two methods should be able to see
INFORMATIVE_REL_WIDTH = 0.5
NOT_INFORMATIVE = "not informative"
# The sign of the held-out errors (error_pct, fd_error_pct), written beside them into fits.json: positive
# when the law predicted too low, as the ladder's Extrapolation section and issue 27 have it.
ERROR_CONVENTION = "100 * (measured - predicted) / measured"


@dataclass
class Agreement:
    """Whether approach 2's and approach 3's N_opt exponents agree within their intervals.

    verdict: "agree", "disagree", "not informative" (both intervals too wide to disagree: see
    compare_exponents) or "not testable" (an estimate is missing). `agree` is the bare z-test."""

    agree: bool | None
    a_isoflop: float = math.nan
    a_isoflop_ci: tuple[float, float] | None = None
    a_surface: float = math.nan
    a_surface_ci: tuple[float, float] | None = None
    z: float = math.nan  # |difference| / combined standard error
    text: str = ""
    verdict: str = "not testable"
    needed: int | None = None  # budgets that would make a not-informative comparison informative (extrapolated)

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("agree", "verdict", "needed", "a_isoflop", "a_isoflop_ci", "a_surface",
                                              "a_surface_ci", "z", "text")}


def _rel_width(a: float, ci) -> float:
    if not ci or not all(math.isfinite(c) for c in ci) or a == 0:
        return math.nan
    return (ci[1] - ci[0]) / abs(a)


def budgets_needed(rel_width: float, n_now: int | None, target: float = INFORMATIVE_REL_WIDTH) -> int | None:
    """How many budgets would bring an interval of relative width `rel_width`, from `n_now` budgets,
    down to `target`, assuming width ∝ 1 / √(number of budgets) at the same sizes per budget — the
    standard-error scaling of a regression with more points; with 3 budgets the Student-t quantile
    shrinks too, so this is a rough upper estimate."""
    if not n_now or not math.isfinite(rel_width) or rel_width <= target:
        return None
    return int(math.ceil(n_now * (rel_width / target) ** 2))


def _se_from_ci(ci, level: float = CI_LEVEL) -> float:
    from scipy.stats import norm

    if not ci or not all(math.isfinite(c) for c in ci):
        return math.nan
    return (ci[1] - ci[0]) / (2 * float(norm.ppf(0.5 + level / 2)))


def compare_exponents(a1: float, ci1, a2: float, ci2, names=("isoFLOP parabolas (approach 2)",
                                                             "loss surface (approach 3)"),
                      what: str = "N_opt ∝ C^a", level: float = CI_LEVEL,
                      n_budgets: tuple[int | None, int | None] = (None, None)) -> Agreement:
    """Two estimates of one exponent agree when their difference is within the combined interval:
    |a₁ − a₂| ≤ z · sqrt(se₁² + se₂²), se from each (95 %) interval's half-width. The intervals carry
    the measured noise (replicate spread, bootstrap), so this is the noise level of the judgement.

    The verdict is "not informative" — neither agreement nor disagreement is claimed — when each
    interval contains the other's estimate and both are wider than INFORMATIVE_REL_WIDTH (50 %) of
    their estimates: such intervals would agree with almost any pair of exponents. `n_budgets`: the
    budgets behind each estimate; then `needed` says how many budgets would bring the wider-relative
    interval under 50 % (budgets_needed: width ∝ 1/√budgets)."""
    from scipy.stats import norm

    res = Agreement(None, a1, tuple(ci1) if ci1 else None, a2, tuple(ci2) if ci2 else None)
    fmt = lambda a, ci: f"{a:.3f} {format_interval(ci)}"  # noqa: E731
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
    rel = (_rel_width(a1, ci1), _rel_width(a2, ci2))
    inside = bool(ci1 and ci2 and ci1[0] <= a2 <= ci1[1] and ci2[0] <= a1 <= ci2[1])
    wide = all(math.isfinite(r) and r > INFORMATIVE_REL_WIDTH for r in rel)
    res.verdict = NOT_INFORMATIVE if inside and wide else "agree" if res.agree else "disagree"
    head = (f"{what}: {names[0]} a = {fmt(a1, ci1)}; {names[1]} a = {fmt(a2, ci2)} — ")
    if res.verdict == NOT_INFORMATIVE:
        needs = [budgets_needed(r, nb) for r, nb in zip(rel, n_budgets)]
        needs = [x for x in needs if x]
        res.needed = max(needs) if needs else None
        more = (f"; roughly {res.needed} budgets (now {max(nb for nb in n_budgets if nb)}) would bring both "
                f"under {INFORMATIVE_REL_WIDTH:.0%}, assuming width ∝ 1/√budgets at the same sizes per budget"
                if res.needed else "")
        res.text = (head + f"not informative: each interval contains the other's estimate and both are wider than "
                    f"{INFORMATIVE_REL_WIDTH:.0%} of their estimates (relative widths {rel[0]:.2f}, {rel[1]:.2f}), "
                    f"so they could not disagree{more}")
        return res
    res.text = head + (f"the two methods {'agree' if res.agree else 'DISAGREE'} (difference {diff:.3f}, "
                       f"{res.z:.1f} combined standard errors)")
    return res


def compare_optimal_exponents(isoflop: IsoflopOptima | None, surface: LossSurfaceFit | None) -> Agreement:
    a1 = isoflop.n_opt_fit.a if isoflop is not None and isoflop.n_opt_fit is not None and isoflop.n_opt_fit.ok \
        else math.nan
    ci1 = isoflop.n_opt_fit.a_ci if not math.isnan(a1) else None
    a2 = surface.a if surface is not None and surface.ok else math.nan
    ci2 = surface.a_ci if not math.isnan(a2) else None
    n_iso = isoflop.n_opt_fit.n if not math.isnan(a1) else None
    n_all = int(isoflop.budgets["budget"].nunique()) if isoflop is not None and not isoflop.budgets.empty else None
    return compare_exponents(a1, ci1, a2, ci2, n_budgets=(n_iso, n_all))


def fit_loss_to_fd(loss, fd, bootstrap: int = 1000, seed: int = 0, level: float = CI_LEVEL) -> ExponentFit:
    """FD (or FID) as a function of loss across runs: FD = k · loss^a, a line in log-log space, with a
    bootstrap interval over runs. Used to carry a predicted loss to a predicted FD."""
    x, y = finite_positive(loss, fd)
    res = fit_exponent(x, y, bootstrap=0)
    if not res.ok:
        return res
    lx0 = float(np.mean(np.log(x)))
    u, ly = np.log(x) - lx0, np.log(y)

    def refit(idx):  # (k, a) of one resample; a resample at a single loss has no slope
        if np.unique(u[idx]).size < 2:
            return None
        a, c0 = np.polyfit(u[idx], ly[idx], 1)
        return math.exp(c0 - a * lx0), a

    draws = bootstrap_draws(refit, x.size, bootstrap, seed)
    if len(draws) >= 2:
        res.samples = np.asarray(draws)
        res.a_ci = percentile_interval(res.samples[:, 1], level)
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
    error_pct: float = math.nan  # ERROR_CONVENTION: > 0 when the law predicted too low
    covered: bool | None = None  # measured inside the predicted interval
    isoflop_predicted: float = math.nan  # L_opt(C) from the approach-2 law fitted on the other budgets
    isoflop_predicted_ci: tuple[float, float] | None = None
    fd_key: str | None = None
    fd_predicted: float = math.nan
    fd_predicted_ci: tuple[float, float] | None = None
    fd_measured: float = math.nan
    fd_error_pct: float = math.nan  # 100 · (measured − predicted) / measured, as error_pct
    isoflop_not_identified: str | None = None  # why the L_opt(C) law behind isoflop_predicted is not identified
    surface: LossSurfaceFit | None = field(default=None, repr=False)
    points: pd.DataFrame | None = field(default=None, repr=False)  # the held-out sizes: n, d, measured, predicted, lo, hi
    warning: str | None = None

    @property
    def ok(self) -> bool:
        return self.warning is None and math.isfinite(self.error_pct)

    def describe(self) -> str:
        if not self.ok:
            return f"held-out prediction: not made — {self.warning}"
        ci = format_interval
        txt = (f"fitted on the {self.n_fit_budgets} smaller budgets, the surface predicts the best loss at the "
               f"largest budget (C = {self.compute:.4g}) as {self.predicted:.4g} {ci(self.predicted_ci)}; "
               f"measured {self.measured:.4g}; error (measured − predicted) / measured {self.error_pct:+.2f} % "
               f"({'inside' if self.covered else 'outside'} the interval)")
        if math.isfinite(self.isoflop_predicted):
            txt += f"; the isoFLOP law L_opt(C) predicts {self.isoflop_predicted:.4g} {ci(self.isoflop_predicted_ci)}"
            if self.isoflop_not_identified:
                txt += f" (that law is not identified: {self.isoflop_not_identified})"
        if math.isfinite(self.fd_error_pct):
            txt += (f"; {self.fd_key}: predicted {self.fd_predicted:.4g} {ci(self.fd_predicted_ci)}, measured "
                    f"{self.fd_measured:.4g}, error {self.fd_error_pct:+.2f} %")
        return txt

    def as_dict(self) -> dict:
        """The fields for fits.json, with error_convention beside error_pct (its sign flipped in 331b4b3
        under the same key: a reader of an older report can tell them apart, as the field is absent there)."""
        keys = ("budget", "compute", "n_fit_budgets", "predicted", "predicted_ci", "predicted_n", "measured",
                "measured_std", "measured_n", "error_pct", "covered", "isoflop_predicted", "isoflop_predicted_ci",
                "fd_key", "fd_predicted", "fd_predicted_ci", "fd_measured", "fd_error_pct", "isoflop_not_identified",
                "warning")
        return lists_for_tuples({**{k: getattr(self, k) for k in keys}, "error_convention": ERROR_CONVENTION})


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
    (measured − predicted) / measured, positive when the law predicted too low a loss: the convention of
    issue 27 and of the ladder's Extrapolation section (analysis/extrapolation.py), so one sign means one
    thing throughout the report. The approach-2 law L_opt(C) from the other budgets is given
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
        mins = np.nanmin(surf.sample_predict(t[n].to_numpy(float), t["d"].to_numpy(float)), axis=1)
        out.predicted_ci = percentile_interval(mins, level)
    j = int(np.argmin(t["measured"].to_numpy(float)))
    out.measured, out.measured_n = float(t["measured"].iloc[j]), float(t[n].iloc[j])
    out.measured_std = float(t["std"].iloc[j]) if math.isfinite(t["std"].iloc[j]) else math.nan
    out.error_pct = 100.0 * (out.measured - out.predicted) / out.measured
    if out.predicted_ci:
        out.covered = bool(out.predicted_ci[0] <= out.measured <= out.predicted_ci[1])
    iso = fit_isoflop_optima(train.assign(**{budget: train[budget]}), budget=budget, n=n, loss=loss, compute=compute,
                             bootstrap=max(bootstrap, 200), seed=seed, level=level, min_budgets=min_budgets - 1)
    if iso.l_opt_fit is not None and iso.l_opt_fit.ok:
        out.isoflop_predicted = float(iso.l_opt_fit.predict(out.compute))
        lo2, hi2 = iso.l_opt_fit.band(np.array([out.compute]))
        if np.isfinite(lo2[0]):
            out.isoflop_predicted_ci = (float(lo2[0]), float(hi2[0]))
        out.isoflop_not_identified = "; ".join(iso.l_opt_fit.identification("the L_opt(C) exponent")) or None
    if fd and fd in data and data[fd].notna().any():
        rel = fit_loss_to_fd(train[loss], pd.to_numeric(train[fd], errors="coerce"), bootstrap=max(bootstrap, 200),
                             seed=seed)
        measured_fd = pd.to_numeric(test[fd], errors="coerce").dropna()
        if rel.ok and not measured_fd.empty:
            out.fd_key = fd
            out.fd_predicted = float(rel.predict(out.predicted))
            out.fd_measured = float(test.groupby(n)[fd].mean().min())
            out.fd_error_pct = 100.0 * (out.fd_measured - out.fd_predicted) / out.fd_measured
            ends = [out.predicted] + list(out.predicted_ci or [])
            vals = []
            for x in ends:
                lo3, hi3 = rel.band(np.array([x]))
                vals += [float(rel.predict(x))] + [v for v in (lo3[0], hi3[0]) if np.isfinite(v)]
            out.fd_predicted_ci = (min(vals), max(vals))
    return out
