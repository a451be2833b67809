"""The analysis of one study: from its trials and metric histories to the findings, fitted laws and
figures of analysis.findings.Report — in numbers and PNGs; analysis/sections.py puts them into words
and analysis/render.py into report.md and index.html.

    rep = Report(study, uri, parent_run_id, trials)
    analyse(rep, histories, out_dir, bootstrap=1000, seed=0, holdout="largest")

The steps, in the order the figures appear: curves over training steps (the DiT paper's Figure 2
layout), the trials each fit may use and the DiT findings, power laws per architecture (and patch size),
the compute-optimal frontier of the learning curves, the budget study (analysis/budget_laws.py), DiT vs
MM-DiT, post-hoc EMA widths and loss -> image metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from analysis import budget_laws, loss_metric, plots, posthoc_ema, runs, scaling, study
from analysis.findings import Report
from analysis.plots import COMPUTE_LABEL, FORWARD_LABEL, PARAMS_LABEL


def conventions() -> list[str]:
    """The report's Conventions section: the units and methods every number in it follows."""
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


@dataclass
class _Study:
    """What the steps of analyse() share: the report, where figures go, and the metrics chosen."""
    rep: Report
    out: Path
    bootstrap: int
    seed: int
    y_col: str | None = None  # the trials column the loss laws fit (None: no loss was logged)
    y_label: str = ""
    loss_key: str = "loss"  # the history key of the loss curves
    loss_axis: str = ""
    loss_curves: pd.DataFrame = field(default_factory=pd.DataFrame)
    train_loss: pd.DataFrame = field(default_factory=pd.DataFrame)
    fd: dict | None = None  # the primary Fréchet-distance metric (runs.primary_fd_metric), None when unusable
    fd_curves: pd.DataFrame | None = None
    fd_label: str = "FID"
    fd_col: str | None = None
    fit_trials: pd.DataFrame = field(default_factory=pd.DataFrame)  # the finished trials every fit uses
    distinct: list[str] = field(default_factory=list)  # axes never pooled as repeats at one x


def analyse(rep: Report, histories: pd.DataFrame, out: Path, bootstrap: int, seed: int,
            holdout: str = "largest") -> None:
    """Fill `rep` with the study's figures (written to `out`), fits, findings and notes, step by step, so
    that what was done survives an error further on."""
    s = _choose_metrics(rep, histories, out, bootstrap, seed)
    _curves_over_steps(s)
    _usable_trials_and_findings(s)
    _power_laws(s)
    _frontier(s)
    if s.y_col is not None:  # scaling laws that hold: loss surface, isoFLOP optima, agreement, held-out
        budget_laws.analyse_budgets(rep, s.fit_trials, s.y_col, s.fd, s.fd_col, s.fd_label, s.y_label, out,
                                    s.bootstrap, s.seed, holdout, rep.add_figure)
    _arch_comparison(s)
    posthoc_ema.figure(rep.trials, out, rep.add_figure, rep.notes)  # loss vs EMA width (eval.ema_sigma_rels)
    loss_metric.analyse(rep, s.fit_trials, s.y_col, s.y_label, out, rep.add_figure, bootstrap, seed)


def _loss_choice(trials: pd.DataFrame, histories: pd.DataFrame) -> tuple[str | None, str, str]:
    """(trials column for fits, history key for curves, axis label)."""
    if "final_val_loss" in trials and trials["final_val_loss"].notna().any():
        per_run = histories[histories["key"] == "val_loss"].groupby("run_id").size()
        curve_key = "val_loss" if len(per_run) and per_run.median() >= 3 else "loss"
        return "final_val_loss", curve_key, "validation loss (final)"
    if "loss_tail" in trials and trials["loss_tail"].notna().any():
        return "loss_tail", "loss", "training loss (mean of the last 10 % of logs; no val_loss logged)"
    return None, "loss", "training loss"


