"""The plan of a study, printed by `ditscale sweep --dry-run` (and before every sweep): one row per
trial with its model, size, budget, length and compute. Starts nothing: no Ray, no MLflow.

Budget trials (`train.flops`) come with their step count (harness.study.load_trials), before anything runs.
A plan needs no data (nor torch): the counts take the image size and channels from the study, the number of classes
from `data.num_classes` or the shards' dataset.json (else 1000), and the training split's size (for
epochs) from dataset.json when it is here; `data_lines` says which.

`ditscale plan` (write_plan) writes an isoFLOP study centred on a scaling law (harness/launch/planner.py)
and prints what it costs.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import sys
import tempfile
import textwrap
from pathlib import Path

import yaml

from harness.checks import cooldown_steps
from harness.config import TrialConfig, load_study
from harness.data.shards import shard_name, shard_urls
from harness.errors import UserError
from harness.files import atomic_write_text
from harness.launch import planner
from harness.launch.branches import plan_branches, plan_compute
from harness.study import BudgetError, count_trial, load_trials, planned_count
from models.flops import training_gflops


def train_images(trial: TrialConfig, manifest: dict) -> int | None:
    """Images in the training split data.shards names, from dataset.json's per-shard counts (None: unknown)."""
    counts = {s["name"]: s["count"] for split in (manifest or {}).get("splits", {}).values() for s in split["shards"]}
    urls, missing = shard_urls(trial.data.shards)
    names = [shard_name(u) for u in urls + missing]
    if not names or any(n not in counts for n in names):
        return None
    return sum(counts[n] for n in names)


def plan_rows(trials: list[TrialConfig]) -> list[dict]:
    """One row per trial (budgets resolved: harness.study.load_trials)."""
    rows = []
    for i, trial in enumerate(trials):
        planned = planned_count(trial)
        count = planned.count
        images = trial.train.steps * trial.train.batch_size
        split = train_images(trial, planned.manifest)
        rows.append({
            "trial": i, "trial_id": trial.trial_id, "model": trial.model_name, "size": trial.model.size,
            "attention": trial.model.attention if trial.model.family == "mmdit" else "-",
            "objective": trial.objective.kind, "params": count.params, "budget": trial.train.flops,
            "steps": trial.train.steps, "batch": trial.train.batch_size, "images": images,
            "images_per_param": images / count.params, "fwd_gflops": count.gflops,
            "train_gflops": training_gflops(count.gflops, images),
            "train_images": split, "epochs": images / split if split else None,
            "workers": trial.resources.workers_per_trial,
        })
    return rows


def print_plan(rows: list[dict]) -> None:
    print(f"{'#':>3} {'trial_id':<13}{'model':<15}{'attn':<6}{'objective':<15}{'params':>10}{'budget':>10}"
          f"{'steps':>8}{'batch':>6}{'images':>10}{'img/param':>10}{'epochs':>8}{'fwd GFLOPs':>11}"
          f"{'train GFLOPs':>13}{'workers':>8}")
    for r in rows:
        budget = f"{r['budget']:.3g}" if r["budget"] else "-"
        epochs = f"{r['epochs']:.3g}" if r.get("epochs") else "?"
        print(f"{r['trial']:>3} {r['trial_id']:<13}{r['model']:<15}{r['attention']:<6}{r['objective']:<15}"
              f"{r['params'] / 1e6:>9.2f}M{budget:>10}{r['steps']:>8}{r['batch']:>6}{r['images']:>10}"
              f"{r['images_per_param']:>10.3g}{epochs:>8}{r['fwd_gflops']:>11.4f}{r['train_gflops']:>13.4g}"
              f"{r['workers']:>8}")
    print("GFLOPs and budgets are multiply-adds (DiT paper convention); training compute = 3 x forward x images.")


JSON_KEYS = ("trial", "trial_id", "model", "size", "params", "budget", "steps", "batch", "images", "images_per_param",
             "epochs", "train_gflops", "workers")


