"""The pre-registered ladder run (issue 27 item 3): after a study's isoFLOP grid is trained and fitted,
each `ladder.budgets` entry is predicted, registered, and only then trained.

Per ladder budget C (training FLOPs, multiply-adds, as `train.flops` counts them):
  1. fit the grid as the report does (analysis.runs for the trials; analysis.scaling for the fits):
     approach 2, isoFLOP parabolas -> N_opt(C) = k·C^a and L_opt(C) (analysis/scaling/isoflop.py), and
     approach 3, the loss surface L(N, D) (analysis/scaling/surface.py), each with its bootstrap interval;
  2. snap the compute-optimal N (approach 3 when its surface is fitted, else approach 2) to the nearest
     geometry of the study's family under `ditscale plan`'s shape rule (harness/launch/planner.py), and
     state what the snap costs: the surface's loss at (N_snap, D = C / (k · N_snap)) minus at N_opt;
  3. predict the final validation loss with a 95 % interval (the surface's bootstrap band at the snapped
     geometry, else approach 2's L_opt(C)), and the FD through the fitted loss -> FD relation when the grid
     logged an FD;
  4. register: write runs/<study>/ladder/<trial_id>.json (created exclusively, never overwritten) and log the
     prediction to the ladder trial's MLflow run (tag ditscale.role=ladder; metrics prediction_loss,
     prediction_loss_lo, prediction_loss_hi; the whole registration as ladder_prediction.json) — before the
     trial trains a step. The sweep then trains it as an ordinary trial.

Why pre-registration: a law is worth what it predicts beyond the runs it was fitted on (Liang et al. 2024,
arXiv 2410.08184, checked their DiT law ~250x beyond the fit); the prediction must be fixed, with a
timestamp, before the outcome exists. A registration is found again by its budget: a later sweep or report
that refits keeps it and says so.
"""

from __future__ import annotations

import datetime as _dt
import errno
import json
import math
from pathlib import Path

from harness.checks import check_trial
from harness.config import StudyError, TrialConfig
from harness.credentials import public_config
from harness.errors import UserError
from harness.files import write_once
from harness.paths import study_dir
from harness.study import resolve_budgets

ROLE = "ladder"                  # the value of ditscale.role (harness.tracking.ROLE_TAG) on a ladder run
FOLDER = "ladder"                # runs/<study>/ladder/<trial_id>.json
ARTIFACT = "ladder_prediction.json"
PREDICTION_METRICS = ("prediction_loss", "prediction_loss_lo", "prediction_loss_hi")
LOSS_KEY = "val_loss"            # the loss predicted: the final validation loss (as analysis.ladder_fits fits it)


# --- where a registration lives ----------------------------------------------------------------------


def ladder_folder(trial: TrialConfig) -> Path:
    return study_dir(trial.resources.storage, trial.name) / FOLDER


def find_registration(folder: Path, budget: float) -> tuple[Path, dict] | None:
    """The registration of `budget` in `folder` (matched to 1e-9 relative), or None. An unreadable file is
    an error naming it: a registration is never silently replaced."""
    if not folder.is_dir():
        return None
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise UserError(f"ladder.budgets: the registration {path} is unreadable ({err}); a registered "
                            "prediction is never rewritten: move it away to predict that budget again") from None
        if isinstance(data, dict) and _same_budget(data.get("budget"), budget):
            return path, data
    return None


def _same_budget(a, b) -> bool:
    return isinstance(a, (int, float)) and math.isclose(float(a), float(b), rel_tol=1e-9)