def _choose_metrics(rep: Report, histories: pd.DataFrame, out: Path, bootstrap: int, seed: int) -> _Study:
    """The loss the laws fit and the Fréchet distance the report ranks, with their curves; rep.fd_rows
    lists every Fréchet-distance metric logged."""
    trials = rep.trials
    s = _Study(rep, out, bootstrap, seed)
    s.y_col, s.loss_key, s.y_label = _loss_choice(trials, histories)
    s.loss_curves = runs.metric_curves(histories, trials, s.loss_key)
    s.train_loss = runs.metric_curves(histories, trials, "loss")
    s.loss_axis = "training loss" if s.loss_key == "loss" else "validation loss"
    keys = histories["key"].unique()
    s.fd = runs.primary_fd_metric(keys)
    for d in runs.fd_metrics(keys):
        configured = sorted({str(v) for v in trials.get("eval.feature_extractor", pd.Series(dtype=str)).dropna()})
        rep.fd_rows.append({**d, "configured": ", ".join(configured)})
    fd = s.fd
    s.fd_curves = runs.metric_curves(histories, trials, fd["key"]) if fd else None
    s.fd_label = (f"FID [{fd['key']}]" if fd["is_fid"] else f"{fd['key']} (stand-in, not FID)") if fd else "FID"
    return s


def _curves_over_steps(s: _Study) -> None:
    """Loss and FD over training steps by model size and by patch size (the DiT paper's Figure 2 layout),
    and FD over training compute."""
    rep, out, notes, fig = s.rep, s.out, s.rep.notes, s.rep.add_figure
    fig(plots.plot_metric_vs_steps(s.train_loss, out / "loss_vs_steps_by_size.png", "training loss", by="size",
                                   fixed="patch", notes=notes, title="training loss vs steps, by model size"),
        "Training loss vs steps — model size at fixed patch size",
        "x: training steps; y: training loss (mean over each log interval); one line per model size, one panel "
        "per architecture and patch size.")
    fig(plots.plot_metric_vs_steps(s.train_loss, out / "loss_vs_steps_by_patch.png", "training loss", by="patch",
                                   fixed="size", notes=notes, title="training loss vs steps, by patch size"),
        "Training loss vs steps — patch size at fixed model size",
        "x: training steps; y: training loss; one line per patch size, one panel per architecture and model size.")
    fd, label = s.fd, s.fd_label
    if fd is None:
        rep.notes.append("FID / Fréchet-distance figures: skipped — no fid or fd_<extractor> metric was logged "
                         "(run the evaluation)")
        return
    fig(plots.plot_metric_vs_steps(s.fd_curves, out / f"{fd['key']}_vs_steps_by_size.png", label, by="size",
                                   fixed="patch", notes=notes, title=f"{fd['key']} vs steps, by model size"),
        f"{fd['name']} vs steps — model size at fixed patch size",
        f"x: training steps; y: {label}; one line per model size.")
    fig(plots.plot_metric_vs_steps(s.fd_curves, out / f"{fd['key']}_vs_steps_by_patch.png", label, by="patch",
                                   fixed="size", notes=notes, title=f"{fd['key']} vs steps, by patch size"),
        f"{fd['name']} vs steps — patch size at fixed model size",
        f"x: training steps; y: {label}; one line per patch size.")
    fig(plots.plot_fd_vs_compute(s.fd_curves, out / f"{fd['key']}_vs_compute.png", label, notes=notes),
        f"{fd['name']} vs training compute (log-log)",
        f"x: {COMPUTE_LABEL}; y: {label}; one line per configuration.")


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


