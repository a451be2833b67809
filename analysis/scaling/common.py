"""What the fits of this package share: when a law is claimed, the bootstrap that gives every interval,
and how numbers and intervals are written in the one-line descriptions."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

MIN_R2 = 0.9  # in log space: a law that explains less of the data is not claimed
CI_LEVEL = 0.95
MIN_DISTINCT_X = 4  # a law is claimed only from at least this many distinct x values
# an exponent whose 95 % interval is wider than this many times |its estimate| is not identified: the data
# allow it to be anything from about zero to about twice its value (or of either sign)
MAX_REL_WIDTH = 1.0


def bootstrap_draws(refit: Callable[[np.ndarray], object], n_rows: int, resamples: int, seed: int,
                    groups: np.ndarray | None = None) -> list:
    """The draws of a nonparametric bootstrap: `resamples` times, draw the n_rows rows with replacement
    and refit. refit(idx) gets the row indices of one resample and returns its estimate, or None to
    drop the resample (too few distinct points to fit, or no convergence); the fits report how many
    were kept (n_bootstrap).

    groups: one group index (0 .. G−1) per row. Whole groups are drawn then (G of them, with
    replacement), so that replicates — seeds of one configuration — are resampled together and their
    agreement is not mistaken for independent evidence. One row per group draws exactly what no
    groups draws: the same seed gives the same resamples either way."""
    rng = np.random.default_rng(seed)
    members = None if groups is None else [np.flatnonzero(groups == g) for g in range(int(groups.max()) + 1)]
    draws = []
    for _ in range(int(resamples or 0)):  # 0 or None: no draws
        if members is None:
            idx = rng.integers(0, n_rows, n_rows)
        else:
            pick = rng.integers(0, len(members), len(members))
            idx = np.concatenate([members[g] for g in pick])
        estimate = refit(idx)
        if estimate is not None:
            draws.append(estimate)
    return draws


def percentile_band(draws, level: float = CI_LEVEL, skip_nan: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The central `level` interval of the draws along their first axis (one interval per column: a
    parameter, or a point of a curve). skip_nan: draws that overflowed to NaN are left out."""
    quantile = np.nanquantile if skip_nan else np.quantile
    q = (1 - level) / 2
    return quantile(draws, q, axis=0), quantile(draws, 1 - q, axis=0)


def percentile_interval(draws, level: float = CI_LEVEL) -> tuple[float, float]:
    """The central `level` interval of one quantity's draws."""
    lo, hi = percentile_band(draws, level)
    return float(lo), float(hi)


def _touches(v: float, bound: float) -> bool:
    """v reached the bound (bootstrap refits stopped there: their percentile equals the bound)."""
    return abs(v - bound) <= 1e-3 * max(abs(bound), 1e-3)


def not_identified(name: str, value: float, ci, bounds: tuple[float, float] | None = None,
                   max_rel_width: float = MAX_REL_WIDTH) -> str | None:
    """Why `value` with its interval `ci` is not identified by the data, or None when it is.

    Two rules: the interval touches a bound of the fitter (`bounds`: the optimiser's box for this
    parameter — refits that stop at the box say the data would have gone further, so the interval is the
    box's, not the data's); or the interval is wider than max_rel_width × |value| (the data allow about
    zero to twice the estimate). No interval (no bootstrap was run) is not judged: None."""
    if ci is None or not math.isfinite(value):
        return None
    lo, hi = (float(c) for c in ci)
    txt = f"{name} = {format_number(value)} {format_interval(ci)}"
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return f"{txt}: the interval is not finite"
    if bounds is not None:
        for b in bounds:
            if _touches(lo, b) or _touches(hi, b):
                return f"{txt}: {name}'s interval reaches the fitter's bound {format_number(b)}"
    width = hi - lo
    if width > max_rel_width * abs(value):
        times = "" if max_rel_width == 1 else f"{max_rel_width:g} × "
        return f"{txt}: the interval is wider than {times}the estimate itself (width {format_number(width)})"
    return None


def finite_positive(x, y) -> tuple[np.ndarray, np.ndarray]:
    """The (x, y) pairs a power law can be fitted to: both finite and positive (logs are taken)."""
    x, y = np.asarray(x, dtype=float).ravel(), np.asarray(y, dtype=float).ravel()
    if x.shape != y.shape:
        raise ValueError(f"x and y differ in length ({x.size} vs {y.size})")
    keep = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    return x[keep], y[keep]


def format_number(v: float) -> str:
    return f"{v:.4g}" if v is not None and math.isfinite(v) else "nan"


def format_interval(ci) -> str:
    return f"[{format_number(ci[0])}, {format_number(ci[1])}]" if ci else "[n/a]"


def lists_for_tuples(fields: dict) -> dict:
    """as_dict() output for fits.json: intervals and ranges (tuples) become lists."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in fields.items()}
