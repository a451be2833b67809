"""`ditscale plan` (harness/launch/planner.py, plan.py), the study's `points:` and dry runs where the
data is not (issue 27, item 1). Fast: no Ray, no MLflow, no data."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import yaml

from harness.cli import main
from harness.config import StudyError, expand_grid, load_study
from harness.errors import UserError
from harness.launch import planner
from models.flops import count_model
from tests.support.paths import EXPERIMENTS

BUDGETS = (1e13, 2e13, 4e13)


def _dit_params(size: str) -> int:
    return count_model(f"DiT-{size}/2", input_size=32, in_channels=4, num_classes=10).params


def _base(tmp_path, **train) -> str:
    """A WSD budget study whose shards do not exist (a GPU study planned on a laptop)."""
    study = {
        "name": "plan-base",
        "data": {"shards": str(tmp_path / "nowhere" / "train-{000000..000009}.tar"), "image_size": 32,
                 "channels": 4, "num_classes": 10, "num_workers": 0},
        "model": {"family": "dit", "size": "d2w64", "patch": 2},
        "train": {"flops": 1e13, "batch_size": 64, "schedule": "wsd", "warmup_steps": 5, "cooldown": 0.2,
                  "precision": "fp32", **train},
        "eval": {"fid_samples": 0, "val_batches": 0},
        "grid": {"model.size": ["d1w32", "d2w64"], "train.flops": [1e13, 4e13]},
    }
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return str(path)


# --- the planner's arithmetic ------------------------------------------------------------------------


@pytest.mark.parametrize("n0, a", [(1.0e6, planner.DEFAULT_EXPONENT), (3.0e6, 0.4)])
def test_the_sizes_are_centred_on_the_law_and_bracket_it_at_every_budget(n0, a):
    law = planner.Law(n0, BUDGETS[0], a, "test")
    plans = planner.plan_budgets(law, list(BUDGETS), 5, 4.0, "dit", _dit_params)
    for plan, c in zip(plans, BUDGETS):
        assert plan.n_opt == pytest.approx(n0 * (c / BUDGETS[0]) ** a)
        params = [p for p, _ in plan.sizes]
        assert plan.below >= 2 and plan.above >= 2, plan
        assert len({s for _, s in plan.sizes}) == len(plan.sizes) == 5  # distinct, none collapsed at this scale
        # centred: the sizes' geometric mean within a factor 1.5 of N_opt, and they span ~N_opt/4 .. N_opt*4
        assert abs(sum(math.log(p / plan.n_opt) for p in params) / len(params)) < math.log(1.5)
        assert plan.n_opt / 6 < min(params) < plan.n_opt / 2.5 and plan.n_opt * 2.5 < max(params) < plan.n_opt * 6
        for _, size in plan.sizes:  # the shape rule: DiT-d{D}w{W} with 32 <= W/D <= 64
            depth, width = (int(x) for x in size[1:].split("w"))
            assert 32 <= width / depth <= 64 and width % 32 == 0
    # a different law centres elsewhere: the plans follow the law, not a fixed ladder
    other = planner.plan_budgets(planner.Law(n0 * 4, BUDGETS[0], a, "x"), list(BUDGETS), 5, 4.0, "dit", _dit_params)
    assert other[0].sizes != plans[0].sizes


def test_mmdit_sizes_follow_sd3s_rule():
    def params(size):
        return count_model(f"MMDiT-{size}/2", input_size=32, in_channels=16).params

    plans = planner.plan_budgets(planner.Law(5e8, 1e18, 0.5, "t"), [1e18, 4e18], 4, 4.0, "mmdit", params)
    for plan in plans:
        assert plan.below >= 2 and plan.above >= 2
        assert all(s.startswith("d") and s[1:].isdigit() for _, s in plan.sizes)


def test_collapsed_sizes_are_widened_with_the_nearest_spare_geometry_or_refused():
    ladder = [(10, "a"), (100, "b"), (1000, "c"), (1100, "d"), (5000, "e"), (20000, "f")]
    # targets 250, 500, 1000, 2000, 4000 snap to b, c, c, d, e: only b lies below the centre 1000
    plan = planner.snap_budget(1e12, 1000, 5, 4.0, ladder, "dit")
    assert [s for _, s in plan.sizes] == ["a", "b", "c", "d", "e"]
    assert plan.below == 2 and plan.above == 2
    assert any("added a below" in note for note in plan.notes)
    with pytest.raises(UserError, match=r"^--center: at budget 1e\+12, N_opt = 1e\+03 .* fewer than 2 dit "):
        planner.snap_budget(1e12, 1000, 5, 4.0, ladder[1:], "dit")


def test_the_report_law_is_read_from_fits_json(tmp_path):
    rows = [{"relation": "loss surface L(N, D)", "group": "DiT", "fitted": True, "A": 1e12, "alpha": 2.7, "B": 4e5,
             "beta": 1.5, "k": 3e-8},
            {"relation": "isoFLOP optima", "group": "DiT", "fitted": True, "n_opt_fit": {"a": 0.57, "k": 7485.0}}]
    (tmp_path / "fits.json").write_text(json.dumps(rows))
    law = planner.law_from_report(tmp_path)
    assert "approach 2" in law.source
    assert law.n_opt(7.5e10) == pytest.approx(7485.0 * 75 ** 0.57)  # the report's C is GFLOPs
    (tmp_path / "fits.json").write_text(json.dumps(rows[:1]))  # no isoFLOP law: the surface's
    g = (2.7 * 1e12 / (1.5 * 4e5)) ** (1 / 4.2)
    assert planner.law_from_report(tmp_path).n_opt(7.5e10) == pytest.approx(g * (75 / 3e-8) ** (1.5 / 4.2))
    (tmp_path / "fits.json").write_text(json.dumps([{**rows[1], "fitted": False}]))
    with pytest.raises(UserError, match="^--from-report: .* has no fitted N_opt"):
        planner.law_from_report(tmp_path)


@pytest.mark.parametrize("call, flag", [
    (lambda: planner.parse_budgets("3e11,1e11"), "--budgets"),
    (lambda: planner.parse_budgets("1e11,1e11"), "--budgets"),
    (lambda: planner.parse_budgets("1e11,lots"), "--budgets"),
    (lambda: planner.parse_center("1e5"), "--center"),
    (lambda: planner.parse_center("1e5@"), "--center"),
    (lambda: planner.parse_center("big@1e11"), "--center"),
    (lambda: planner.check_numbers(0.0, 5, 4.0, 4.0), "--exponent"),
    (lambda: planner.check_numbers(1.0, 5, 4.0, 4.0), "--exponent"),
    (lambda: planner.check_numbers(0.5, 2, 4.0, 4.0), "--sizes-per-budget"),
    (lambda: planner.check_numbers(0.5, 5, 1.0, 4.0), "--spread"),
    (lambda: planner.parse_ladder("2e13", [1e13, 2e13]), "--ladder"),   # not above the largest budget
    (lambda: planner.parse_ladder("8e13,lots", [1e13, 2e13]), "--ladder"),
    (lambda: planner.parse_ladder("8e13,8e13", [1e13, 2e13]), "--ladder"),
])
def test_bad_input_is_one_line_naming_the_flag(call, flag):
    with pytest.raises(UserError) as err:
        call()
    assert str(err.value).startswith(f"{flag}: ") and "\n" not in str(err.value)


# --- the command, the plan file and the dry run ----------------------------------------------------------


def test_bad_flags_stop_the_command_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "plan.yaml"
    for flags, flag in ((["--budgets", "2e13,1e13", "--center", "1e6@1e13"], "--budgets"),
                        (["--budgets", "1e13,2e13", "--center", "1e6"], "--center"),
                        (["--budgets", "1e13,2e13", "--center", "1e6@1e13", "--exponent", "1.2"], "--exponent"),
                        (["--budgets", "1e13,2e13", "--center", "1e6@1e13", "--sizes-per-budget", "2"],
                         "--sizes-per-budget"),
                        (["--budgets", "1e13,2e13", "--center", "1e6@1e13", "--spread", "0.5"], "--spread"),
                        (["--budgets", "1e13,2e13", "--center", "1e6@1e13", "--ladder", "1.5e13"], "--ladder"),
                        (["--budgets", "1e13,2e13", "--center", "liang2024", "--exponent", "0.5"], "--exponent")):
        assert main(["plan", "--base", _base(tmp_path), *flags, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"ditscale plan: error: {flag}: "), err
    assert not out.exists()


def test_the_plan_is_a_study_and_the_dry_run_lists_exactly_its_pairs_without_the_data(tmp_path, capsys):
    out = tmp_path / "plan.yaml"
    budgets = ",".join(f"{c:g}" for c in BUDGETS)
    assert main(["plan", "--base", _base(tmp_path), "--budgets", budgets, "--center", "1e6@1e13",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "WSD branches" in printed and "as independent trials" in printed
    assert "no shard of data.shards here" in printed and "epochs unknown" in printed

    raw = yaml.safe_load(out.read_text())
    assert "grid" not in raw and raw["data"]["image_size"] == 32 and raw["train"]["schedule"] == "wsd"
    planned = [(p["model.size"], p["train.flops"]) for p in raw["points"]]
    assert len(set(planned)) == len(planned) == 15  # 5 sizes x 3 budgets, pairs (not a cross product of sizes)
    assert len({s for s, _ in planned}) > 5         # the centre moves with the budget: more than 5 sizes in all
    trials = expand_grid(load_study(out, check_files=False))
    assert [(t.model.size, t.train.flops) for t in trials] == planned

    assert main(["sweep", str(out), "--dry-run", "--json"]) == 0
    captured = capsys.readouterr()
    listed = json.loads(captured.out)  # stdout holds only the JSON
    assert [(r["size"], r["budget"]) for r in listed] == planned
    assert {"trial_id", "model", "params", "budget", "steps", "images"} <= set(listed[0])
    assert all(r["images"] == r["steps"] * 64 and r["params"] > 0 for r in listed)
    assert "no shard of data.shards here" in captured.err and "data.channels, data.image_size" in captured.err

    assert main(["sweep", str(out)]) == 2  # something would train: now the shards are checked
    assert "data.shards: no file matches" in capsys.readouterr().err


def test_other_grid_axes_are_kept_and_every_point_runs_at_each(tmp_path, capsys):
    base = yaml.safe_load(Path(_base(tmp_path)).read_text())
    base["grid"]["train.lr"] = [1e-3, 2e-3]
    path = tmp_path / "lr.yaml"
    path.write_text(yaml.safe_dump(base))
    out = tmp_path / "plan.yaml"
    assert main(["plan", "--base", str(path), "--budgets", "1e13,2e13", "--center", "1e6@1e13",
                 "--sizes-per-budget", "3", "--out", str(out)]) == 0
    assert "grid.train.lr kept" in capsys.readouterr().out
    raw = yaml.safe_load(out.read_text())
    assert raw["grid"] == {"train.lr": [1e-3, 2e-3]}
    assert len(expand_grid(load_study(out, check_files=False))) == 2 * len(raw["points"])


@pytest.mark.parametrize("points, grid, expected", [
    ([{"model.sise": "d1w32"}], {}, "points.0.model.sise: not a study field"),
    ([{"model.size": "d1w32"}], {"model.size": ["d2w64"]}, "points.0.model.size: also a grid axis"),
    ([{}], {}, "points.0: an empty mapping"),
])
def test_points_are_validated_naming_the_field(tmp_path, points, grid, expected):
    raw = yaml.safe_load(Path(_base(tmp_path)).read_text())
    raw.update(points=points, grid=grid)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(StudyError, match=expected):
        load_study(path, check_files=False)


def test_a_dry_run_of_a_study_whose_shards_do_not_exist_works_and_says_so(tmp_path, capsys):
    assert main(["sweep", _base(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "DiT-d2w64/2" in out and "epochs" in out
    line = [x for x in out.splitlines() if x.startswith("data:")]
    assert len(line) == 1 and "4x32x32 inputs" in line[0] and "10 classes (data.num_classes)" in line[0]


def test_the_ladder_flag_writes_ladder_budgets_and_the_dry_run_says_it_trains_after_the_grid(tmp_path, capsys):
    out = tmp_path / "plan.yaml"
    assert main(["plan", "--base", _base(tmp_path), "--budgets", "1e13,2e13", "--center", "1e6@1e13",
                 "--sizes-per-budget", "3", "--ladder", "2e14", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ladder: 2e+14 (10x the largest budget" in printed and "GPU-hours more" in printed
    assert yaml.safe_load(out.read_text())["ladder"] == {"budgets": [2e14]}
    assert load_study(out, check_files=False).ladder.budgets == [2e14]
    assert main(["sweep", str(out), "--dry-run"]) == 0
    assert "ladder: 1 trial(s) at 2e+14 (10x) the grid's largest budget" in capsys.readouterr().out


def test_liang_centre_converts_their_flops_to_ours():
    """Liang et al. 2024: N_opt = 0.0009 C_L^0.5681 with C_L = 6ND FLOPs = 2 x our multiply-adds."""
    law = planner.liang_law()
    for c in (5e16, 3e18, 3e19):
        assert law.n_opt(c) == pytest.approx(0.0009 * (2 * c) ** 0.5681)
    assert law.n_opt(3e18) == pytest.approx(41.9e6, rel=1e-3)  # their 6e18 FLOPs
    # independent checks of the coefficient (planner.py's comment above LIANG_CENTER): their 1.5e21-FLOP run's
    # compute-optimal size, ~958.3M, and their D_opt = 186.8535 C^0.4319, whose product with N_opt is C / 6
    assert law.n_opt(1.5e21 / 2) == pytest.approx(958.3e6, rel=0.01)
    assert 6 * planner.LIANG_K * 186.8535 == pytest.approx(1.0, rel=0.01)
    assert planner.LIANG_A + 0.4319 == pytest.approx(1.0)


def test_dit_isoflop_is_the_plan_its_header_names_and_its_costs_are_current(capsys):
    """experiments/dit_isoflop.yaml: written by `ditscale plan --center liang2024 --ladder ...` (issue 27 item 5);
    the dry run lists exactly its points at each LR, says the ladder trains after the grid, and the header's
    GPU-hours are recomputed here from the dry run's compute (a hand edit of the budgets makes this fail)."""

    path = EXPERIMENTS / "dit_isoflop.yaml"
    text = path.read_text()
    header = " ".join(line[2:].rstrip(" \\") for line in text.splitlines() if line.startswith("# "))
    assert "ditscale plan --base experiments/dit_isoflop.yaml" in header and "--center liang2024" in header
    raw = yaml.safe_load(text)
    budgets = sorted({p["train.flops"] for p in raw["points"]})
    assert raw["ladder"]["budgets"] == [10 * max(budgets)]
    law = planner.liang_law()
    for c in budgets:  # every budget's sizes bracket Liang et al.'s N_opt(C), converted to our FLOPs
        params = [_dit_params_imagenet(p["model.size"]) for p in raw["points"] if p["train.flops"] == c]
        assert min(params) < law.n_opt(c) < max(params)

    assert main(["sweep", str(path), "--dry-run", "--json"]) == 0
    captured = capsys.readouterr()
    listed = json.loads(captured.out)
    lrs = raw["grid"]["train.lr"]
    assert sorted((r["size"], r["budget"]) for r in listed) == sorted(
        (p["model.size"], p["train.flops"]) for p in raw["points"] for _ in lrs)
    assert "ladder: 1 trial(s) at 3e+19 (10x) the grid's largest budget" in captured.err
    assert "once the grid has concluded" in captured.err

    independent = sum(r["train_gflops"] for r in listed) * 1e9  # multiply-adds
    hours = 2 * independent / (0.40 * 989e12) / 3600            # 2 FLOPs per multiply-add, 40 % MFU of an H100
    stated = re.search(r"GPU-hours on one H100 at 40% MFU of 989 TFLOP/s .*?: ([0-9.]+) independent", header)
    assert stated and float(stated.group(1)) == pytest.approx(hours, rel=1e-3)
    assert f"{2 * max(budgets) * 10:.3g}" in header.split("budgets in Liang et al.'s FLOPs")[1]


def _dit_params_imagenet(size: str) -> int:
    return count_model(f"DiT-{size}/2", input_size=32, in_channels=4, num_classes=1000).params