def _usable_trials_and_findings(s: _Study) -> None:
    """The finished trials every fit uses (the others listed with their reason), the FD column when its
    values are comparable, and DiT's qualitative findings tested against the measured noise."""
    rep, trials = s.rep, s.rep.trials
    s.fit_trials, rep.excluded = study.split_usable(trials, s.y_col)
    if rep.excluded:
        rep.notes.append(f"every fit leaves out {len(rep.excluded)} trial(s) (diverged, failed or unfinished): "
                         + "; ".join(f"{x['label']} [{x['trial_id']}]: {x['reason']}" for x in rep.excluded))
    fd = s.fd
    s.fd_col = f"final_{fd['key']}" if fd is not None and f"final_{fd['key']}" in trials else None
    mixed = _mixed_detectors(s.fit_trials, s.fd_col)
    if mixed:
        s.fd_col, s.fd = None, None
    se_col = "final_se_val_loss" if s.y_col == "final_val_loss" and "final_se_val_loss" in trials else None
    samples = runs.load_val_samples(rep.uri, s.fit_trials) if se_col else {}
    rep.findings = study.dit_findings(s.fit_trials, s.y_col, s.fd_col, s.fd_label, se_col=se_col, samples=samples)
    if mixed:
        rep.findings.append({"finding": f"{s.fd_label} falls with training compute", "held": None,
                             "evidence": mixed})
        rep.notes.append(mixed)
    # different experiments (another patch, objective, ...) at one x are never pooled as repeats
    s.distinct = [c for c in study.group_axes(s.fit_trials) if c != "arch"] + [
        c for c in study.varying_axes(s.fit_trials) if c in ("train.steps", study.BUDGET_KEY, study.LR_KEY)]


def _by(trials: pd.DataFrame, *cols: str) -> list[str]:
    """Grouping columns: arch always, plus objective when the study varies it, plus cols."""
    out = ["arch"]
    if trials["objective"].nunique() > 1:
        out.append("objective")
    return out + list(cols)


def fit_row(what: str, x_label: str, y_label: str, gf: scaling.GroupFit, note: str = "") -> dict:
    """One row of the fit table (and of fits.json): the law of one group with its intervals."""
    f = gf.fit
    return {
        "relation": what, "group": gf.label, "x": x_label, "y": y_label, "n": f.n,
        "alpha": f.alpha, "alpha_ci": f.alpha_ci, "A": f.A, "A_ci": f.A_ci, "E": f.E, "E_ci": f.E_ci, "r2": f.r2,
        "law": f.describe("x", "y"), "warning": f.warning, "note": note, "fitted": f.ok,
        "not_identified": f.identification(),
    }


def _fit_law(s: _Study, x: str, y: str, x_label: str, y_lab: str, stem: str, what: str, curves=None) -> None:
    """y = E + A·x^(−α) per architecture (and per patch size where an architecture has several), its rows
    in the fit table and its figures."""
    t, trials, fig = s.fit_trials, s.rep.trials, s.rep.add_figure
    kw = {"bootstrap": s.bootstrap, "seed": s.seed, "distinct_axes": s.distinct}
    pooled = scaling.fit_groups(t, x, y, by=_by(trials), **kw)
    per_patch = []
    if t["patch"].nunique() > 1:
        per_patch = scaling.fit_groups(t, x, y, by=_by(trials, "patch"), **kw)
        # an architecture trained at a single patch size: its per-patch law is its pooled law
        n_patch = t.groupby("arch")["patch"].nunique()
        per_patch = [gf for gf in per_patch if n_patch.get(gf.group.get("arch"), 0) > 1]
    for gf in pooled + per_patch:
        s.rep.fits.append(fit_row(what, x_label, y_lab, gf))
    fig(plots.plot_fits(pooled, s.out / f"fit_{stem}.png", x_label, y_lab, curves=curves, notes=s.rep.notes,
                        title=what),
        f"{what} — fitted law per architecture",
        f"x: {x_label}; y: {y_lab}; points: trials; line: y = E + A·x^(−α); band: 95 % bootstrap interval.")
    if per_patch:
        fig(plots.plot_fits(per_patch, s.out / f"fit_{stem}_by_patch.png", x_label, y_lab, curves=curves,
                            notes=s.rep.notes, title=f"{what}, per patch size"),
            f"{what} — fitted law per architecture and patch size",
            f"x: {x_label}; y: {y_lab}; one law per patch size; band: 95 % bootstrap interval.")


