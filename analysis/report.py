"""The scaling report of one study: reports/<study>/index.html, report.md, PNG figures,
trials.csv, trials.parquet and fits.json — logged as artifacts (under `report/`) to the sweep's
parent MLflow run when there is one.

    from analysis.report import build_report
    build_report("sqlite:///mlflow.db", "dit-scaling")          # or: ditscale report --experiment dit-scaling

The HTML is self-contained: inline CSS, images referenced relatively, no scripts, no fonts.

The steps: analysis/analyse.py fills an analysis.findings.Report (findings, fits, figures — numbers, no
markup), analysis/sections.py puts it into words as blocks, analysis/render.py renders those through
the Jinja2 templates in analysis/templates/. This module reads the runs, writes the files (the two
renderings, trials.csv/.parquet, fits.json, the manifest) and logs them to MLflow.
"""

from __future__ import annotations

import json
import math
import traceback
from pathlib import Path

import numpy as np

from analysis import bracketing, budget_laws, extrapolation, runs
from analysis.analyse import analyse, conventions
from analysis.findings import Report
from analysis.plots import write_file
from analysis.render import render
from analysis.sections import sections
from harness.tracking import safe_folder_name

ARTIFACT_DIR = "report"
FILES = ("index.html", "report.md", "trials.csv", "trials.parquet", "fits.json")
MANIFEST = "report-files.json"  # the report's own index of the files it wrote (and may remove next time)


def build_report(tracking_uri: str | None, experiment: str, parent_run_id: str | None = None,
                 out_dir: str | Path | None = None, bootstrap: int = 1000, seed: int = 0,
                 log_to_mlflow: bool = True, holdout: str = "largest") -> Path:
    """Write the report of `experiment` and return the path of its index.html.

    holdout: "largest" (default) holds the largest training budget out of the fits and predicts it
    when the study has at least 3 budgets (`train.flops`); "none" fits every budget.

    Trials: the newest run of every trial of the experiment, or only those of the sweep
    `parent_run_id` when it is given. Artifacts go to `parent_run_id`, else to the newest sweep
    parent run of the experiment (none found: nothing is logged). out_dir defaults to
    reports/<experiment> in the working directory (the name made one safe folder name, as
    harness.paths.report_dir does). Of the files already in out_dir only those the previous report
    listed in its report-files.json are removed (its figures); nothing else there is touched."""
    if holdout not in ("none", "largest"):
        raise ValueError(f"holdout must be 'none' or 'largest', not {holdout!r}")
    uri = runs.default_tracking_uri(tracking_uri)
    runs.experiment_id(uri, experiment)  # a clear error when the experiment does not exist
    log_parent = parent_run_id or runs.find_parent_run(uri, experiment)
    out = Path(out_dir) if out_dir is not None else Path.cwd() / "reports" / safe_folder_name(experiment)
    out.mkdir(parents=True, exist_ok=True)
    _remove_previous_report(out)

    trial_runs = runs.trial_runs(uri, experiment, parent_run_id)
    histories = runs.load_histories(uri, experiment, keys=runs.HISTORY_KEYS.pattern, runs=trial_runs)
    trials = runs.load_trials(uri, experiment, histories=histories, runs=trial_runs)
    rep = Report(experiment, uri, log_parent, trials, conventions=conventions())
    if not trials.empty:
        try:
            analyse(rep, histories, out, bootstrap, seed, holdout)
        except Exception as err:  # a report with what was done and the error beats no report after a sweep
            rep.notes.append(f"the analysis stopped early: {type(err).__name__}: {err}")
            traceback.print_exc()
    else:
        rep.notes.append("no trial runs (runs tagged trial_id) were found" +
                         (f" for the sweep {parent_run_id}" if parent_run_id else ""))
    _read_added_and_ladder_runs(rep)

    _write_tables(rep, out)
    write_file(out / "fits.json", json.dumps(_jsonable(rep.fits + budget_laws.fits_json_rows(rep)), indent=1))
    blocks = sections(rep)
    write_file(out / "report.md", render(rep, blocks, "report.md.j2"))
    index = out / "index.html"
    write_file(index, render(rep, blocks, "index.html.j2"))
    _write_manifest(out, rep)
    if log_to_mlflow and log_parent:
        _log_artifacts(uri, log_parent, out, rep)
    return index


def _read_added_and_ladder_runs(rep: Report) -> None:
    """The sizes bracketing added and the ladder runs' registered predictions, read from their tags (each
    failure is said in its section: the rest of the report beats none)."""
    try:
        rep.ladder_rows = extrapolation.rows(rep.uri, rep.study)
    except Exception as err:
        rep.ladder_error = f"{type(err).__name__}: {err}"
    try:
        rep.bracket_rows = bracketing.added_rows(rep.uri, rep.study)
    except Exception as err:
        rep.bracket_error = f"{type(err).__name__}: {err}"


# --- outputs --------------------------------------------------------------------------------------


def _write_tables(rep: Report, out: Path) -> None:
    t = rep.trials.copy()
    for c in t.columns:  # parquet needs one type per column: mixed objects become strings
        if t[c].dtype == object:
            t[c] = t[c].map(lambda v: None if v is None or (isinstance(v, float) and math.isnan(v)) else str(v))
    write_file(out / "trials.csv", t.to_csv(index=False))
    try:
        write_file(out / "trials.parquet", t.to_parquet(index=False))
    except ImportError as err:
        (out / "trials.parquet").unlink(missing_ok=True)
        rep.notes.append(f"trials.parquet: not written — {err}")


def _jsonable(v):
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (float, np.floating)):
        return float(v) if math.isfinite(v) else None
    if isinstance(v, np.integer):
        return int(v)
    return v


def _log_artifacts(uri: str, parent_run_id: str, out: Path, rep: Report) -> None:
    c = runs.client(uri)
    files = [out / f for f in FILES if (out / f).is_file()] + [out / f.file for f in rep.figures]
    for path in files:
        c.log_artifact(parent_run_id, str(path), ARTIFACT_DIR)


def _report_file_name(name) -> bool:
    """A name a report writes: one of FILES or a figure (*.png), a plain name in the folder itself."""
    return (isinstance(name, str) and name == Path(name).name and not name.startswith(".")
            and "\\" not in name and (name in FILES or name.endswith(".png")))


def _listed_files(folder: Path) -> list[str]:
    """The files the report in `folder` listed in its manifest (none when there is no readable one)."""
    try:
        listed = json.loads((folder / MANIFEST).read_text()).get("files", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [name for name in listed if _report_file_name(name)] if isinstance(listed, list) else []


def _remove_previous_report(out: Path) -> None:
    """Remove the files the previous report in `out` wrote (listed in its manifest and still there as
    plain files); a folder without a manifest, and every file it does not list, is left alone."""
    for name in _listed_files(out):
        path = out / name
        if path.is_file() and not path.is_symlink():
            path.unlink()


def _write_manifest(out: Path, rep: Report) -> None:
    names = [f for f in FILES if (out / f).is_file()] + [f.file for f in rep.figures if (out / f.file).is_file()]
    write_file(out / MANIFEST, json.dumps({"written_by": "ditscale report", "experiment": rep.study,
                                           "files": sorted(set(names))}, indent=1) + "\n")


def report_files(index: Path) -> list[Path]:
    """The files a report wrote (index.html's folder), as its manifest lists them (the fixed files
    when there is none)."""
    folder = Path(index).parent
    listed = _listed_files(folder)
    return [folder / f for f in (listed or FILES) if (folder / f).exists()]


__all__ = ["build_report", "report_files", "ARTIFACT_DIR"]
