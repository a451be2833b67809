"""Scaling laws fitted to a study's trials, each with a bootstrap interval and a `warning` in place of
a number when the data cannot support it.

    powerlaw.py    y = E + A·x^(−α) (PowerLawFit), y = k·x^a (ExponentFit), one law per group (fit_groups)
    frontier.py    the compute-optimal frontier read off learning curves (compute_frontier)
    surface.py     Chinchilla approach 3: L(N, D) = E + A/N^α + B/D^β and its allocation (fit_loss_surface)
    isoflop.py     Chinchilla approach 2: a parabola per compute budget, N_opt(C) (fit_isoflop_optima)
    prediction.py  do approaches 2 and 3 agree, the held-out budget, loss -> FD (holdout_prediction)
    common.py      the claim thresholds (not_identified: an interval at a bound or wider than its estimate),
                   the bootstrap, number formatting

`from analysis import scaling` gives all of it: scaling.fit_loss_surface(...), scaling.MIN_DISTINCT_X.
"""

from .common import CI_LEVEL, MAX_REL_WIDTH, MIN_DISTINCT_X, MIN_R2, not_identified
from .frontier import Frontier, compute_frontier, isoflop_optima, isoflop_slices, lower_envelope
from .isoflop import IsoflopOptima, fit_isoflop_optima
from .powerlaw import ExponentFit, GroupFit, PowerLawFit, fit_exponent, fit_groups, fit_power_law
from .prediction import (INFORMATIVE_REL_WIDTH, NOT_INFORMATIVE, Agreement, HoldoutPrediction, budgets_needed,
                         compare_exponents, compare_optimal_exponents, fit_loss_to_fd, holdout_prediction)
from .surface import HUBER_DELTA, LossSurfaceFit, fit_loss_surface

__all__ = [
    "CI_LEVEL", "HUBER_DELTA", "INFORMATIVE_REL_WIDTH", "MAX_REL_WIDTH", "MIN_DISTINCT_X", "MIN_R2", "NOT_INFORMATIVE",
    "Agreement", "budgets_needed", "not_identified", "ExponentFit", "Frontier", "GroupFit",
    "HoldoutPrediction", "IsoflopOptima", "LossSurfaceFit", "PowerLawFit", "compare_exponents",
    "compare_optimal_exponents", "compute_frontier", "fit_exponent", "fit_groups", "fit_isoflop_optima",
    "fit_loss_surface", "fit_loss_to_fd", "fit_power_law", "holdout_prediction", "isoflop_optima", "isoflop_slices",
    "lower_envelope",
]