def plan_output(as_json: bool):
    """Where the human-readable plan goes: stdout, or stderr under --json (stdout holds only the JSON)."""
    return contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext()


def plan_json(rows: list[dict]) -> str:
    """`ditscale sweep --dry-run --json`: the planned trials, for scripts (budget in FLOPs, i.e. train.flops)."""
    return json.dumps([{k: r.get(k) for k in JSON_KEYS} for r in rows], indent=1)


def data_lines(trials: list[TrialConfig]) -> list[str]:
    """One line per distinct data section: what the plan's counts took from where (data may be elsewhere)."""
    out = {}
    for trial in trials:
        d = trial.data
        key = (d.shards, d.image_size, d.channels, d.num_classes)
        if key in out:
            continue
        info = planned_count(trial)
        urls, missing = shard_urls(d.shards)
        split = train_images(trial, info.manifest)
        classes = (f"{d.num_classes} classes (data.num_classes)" if d.num_classes else
                   f"{info.num_classes} classes (dataset.json)" if info.manifest.get("num_classes") else
                   f"{info.num_classes} classes assumed (no data.num_classes, no dataset.json)"
                   if d.conditioning == "class" else "captions")
        geometry = f"{d.channels}x{d.image_size}x{d.image_size} inputs (data.channels, data.image_size)"
        if urls and not missing:
            kind = info.manifest.get("kind", "pixels or latents: no dataset.json")
            size = f"{split:,} training images" if split else "training split size unknown (no dataset.json)"
            out[key] = f"data: {len(urls)} shard(s) here; counts from {geometry}, {kind}, {classes}; {size}"
        else:
            where = f"{len(missing)} of {len(urls) + len(missing)} shards" if urls else "no shard"
            size = f"{split:,} training images (dataset.json)" if split else "epochs unknown"
            out[key] = (f"data: {where} of data.shards here ({d.shards}): the plan takes {geometry} (latents or "
                        f"pixels alike: the counts need only these), {classes}; {size}. The shards are checked "
                        "when the study trains")
    return list(out.values())


# --- ditscale plan ------------------------------------------------------------------------------------


# Grid axes the plan replaces with its points: the size, the length, and anything that sets them.
_PLANNED_AXES = {"model.size", "model", "train.flops", "train.steps", "train"}
# Grid axes the plan refuses: they change the geometry family or the counts (plan one at a time).
_FIXED_AXES = ("model.family", "model.patch", "data", "data.image_size", "data.channels", "data.num_classes",
               "data.shards", "data.text_encoder", "model.attention", "model.qk_norm")


def _base_trial(study) -> TrialConfig:
    bad = [axis for axis in study.grid if axis in _FIXED_AXES]
    if bad:
        raise UserError(f"--base: grid.{bad[0]} varies the geometry or the counts; plan one value at a time "
                        "(a copy of the base study per value)")
    # the study's own sections (grid, points, ladder, ...) are not a trial's: whichever the Study adds
    raw = study.model_dump(mode="python", exclude=set(type(study).model_fields) - set(TrialConfig.model_fields))
    raw["train"].update(steps=1, flops=None)  # a stand-in length: only the geometry is counted here
    return TrialConfig.model_validate(raw)


def _params_of(trial: TrialConfig):
    """size -> parameters of that size in this study (its image size, channels, classes, text geometry)."""
    planned = planned_count(trial)

    def params(size: str) -> int:
        spec = trial.model.model_copy(update={"size": size}).spec()
        return count_trial(trial, planned.num_classes, planned.text, spec).params
    return params


