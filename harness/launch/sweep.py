"""`ditscale sweep STUDY`: every grid point as a Ray Tune trial (harness/launch/tune_trial.py); each
trial a Ray Train TorchTrainer whose workers run harness/trial/loop.py's loop on DeepSpeed.

The driver: plan the study (budgets resolved, WSD trunks found; harness/launch/plan.py, branches.py),
validate it, take the study's lock, join or start Ray (harness/launch/local_ray.py), open the sweep's
MLflow parent run, run the trials that train alone and the trunks, then the branches, then (`bracket:`)
add and train sizes beyond the edge where a budget's loss minimum sits (harness/launch/bracket.py), then
(`ladder:`) predict, register and train each ladder trial (harness/launch/ladder.py), close the parent run
and write the report. Trials whose MLflow run says `finished` (or `diverged`) are skipped; the
others resume from the DeepSpeed checkpoint in their trial folder.
"""

from __future__ import annotations

from pathlib import Path

from harness.checks import ema_warnings
from harness.config import MAX_TRIALS, TrialConfig
from harness.launch import bracket
from harness.launch.branches import (
    DIVERGED,
    REWIND,
    Trunk,
    branch_point,
    branch_ready,
    plan_branches,
    plan_compute,
    rewind_trunk,
    trunk_checkpoint,
    trunk_need,
)
from harness.launch.ladder import kept_ladder_lines, ladder_pending, prepare_ladder
from harness.launch.ladder import plan_line as ladder_plan_line
from harness.launch.local_ray import max_concurrent_trials, start_ray, stop_ray
from harness.launch.plan import data_lines, plan_json, plan_output, plan_rows, print_plan
from harness.launch.study_lock import study_lock
from harness.launch.tune_trial import conclude_branch, run_tune_trial, runs_in_process, storage_probe, trial_resources
from harness.paths import checkpoint_root, stop_file
from harness.study import load_trials
from harness.tracking import (
    check_tracking_uri,
    close_parent_run,
    concluded,
    open_parent_run,
    redact,
    redact_uri,
    resolve_tracking_uri,
    sweep_state,
)
from harness.tracking_view import study_link
from harness.trial.checkpoint_files import tag_for
from harness.trial.deepspeed_config import check_deepspeed_configs
from harness.trial.divergence import divergence_step


def run_sweep(config_path: str, overrides: list[str] = (), address: str | None = None, dry_run: bool = False,
              max_concurrent: int | None = None, report: bool = True, max_trials: int | None = MAX_TRIALS,
              as_json: bool = False) -> dict:
    # The shards are checked only when something will train: a dry run plans where the data is not.
    study, trials = load_trials(config_path, overrides, max_trials=max_trials, check_files=not dry_run)
    rows = plan_rows(trials)
    trunks, _ = plan_branches(trials)
    with plan_output(as_json):  # --json: the table goes to stderr, stdout holds only the JSON
        print_plan(rows)
        print_branch_plan(trunks, rows)
        for line in ema_warnings(trials):
            print(f"warning: {line}")
        for line in (bracket.plan_line(study, trials), ladder_plan_line(study, trials)):
            if line:
                print(line)
        for line in data_lines(trials) if dry_run else []:
            print(line)
    if dry_run:
        if as_json:
            print(plan_json(rows))
        return {"planned": len(trials), "ran": 0}
    check_deepspeed_configs(trials)  # DeepSpeed's own config class, before anything starts
    with study_lock(trials[0]):  # one sweep of a study at a time
        return _sweep(study, trials, trunks, address, max_concurrent, report, source=config_path)