def write_registration(folder: Path, data: dict) -> Path:
    """<folder>/<trial_id>.json, created exclusively (O_EXCL): an existing file is never overwritten."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{data['trial_id']}.json"
    if not write_once(path, json.dumps(data, indent=1, default=_json_default)):
        raise FileExistsError(errno.EEXIST, "a ladder registration is never overwritten", str(path))
    return path


def _json_default(v):
    if hasattr(v, "item"):  # numpy scalars
        return v.item()
    if isinstance(v, tuple):
        return list(v)
    raise TypeError(f"not JSON: {type(v).__name__}")


# --- the prediction ------------------------------------------------------------------------------------


def snap(n_target: float, geometries: list[tuple[int, str]]) -> tuple[int, str]:
    """The geometry nearest to n_target in log N (the planner's snapping rule). N_opt = 0 — a surface whose
    N term is flat (α at its bound), so smaller is always better at this budget — is the smallest geometry."""
    if not geometries or not math.isfinite(n_target) or n_target < 0:
        raise ValueError(f"cannot snap N = {n_target!r} to {len(geometries)} geometries")
    if n_target == 0:
        return min(geometries)
    return min(geometries, key=lambda g: abs(math.log(g[0] / n_target)))


def _finite(v) -> float | None:
    return float(v) if v is not None and math.isfinite(float(v)) else None


def _clean(v):
    """JSON-safe: non-finite floats as null (a degenerate fit's inf), tuples as lists, numpy as Python."""
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _ci(ci) -> list[float] | None:
    return [float(ci[0]), float(ci[1])] if ci is not None and all(math.isfinite(float(v)) for v in ci) else None


def _approach2(iso, c: float) -> dict:
    """N_opt(C) and L_opt(C) of the isoFLOP laws at compute c (GFLOPs), with their bootstrap bands."""
    import numpy as np

    out: dict = {"n_opt": None, "n_opt_ci": None, "loss": None, "loss_ci": None, "why_not": None}
    if iso is None or iso.n_opt_fit is None or not iso.n_opt_fit.ok:
        out["why_not"] = "; ".join(iso.notes) if iso is not None and iso.notes else "N_opt(C) is not fitted"
        return out
    out["n_opt"] = float(iso.n_opt_fit.predict(c))
    lo, hi = iso.n_opt_fit.band(np.array([c]))
    out["n_opt_ci"] = _ci((lo[0], hi[0]))
    if iso.l_opt_fit is not None and iso.l_opt_fit.ok:
        out["loss"] = float(iso.l_opt_fit.predict(c))
        lo, hi = iso.l_opt_fit.band(np.array([c]))
        out["loss_ci"] = _ci((lo[0], hi[0]))
    return out


def _approach3(surf, c: float, k: float) -> dict:
    out: dict = {"n_opt": None, "n_opt_ci": None, "d_opt": None, "loss": None, "loss_ci": None,
                 "law": surf.describe() if surf is not None else None, "identified": False, "why_not": None}
    if surf is None or not surf.ok:
        out["why_not"] = surf.warning if surf is not None else "no surface"
        return out
    a = surf.allocation(c)
    out.update(n_opt=a["n_opt"], n_opt_ci=_ci(a["n_opt_ci"]), d_opt=_finite(a["d_opt"]), loss=_finite(a["loss_opt"]),
               loss_ci=_ci(a["loss_opt_ci"]), identified=surf.identified,
               why_not="; ".join(surf.identification()) or None)
    return out


def _surface_at(surf, n: float, d: float) -> tuple[float, list[float] | None]:
    lo, hi = surf.band(n, d)
    return float(surf.predict(n, d)), _ci((float(lo), float(hi)))


def predict(fits: dict, budget: float, geometries_of) -> dict:
    """The registration's numbers for a ladder budget (FLOPs): both approaches' N_opt and loss with their
    intervals, the snapped geometry and its effect, the predicted loss with its interval, and the FD.
    geometries_of(up_to) -> [(params, size)] of the family (see geometries). Raises UserError naming
    ladder.budgets when neither approach gives a size."""
    c = budget / 1e9  # the fits' compute is train_gflops (GFLOPs); train.flops counts FLOPs
    rows, k = fits["rows"], fits["k"]
    a2, a3 = _approach2(fits["isoflop"], c), _approach3(fits["surface"], c, k)
    if a3["n_opt"] is not None and math.isfinite(a3["n_opt"]) and a3["n_opt"] >= 0:
        target, source = a3["n_opt"], "approach 3 (loss surface)"
    elif a2["n_opt"] is not None:
        target, source = a2["n_opt"], "approach 2 (isoFLOP parabolas)"
    else:
        raise UserError(f"ladder.budgets: {budget:.3g} cannot be predicted: neither fit gives N_opt (surface: "
                        f"{a3['why_not']}; isoFLOP: {a2['why_not']}); the ladder run is not trained unregistered")
    geoms, up_to = [], max(4 * target, 1e4)  # room above the target for its nearest neighbour
    while not geoms and up_to < 1e15:  # a target below the family's smallest geometry: reach up to it
        geoms, up_to = geometries_of(up_to), up_to * 4
    params, size = snap(target, geoms)
    largest = float(rows["budget"].astype(float).max())
    out = {"budget": float(budget), "compute_gflops": c, "largest_fitted_budget": largest,
           "ratio": float(budget) / largest, "n_fitted_trials": len(rows), "k": k,
           "approach2": a2, "approach3": a3,
           "snap": {"target_n": target, "from": source, "size": size, "params": int(params),
                    "ratio": params / target if target > 0 else None,
                    "d": c / (k * params) if math.isfinite(k) else None}}
    surf = fits["surface"]
    if source.startswith("approach 3") and out["snap"]["d"]:
        loss, ci = _surface_at(surf, params, out["snap"]["d"])
        out["snap"]["loss_at_snap"], out["snap"]["loss_at_n_opt"] = loss, a3["loss"]
        out["snap"]["effect"] = loss - a3["loss"] if a3["loss"] is not None else None
        if a3["loss"] is None:
            out["snap"]["note"] = (f"the surface's N_opt ({target:.3g}) lies outside the family's geometries, where "
                                   "its loss is not finite: the snap's effect is not a number")
        out["prediction"] = {"loss": loss, "lo": ci[0] if ci else None, "hi": ci[1] if ci else None,
                             "method": "approach 3: the surface's L at the snapped N and D = C / (k·N)"}
    else:
        out["snap"]["effect"] = None
        out["snap"]["note"] = "no loss surface: the snap's effect on the loss is not predicted"
        out["prediction"] = {"loss": a2["loss"], "lo": (a2["loss_ci"] or [None])[0],
                             "hi": (a2["loss_ci"] or [None, None])[1],
                             "method": "approach 2: L_opt(C) at N_opt (the snap's effect not included)"}
    if out["prediction"]["loss"] is None:
        raise UserError(f"ladder.budgets: {budget:.3g}: no loss prediction (surface: {a3['why_not']}; L_opt(C) "
                        "not fitted); the ladder run is not trained unregistered")
    out["fd"] = _fd(fits, out["prediction"])
    return _clean(out)


def _fd(fits: dict, pred: dict) -> dict:
    rel = fits.get("loss_fd")
    if rel is None or not rel.ok:
        return {"key": None, "note": "none: the grid has no fitted loss → FD relation (no FD logged, or fewer "
                                     "than 3 trials with one)"}
    import numpy as np

    vals = [float(rel.predict(pred["loss"]))]
    for x in [pred["loss"], pred["lo"], pred["hi"]]:
        if x is not None:
            lo, hi = rel.band(np.array([x]))
            vals += [float(v) for v in (lo[0], hi[0]) if np.isfinite(v)]
    return {"key": fits["fd_key"], "fd": vals[0], "lo": min(vals), "hi": max(vals),
            "note": f"through {fits['fd_key']} = k · loss^a fitted across the grid's trials"}


# --- the ladder trial ----------------------------------------------------------------------------------


def ladder_trial(base: TrialConfig, size: str, budget: float) -> TrialConfig:
    """An ordinary trial: the grid's settings with model.size = the snapped geometry and train.flops = the
    ladder budget (steps resolved from it, as for the grid's trials)."""
    raw = base.model_dump(mode="python")
    raw["model"]["size"] = size
    raw["train"].update(flops=float(budget), steps=None, save_at=[])
    trial = TrialConfig.model_validate(raw)
    problems = check_trial(trial, check_files=False)  # as load_study checks the grid's: before the steps
    if problems:
        raise StudyError([f"ladder.budgets: {budget:.3g}: {p}" for p in problems])
    return resolve_budgets([trial])[0]


def geometries(base: TrialConfig, up_to: float) -> list[tuple[int, str]]:
    """(params, size) of the family's geometries up to ~up_to parameters (`ditscale plan`'s shape rule)."""
    from harness.launch import planner
    from harness.launch.plan import _params_of

    return planner.LADDERS[base.model.family](_params_of(base), up_to)


# --- registration ----------------------------------------------------------------------------------------


def log_registration(uri: str, trial: TrialConfig, parent_run_id: str | None, data: dict) -> str:
    """The ladder trial's MLflow run, opened (or found by trial_id) with ditscale.role=ladder, and the
    prediction logged to it unless it already holds one (a registration is never rewritten)."""
    from mlflow.entities import Metric

    from harness.tracking import ROLE_TAG, client, open_trial_run

    run_id = open_trial_run(trial, uri, parent_run_id=parent_run_id, tags={ROLE_TAG: ROLE})
    c = client(uri)
    c.set_tag(run_id, ROLE_TAG, ROLE)
    if PREDICTION_METRICS[0] in c.get_run(run_id).data.metrics:
        return run_id
    now = int(_dt.datetime.now(_dt.timezone.utc).timestamp() * 1000)
    pred = data["prediction"]
    values = {"prediction_loss": pred["loss"], "prediction_loss_lo": pred["lo"], "prediction_loss_hi": pred["hi"],
              "prediction_params": data["snap"]["params"], "prediction_budget_ratio": data["ratio"]}
    c.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in values.items() if v is not None])
    c.log_dict(run_id, data, ARTIFACT)
    return run_id


