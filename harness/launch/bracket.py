"""Bracketing while the study runs (issue 27 item 2): `bracket: {max_extra_sizes: K}` in a study.

When every trial of an isoFLOP budget has concluded and the budget's final val_loss, over its sizes, is
lowest at its smallest or largest size, the budget's optimum is not bracketed: its isoFLOP parabola is then
an extrapolation, and Czech et al. 2026 (arXiv 2603.22339) showed an off-centre size grid biases the fitted
optimum. The sweep then adds the next size beyond that edge and trains it, and repeats until the minimum sits
inside the budget's sizes or K sizes were added to that budget.

The next size: one step of the budget's own log spacing beyond the edge (the geometric mean ratio of
neighbouring sizes, (N_max / N_min)^(1 / (sizes - 1))), snapped in log N to the nearest geometry of the
family under `ditscale plan`'s shape rule (harness/launch/planner.py) that lies beyond the edge and that the
budget has not trained. No such geometry (e.g. the minimum at DiT-d1w32, the smallest DiT): one line, and
the budget stays unbracketed — the report flags it and leaves it out of N_opt(C), as for any grid.

An added size is an ordinary trial of the study: the budget's trial with model.size changed (one per
train.seed the budget has), trained through the sweep's phases (a WSD branch when two or more budgets add
the same size in one round, so a trunk serves them; else standalone). Each is recorded before it trains in
runs/<study>/bracket/<trial_id>.json (created exclusively) and its MLflow run tagged ditscale.added_by=bracket
with ditscale.added_why, e.g. "minimum at the largest size d2w64 at 1.5e+11". A re-run sweep reads the
records, resumes what did not finish, and never adds a trial id twice; decisions are recomputed from MLflow,
so the same losses give the same sizes.

A budget: trials equal in everything but model.size and train.seed (seeds are averaged); its sizes'
parameter counts come from the planner's counter, as the geometries' do.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from harness.checks import check_trial
from harness.config import StudyError, TrialConfig
from harness.credentials import public_config
from harness.files import write_once
from harness.paths import study_dir
from harness.study import resolve_budgets

ADDED_BY_TAG = "ditscale.added_by"
ADDED_WHY_TAG = "ditscale.added_why"
ADDED_BY = "bracket"
FOLDER = "bracket"               # runs/<study>/bracket/<trial_id>.json
LOSS_KEY = "val_loss"            # the final validation loss, as the report's fits use it


# --- the decision (pure) --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """What a budget needs: action "inside" (bracketed), "add" (params, size: the next size), "limit"
    (bracket.max_extra_sizes reached), "none_left" (no geometry beyond the edge) or "too_few" (< 2 sizes).
    line: one sentence (for "add", the reason tagged on the added trial)."""

    action: str
    line: str
    params: int | None = None
    size: str | None = None
    edge: str | None = None      # "smallest" | "largest": the edge the minimum sits at


def log_spacing(params: list[float]) -> float:
    """The ratio between neighbouring sizes, on average in log N: (max / min)^(1 / (n - 1))."""
    lo, hi = min(params), max(params)
    return (hi / lo) ** (1 / (len(params) - 1)) if len(params) > 1 and hi > lo else 2.0


def next_size(points: list[tuple[float, str, float]], geometries: list[tuple[int, str]], added: int, limit: int,
              budget: float, rule: str = "the family's shape rule") -> Step:
    """points: (params, size, mean final loss) of a budget's sizes; geometries: (params, size) of the
    family; added: sizes already added to this budget. See the module docstring."""
    pts = sorted(points)
    if len(pts) < 2:
        return Step("too_few", f"budget {budget:.3g}: {len(pts)} size(s) with a final {LOSS_KEY}: nothing to bracket")
    best = min(range(len(pts)), key=lambda i: pts[i][2])
    if 0 < best < len(pts) - 1:
        return Step("inside", f"budget {budget:.3g}: minimum at {pts[best][1]}, inside its sizes")
    below = best == 0
    where = f"minimum at the {'smallest' if below else 'largest'} size {pts[best][1]} at {budget:.3g}"
    if added >= limit:
        return Step("limit", f"budget {budget:.3g}: {where} after {added} added size(s) (bracket.max_extra_sizes = "
                             f"{limit}): left unbracketed; the report flags it")
    ratio = log_spacing([p for p, _, _ in pts])
    target = pts[0][0] / ratio if below else pts[-1][0] * ratio
    used = {s for _, s, _ in pts}
    beyond = [g for g in geometries if g[1] not in used and (g[0] < pts[0][0] if below else g[0] > pts[-1][0])]
    if not beyond:
        return Step("none_left", f"budget {budget:.3g}: {where}, and no {'smaller' if below else 'larger'} geometry "
                                 f"is left ({rule}): left unbracketed; the report flags it")
    params, size = min(beyond, key=lambda g: (abs(math.log(g[0] / target)), g[0]))
    return Step("add", where, int(params), size, "smallest" if below else "largest")


# --- the budgets of a study -----------------------------------------------------------------------------


def budget_key(trial: TrialConfig) -> str:
    """Trials of one budget: equal in everything but model.size and train.seed (identity() leaves out the
    step count of a train.flops trial)."""
    identity = trial.identity()
    identity["model"] = {k: v for k, v in identity["model"].items() if k != "size"}
    identity["train"] = {k: v for k, v in identity["train"].items() if k not in ("seed", "steps")}
    return json.dumps(identity, sort_keys=True)


def final_losses(uri: str, experiment: str) -> dict[str, float]:
    """trial_id -> the final val_loss of its newest run, for runs that finished (diverged and failed trials
    are left out, as the report's fits leave them out)."""
    from harness.tracking import STATUS_TAG, TRIAL_ID_TAG, client

    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return {}
    out: dict[str, float] = {}
    runs = c.search_runs([exp.experiment_id], filter_string=f"tags.{TRIAL_ID_TAG} != ''",
                         order_by=["attributes.start_time ASC"], max_results=50000)
    for run in runs:  # oldest first: the newest run of a trial wins
        tid, loss = run.data.tags[TRIAL_ID_TAG], run.data.metrics.get(LOSS_KEY)
        ok = run.data.tags.get(STATUS_TAG) == "finished" and loss is not None and math.isfinite(loss)
        if ok:
            out[tid] = float(loss)
        else:
            out.pop(tid, None)
    return out


def _geometries(base: TrialConfig, up_to: float, counter) -> list[tuple[int, str]]:
    from harness.launch import planner

    return planner.LADDERS[base.model.family](counter, up_to)


def _counter(base: TrialConfig):
    from harness.launch.plan import _params_of

    count, cache = _params_of(base), {}

    def params(size: str) -> int:
        if size not in cache:
            cache[size] = count(size)
        return cache[size]
    return params


def plan_round(study, trials: list[TrialConfig], records: list[tuple[TrialConfig, dict]], uri: str,
               state: dict[str, str]) -> tuple[list[tuple[TrialConfig, dict]], list[str]]:
    """The next round of additions, without writing anything: ([(trial, record)], lines for budgets that stay
    unbracketed or wait). records: the additions so far (load_added); state: trial_id -> status
    (harness.tracking.sweep_state) of the grid's and the added trials."""
    from harness.launch.planner import SHAPE_RULES
    from harness.tracking import concluded

    limit = study.bracket.max_extra_sizes
    if not limit or not trials:
        return [], []
    added = [t for t, _ in records]
    open_ = [t.trial_id for t in trials + added if not concluded(state.get(t.trial_id, "new"))]
    if open_:
        return [], [f"bracket: {len(open_)} trial(s) not concluded; budgets are bracketed once all have"]
    losses = final_losses(uri, study.name)
    rounds = {t.trial_id: int(d.get("round", 1)) for t, d in records}
    groups: dict[str, list[TrialConfig]] = {}
    for t in trials + added:
        groups.setdefault(budget_key(t), []).append(t)
    out, lines = [], []
    for members in groups.values():
        base = members[0]
        count = _counter(base)
        by_size: dict[str, list[float]] = {}
        for m in members:
            if m.trial_id in losses:
                by_size.setdefault(m.model.size, []).append(losses[m.trial_id])
        points = [(count(s), s, sum(v) / len(v)) for s, v in by_size.items()]
        n_added = len({m.model.size for m in members if m.trial_id in rounds})
        reach = max(p for p, _, _ in points) * log_spacing([p for p, _, _ in points]) ** 2 if points else 0
        geoms = _geometries(base, reach, count) if len(points) >= 2 else []
        geoms = [g for g in geoms if g[1] not in {m.model.size for m in members}]  # trained, even if diverged
        step = next_size(points, geoms, n_added, limit, base.train.flops, SHAPE_RULES.get(base.model.family, ""))
        if step.action in ("limit", "none_left", "too_few"):
            lines.append(f"bracket: {step.line}")
        if step.action != "add":
            continue
        rnd = 1 + max((rounds[m.trial_id] for m in members if m.trial_id in rounds), default=0)
        for seed_member in {m.train.seed: m for m in members}.values():
            trial = added_trial(seed_member, step.size)
            out.append((trial, {"trial_id": trial.trial_id, "budget": float(base.train.flops), "size": step.size,
                                "params": step.params, "reason": step.line, "round": rnd,
                                "edge": step.edge,
                                "trial": public_config(trial.model_dump(mode="json"))}))
    return out, lines


def added_trial(member: TrialConfig, size: str) -> TrialConfig:
    """The budget's trial with model.size = `size`, its steps resolved from train.flops as the grid's are."""
    raw = member.model_dump(mode="python")
    raw["model"]["size"] = size
    raw["train"]["steps"] = None
    trial = TrialConfig.model_validate(raw)
    problems = check_trial(trial, check_files=False)
    if problems:
        raise StudyError([f"bracket.max_extra_sizes: adding {trial.model_name} at {member.train.flops:.3g}: {p}"
                          for p in problems])
    return resolve_budgets([trial])[0]


# --- records ----------------------------------------------------------------------------------------


def bracket_folder(trial: TrialConfig) -> Path:
    return study_dir(trial.resources.storage, trial.name) / FOLDER


def load_added(base: TrialConfig) -> list[tuple[TrialConfig, dict]]:
    """The trials bracketing added in earlier rounds or sweeps (their records), oldest round first."""
    from harness.errors import UserError

    folder = bracket_folder(base)
    found = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            data = json.loads(path.read_text())
            trial = TrialConfig.model_validate(data["trial"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise UserError(f"bracket.max_extra_sizes: the record {path} is unreadable ({err}); move it away to "
                            "let the sweep decide that budget again") from None
        found.append((trial, data))
    return sorted(found, key=lambda x: (x[1].get("round", 1), x[1].get("budget", 0), x[0].trial_id))


def write_record(folder: Path, data: dict) -> bool:
    """<folder>/<trial_id>.json, created exclusively; False when it exists (that trial is added already)."""
    folder.mkdir(parents=True, exist_ok=True)
    return write_once(folder / f"{data['trial_id']}.json", json.dumps(data, indent=1))


def _tag_run(trial: TrialConfig, data: dict, uri: str, parent_run_id: str | None) -> None:
    """Open (or find) the addition's MLflow run and tag it ditscale.added_by / added_why: before it trains,
    and for a run that already concluded under this trial id, only the tags."""
    from harness.tracking import client, concluded, experiment_id, find_trial_run, open_trial_run, sweep_state

    tags = {ADDED_BY_TAG: ADDED_BY, ADDED_WHY_TAG: data["reason"]}
    if concluded(sweep_state(uri, trial.name, [trial])[trial.trial_id]):
        run_id = find_trial_run(uri, experiment_id(uri, trial.name), trial.trial_id).info.run_id
    else:
        run_id = open_trial_run(trial, uri, parent_run_id=parent_run_id, tags=tags)
    for k, v in tags.items():
        client(uri).set_tag(run_id, k, v)


def record_additions(new: list[tuple[TrialConfig, dict]], uri: str, parent_run_id: str | None,
                     say=print) -> list[tuple[TrialConfig, dict]]:
    """Write each addition's record and tag its MLflow run (opened now, before it trains; a run that already
    concluded under this trial id is only tagged). Returns the additions newly recorded."""
    out = []
    for trial, data in new:
        trial.tracking.uri = uri
        if not write_record(bracket_folder(trial), data):
            continue
        _tag_run(trial, data, uri, parent_run_id)
        say(f"bracket: {data['reason']}: adding {trial.model_name} ({data['params']:,} parameters, "
            f"{trial.train.steps} steps), trial {trial.trial_id}, round {data['round']}")
        out.append((trial, data))
    return out


def tag_recorded(records: list[tuple[TrialConfig, dict]], uri: str, parent_run_id: str | None) -> None:
    """Tag the run of every recorded addition that lacks its tags: a sweep that died between writing a
    record and tagging its run would otherwise leave it out of the report's "Sizes added" table for good."""
    from harness.tracking import experiment_id, find_trial_run

    for trial, data in records:
        trial.tracking.uri = uri
        run = find_trial_run(uri, experiment_id(uri, trial.name), trial.trial_id)
        if run is None or run.data.tags.get(ADDED_BY_TAG) != ADDED_BY:
            _tag_run(trial, data, uri, parent_run_id)


def plan_line(study, trials: list[TrialConfig]) -> str | None:
    """The dry run's line: bracketing decides after the grid, so its trials are not in the table."""
    k = study.bracket.max_extra_sizes
    if not k or not trials:
        return None
    return (f"bracket: up to {k} size(s) per budget may be added after the grid, beyond the edge where a budget's "
            f"{LOSS_KEY} minimum sits (not in the table above: decided from the trained losses)")