def _sweep(study, trials: list[TrialConfig], trunks: list[Trunk], address: str | None, max_concurrent: int | None,
           report: bool, source: str | None = None) -> dict:
    """run_sweep after validation, holding the study's lock. `source`: the study file (the runs' source)."""
    uri = resolve_tracking_uri(study.tracking.uri)
    check_tracking_uri(uri)
    for trial in trials + [trunk.trial for trunk in trunks]:  # workers log where the driver looked
        trial.tracking.uri = uri  # (not into a database in their own folder)
    state = sweep_state(uri, study.name, trials)
    todo = [trial for trial in trials if not concluded(state.get(trial.trial_id, "new"))]
    skipped = len(trials) - len(todo)
    ladder_due = ladder_pending(study, trials, uri)
    records = bracket.load_added(trials[0]) if study.bracket.max_extra_sizes else []
    bracket_due = not todo and _bracket_due(study, trials, records, uri, state)  # with todo, decided after it
    if skipped:
        print(f"{skipped} of {len(trials)} trials already finished or diverged (MLflow says so): skipping them")

    stop = stop_file(trials[0])
    if stop.exists():
        print(f"removing the stop request {stop} left by an earlier invocation")
        stop.unlink()
    parent, statuses, final, ladder_trials = None, {}, state, []
    if todo or ladder_due or bracket_due:  # nothing to train: no Ray, no parent run, nothing written but the report
        parent = open_parent_run(uri, study, trials, source=source)
        probe, started_ray, error = None, False, None
        try:
            probe = storage_probe(trials[0], parent)
            started_ray = start_ray(address, train_workers=any(
                not runs_in_process(t) for t in trials + [trunk.trial for trunk in trunks]))
            if address:  # other machines' nodes: do they see the study's files and reach the tracking server?
                from harness.launch.local_ray import check_shared_files

                check_shared_files(trials[0], probe)
            concurrent = max_concurrent or study.resources.max_concurrent_trials
            statuses = _run_phases(study, todo, trunks, uri, parent, probe, concurrent) if todo else {}
            if study.bracket.max_extra_sizes and not stop.exists():  # after the grid, before the ladder's fits
                records = _bracket_phase(study, trials, records, uri, parent, probe, concurrent, statuses)
            fitted = trials + [t for t, _ in records]  # added sizes are trials of the study: fitted too
            if ladder_due and not stop.exists():  # after the grid: its fits predict the ladder
                from analysis.ladder_fits import grid_fits  # the report's fits: analysis reads MLflow

                ladder_trials = prepare_ladder(study, fitted, uri, parent, sweep_state(uri, study.name, fitted),
                                               grid_fits)
                ladder_todo = [t for t in ladder_trials
                               if not concluded(sweep_state(uri, study.name, [t])[t.trial_id])]
                if ladder_todo:
                    statuses |= _run_tune(study, ladder_todo, parent, probe, concurrent, "ladder")
        except Exception as err:  # the sweep itself failed: its parent run says so (Ctrl-C: KILLED, resumable)
            error = f"{type(err).__name__}: {err}"
            raise
        finally:
            try:
                every = trials + [t for t, _ in records] + ladder_trials
                final = sweep_state(uri, study.name, every)
                close_parent_run(uri, parent, every, final, error=error)
            except Exception as err:  # the store itself is failing: say so, keep the original error
                print(redact(f"could not close the sweep's MLflow run {parent}: {type(err).__name__}: {err}"))
                if error is None:
                    raise
            finally:
                if probe is not None:
                    probe.unlink(missing_ok=True)
                if started_ray:
                    stop_ray()
    else:
        kept_ladder_lines(study, trials)
        if study.bracket.max_extra_sizes:  # why each budget still unbracketed stays so
            added_state = sweep_state(uri, study.name, [t for t, _ in records])
            for line in bracket.plan_round(study, trials, records, uri, state | added_state)[1]:
                print(line)
        print("nothing to train")
    report_path = _write_report(uri, study.name) if report else None
    _print_where_to_look(uri, study.name, trials, report_path)
    unfinished = [tid for tid, s in final.items() if not concluded(s)]
    stopped = stop.exists() and any(final.get(tid) == "killed" for tid in unfinished)
    if stopped:
        print(f"stopped on request ({stop}): run the same command again to resume")
    return {"planned": len(trials), "ran": len(todo), "skipped": skipped, "parent_run_id": parent,
            "failed": [] if stopped else unfinished, "stopped": stopped, "statuses": statuses,
            "report": report_path}


def _print_where_to_look(uri: str, name: str, trials: list[TrialConfig], report_path) -> None:
    """The sweep's last lines: how to open its runs in the MLflow UI, and where its report is."""
    print(f"\nMLflow: mlflow ui --backend-store-uri {redact_uri(uri)} --host 127.0.0.1 --port 5000   "
          f"(experiment {name!r})")
    link = study_link(uri, name, trials)  # saves the runs table's view of the study (tracking_view.py)
    if link:
        print(f"MLflow UI, the study's training runs: {link}")
    if report_path:
        print(f"Report: {report_path}")


def _bracket_due(study, trials: list[TrialConfig], records: list, uri: str, state: dict) -> bool:
    """Whether bracketing has work: an added trial not concluded, or a budget that needs a size added."""
    if not study.bracket.max_extra_sizes:
        return False
    added_state = sweep_state(uri, study.name, [t for t, _ in records])
    if any(not concluded(s) for s in added_state.values()):
        return True
    return bool(bracket.plan_round(study, trials, records, uri, state | added_state)[0])