def settings_source(fits: dict, grid: list[TrialConfig], default: TrialConfig) -> TrialConfig:
    """The grid trial whose settings (learning rate, ...) the ladder trial copies: the lowest-loss fitted
    row at the largest fitted budget. The fits keep only each (budget, size)'s best LR (analysis.study.
    budget_rows), so the prediction is a loss at a tuned LR; training the ladder at the first grid trial's
    LR instead would make its error measure the LR choice, not the law."""
    rows = fits.get("rows")
    if rows is None or len(rows) == 0:
        return default
    budgets = rows["budget"].astype(float)  # train.flops as logged: a param, so text
    top = rows[budgets == budgets.max()]
    best = str(top.loc[top["loss"].idxmin(), "trial_id"])
    return next((t for t in grid if t.trial_id == best), default)


def register(study, base: TrialConfig, uri: str, parent_run_id: str | None, fits_of, budget: float,
             say=print, grid: list[TrialConfig] | None = None) -> TrialConfig:
    """The ladder trial of `budget`, registered: an existing registration is kept (one line says so),
    else the grid is fitted (fits_of(), cached by the caller), predicted and registered. The file is
    written first, then the MLflow run: a sweep stopped between the two logs the file's prediction next time."""
    folder = ladder_folder(base)
    found = find_registration(folder, budget)
    if found is not None:
        path, data = found
        trial = TrialConfig.model_validate(data["trial"])
        say(f"ladder {budget:.3g}: keeping the prediction registered {data.get('registered_at', '?')} in {path} "
            f"(loss {data['prediction']['loss']:.4g}); a registration is never rewritten, not even by a refit")
        return trial
    fits = fits_of()
    base = settings_source(fits, grid or [base], base)
    data = predict(fits, budget, lambda up_to: geometries(base, up_to))
    trial = ladder_trial(base, data["snap"]["size"], budget)
    data |= {"study": study.name, "trial_id": trial.trial_id, "model": trial.model_name,
             "registered_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds"),
             "loss_key": LOSS_KEY, "fitted_trials": fits["trial_ids"],
             "settings_from": base.trial_id, "trial": public_config(trial.model_dump(mode="json"))}
    path = write_registration(folder, data)
    say(f"ladder {budget:.3g} ({data['ratio']:.3g}x the largest fitted budget): {describe(data)}; registered in "
        f"{path}")
    return trial


