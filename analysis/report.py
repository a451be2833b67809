"""The scaling report of one study: reports/<study>/index.html, report.md, PNG figures,
trials.csv, trials.parquet and fits.json — logged as artifacts (under `report/`) to the sweep's
parent MLflow run when there is one.

    from analysis.report import build_report
    build_report("sqlite:///mlflow.db", "dit-scaling")          # or: ditscale report --experiment dit-scaling

The HTML is self-contained: inline CSS, images referenced relatively, no scripts, no fonts.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import budget_laws, plots, posthoc_ema, runs, scaling, study
from analysis.plots import COMPUTE_LABEL, FORWARD_LABEL, PARAMS_LABEL, write_file
from harness.tracking import redact_uri, safe_folder_name

ARTIFACT_DIR = "report"
FILES = ("index.html", "report.md", "trials.csv", "trials.parquet", "fits.json")
MANIFEST = "report-files.json"  # the report's own index of the files it wrote (and may remove next time)


@dataclass
class _Figure:
    file: str
    title: str
    caption: str


@dataclass
class _Report:
    study: str
    uri: str
    parent_run_id: str | None
    trials: pd.DataFrame
    figures: list[_Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    fits: list[dict] = field(default_factory=list)  # rows of the fit table
    frontier_notes: list[str] = field(default_factory=list)
    conventions: list[str] = field(default_factory=list)
    fd_rows: list[dict] = field(default_factory=list)
    findings: list[dict] = field(default_factory=list)  # DiT's qualitative findings: held or not
    budget: list[dict] = field(default_factory=list)  # per group: surface, isoFLOP, agreement, held-out, allocation
    not_claimed: list[str] = field(default_factory=list)  # one line per fit the report does not claim
    excluded: list[dict] = field(default_factory=list)  # trials left out of every fit, with their reason
    headline: list[str] = field(default_factory=list)  # what must be read first (methods that disagree)


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
    rep = _Report(experiment, uri, log_parent, trials)
    rep.conventions = _conventions()
    if not trials.empty:
        try:
            _analyse(rep, histories, out, bootstrap, seed, holdout)
        except Exception as err:  # a report with what was done and the error beats no report after a sweep
            import traceback

            rep.notes.append(f"the analysis stopped early: {type(err).__name__}: {err}")
            traceback.print_exc()
    else:
        rep.notes.append("no trial runs (runs tagged trial_id) were found" +
                         (f" for the sweep {parent_run_id}" if parent_run_id else ""))

    _write_tables(rep, out)
    write_file(out / "fits.json", json.dumps(_jsonable(rep.fits + budget_laws.fits_json_rows(rep)), indent=1))
    write_file(out / "report.md", _markdown(rep))
    index = out / "index.html"
    write_file(index, _html(rep))
    _write_manifest(out, rep)
    if log_to_mlflow and log_parent:
        _log_artifacts(uri, log_parent, out, rep)
    return index


# --- analysis -------------------------------------------------------------------------------------


def _conventions() -> list[str]:
    return [
        "Forward GFLOPs are multiply-adds (MACs) of one forward pass on one image, as in the DiT paper "
        "(Peebles & Xie 2023); hardware FLOPs would be twice that.",
        "Training compute = 3 × forward GFLOPs × images seen (forward + backward ≈ 3 forward passes), in "
        "GFLOPs of multiply-adds — the `train_gflops` metric. A trial's forward GFLOPs are read back as "
        "train_gflops / samples_seen / 3 (NaN when those were not logged).",
        "Each trial is the newest MLflow run of its trial_id (a hash of its config).",
        "Power laws are y = E + A · x^(−α), fitted by least squares in log space (scipy curve_fit, bounds "
        "A > 0, α > 0, 0 ≤ E < min y); intervals are 95 % percentile bootstraps over the trials. A law is "
        f"claimed only from at least {scaling.MIN_DISTINCT_X} distinct x values and R² ≥ 0.9; otherwise it is "
        "listed under the fits not claimed, with the reason. Trials that differ in another axis of the grid (patch, "
        "objective, steps, budget, ...) are never pooled as repeats at the same x: such a pooled fit is refused "
        "and the law is fitted per value of that axis.",
        *budget_laws.CONVENTIONS,
        "Replicates: trials that differ only in train.seed are averaged (their spread: error bars, and the noise "
        "level of the intervals). Only finished trials enter a fit; diverged, failed and unfinished ones are "
        "listed by name with their reason.",
        "A metric named fid… is FID (Inception-v3 features); a metric named fd_<extractor>… is a Fréchet "
        "distance in another network's features — a stand-in used when Inception weights are absent, "
        "not comparable with FID and never called FID here.",
    ]


def _by(trials: pd.DataFrame, *cols: str) -> list[str]:
    """Grouping columns: arch always, plus objective when the study varies it, plus cols."""
    out = ["arch"]
    if trials["objective"].nunique() > 1:
        out.append("objective")
    return out + list(cols)


def _loss_choice(trials: pd.DataFrame, histories: pd.DataFrame) -> tuple[str | None, str, str]:
    """(trials column for fits, history key for curves, axis label)."""
    if "final_val_loss" in trials and trials["final_val_loss"].notna().any():
        per_run = histories[histories["key"] == "val_loss"].groupby("run_id").size()
        curve_key = "val_loss" if len(per_run) and per_run.median() >= 3 else "loss"
        return "final_val_loss", curve_key, "validation loss (final)"
    if "loss_tail" in trials and trials["loss_tail"].notna().any():
        return "loss_tail", "loss", "training loss (mean of the last 10 % of logs; no val_loss logged)"
    return None, "loss", "training loss"


def _mixed_detectors(trials: pd.DataFrame, fd_col: str | None) -> str | None:
    """The refusal, when the trials' FDs come from different detectors (the run tag ditscale.detector:
    a stand-in trained on another machine has other weights, so its FD has another scale), else None.
    Runs logged before the tag existed ("") are not counted as a detector of their own."""
    if fd_col is None or "detector" not in trials:
        return None
    used = trials.loc[pd.to_numeric(trials[fd_col], errors="coerce").notna(), "detector"]
    found = sorted({str(d) for d in used.dropna() if str(d)})
    if len(found) < 2:
        return None
    return (f"{fd_col}: not ranked or fitted — its values come from {len(found)} different detectors "
            f"({', '.join(found)}), whose Fréchet distances have different scales; compare runs of one detector")


def _analyse(rep: _Report, histories: pd.DataFrame, out: Path, bootstrap: int, seed: int,
             holdout: str = "largest") -> None:
    trials, notes = rep.trials, rep.notes
    y_col, loss_key, y_label = _loss_choice(trials, histories)
    loss_curves = runs.metric_curves(histories, trials, loss_key)
    train_loss = runs.metric_curves(histories, trials, "loss")
    loss_axis = "training loss" if loss_key == "loss" else "validation loss"

    fd = runs.primary_fd_metric(histories["key"].unique())
    for d in runs.fd_metrics(histories["key"].unique()):
        configured = sorted({str(v) for v in trials.get("eval.feature_extractor", pd.Series(dtype=str)).dropna()})
        rep.fd_rows.append({**d, "configured": ", ".join(configured)})
    fd_curves = runs.metric_curves(histories, trials, fd["key"]) if fd else None
    fd_label = (f"FID [{fd['key']}]" if fd["is_fid"] else f"{fd['key']} (stand-in, not FID)") if fd else "FID"

    def fig(path: Path | None, title: str, caption: str) -> None:
        if path is not None:
            rep.figures.append(_Figure(path.name, title, caption))

    # --- over training steps (the DiT paper's Figure 2 layout) --------------------------------------
    fig(plots.plot_metric_vs_steps(train_loss, out / "loss_vs_steps_by_size.png", "training loss", by="size",
                                   fixed="patch", notes=notes, title="training loss vs steps, by model size"),
        "Training loss vs steps — model size at fixed patch size",
        "x: training steps; y: training loss (mean over each log interval); one line per model size, one panel "
        "per architecture and patch size.")
    fig(plots.plot_metric_vs_steps(train_loss, out / "loss_vs_steps_by_patch.png", "training loss", by="patch",
                                   fixed="size", notes=notes, title="training loss vs steps, by patch size"),
        "Training loss vs steps — patch size at fixed model size",
        "x: training steps; y: training loss; one line per patch size, one panel per architecture and model size.")
    if fd is None:
        notes.append("FID / Fréchet-distance figures: skipped — no fid or fd_<extractor> metric was logged "
                     "(run the evaluation)")
    else:
        fig(plots.plot_metric_vs_steps(fd_curves, out / f"{fd['key']}_vs_steps_by_size.png", fd_label, by="size",
                                       fixed="patch", notes=notes, title=f"{fd['key']} vs steps, by model size"),
            f"{fd['name']} vs steps — model size at fixed patch size",
            f"x: training steps; y: {fd_label}; one line per model size.")
        fig(plots.plot_metric_vs_steps(fd_curves, out / f"{fd['key']}_vs_steps_by_patch.png", fd_label, by="patch",
                                       fixed="size", notes=notes, title=f"{fd['key']} vs steps, by patch size"),
            f"{fd['name']} vs steps — patch size at fixed model size",
            f"x: training steps; y: {fd_label}; one line per patch size.")
        fig(plots.plot_fd_vs_compute(fd_curves, out / f"{fd['key']}_vs_compute.png", fd_label, notes=notes),
            f"{fd['name']} vs training compute (log-log)",
            f"x: {COMPUTE_LABEL}; y: {fd_label}; one line per configuration.")

    # --- fitted laws --------------------------------------------------------------------------------
    fit_trials, rep.excluded = study.split_usable(trials, y_col)
    if rep.excluded:
        notes.append(f"every fit leaves out {len(rep.excluded)} trial(s) (diverged, failed or unfinished): "
                     + "; ".join(f"{x['label']} [{x['trial_id']}]: {x['reason']}" for x in rep.excluded))
    fd_col = f"final_{fd['key']}" if fd is not None and f"final_{fd['key']}" in trials else None
    mixed = _mixed_detectors(fit_trials, fd_col)
    if mixed:
        fd_col, fd = None, None
    se_col = "final_se_val_loss" if y_col == "final_val_loss" and "final_se_val_loss" in trials else None
    samples = runs.load_val_samples(rep.uri, fit_trials) if se_col else {}
    rep.findings = study.dit_findings(fit_trials, y_col, fd_col, fd_label, se_col=se_col, samples=samples)
    if mixed:
        rep.findings.append({"finding": f"{fd_label} falls with training compute", "held": None,
                             "evidence": mixed})
        notes.append(mixed)
    # different experiments (another patch, objective, ...) at one x are never pooled as repeats
    distinct = [c for c in study.group_axes(fit_trials) if c != "arch"] + [
        c for c in study.varying_axes(fit_trials) if c in ("train.steps", study.BUDGET_KEY, study.LR_KEY)]

    def fits(x: str, y: str, x_label: str, y_lab: str, stem: str, what: str, curves=None) -> None:
        t = fit_trials
        pooled = scaling.fit_groups(t, x, y, by=_by(trials), bootstrap=bootstrap, seed=seed, distinct_axes=distinct)
        per_patch = []
        if t["patch"].nunique() > 1:
            per_patch = scaling.fit_groups(t, x, y, by=_by(trials, "patch"), bootstrap=bootstrap, seed=seed,
                                           distinct_axes=distinct)
            # an architecture trained at a single patch size: its per-patch law is its pooled law
            n_patch = t.groupby("arch")["patch"].nunique()
            per_patch = [gf for gf in per_patch if n_patch.get(gf.group.get("arch"), 0) > 1]
        for gf in pooled + per_patch:
            rep.fits.append(_fit_row(what, x_label, y_lab, gf))
        fig(plots.plot_fits(pooled, out / f"fit_{stem}.png", x_label, y_lab, curves=curves, notes=notes,
                            title=what),
            f"{what} — fitted law per architecture",
            f"x: {x_label}; y: {y_lab}; points: trials; line: y = E + A·x^(−α); band: 95 % bootstrap interval.")
        if per_patch:
            fig(plots.plot_fits(per_patch, out / f"fit_{stem}_by_patch.png", x_label, y_lab, curves=curves,
                                notes=notes, title=f"{what}, per patch size"),
                f"{what} — fitted law per architecture and patch size",
                f"x: {x_label}; y: {y_lab}; one law per patch size; band: 95 % bootstrap interval.")

    if y_col is None:
        notes.append("loss fits: skipped — neither val_loss nor training loss was logged")
    else:
        fits("train_gflops", y_col, COMPUTE_LABEL, y_label, "loss_vs_compute", "loss vs training compute",
             curves=loss_curves)
        if trials["params"].notna().any():
            fits("params", y_col, PARAMS_LABEL, y_label, "loss_vs_params", "loss vs parameters")
        else:
            notes.append("loss vs parameters: skipped — parameter counts are not logged with the runs "
                         "(a metric, param or tag named params)")
    if fd is not None and f"final_{fd['key']}" in trials:
        fits("forward_gflops", f"final_{fd['key']}", FORWARD_LABEL, f"{fd_label} (final)",
             f"{fd['key']}_vs_forward_gflops", f"{fd['name']} vs forward GFLOPs")

    # --- compute-optimal frontier -------------------------------------------------------------------
    frontier_curves = loss_curves[loss_curves["run_id"].isin(fit_trials["run_id"])] if not loss_curves.empty \
        else loss_curves
    if not frontier_curves.empty:
        for arch, c in frontier_curves.groupby("arch", sort=True):
            name = plots._arch_name(arch)
            if c["run_id"].nunique() < 2:
                rep.frontier_notes.append(f"{name}: a single trial — no frontier (the envelope of one curve is "
                                          "that curve)")
                continue
            t = trials[trials["arch"] == arch].set_index("trial_id")
            if t["params"].notna().all():
                size, measure = t["params"], "parameters"
            else:
                size, measure = t["forward_gflops"], "forward GFLOPs"
            fr = scaling.compute_frontier(c, size, size_measure=measure, bootstrap=bootstrap, seed=seed)
            rep.frontier_notes.append(f"{name}: {fr.note}" + (
                f": a = {fr.optimal_size_fit.a:.3f} {_ci(fr.optimal_size_fit.a_ci)}, R² = "
                f"{fr.optimal_size_fit.r2:.3f}" if fr.optimal_size_fit is not None and fr.optimal_size_fit.ok else ""))
            if measure != "parameters":
                rep.frontier_notes.append(f"{name}: model size is measured in forward GFLOPs (parameter counts "
                                          "are not logged), so the optimum is G_opt ∝ C^a")
            rep.fits.append(_fit_row("frontier: lower envelope of loss vs training compute", COMPUTE_LABEL,
                                     loss_axis, scaling.GroupFit({"arch": arch}, "compute", loss_key,
                                                                 fr.envelope_fit, pd.DataFrame()),
                                     note="envelope points are correlated: the interval is optimistic"))
            fig(plots.plot_frontier(c, fr, out / f"frontier_{arch}.png", loss_axis, notes=notes),
                f"Compute-optimal frontier — {name}",
                f"left: x: {COMPUTE_LABEL}, y: {loss_axis}; grey: every trial, red: lower envelope, dashed: its "
                f"fitted law. right: isoFLOP slices, x: model size ({measure}), y: {loss_axis} at fixed compute; "
                "stars: the parabola's optimum where the grid brackets it.")
    else:
        notes.append("compute-optimal frontier: skipped — no loss curve against training compute")

    # --- scaling laws that hold: loss surface, isoFLOP optima, agreement, held-out ------------------
    if y_col is not None:
        budget_laws.analyse_budgets(rep, fit_trials, y_col, fd, fd_col, fd_label, y_label, out, bootstrap, seed,
                                    holdout, fig)

    # --- DiT vs MM-DiT --------------------------------------------------------------------------------
    comp = {loss_axis: loss_curves}
    if fd_curves is not None:
        comp[fd_label] = fd_curves
    fig(plots.plot_arch_comparison(comp, out / "dit_vs_mmdit.png", notes=notes),
        "DiT vs MM-DiT (joint vs split attention) at matched compute",
        f"left: x: {COMPUTE_LABEL}, y: the metric, one colour per architecture; right: each architecture's best "
        "trial at the largest training compute all architectures reached.")
    posthoc_ema.figure(trials, out, fig, notes)  # eval.ema_sigma_rels: loss vs EMA width (analysis/posthoc_ema.py)
    from analysis import loss_metric  # is the loss a proxy for each image metric? (analysis/loss_metric.py)
    loss_metric.analyse(rep, fit_trials, y_col, y_label, out, fig, bootstrap, seed)


def _ci(ci) -> str:
    return f"[{ci[0]:.4g}, {ci[1]:.4g}]" if ci else "[n/a]"


def _fit_row(what: str, x_label: str, y_label: str, gf: scaling.GroupFit, note: str = "") -> dict:
    f = gf.fit
    return {
        "relation": what, "group": gf.label, "x": x_label, "y": y_label, "n": f.n,
        "alpha": f.alpha, "alpha_ci": f.alpha_ci, "A": f.A, "A_ci": f.A_ci, "E": f.E, "E_ci": f.E_ci, "r2": f.r2,
        "law": f.describe("x", "y"), "warning": f.warning, "note": note, "fitted": f.ok,
        "not_identified": f.identification(),
    }


# --- outputs --------------------------------------------------------------------------------------


def _write_tables(rep: _Report, out: Path) -> None:
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


def _summary(trials: pd.DataFrame) -> pd.DataFrame:
    cols = ["label", "objective", "status", "forward_gflops", "params", "steps", "train_gflops"]
    metric_cols = [c for c in trials.columns if c.startswith(("final_val_loss", "best_val_loss"))]
    metric_cols += ["final_se_val_loss"] if "final_se_val_loss" in trials else []
    metric_cols += ["loss_tail"] if "loss_tail" in trials else []
    metric_cols += [c for c in trials.columns if c.startswith(("final_fid", "final_fd_", "final_kid"))]
    cols = [c for c in cols + metric_cols + ["trial_id"] if c in trials]
    s = trials.sort_values(["arch", "size_rank", "patch"], na_position="last")[cols].copy()
    if s["params"].isna().all():
        s = s.drop(columns="params")
    return s


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, (float, np.floating)):
        if not math.isfinite(v):
            return "–"
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    return str(v)


def _md_text(s) -> str:
    """Text from runs (names, params, tags, errors) made inert in Markdown: renderers pass raw HTML
    through, so a `<script>` in a run name would run where report.md is shown (GitHub strips it, many
    viewers and static-site generators do not). &, < and > become entities."""
    return str(s).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    esc = lambda s: _md_text(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(map(esc, head)) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
    return "\n".join(lines)


def _axes_used(rep: _Report) -> list[str]:
    return sorted({f"{r['relation']}: x = {r['x']}; y = {r['y']}" for r in rep.fits})


def _e(v: float) -> str:
    return _fmt(v) if v is not None else "–"


def _with_ci(v, ci) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{_fmt(v)} {_ci(ci)}" if ci else _fmt(v)


UNRESOLVED_TEXT = "not resolved (within noise)"
_AGREEMENT_RESULT = {"agree": "held", "disagree": "did not hold", scaling.NOT_INFORMATIVE: scaling.NOT_INFORMATIVE,
                     "not testable": "not testable"}
_NOT_IDENTIFIED_RULE = (
    "A fitted law is claimed only when the data identify it: it is listed here instead when an exponent's 95 % "
    "interval reaches a bound of its fitter (the refits stopped at the optimiser's box, so the interval is the "
    f"box's, not the data's) or is wider than {scaling.MAX_REL_WIDTH:g} × its estimate (the data allow about zero "
    "to twice the value, or either sign). More budgets or sizes narrow the intervals.")


def _laws(rep: _Report) -> tuple[list[list[str]], list[list[str]]]:
    """(laws claimed: [relation, group, law, n]; laws fitted but not identified: [relation, group, why,
    law, n]). A law is claimed only when its exponents are identified (scaling.not_identified)."""
    claimed, unidentified = [], []

    def add(relation: str, group: str, law: str, n, why: list[str]) -> None:
        if why:
            unidentified.append([relation, group, "; ".join(why), law, str(n)])
        else:
            claimed.append([relation, group, law, str(n)])

    for r in rep.fits:
        if r["fitted"]:
            add(r["relation"], r["group"], r["law"], r["n"], r.get("not_identified") or [])
    for r in rep.budget:
        s = r["surface"]
        if s is not None and s.ok:
            add("loss surface L(N, D), approach 3", r["group"], s.describe("N", "D")
                + f"; N_opt ∝ C^{s.a:.4g} {_ci(s.a_ci)}, D_opt ∝ C^{s.b:.4g}; {s.n_at_best} of {s.n_starts} "
                f"starts reached the best optimum", s.n, s.identification())
        iso = r["isoflop"]
        if iso is not None:
            for what, fit, name in (("N_opt(C), isoFLOP parabolas (approach 2)", iso.n_opt_fit, "a of N_opt(C)"),
                                    ("L_opt(C), isoFLOP parabolas (approach 2)", iso.l_opt_fit, "a of L_opt(C)")):
                if fit is not None and fit.ok:
                    add(what, r["group"], fit.describe("C", what.split("(")[0]), fit.n, fit.identification(name))
        rel = r["loss_fd"]
        if rel is not None and rel.ok:
            add("FD vs loss across trials", r["group"], rel.describe("loss", "FD"), rel.n,
                rel.identification("a of FD(loss)"))
    return claimed, unidentified


def _held(v) -> str:
    if v == study.UNRESOLVED:
        return UNRESOLVED_TEXT
    if v == study.NOT_APPLICABLE:
        return study.NOT_APPLICABLE
    return "held" if v is True else "did not hold" if v is False else "not testable"


_NOISE_TEST = (
    "The loss findings test each step (one size up, one patch size down) against the measured noise: a step "
    f"counts as better or worse only when its gap Δ exceeds {study.Z_NOISE:g}σ. σ is measured on the "
    "validation set every trial scores (the same images, timesteps and noise): the standard error of the two "
    "configurations' per-sample loss differences (paired; the collapsed-strata estimate over the timestep "
    "strata), or, for runs without per-sample losses, √(se_a² + se_b²) of their se_val_loss (unpaired, "
    "conservative); plus the variance of each configuration's train.seed replicates / k. A finding held when "
    "every step is better, did not hold when a step is worse, and is not resolved (within noise) otherwise. "
    "Without replicates σ says nothing of training-seed noise: add train.seed to the grid to measure it. "
    "Trials with no noise estimate at all are compared strictly, as the evidence then says.")


def _sections(rep: _Report) -> list[tuple]:
    """The report as blocks, from the answer down: what the study found, figures, the fits it does not
    claim, conventions, notes, trials. Blocks: ("h2"|"h3", text), ("p", text, warn), ("ul", items),
    ("table", head, rows, warn_col), ("figure", _Figure)."""
    from analysis.extrapolation import extrapolation_blocks  # a ladder's pre-registered prediction comes first

    b: list[tuple] = extrapolation_blocks(rep) + [("h2", "What the study found")]
    for h in rep.headline:
        b.append(("p", f"⚠ The two fitting methods disagree — {h}", True))
    findings = [[f["finding"], _held(f["held"]), f["evidence"]] for f in rep.findings]
    for r in rep.budget:
        ag = r["agreement"]
        if ag is not None:
            findings.append([f"approaches 2 and 3 agree on N_opt ∝ C^a ({r['group']})", _AGREEMENT_RESULT[ag.verdict],
                             ag.text])
        ho = r["holdout"]
        if ho is not None and ho.ok:
            findings.append([f"the held-out budget was predicted within its interval ({r['group']})",
                             "held" if ho.covered else "did not hold", ho.describe()])
    b.append(("h3", "Findings"))
    if findings:
        b.append(("table", ["finding", "result", "evidence"], findings, 1))
        if any(f["finding"] in (study.SIZE_FINDING, study.PATCH_FINDING) for f in rep.findings):
            b.append(("p", _NOISE_TEST, False))
    else:
        b.append(("p", "No finding could be tested (see the fits not claimed).", False))

    b.append(("h3", "Laws claimed (95 % intervals)"))
    laws, unidentified = _laws(rep)
    if laws:
        b.append(("table", ["relation", "group", "law", "n"], laws, None))
    else:
        b.append(("p", "No law is claimed: see the laws not identified and the fits not claimed below for why.",
                  True))
    if unidentified:
        b.append(("h3", "Laws not identified (fitted, not claimed)"))
        b.append(("p", _NOT_IDENTIFIED_RULE, False))
        b.append(("table", ["relation", "group", "why not identified", "fitted law (for reference only)", "n"],
                  unidentified, 2))

    held = [r for r in rep.budget if r["holdout"] is not None and r["holdout"].ok]
    if held:
        b.append(("h3", "Held-out prediction"))
        rows = []
        for r in held:
            h = r["holdout"]
            rows.append([r["group"], f"{h.compute:.4g}", str(h.n_fit_budgets), _with_ci(h.predicted, h.predicted_ci),
                         _fmt(h.measured) + (f" ± {_fmt(h.measured_std)}" if math.isfinite(h.measured_std) else ""),
                         f"{h.error_pct:+.2f} %", "yes" if h.covered else "no",
                         _with_ci(h.isoflop_predicted, h.isoflop_predicted_ci)
                         + (" (law not identified)" if h.isoflop_not_identified else ""),
                         (f"{h.fd_key}: predicted {_with_ci(h.fd_predicted, h.fd_predicted_ci)}, measured "
                          f"{_fmt(h.fd_measured)}, error {h.fd_error_pct:+.2f} %") if h.fd_key else "–"])
        b.append(("table", ["group", "held-out C", "budgets fitted", "predicted best loss [95 %]", "measured best loss",
                            "error", "inside interval", "isoFLOP law L_opt(C) [95 %]", "FD"], rows, None))
    alloc = [r for r in rep.budget if r["allocation"]]
    if alloc:
        b.append(("h3", "Compute-optimal allocation"))
        b.append(("p", "At compute C (GFLOPs of multiply-adds, 3 × forward × images): train N_opt parameters on "
                       "D_opt images (steps = D_opt / batch size) and expect this loss and FD.", False))
        for r in alloc:
            if r["surface"] is not None and r["surface"].ok and not r["surface"].identified:
                b.append(("p", f"⚠ {r['group']}: the loss surface is not identified (see above), so its columns "
                               "(N_opt surface, D_opt, steps, expected loss and FD) are extrapolations of a law the "
                               "data do not pin down — shown for reference, not claimed.", True))
        rows = []
        for r in alloc:
            for a in r["allocation"]:
                steps = a["d_opt"] / r["batch"] if "d_opt" in a and r.get("batch") and math.isfinite(r["batch"]) \
                    else math.nan
                rows.append([r["group"], f"{a['compute']:.4g}" + ("" if a["trained"] else " (extrapolated)"),
                             _with_ci(a.get("n_opt"), a.get("n_opt_ci")), _with_ci(a.get("n_opt_iso"), a.get("n_opt_iso_ci")),
                             _with_ci(a.get("d_opt"), a.get("d_opt_ci")), _fmt(steps),
                             _with_ci(a.get("loss"), a.get("loss_ci")), _with_ci(a.get("fd"), a.get("fd_ci"))])
        b.append(("table", ["group", "C", "N_opt, surface [95 %]", "N_opt, isoFLOP law [95 %]", "D_opt images [95 %]",
                            "steps", "expected loss [95 %]", "expected FD [95 %]"], rows, None))
    isos = [r for r in rep.budget if r["isoflop"] is not None and not r["isoflop"].budgets.empty]
    if isos:
        b.append(("h3", "isoFLOP budgets"))
        rows = []
        for r in isos:
            for _, x in r["isoflop"].budgets.iterrows():
                rows.append([r["group"], str(x["budget"]), f"{x['compute']:.4g}", str(x["n_sizes"]), str(x["n_runs"]),
                             _with_ci(x["n_opt"], (x["n_opt_lo"], x["n_opt_hi"]) if math.isfinite(x["n_opt_lo"]) else None),
                             _with_ci(x["loss_opt"], (x["loss_opt_lo"], x["loss_opt_hi"])
                                      if math.isfinite(x["loss_opt_lo"]) else None),
                             f"{x['grid_decades']:.2f}", _fmt(x["offset_decades"]),
                             _fmt(x.get("rms_resid", math.nan)),
                             _fmt(x["noise"]) if x.get("noise_from") == "seeds" else "– (no seeds)",
                             "yes" if x["bracketed"] else f"⚠ {x['note']}"])
        b.append(("table", ["group", "train.flops", "C", "sizes", "runs", "N_opt [95 %]", "L_opt [95 %]",
                            "grid width (decades)", "vertex offset (decades)", "parabola RMS residual", "seed noise σ",
                            "bracketed"], rows, 11))
        b.append(("p", "L_opt intervals are taken on log L_opt (a loss is positive: L_opt · exp(±t·se/L_opt)). The "
                       "parabola RMS residual is how far the measured means lie from each budget's parabola (the "
                       "isoFLOP figure's lower panel shows each point); seed noise σ is the spread of a size's "
                       "train.seed replicates (none without seeds: compare with the validation standard error in "
                       "the trials table). A residual well above the noise, or residuals that follow the size, mean "
                       "the parabola misses the curve's shape and its vertex is biased (Czech et al. 2026).", False))
    if rep.frontier_notes:
        b += [("h3", "Compute-optimal frontier (learning curves)"), ("ul", list(rep.frontier_notes))]

    from analysis import bracketing  # sizes the sweep added to unbracketed budgets (analysis/bracketing.py)
    b += bracketing.blocks(rep)
    b += posthoc_ema.blocks(rep.trials)  # eval.ema_sigma_rels: the best EMA width per size (analysis/posthoc_ema.py)
    from analysis import loss_metric  # loss → image metrics across trials (analysis/loss_metric.py)
    b += loss_metric.blocks(rep)
    b.append(("h2", "Figures"))
    b += [("figure", f) for f in rep.figures]

    b.append(("h2", "Fits not claimed"))
    lines = [f"{r['relation']} ({r['group']}, n = {r['n']}): {r['warning']}" for r in rep.fits if not r["fitted"]]
    lines += rep.not_claimed
    b.append(("ul", lines) if lines else ("p", "None: every fit attempted is claimed above.", False))
    warned = [r for r in rep.fits if not r["fitted"]]
    if warned:
        b.append(("p", f"Warning: {len(warned)} of {len(rep.fits)} power-law fits are under-determined or poor and "
                       "are not claimed.", True))

    b.append(("h2", "Conventions"))
    b.append(("ul", list(rep.conventions) + [f"Axes — {a}" for a in _axes_used(rep)]))
    if rep.fd_rows:
        b.append(("h3", "Fréchet distances"))
        b.append(("table", ["metric", "extractor", "is FID", "CFG", "configured feature_extractor"],
                  [[d["key"], d["extractor"], "yes" if d["is_fid"] else "no — a stand-in",
                    _fmt(d["cfg"]) if d["cfg"] is not None else "", d["configured"]] for d in rep.fd_rows], None))
    if rep.notes:
        b += [("h2", "Notes"), ("ul", list(rep.notes))]
    b.append(("h2", "Trials"))
    if rep.excluded:
        b.append(("p", "Left out of every fit:", True))
        b.append(("ul", [f"{x['label']} [{x['trial_id']}]: {x['reason']}" for x in rep.excluded]))
    if not rep.trials.empty:
        s = _summary(rep.trials)
        b.append(("table", list(s.columns), [[_fmt(v) for v in row] for row in s.itertuples(index=False)], None))
    return b


def _markdown(rep: _Report) -> str:
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    e = _md_text
    md = [f"# Scaling report: {e(rep.study)}", "",
          f"Generated {now} from MLflow `{e(redact_uri(rep.uri))}`, experiment `{e(rep.study)}`"
          + (f", sweep parent run `{rep.parent_run_id}`" if rep.parent_run_id else "") + f"; {len(rep.trials)} trials.",
          ""]
    for blk in _sections(rep):
        kind = blk[0]
        if kind == "h2":
            md += [f"## {e(blk[1])}", ""]
        elif kind == "h3":
            md += [f"### {e(blk[1])}", ""]
        elif kind == "p":
            md += [f"**{e(blk[1])}**" if blk[2] else e(blk[1]), ""]
        elif kind == "ul":
            md += [f"- {e(x)}" for x in blk[1]] + [""]
        elif kind == "table":
            md += [_md_table(blk[1], blk[2]), ""]
        elif kind == "figure":
            f = blk[1]
            md += [f"#### {e(f.title)}", "", f"![{e(f.title)}]({f.file})", "", f"*{e(f.caption)}*", ""]
    md += ["Full table: [trials.csv](trials.csv), [trials.parquet](trials.parquet); fits: [fits.json](fits.json).", ""]
    return "\n".join(md)


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;
color:#222;line-height:1.45;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0}th,td{border:1px solid #ccc;padding:.25em .5em;
text-align:left;vertical-align:top}th{background:#f3f3f3}tr:nth-child(even) td{background:#fafafa}
.warn{color:#9a3a00}.meta{color:#555;font-size:.9em}figure{margin:1.2em 0}figure img{max-width:100%;
border:1px solid #eee}figcaption{color:#444;font-size:.9em}code{background:#f3f3f3;padding:0 .25em}
.scroll{overflow-x:auto}.unresolved{color:#5a5a5a;font-style:italic}
"""