def _bracket_phase(study, trials: list[TrialConfig], records: list, uri: str, parent_run_id: str, probe: Path,
                   max_concurrent: int | None, statuses: dict) -> list:
    """Rounds of bracketing (harness/launch/bracket.py): train the added trials not concluded (a round's
    additions of one size at several budgets share a WSD trunk, as the grid's do), then decide the next
    round from the final losses; stop when no budget needs a size, or on a stop request. Each round adds at
    most one size per budget, so max_extra_sizes + 1 rounds decide every budget. Returns every addition."""
    said = set()
    bracket.tag_recorded(records, uri, parent_run_id)
    for _ in range(study.bracket.max_extra_sizes + 2):
        for trial, _ in records:
            trial.tracking.uri = uri
        added = [t for t, _ in records]
        state = sweep_state(uri, study.name, trials + added)
        for rnd in sorted({d.get("round", 1) for _, d in records}):
            members = [t for t, d in records if d.get("round", 1) == rnd]
            todo = [t for t in members if not concluded(state[t.trial_id])]
            if todo and not stop_file(study).exists():
                trunks, _ = plan_branches(members)
                for trunk in trunks:
                    trunk.trial.tracking.uri = uri
                statuses |= _run_phases(study, todo, trunks, uri, parent_run_id, probe, max_concurrent)
        if stop_file(study).exists():
            break
        state = sweep_state(uri, study.name, trials + added)
        new, lines = bracket.plan_round(study, trials, records, uri, state)
        for line in lines:
            if line not in said:  # a budget left unbracketed says so once
                print(line)
                said.add(line)
        new = bracket.record_additions(new, uri, parent_run_id)
        if not new:
            break
        records = records + new
    return records


def print_branch_plan(trunks: list[Trunk], rows: list[dict]) -> None:
    """How many trunks serve how many branches, and what branching saves (training compute)."""
    if not trunks:
        return
    per_image = {r["trial_id"]: r["train_gflops"] / r["images"] for r in rows}
    for trunk in trunks:  # the trunk is its branches' model
        per_image[trunk.trial.trial_id] = per_image[trunk.branches[0].trial_id]
    branched, independent = plan_compute(trunks, [], lambda trial: per_image[trial.trial_id] * trial.train.batch_size)
    branches = sum(len(trunk.branches) for trunk in trunks)
    print(f"WSD branches: {len(trunks)} trunk(s) serve {branches} trials; their training compute "
          f"{branched:.4g} GFLOPs branched vs {independent:.4g} GFLOPs trained independently "
          f"({branched / independent:.0%}); train.branch: false trains them independently.")


def _run_phases(study, todo: list[TrialConfig], trunks: list[Trunk], uri: str, parent_run_id: str, probe: Path,
                max_concurrent: int | None) -> dict:
    """First the trials that train alone and the trunks that unfinished branches need, then the
    branches (each starts from its trunk's checkpoint; harness/launch/branches.py).

    A trunk is trained when it has not concluded, and trained again (once per sweep) when a branch's
    checkpoint is gone (a deleted folder) and the trunk passed that branch point in health (it finished,
    or diverged only later): rewind_trunk, branches.trunk_need. Branches that still cannot start are
    settled without Ray (settle_branches): `diverged (trunk <id>)` when the trunk diverged at or before
    their branch point, else failed with one line naming the trunk's folder."""
    trunk_of = {b.trial_id: trunk.trial for trunk in trunks for b in trunk.branches}
    branches = [t for t in todo if t.trial_id in trunk_of]
    needed = {trunk_of[b.trial_id].trial_id: trunk_of[b.trial_id] for b in branches}
    trunk_state = sweep_state(uri, study.name, list(needed.values()))
    retrained = _trunks_to_retrain(branches, trunk_of, trunk_state)
    first = [t for t in todo if t.trial_id not in trunk_of]
    first += [t for tid, t in needed.items() if not concluded(trunk_state[tid]) or tid in retrained]
    roles = {tid: {"role": "trunk"} for tid in needed}
    statuses = _run_tune(study, first, parent_run_id, probe, max_concurrent, "sweep", roles) if first else {}
    if branches and not stop_file(study).exists():
        trunk_state = sweep_state(uri, study.name, list(needed.values()))
        branches, settled = settle_branches(branches, trunk_of, trunk_state, retrained, uri, parent_run_id)
        statuses |= settled
        links = {b.trial_id: {"trunk": trunk_of[b.trial_id].model_dump(mode="json")} for b in branches}
        if branches:
            statuses |= _run_tune(study, branches, parent_run_id, probe, max_concurrent, "branches", links)
    return statuses