def describe(data: dict) -> str:
    """One line: the snapped size and the predicted loss (both approaches)."""
    p, s, a2, a3 = data["prediction"], data["snap"], data["approach2"], data["approach3"]
    parts = [(f"N_opt {_num(a3['n_opt'])} {_iv(a3['n_opt_ci'])} (approach 3), {_num(a2['n_opt'])} "
              f"{_iv(a2['n_opt_ci'])} (approach 2)"),
             f"snapped to {s['size']} ({s['params']:,} parameters, x{_num(s['ratio'])} of {s['from']}'s N_opt"
             + (f"; the surface's loss {s['effect']:+.3g} for the snap)" if s.get("effect") is not None else ")"),
             f"predicted {LOSS_KEY} {p['loss']:.4g} {_iv([p['lo'], p['hi']] if p['lo'] is not None else None)}"]
    return "; ".join(parts)


def _num(v) -> str:
    return "n/a" if v is None else f"{v:.4g}"


def _iv(ci) -> str:
    return f"[{ci[0]:.4g}, {ci[1]:.4g}]" if ci else "[n/a]"


def prepare_ladder(study, trials: list[TrialConfig], uri: str, parent_run_id: str | None, state: dict,
                   grid_fits, say=print) -> list[TrialConfig]:
    """The ladder trials, each registered (file and MLflow run) before it trains; [] when the grid is not
    done yet (the ladder waits for every grid trial to conclude) or the study has no ladder. `grid_fits`
    (analysis.ladder_fits.grid_fits, passed in by the sweep: harness reads MLflow's fits only there) fits
    the grid as the report does."""
    from harness.tracking import concluded, sweep_state

    budgets = list(study.ladder.budgets) if getattr(study, "ladder", None) else []
    if not budgets:
        return []
    open_grid = [tid for tid in (t.trial_id for t in trials) if not concluded(state.get(tid, "new"))]
    if open_grid:
        say(f"ladder: {len(open_grid)} grid trial(s) not finished; the ladder is predicted and trained once the "
            "whole grid has concluded")
        return []
    grid_ids = {t.trial_id for t in trials}
    cache: dict = {}

    def fits_of() -> dict:
        if "fits" not in cache:
            cache["fits"] = grid_fits(uri, study.name, grid_ids)
        return cache["fits"]

    out = []
    for budget in budgets:
        trial = register(study, trials[0], uri, parent_run_id, fits_of, budget, say=say, grid=trials)
        trial.tracking.uri = uri
        data = find_registration(ladder_folder(trials[0]), budget)[1]
        if not concluded(sweep_state(uri, study.name, [trial])[trial.trial_id]):
            log_registration(uri, trial, parent_run_id, data)
        out.append(trial)
    return out


