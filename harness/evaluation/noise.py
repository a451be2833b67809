"""Noise levels of the evaluation's estimates, so that the report can tell a gap from a fluctuation.
numpy only: analysis/ imports it to judge gaps between trials from their per-sample validation losses."""

from __future__ import annotations

import math

import numpy as np

VAL_LOSSES_DIR = "val_losses"  # per-sample validation losses: one JSON file per evaluation, step-%08d.json


def stratified_standard_error(t, loss) -> float:
    """Standard error of the mean of `loss` over a validation set with one sample per timestep stratum.

    The collapsed-strata estimator (Cochran, Sampling Techniques, 3rd ed. 1977, §5A.12): with one unit
    per stratum no stratum has a variance of its own, so neighbouring strata are grouped and each
    group's spread stands in for its strata's variances. The samples are sorted by t (the strata are
    consecutive quantiles of the timestep distribution, so neighbours in t are neighbouring strata) and
    paired; with equal stratum weights 1/n,

        var(mean) ≈ Σ_pairs (l_a − l_b)² / n².

    A pair's (l_a − l_b)² has expectation var_a + var_b + (μ_a − μ_b)²: unbiased where neighbouring
    strata have equal means, and only slightly high where the loss changes smoothly with t — unlike
    std(loss) / √n, which counts the whole trend of the loss over t as noise.

    An odd sample out is neither dropped (that would leave its variance out) nor paired twice (that
    would count a neighbour's variance twice): the last three strata form one group, whose
    k/(k − 1) · Σ (l − l̄)² (k = 3) has expectation var_1 + var_2 + var_3 under equal means — the same
    argument as for a pair, to which the formula reduces at k = 2. Samples at the same t (DDPM's
    integer timesteps, with more samples than timesteps) keep the order they are given in — pass them
    in sample order, which is unrelated to their losses: breaking ties by the loss would pair the
    closest losses and understate the variance (×0.45 with 4 samples per t).
    NaN for fewer than 2 samples."""
    t, loss = np.asarray(t, dtype=np.float64).ravel(), np.asarray(loss, dtype=np.float64).ravel()
    n = len(loss)
    if n < 2:
        return math.nan
    ordered = loss[np.argsort(t, kind="stable")]
    cut = n - 3 if n % 2 else n
    pairs = ordered[:cut].reshape(-1, 2)
    ss = float(((pairs[:, 0] - pairs[:, 1]) ** 2).sum())
    if n % 2:
        tail = ordered[cut:]
        ss += 1.5 * float(((tail - tail.mean()) ** 2).sum())
    return math.sqrt(ss) / n