def _trunks_to_retrain(branches: list[TrialConfig], trunk_of: dict, trunk_state: dict) -> set[str]:
    """Concluded trunks that a branch still needs but whose checkpoint at its branch point is gone, and
    that passed that point in health (finished, or diverged at a later step: branches.trunk_need): each
    is rewound to train again through the earliest missing branch point. A trunk that diverged at or
    before the branch point is not (its branches conclude as diverged)."""
    missing: dict[str, int] = {}
    for b in branches:
        trunk = trunk_of[b.trial_id]
        if trunk_need(trunk_state[trunk.trial_id], branch_point(b), branch_ready(trunk, b)) == REWIND:
            missing[trunk.trial_id] = min(missing.get(trunk.trial_id, branch_point(b)), branch_point(b))
    for tid, step in missing.items():
        trunk = next(t for t in trunk_of.values() if t.trial_id == tid)
        tag = rewind_trunk(trunk, step)
        gone = checkpoint_root(trunk) / tag_for(step)
        diverged = divergence_step(trunk_state[tid])
        why = f" (it diverged only at step {diverged}, after it)" if diverged is not None else ""
        print(f"trunk {tid}: its checkpoint at step {step} is gone ({gone}){why}; training it again from "
              f"{tag or 'the start'}")
    return set(missing)


def settle_branches(branches: list[TrialConfig], trunk_of: dict, trunk_state: dict, retrained: set[str], uri: str,
                    parent_run_id: str | None) -> tuple[list[TrialConfig], dict]:
    """(branches that can start, {trial_id: status} of those that cannot, recorded in their MLflow runs):
    `diverged (trunk <id>)` when the trunk diverged at or before their branch point (a concluded status,
    not an error; branches.trunk_need), else `failed: ...` in one line naming the checkpoint and the
    trunk's trial folder."""
    ready, settled = [], {}
    for b in branches:
        trunk = trunk_of[b.trial_id]
        if branch_ready(trunk, b):
            ready.append(b)
            continue
        state = trunk_state.get(trunk.trial_id, "new")
        if trunk_need(state, branch_point(b), False) == DIVERGED:
            status = f"diverged (trunk {trunk.trial_id})"
        else:
            again = " after training it again" if trunk.trial_id in retrained else ""
            status = (f"failed: its trunk's checkpoint {trunk_checkpoint(trunk, b)} is missing{again} (trunk "
                      f"{trunk.trial_id}: {state.splitlines()[0] if state else 'new'}); see the trunk's folder "
                      f"{trunk_checkpoint(trunk, b).parent.parent}")
        conclude_branch(b, trunk, uri, parent_run_id, status)
        print(f"branch {b.trial_id} ({b.model_name}, {b.train.steps} steps): {status}")
        settled[b.trial_id] = status
    return ready, settled


def _run_tune(study, todo: list[TrialConfig], parent_run_id: str, probe: Path, max_concurrent: int | None,
              phase: str = "sweep", links: dict | None = None) -> dict:
    """One Tune experiment over `todo`. links {trial_id: {"role": "trunk"} | {"trunk": trunk config}}."""
    from ray import tune
    from ray.tune.logger import JsonLoggerCallback

    concurrent = max_concurrent_trials(todo, max_concurrent)
    # Tune's table shows the search space: the trial id there, the whole trial config passed beside it.
    trials = {trial.trial_id: trial.model_dump(mode="json") for trial in todo}
    names = {trial.trial_id: f"{trial.model_name.replace('/', '_')}-{trial.trial_id[:6]}" for trial in todo}
    space = {"trial_id": tune.grid_search(list(trials)), "parent_run_id": parent_run_id,
             "storage_probe": str(probe)}
    by_id = {trial.trial_id: trial for trial in todo}
    trainable = tune.with_resources(tune.with_parameters(run_tune_trial, trials=trials, links=links or {}),
                                    lambda config: trial_resources(by_id[config["trial_id"]]))
    tuner = tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(max_concurrent_trials=concurrent, reuse_actors=True,
                                    trial_name_creator=lambda t: names[t.config["trial_id"]],
                                    trial_dirname_creator=lambda t: names[t.config["trial_id"]]),
        run_config=tune.RunConfig(
            name=f"{study.name}-{phase}",
            storage_path=str(Path(study.resources.storage).resolve() / "_ray"),
            failure_config=tune.FailureConfig(max_failures=study.resources.max_failures),
            verbose=1,
            # The automatic loggers are off (local_ray._RAY_TRAIN_ENV); Tune's result grid reads each
            # trial's result.json at the end, and says it failed to fetch the metrics without it.
            callbacks=[JsonLoggerCallback()],
        ),
    )
    results = tuner.fit()
    return {r.config["trial_id"]: ("error" if r.error else "ok") for r in results}


def _write_report(uri: str, experiment: str):
    """Every trial of the study (the newest run of each, whichever invocation trained it); the report
    is logged to the newest sweep parent run."""
    from analysis.report import build_report

    return build_report(uri, experiment)
