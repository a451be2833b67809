"""Issue 27 item 2, bracketing while the study runs (harness/launch/bracket.py): the decision for one budget
(which edge, which size next, when it stops), the study section's validation, and the record that keeps a
re-run sweep from adding a size twice. The real sweep (Ray, DeepSpeed, MLflow) that adds a size is
tests/launch/test_ladder.py's end-to-end test."""

from __future__ import annotations

import pytest

from tests.support import tiny_study, write_study

GEOMS = [(50, "g50"), (100, "g100"), (200, "g200"), (400, "g400"), (700, "g700"), (900, "g900"), (1600, "g1600")]


def _points(losses, sizes=((100, "g100"), (200, "g200"), (400, "g400"))):
    return [(p, s, loss) for (p, s), loss in zip(sizes, losses)]


def test_a_budgets_sizes_are_compared_within_one_patch_and_objective_never_pooled():
    """Bracketing decides per budget among trials equal in everything but size and seed: a grid over the patch,
    the objective or the LR brackets each value on its own (the minimum over sizes of a pooled budget would
    mix laws); seeds of one size are one point."""
    from harness.launch.bracket import budget_key
    from harness.schema import TrialConfig

    def trial(size="d1w32", patch=4, kind="ddpm", lr=1e-3, seed=0, flops=1e9):
        return TrialConfig.model_validate({"name": "s", "data": {"shards": "x-{0..1}.tar", "image_size": 16,
                                                                 "channels": 1},
                                           "model": {"size": size, "patch": patch}, "objective": {"kind": kind},
                                           "train": {"flops": flops, "batch_size": 32, "lr": lr, "seed": seed}})

    key = budget_key(trial())
    assert budget_key(trial(size="d2w64", seed=1)) == key
    for other in (trial(patch=2), trial(kind="rectified_flow"), trial(lr=2e-3), trial(flops=2e9)):
        assert budget_key(other) != key


def test_a_minimum_at_the_largest_size_adds_the_next_larger_geometry_at_the_same_log_spacing():
    from harness.launch.bracket import next_size

    step = next_size(_points([3.0, 2.0, 1.0]), GEOMS, added=0, limit=2, budget=1.5e11)
    # spacing x2 -> target 800: g900 (log distance 0.118) beats g700 (0.134)
    assert (step.action, step.size, step.params, step.edge) == ("add", "g900", 900, "largest")
    assert step.line == "minimum at the largest size g400 at 1.5e+11"


def test_a_minimum_at_the_smallest_size_adds_a_smaller_one_and_skips_trained_geometries():
    from harness.launch.bracket import next_size

    step = next_size(_points([1.0, 2.0, 3.0]), GEOMS, added=1, limit=2, budget=1e9)
    assert (step.action, step.size, step.edge) == ("add", "g50", "smallest")
    # a geometry the budget already trained is never added again, however near the target
    step = next_size(_points([1.0, 2.0, 3.0]), [g for g in GEOMS if g[1] != "g50"], added=0, limit=2, budget=1e9)
    assert step.action == "none_left"
    # wider spacing (x4): target 25, nearest of what lies below
    pts = _points([1.0, 2.0, 3.0], sizes=((100, "g100"), (400, "g400"), (1600, "g1600")))
    assert next_size(pts, GEOMS + [(20, "g20")], 0, 2, 1e9).size == "g20"


def test_a_minimum_inside_adds_nothing():
    from harness.launch.bracket import next_size

    step = next_size(_points([2.0, 1.0, 3.0]), GEOMS, added=0, limit=2, budget=1e9)
    assert step.action == "inside" and step.size is None


def test_bracketing_stops_at_its_limit_in_one_line():
    from harness.launch.bracket import next_size

    step = next_size(_points([3.0, 2.0, 1.0]), GEOMS, added=2, limit=2, budget=2e9)
    assert step.action == "limit" and step.size is None
    assert step.line == ("budget 2e+09: minimum at the largest size g400 at 2e+09 after 2 added size(s) "
                         "(bracket.max_extra_sizes = 2): left unbracketed; the report flags it")


