"""Post-hoc EMA (EDM2, arXiv 2312.02696): the power-function EMA and its reconstruction (models/phema.py),
the study fields (train.posthoc_ema) and `ditscale ema reconstruct` on a trial folder. The end-to-end
check (a real trial killed with SIGKILL and resumed, reconstructed, loaded strictly) extends
tests/test_train.py::test_kill_and_resume_continues_the_same_run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from models.phema import (PowerFunctionEMA, ema_beta, gamma_to_sigma_rel, sigma_rel_to_gamma, solve_weights,
                          solve_weights_and_error)


def _walk(steps: int, every: int, tracked=(0.05, 0.10), direct=(0.07,), n=1000, seed=0):
    """A deterministic parameter trajectory (a Gaussian random walk of n weights) with the tracked
    profiles' snapshots every `every` steps and directly tracked profiles; returns
    (snapshots [((step, sigma), tensor)], direct EMA, the tracked EMA)."""
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Linear(n, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    tracker, reference = PowerFunctionEMA(model, tracked), PowerFunctionEMA(model, direct)
    snaps = []
    for t in range(1, steps + 1):
        with torch.no_grad():
            model.weight.add_(torch.randn(1, n, generator=g))
        tracker.update(model)
        reference.update(model)
        if t % every == 0:
            snaps += [((t, s), tracker.snapshot(s)["shadow"]["weight"].clone()) for s in tracker.sigma_rels]
    return snaps, reference, tracker


def test_sigma_rel_gamma_relation_matches_edm2():
    # EDM2 (section 3.1): sigma_rel 0.05 <-> gamma 16.97, 0.10 <-> 6.94.
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    for s in (0.01, 0.05, 0.2, 0.3):
        assert gamma_to_sigma_rel(sigma_rel_to_gamma(s)) == pytest.approx(s, rel=1e-12)
    assert ema_beta(1, 6.94) == 0.0  # the first update drops the initialisation
    assert ema_beta(10, 2.0) == pytest.approx(0.9 ** 3)


@pytest.mark.parametrize("bad", [0.0, -0.1, 0.31, float("nan"), float("inf"), "x"])
def test_sigma_rel_outside_its_range_is_a_clear_value_error(bad):
    model = torch.nn.Linear(2, 1)
    with pytest.raises(ValueError, match=r"sigma_rels\[1\].*must be in \(0, 0.3\]|not a number"):
        PowerFunctionEMA(model, [0.05, bad])
    with pytest.raises(ValueError, match="target"):
        solve_weights([(10, 0.05)], (10, bad))


def test_reconstruction_matches_a_directly_tracked_profile():
    """0.07 reconstructed at the last step from 20 snapshots each of 0.05 and 0.10 over 2000 steps, against
    0.07 tracked directly. EDM2 reports near-exact reconstructions between the tracked profiles; the
    measured error is 0.10-0.11 % of the distance between the 0.07 and 0.05 EMAs (seeds 0-2), i.e. of
    what choosing the wrong sigma_rel moves the weights; 1 % leaves a 10x margin and would still catch a
    wrong gamma, beta or inner product (every 500 steps, i.e. 4 snapshots, already gives 12 %)."""
    snaps, reference, tracker = _walk(2000, 100)
    weights, fit_error = solve_weights_and_error([key for key, _ in snaps], (2000, 0.07))
    rebuilt = sum(w * v.double() for w, (_, v) in zip(weights, snaps))
    direct = reference.shadows[0]["weight"].double()
    near = tracker.shadows[0]["weight"].double()  # sigma_rel 0.05
    error = float((rebuilt - direct).norm() / (direct - near).norm())
    assert error < 0.01, error
    assert fit_error < 0.01, fit_error  # the profiles themselves: 0.25 % relative L2
    assert sum(weights) == pytest.approx(1.0, abs=1e-9)


def test_tracked_profile_at_a_snapshot_step_gets_all_the_weight():
    snapshots = [(step, s) for step in (500, 1000, 1500, 2000) for s in (0.05, 0.10)]
    for target in [(1000, 0.05), (2000, 0.10)]:
        weights, fit_error = solve_weights_and_error(snapshots, target)
        own = snapshots.index(target)
        assert weights[own] == pytest.approx(1.0, abs=1e-6)
        assert max(abs(w) for i, w in enumerate(weights) if i != own) < 1e-6
        assert fit_error < 1e-6
    # Between the tracked widths the weights stay tame and sum to 1; repeated snapshots do not break it.
    weights = solve_weights(snapshots + snapshots[:2], (2000, 0.07))
    assert sum(weights) == pytest.approx(1.0, abs=1e-9) and max(abs(w) for w in weights) < 5


def test_state_dict_round_trip_continues_identically():
    """A resumed trial (load_state_dict from a checkpoint mid-run) writes the same snapshots as an
    uninterrupted one: the shadows and the step count are all the state there is."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    steps = [{n: torch.randn_like(p) for n, p in model.named_parameters()} for _ in range(30)]

    def step(ema, i):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.add_(steps[i][n])
        ema.update(model)

    with torch.no_grad():
        start = {n: p.clone() for n, p in model.named_parameters()}
    whole = PowerFunctionEMA(model, (0.05, 0.1))
    for i in range(30):
        step(whole, i)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(start[n])
    first = PowerFunctionEMA(model, (0.05, 0.1))
    for i in range(12):
        step(first, i)
    saved = {"sigma_rels": first.state_dict()["sigma_rels"], "num_updates": first.num_updates,
             "shadows": [{k: v.clone() for k, v in s.items()} for s in first.shadows]}
    resumed = PowerFunctionEMA(model, (0.05, 0.1))
    resumed.load_state_dict(saved)
    for i in range(12, 30):
        step(resumed, i)
    for s in (0.05, 0.1):
        a, b = whole.snapshot(s), resumed.snapshot(s)
        assert a["step"] == b["step"] == 30
        assert all(torch.equal(a["shadow"][k], b["shadow"][k]) for k in a["shadow"])
    with pytest.raises(ValueError, match="sigma_rels"):
        PowerFunctionEMA(model, (0.05, 0.2)).load_state_dict(saved)