def plan_study(base_raw: dict, points: list[dict], name: str | None,
               ladder: list[float] | None = None) -> tuple[dict, list[str]]:
    """The base study's mapping with its size/length axes replaced by `points:` (the other grid axes
    stay: every point is trained at each of their combinations) and, with `ladder`, its `ladder.budgets`
    replaced. Returns (study, notes)."""
    raw = json.loads(json.dumps(base_raw))  # a deep copy of plain YAML data
    notes = []
    train = raw.setdefault("train", {})
    train.pop("steps", None)
    train.pop("flops", None)
    grid = raw.get("grid") or {}
    dropped = [k for k in grid if k in _PLANNED_AXES]
    kept = {k: v for k, v in grid.items() if k not in _PLANNED_AXES}
    if dropped:
        notes.append(f"the base's grid.{', grid.'.join(dropped)} replaced by the planned points")
    if kept:
        notes.append(f"the base's grid.{', grid.'.join(kept)} kept: every planned point runs at each of their values")
    raw.pop("grid", None)
    if kept:
        raw["grid"] = kept
    if raw.get("exclude"):
        raw["exclude"] = [e for e in raw["exclude"] if not set(e) & _PLANNED_AXES]
        if not raw["exclude"]:
            raw.pop("exclude")
    raw.pop("points", None)
    if name:
        raw["name"] = name
    raw["points"] = points
    if ladder:
        if (raw.get("ladder") or {}).get("budgets"):
            notes.append(f"the base's ladder.budgets {raw['ladder']['budgets']} replaced by --ladder")
        raw["ladder"] = {"budgets": list(ladder)}
    return raw, notes


def _check_base_ladder(raw: dict, budgets: list[float]) -> None:
    """A base ladder kept without --ladder must still lie beyond the planned budgets (one line naming the flag)."""
    kept = (raw.get("ladder") or {}).get("budgets") or []
    low = [c for c in kept if isinstance(c, (int, float)) and c <= max(budgets)]
    if low:
        raise UserError(f"--ladder: the base's ladder.budgets {low[0]:g} is not above the largest --budgets "
                        f"{max(budgets):g}; give --ladder C (above it) to replace the base's ladder")


def wall_seconds(trials: list[TrialConfig], throughput: dict[str, float]) -> tuple[float, float, list]:
    """(seconds of the independent trials, of the WSD-branched plan, models missing from `throughput`),
    one trial after another at the given images/s per trial."""
    def rate(trial):
        return throughput.get(trial.model_name) or throughput.get(str(trial.model.size))

    missing = sorted({t.model_name for t in trials if not rate(t)})
    independent = sum(t.train.steps * t.train.batch_size / rate(t) for t in trials if rate(t))
    trunks, alone = plan_branches(trials)
    branched = sum(t.train.steps * t.train.batch_size / rate(t) for t in alone if rate(t))
    for trunk in trunks:
        r = rate(trunk.trial)
        if r:
            steps = trunk.trial.train.steps + sum(cooldown_steps(b.train) for b in trunk.branches)
            branched += steps * trunk.trial.train.batch_size / r
    return independent, branched, missing


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.3g} h" if seconds >= 3600 else f"{seconds / 60:.3g} min"


def _study_compute(rows: list[dict], trials: list[TrialConfig]) -> tuple[list, float, float]:
    """(WSD trunks, branched GFLOPs, independent GFLOPs) of the planned trials (harness/launch/branches.py)."""
    per_step = {r["trial_id"]: r["train_gflops"] / r["steps"] for r in rows}
    trunks, alone = plan_branches(trials)
    for trunk in trunks:
        per_step[trunk.trial.trial_id] = per_step[trunk.branches[0].trial_id]
    branched, independent = plan_compute(trunks, alone, lambda t: per_step[t.trial_id])
    return trunks, branched, independent


def compute_lines(rows: list[dict], trials: list[TrialConfig], throughput: dict[str, float] | None) -> list[str]:
    """The study's training compute, independent and branched, and its wall time from a throughput."""
    trunks, branched, independent = _study_compute(rows, trials)
    lines = [f"training compute: {independent * 1e9:.4g} FLOPs as independent trials"]
    if trunks:
        lines[0] += (f"; {branched * 1e9:.4g} FLOPs with WSD branches ({len(trunks)} trunk(s), {branched / independent:.0%}"
                     " of independent)")
    else:
        lines[0] += " (no WSD trunks: the base's train.schedule is not wsd, or train.branch is false)"
    if throughput is not None:
        alone_s, branched_s, missing = wall_seconds(trials, throughput)
        line = f"wall time, one trial at a time: {_hours(alone_s)} independent"
        line += f", {_hours(branched_s)} branched" if trunks else ""
        if missing:
            line += f"; no throughput for {', '.join(missing)} (not counted)"
        lines.append(line)
    return lines