def test_no_geometry_left_is_one_line_naming_the_shape_rule():
    from harness.launch.bracket import next_size

    step = next_size(_points([3.0, 2.0, 1.0]), GEOMS[:4], added=0, limit=2, budget=2e9, rule="DiT-d{D}w{W}")
    assert step.action == "none_left" and "\n" not in step.line
    assert step.line == ("budget 2e+09: minimum at the largest size g400 at 2e+09, and no larger geometry is left "
                         "(DiT-d{D}w{W}): left unbracketed; the report flags it")
    assert next_size(_points([1.0]), GEOMS, 0, 2, 1e9).action == "too_few"


def test_the_real_dit_ladder_has_nothing_below_d1w32(digits_dir, tmp_path):
    """At the CPU scale of the tests the smallest DiT wins every budget: bracketing says so, adds nothing."""
    from harness.config import expand_grid, load_study
    from harness.launch.bracket import _counter, _geometries, next_size

    trial = expand_grid(load_study(write_study(tmp_path / "s.yaml", tiny_study(digits_dir, "s"))))[0]
    count = _counter(trial)
    geoms = _geometries(trial, 4 * count("d2w96"), count)
    assert geoms[0][1] == "d1w32" and "d2w128" in {s for _, s in geoms}
    pts = [(count(s), s, loss) for s, loss in (("d1w32", 0.9), ("d1w64", 0.95), ("d2w64", 1.0))]
    assert next_size(pts, geoms, 0, 2, 5e8).action == "none_left"
    pts = [(count(s), s, loss) for s, loss in (("d1w64", 1.0), ("d2w64", 0.95), ("d2w96", 0.9))]
    step = next_size(pts, geoms, 0, 2, 5e8)
    assert step.action == "add" and step.params > count("d2w96") and step.size not in ("d1w64", "d2w64", "d2w96")


def _isoflop(digits_dir, tmp_path, **sections):
    sections = {"eval": {"val_batches": 1, "batch_size": 64}} | sections
    study = tiny_study(digits_dir, "b", train={"steps": None, "flops": 5e8},
                       resources={"workers_per_trial": 1, "storage": str(tmp_path / "runs")},
                       grid={"model.size": ["d1w64", "d2w64"], "train.flops": [5e8, 1e9], "train.seed": [0, 1]},
                       **sections)
    study["train"] = {k: v for k, v in study["train"].items() if v is not None}
    return write_study(tmp_path / "b.yaml", study)


@pytest.mark.parametrize("section, message", [
    ({"max_extra_sizes": -1}, r"^bracket.max_extra_sizes: "),
    ({"max_extra_sizes": "two"}, r"^bracket.max_extra_sizes: "),
    ({"max_sizes": 2}, r"^bracket.max_sizes: "),
])
def test_bad_bracket_sections_name_the_field(digits_dir, tmp_path, section, message):
    from harness.config import StudyError, load_study

    with pytest.raises(StudyError, match=message) as err:
        load_study(_isoflop(digits_dir, tmp_path, bracket=section))
    assert len(str(err.value).splitlines()) == 1, str(err.value)


def test_bracketing_needs_a_budget_design_and_a_validation_loss(digits_dir, tmp_path):
    from harness.config import StudyError, load_study

    steps = tiny_study(digits_dir, "s", grid={"model.size": ["d1w32", "d1w64"]}, bracket={"max_extra_sizes": 2})
    with pytest.raises(StudyError, match=r"^bracket.max_extra_sizes: bracketing extends an isoFLOP design") as err:
        load_study(write_study(tmp_path / "s.yaml", steps))
    assert len(str(err.value).splitlines()) == 1
    with pytest.raises(StudyError, match=r"^bracket.max_extra_sizes: .*set eval.val_batches > 0$"):
        load_study(_isoflop(digits_dir, tmp_path, bracket={"max_extra_sizes": 2}, eval={"val_batches": 0}))


