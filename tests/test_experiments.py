"""Every shipped study file validates (schema and cross-field rules; large datasets need not be present)."""

from pathlib import Path

import pytest

from harness.config import expand_grid, load_study

EXPERIMENTS = sorted((Path(__file__).parent.parent / "experiments").glob("*.yaml"))


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