def _registered(study, trials: list[TrialConfig]) -> list[tuple[float, tuple[Path, dict] | None]]:
    budgets = list(study.ladder.budgets) if getattr(study, "ladder", None) else []
    return [(b, find_registration(ladder_folder(trials[0]), b)) for b in budgets] if trials else []


def ladder_pending(study, trials: list[TrialConfig], uri: str) -> bool:
    """Whether the sweep has ladder work: a budget not registered yet, or a registered trial not concluded."""
    from harness.tracking import concluded, sweep_state

    for _, found in _registered(study, trials):
        if found is None:
            return True
        trial = TrialConfig.model_validate(found[1]["trial"])
        if not concluded(sweep_state(uri, study.name, [trial])[trial.trial_id]):
            return True
    return False


def kept_ladder_lines(study, trials: list[TrialConfig], say=print) -> None:
    """One line per registered budget when the sweep has nothing to do: the registration is kept."""
    for budget, found in _registered(study, trials):
        if found is not None:
            path, data = found
            say(f"ladder {budget:.3g}: keeping the prediction registered {data.get('registered_at', '?')} in {path} "
                f"(loss {data['prediction']['loss']:.4g}); a registration is never rewritten")


def plan_line(study, trials: list[TrialConfig]) -> str | None:
    """The plan's line for the ladder (its trials are not in the table: their sizes come from the fits)."""
    budgets = list(study.ladder.budgets) if getattr(study, "ladder", None) else []
    if not budgets or not trials:
        return None
    top = max(t.train.flops for t in trials)
    each = ", ".join(f"{b:.3g} ({b / top:.3g}x)" for b in budgets)
    return (f"ladder: {len(budgets)} trial(s) at {each} the grid's largest budget, not in the table above: each "
            f"one's size is predicted from the grid's fits once the grid has concluded, registered in "
            f"{ladder_folder(trials[0])} and MLflow, then trained")