def test_the_section_leaves_trial_ids_alone_and_the_dry_run_says_when_it_decides(digits_dir, tmp_path, capsys):
    from harness.config import expand_grid, load_study
    from harness.launch.sweep import run_sweep

    plain = [t.trial_id for t in expand_grid(load_study(_isoflop(digits_dir, tmp_path)))]
    path = _isoflop(digits_dir, tmp_path, bracket={"max_extra_sizes": 2})
    assert [t.trial_id for t in expand_grid(load_study(path))] == plain
    run_sweep(str(path), dry_run=True)
    assert "bracket: up to 2 size(s) per budget may be added after the grid" in capsys.readouterr().out


def test_an_added_trial_is_the_budgets_trial_resized_and_recorded_once(digits_dir, tmp_path):
    """Seeds share a budget; budgets do not. The added trial is the grid's trial with model.size changed
    (so a size once in the grid gets its old trial id back), and its record is written once."""
    from harness.config import expand_grid, load_study
    from harness.launch.bracket import added_trial, bracket_folder, budget_key, load_added, write_record
    from harness.study import resolve_budgets

    trials = resolve_budgets(expand_grid(load_study(_isoflop(digits_dir, tmp_path))))
    keys = {budget_key(t) for t in trials}
    assert len(keys) == 2  # 2 budgets; sizes and seeds inside each
    d64 = next(t for t in trials if t.model.size == "d2w64" and t.train.flops == 5e8 and t.train.seed == 0)
    small = next(t for t in trials if t.model.size == "d1w64" and t.train.flops == 5e8 and t.train.seed == 0)
    again = added_trial(d64, "d1w64")
    assert again.trial_id == small.trial_id and again.train.steps == small.train.steps
    new = added_trial(d64, "d1w32")
    assert budget_key(new) == budget_key(d64) and new.train.steps > small.train.steps
    data = {"trial_id": new.trial_id, "budget": 5e8, "size": "d1w32", "round": 1, "reason": "r",
            "trial": new.model_dump(mode="json")}
    folder = bracket_folder(new)
    assert write_record(folder, data) is True and write_record(folder, data | {"reason": "other"}) is False
    (found, record), = load_added(trials[0])
    assert found.trial_id == new.trial_id and record["reason"] == "r"


def test_a_record_whose_run_was_never_tagged_is_tagged_by_the_next_sweep(digits_dir, tmp_path):
    """A sweep that died between writing an addition's record and tagging its run (review finding): the
    next sweep's bracketing phase tags it, so the report's "Sizes added" table (which finds additions by
    ditscale.added_by) does not leave it out for good. A real SQLite MLflow store."""
    import mlflow

    from harness.config import expand_grid, load_study
    from harness.launch.bracket import (
        ADDED_BY_TAG,
        ADDED_WHY_TAG,
        added_trial,
        bracket_folder,
        load_added,
        tag_recorded,
        write_record,
    )
    from harness.study import resolve_budgets

    trials = resolve_budgets(expand_grid(load_study(_isoflop(digits_dir, tmp_path))))
    new = added_trial(trials[0], "d1w32")
    write_record(bracket_folder(new), {"trial_id": new.trial_id, "budget": 5e8, "size": "d1w32", "round": 1,
                                       "reason": "minimum at the smallest size", "trial": new.model_dump(mode="json")})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tag_recorded(load_added(trials[0]), uri, None)
    c = mlflow.MlflowClient(uri)
    (run,) = c.search_runs([c.get_experiment_by_name(new.name).experiment_id])
    assert run.data.tags["trial_id"] == new.trial_id and run.data.tags[ADDED_BY_TAG] == "bracket"
    assert run.data.tags[ADDED_WHY_TAG] == "minimum at the smallest size"
    tag_recorded(load_added(trials[0]), uri, None)  # idempotent: still one run
    assert len(c.search_runs([c.get_experiment_by_name(new.name).experiment_id])) == 1