def cost_lines(rows: list[dict], trials: list[TrialConfig], ladder: list[float], law: planner.Law) -> list[str]:
    """GPU-hours of the plan on one H100 at a stated MFU (planner.gpu_hours), and what its ladder costs."""
    trunks, branched, independent = _study_compute(rows, trials)
    line = (f"GPU-hours on one H100 at {planner.PLAN_MFU:.0%} MFU of {planner.H100_BF16_DENSE / 1e12:g} TFLOP/s "
            f"(bf16 dense; 2 FLOPs per multiply-add): {planner.gpu_hours(independent * 1e9):.4g} independent")
    if trunks:
        line += f", {planner.gpu_hours(branched * 1e9):.4g} with WSD branches"
    lines = [line + " (a floor: small models reach a lower MFU)"]
    if law.source.startswith(planner.LIANG_SOURCE):
        lines.append("budgets in Liang et al.'s FLOPs (2 x ours): " + ", ".join(
            f"{planner.LIANG_FLOPS_PER_OURS * c:.3g}" for c in sorted({r['budget'] for r in rows} | set(ladder))))
    if ladder:
        top = max(r["budget"] for r in rows)
        each = ", ".join(f"{c:.3g} ({c / top:.3g}x the largest budget; N_opt {law.n_opt(c) / 1e6:.3g}M by the "
                         "centring law)" for c in ladder)
        lines.append(f"ladder: {each}: {sum(ladder):.4g} FLOPs, {planner.gpu_hours(sum(ladder)):.4g} GPU-hours "
                     "more, trained after the grid (its size comes from the grid's fits)")
    return lines


def _law(center: str | None, from_report: str | None, exponent: float, report_group: str | None) -> planner.Law:
    if (center is None) == (from_report is None):
        raise UserError("--center: give --center N@C, --center liang2024 or --from-report DIR (one of them)")
    if center == planner.LIANG_CENTER:
        if exponent != planner.DEFAULT_EXPONENT:
            raise UserError(f"--exponent: --center {planner.LIANG_CENTER} is Liang et al.'s fit, exponent "
                            f"{planner.LIANG_A:g}; give --center N@C to set another")
        return planner.liang_law()
    if center is not None:
        n0, c0 = planner.parse_center(center)
        return planner.Law(n0, c0, exponent, f"--center {center}, --exponent {exponent:g}")
    return planner.law_from_report(from_report, report_group)