def _html_table(head: list[str], rows: list[list[str]], warn_col: int | None = None) -> str:
    e = html.escape
    out = ["<div class='scroll'><table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr></thead><tbody>"]
    for r in rows:
        cells = []
        for i, v in enumerate(r):
            cls = ""
            if warn_col is not None and i == warn_col:
                if str(v).startswith("⚠") or str(v) == "did not hold":
                    cls = " class='warn'"
                elif str(v) == UNRESOLVED_TEXT:  # neither held nor refuted: neutral, not a warning
                    cls = " class='unresolved'"
            cells.append(f"<td{cls}>{e(str(v))}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table></div>")
    return "\n".join(out)


def _html(rep: _Report) -> str:
    e = html.escape
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = ["<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>",
             "<meta name='viewport' content='width=device-width, initial-scale=1'>",
             f"<title>Scaling report: {e(rep.study)}</title><style>{_CSS}</style></head><body>",
             f"<h1>Scaling report: {e(rep.study)}</h1>",
             f"<p class='meta'>Generated {now} from MLflow <code>{e(redact_uri(rep.uri))}</code>, experiment "
             f"<code>{e(rep.study)}</code>"
             + (f", sweep parent run <code>{e(rep.parent_run_id)}</code>" if rep.parent_run_id else "")
             + f"; {len(rep.trials)} trials.</p>"]
    for blk in _sections(rep):
        kind = blk[0]
        if kind in ("h2", "h3"):
            parts.append(f"<{kind}>{e(blk[1])}</{kind}>")
        elif kind == "p":
            parts.append(f"<p class='warn'><strong>{e(blk[1])}</strong></p>" if blk[2] else f"<p>{e(blk[1])}</p>")
        elif kind == "ul":
            parts.append("<ul>" + "".join(f"<li>{e(str(x))}</li>" for x in blk[1]) + "</ul>")
        elif kind == "table":
            parts.append(_html_table(blk[1], blk[2], warn_col=blk[3]))
        elif kind == "figure":
            f = blk[1]
            parts.append(f"<figure><h4>{e(f.title)}</h4><img src='{e(f.file)}' alt='{e(f.title)}'>"
                         f"<figcaption>{e(f.caption)}</figcaption></figure>")
    parts.append("<p>Full table: <a href='trials.csv'>trials.csv</a>, <a href='trials.parquet'>trials.parquet</a>; "
                 "fits: <a href='fits.json'>fits.json</a>; Markdown: <a href='report.md'>report.md</a>.</p>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _log_artifacts(uri: str, parent_run_id: str, out: Path, rep: _Report) -> None:
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


def _write_manifest(out: Path, rep: _Report) -> None:
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