def _power_laws(s: _Study) -> None:
    """Loss vs training compute and vs parameters, FD vs forward GFLOPs."""
    trials, notes, fd = s.rep.trials, s.rep.notes, s.fd
    if s.y_col is None:
        notes.append("loss fits: skipped — neither val_loss nor training loss was logged")
    else:
        _fit_law(s, "train_gflops", s.y_col, COMPUTE_LABEL, s.y_label, "loss_vs_compute", "loss vs training compute",
                 curves=s.loss_curves)
        if trials["params"].notna().any():
            _fit_law(s, "params", s.y_col, PARAMS_LABEL, s.y_label, "loss_vs_params", "loss vs parameters")
        else:
            notes.append("loss vs parameters: skipped — parameter counts are not logged with the runs "
                         "(a metric, param or tag named params)")
    if fd is not None and f"final_{fd['key']}" in trials:
        _fit_law(s, "forward_gflops", f"final_{fd['key']}", FORWARD_LABEL, f"{s.fd_label} (final)",
                 f"{fd['key']}_vs_forward_gflops", f"{fd['name']} vs forward GFLOPs")


def _ci(ci) -> str:
    return f"[{ci[0]:.4g}, {ci[1]:.4g}]" if ci else "[n/a]"


def _frontier(s: _Study) -> None:
    """The compute-optimal frontier of each architecture's learning curves: the lower envelope of loss vs
    training compute, its law, and the optimal size per compute."""
    rep = s.rep
    c = s.loss_curves
    curves = c[c["run_id"].isin(s.fit_trials["run_id"])] if not c.empty else c
    if curves.empty:
        rep.notes.append("compute-optimal frontier: skipped — no loss curve against training compute")
        return
    for arch, c in curves.groupby("arch", sort=True):
        name = plots._arch_name(arch)
        if c["run_id"].nunique() < 2:
            rep.frontier_notes.append(f"{name}: a single trial — no frontier (the envelope of one curve is "
                                      "that curve)")
            continue
        t = rep.trials[rep.trials["arch"] == arch].set_index("trial_id")
        if t["params"].notna().all():
            size, measure = t["params"], "parameters"
        else:
            size, measure = t["forward_gflops"], "forward GFLOPs"
        fr = scaling.compute_frontier(c, size, size_measure=measure, bootstrap=s.bootstrap, seed=s.seed)
        opt = fr.optimal_size_fit
        rep.frontier_notes.append(f"{name}: {fr.note}" + (
            f": a = {opt.a:.3f} {_ci(opt.a_ci)}, R² = {opt.r2:.3f}" if opt is not None and opt.ok else ""))
        if measure != "parameters":
            rep.frontier_notes.append(f"{name}: model size is measured in forward GFLOPs (parameter counts "
                                      "are not logged), so the optimum is G_opt ∝ C^a")
        rep.fits.append(fit_row("frontier: lower envelope of loss vs training compute", COMPUTE_LABEL, s.loss_axis,
                                scaling.GroupFit({"arch": arch}, "compute", s.loss_key, fr.envelope_fit,
                                                 pd.DataFrame()),
                                note="envelope points are correlated: the interval is optimistic"))
        rep.add_figure(plots.plot_frontier(c, fr, s.out / f"frontier_{arch}.png", s.loss_axis, notes=rep.notes),
                       f"Compute-optimal frontier — {name}",
                       f"left: x: {COMPUTE_LABEL}, y: {s.loss_axis}; grey: every trial, red: lower envelope, dashed: "
                       f"its fitted law. right: isoFLOP slices, x: model size ({measure}), y: {s.loss_axis} at "
                       "fixed compute; stars: the parabola's optimum where the grid brackets it.")


def _arch_comparison(s: _Study) -> None:
    """DiT vs MM-DiT at matched compute (drawn when the study has both)."""
    comp = {s.loss_axis: s.loss_curves}
    if s.fd_curves is not None:
        comp[s.fd_label] = s.fd_curves
    s.rep.add_figure(plots.plot_arch_comparison(comp, s.out / "dit_vs_mmdit.png", notes=s.rep.notes),
                     "DiT vs MM-DiT (joint vs split attention) at matched compute",
                     f"left: x: {COMPUTE_LABEL}, y: the metric, one colour per architecture; right: each "
                     "architecture's best trial at the largest training compute all architectures reached.")