def write_plan(base: str, budgets: str, center: str | None, from_report: str | None, exponent: float,
               sizes: int, spread: float, max_epochs: float, throughput: str | None, out: str,
               name: str | None = None, report_group: str | None = None, argv: list[str] | None = None,
               ladder: str | None = None) -> dict:
    """`ditscale plan`: flags checked first (one line each), then the study written to `out` only once it
    loads and its budgets resolve (the file is ordinary: `ditscale sweep OUT` runs it)."""
    budget_list = planner.parse_budgets(budgets)
    ladder_list = planner.parse_ladder(ladder, budget_list) if ladder is not None else []
    planner.check_numbers(exponent, sizes, spread, max_epochs)
    law = _law(center, from_report, exponent, report_group)
    rates = planner.read_throughput(throughput) if throughput else None
    out_path = Path(out)
    if not out_path.parent.is_dir():
        raise UserError(f"--out: folder {out_path.parent} does not exist")
    study = load_study(base, check_files=False)
    trial = _base_trial(study)
    try:
        plans = planner.plan_budgets(law, budget_list, sizes, spread, trial.model.family, _params_of(trial))
    except UserError as err:  # the centre came from the report: name the flag that gave it
        if from_report is None or not str(err).startswith("--center:"):
            raise
        raise UserError("--from-report:" + str(err)[len("--center:"):]) from None
    raw, notes = plan_study(yaml.safe_load(Path(base).read_text()), planner.plan_points(plans), name, ladder_list)
    _check_base_ladder(raw, budget_list)
    ladder_list = list((raw.get("ladder") or {}).get("budgets") or [])
    body = yaml.safe_dump(raw, sort_keys=False, width=110)
    with tempfile.TemporaryDirectory() as scratch:  # the file as written must load and plan before it is kept
        (Path(scratch) / out_path.name).write_text(body)
        try:
            trials = load_trials(Path(scratch) / out_path.name, check_files=False, max_trials=None).trials
        except BudgetError as err:  # a budget too small for a planned size's schedule, ...: one line
            more = f" (and {len(err.problems) - 1} more like it)" if len(err.problems) > 1 else ""
            raise UserError(f"--budgets: a planned trial does not fit the base's train settings: {err.problems[0]}"
                            f"{more}") from None
    rows = plan_rows(trials)
    costs = cost_lines(rows, trials, ladder_list, law)
    atomic_write_text(out_path, _header(argv, law, trial.model.family, sizes, spread,
                                        compute_lines(rows, trials, None) + costs) + body)
    _print_summary(law, plans, notes, rows, trials, rates, max_epochs, out_path, trial.model.family, costs)
    return {"trials": len(trials), "plans": plans, "rows": rows}


def _comment(text: str) -> str:
    """`text` as YAML comment lines within 110 columns."""
    return "".join(f"# {line}\n" for line in textwrap.wrap(text, 108, break_on_hyphens=False))


def _header(argv: list[str] | None, law: planner.Law, family: str, sizes: int, spread: float,
            costs: list[str]) -> str:
    """The plan's comment: how to write it again, where its sizes come from, and what it costs."""
    command = "ditscale plan " + shlex.join(argv) if argv else "ditscale plan"
    lines = textwrap.wrap(f"Written by: {command}", 106, break_on_hyphens=False, break_long_words=False)
    ends = [" \\"] * (len(lines) - 1) + [""]  # shell continuations: the command pastes as one
    return ("".join(f"# {line}{end}\n" for line, end in zip(lines, ends))
            + _comment(f"N_opt(C) from {law.source}; C in training FLOPs as train.flops counts them "
                       "(multiply-adds, 3 x forward x images).")
            + _comment(f"{sizes} sizes per budget, evenly in log N over N_opt/{spread:g} .. N_opt*{spread:g}, "
                       f"snapped to {planner.SHAPE_RULES[family]}.")
            + "".join(_comment(line) for line in costs)
            + "# `points:` lists each planned (model.size, train.flops) pair: `ditscale sweep --dry-run` shows them.\n")


def _print_summary(law, plans, notes, rows, trials, rates, max_epochs, out_path, family, costs=()) -> None:
    print(f"N_opt(C) from {law.source}")
    print(f"sizes snapped to {planner.SHAPE_RULES[family]}")
    for p in plans:
        sizes = ", ".join(f"{s} ({n / 1e6:.3g}M)" for n, s in p.sizes)
        extra = f"; {'; '.join(p.notes)}" if p.notes else ""
        print(f"budget {p.budget:.3g}: N_opt {p.n_opt / 1e6:.3g}M; {p.below} below, {p.above} above: {sizes}{extra}")
    for note in notes:
        print(f"note: {note}")
    print_plan(rows)
    for line in data_lines(trials) + compute_lines(rows, trials, rates) + list(costs):
        print(line)
    for line in planner.epochs_warnings(rows, max_epochs):
        print(f"warning: {line}")
    print(f"wrote {out_path} ({len(rows)} trials): ditscale sweep {shlex.quote(str(out_path))} --dry-run")
