"""Every shipped study file validates (schema and cross-field rules; large datasets need not be present)."""

from pathlib import Path

import pytest

from harness.config import expand_grid, load_study
from tests.support.paths import EXPERIMENTS

EXPERIMENTS = sorted(EXPERIMENTS.glob("*.yaml"))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_study_file_is_valid(path):
    study = load_study(path, check_files=False)
    trials = expand_grid(study)
    assert trials and len({t.trial_id for t in trials}) == len(trials)


def test_dit_scaling_is_the_paper_grid():
    trials = expand_grid(load_study(Path("experiments/dit_scaling.yaml"), check_files=False))
    assert sorted(t.model_name for t in trials) == sorted(
        f"DiT-{s}/{p}" for s in ("S", "B", "L", "XL") for p in (2, 4, 8))
    t = trials[0]
    assert (t.train.lr, t.train.batch_size, t.train.ema_decay, t.eval.sampling_steps) == (1e-4, 256, 0.9999, 250)


def test_section_valued_grid_axis_moves_fields_together():
    trials = expand_grid(load_study(Path("experiments/dit_vs_mmdit.yaml"), check_files=False))
    assert [(t.model.family, t.model.size, t.model.attention) for t in trials] == [
        ("dit", "B", "joint"), ("mmdit", "d12", "joint"), ("mmdit", "d12", "split")]
    assert [t.data.conditioning for t in trials] == ["class", "text", "text"]
    assert all(t.model.patch == 2 for t in trials)


def test_dit_isoflop_resolves_its_budgets_and_shares_trunks():
    from harness.launch.branches import plan_branches, plan_compute
    from harness.study import flops_per_step, resolve_budgets

    # written by `ditscale plan` (tests/launch/test_plan.py checks it against its header): 6 budgets x 5 sizes x 3 LRs
    trials = resolve_budgets(expand_grid(load_study(Path("experiments/dit_isoflop.yaml"), check_files=False)))
    assert len(trials) == 6 * 5 * 3
    for t in trials:
        assert abs(t.train.steps * flops_per_step(t) - t.train.flops) <= flops_per_step(t) / 2
    trunks, alone = plan_branches(trials)
    assert trunks  # a size planned at two budgets shares one WSD trunk per LR
    per_step = {t.trial_id: flops_per_step(t) for t in trials}
    for trunk in trunks:
        per_step[trunk.trial.trial_id] = per_step[trunk.branches[0].trial_id]
    branched, independent = plan_compute(trunks, alone, lambda t: per_step[t.trial_id])
    assert independent == pytest.approx(sum(t.train.flops for t in trials), rel=1e-3)
    assert branched < independent


def test_embedded_studies_have_what_the_report_needs():
    """smoke: 4 DiT sizes at each of 2 patches (a law from >= 4 sizes, and DiT's findings to check);
    isoflop_smoke: >= 3 budgets x >= 4 sizes on WSD trunks with cooldown branches, muP."""
    from harness.launch.branches import plan_branches
    from harness.study import resolve_budgets

    smoke = expand_grid(load_study(Path("experiments/smoke.yaml"), check_files=False))
    assert {t.model.patch for t in smoke} == {2, 4}
    for patch in (2, 4):
        assert len({t.model.size for t in smoke if t.model.patch == patch}) >= 4
    iso = resolve_budgets(expand_grid(load_study(Path("experiments/isoflop_smoke.yaml"), check_files=False)))
    assert len({t.train.flops for t in iso}) >= 3 and len({t.model.size for t in iso}) >= 4
    assert all(t.train.schedule == "wsd" and t.model.parametrization == "mup" for t in iso)
    # A planned design places sizes per budget: every size trained at >= 2 budgets shares one trunk.
    trunks, alone = plan_branches(iso)
    shared = {s for s in {t.model.size for t in iso} if sum(t.model.size == s for t in iso) >= 2}
    assert len(trunks) == len(shared) >= 3 and len(alone) == len(iso) - sum(t.model.size in shared for t in iso)
    # Issue 27 item 4: written by `ditscale plan`, with a ladder budget >= 4x the largest fitted one.
    text = Path("experiments/isoflop_smoke.yaml").read_text()
    assert "# Written by: ditscale plan --base experiments/isoflop_smoke.yaml" in text
    ladder = load_study(Path("experiments/isoflop_smoke.yaml"), check_files=False).ladder.budgets
    assert ladder and min(ladder) >= 4 * max(t.train.flops for t in iso)
