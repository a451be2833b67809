"""The report in words: analysis.findings.Report as a list of blocks (analysis/blocks.py), from the answer
down — the ladder's pre-registered predictions, what the study found, figures, the fits it does not
claim, conventions, notes, trials. Numbers are formatted here; markup is the templates' (analysis/render.py).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from analysis import bracketing, extrapolation, loss_metric, posthoc_ema, scaling, study
from analysis.blocks import Block, figure, h2, h3, para, table, ul
from analysis.findings import Report

UNRESOLVED_TEXT = "not resolved (within noise)"
_AGREEMENT_RESULT = {"agree": "held", "disagree": "did not hold", scaling.NOT_INFORMATIVE: scaling.NOT_INFORMATIVE,
                     "not testable": "not testable"}
_NOT_IDENTIFIED_RULE = (
    "A fitted law is claimed only when the data identify it: it is listed here instead when an exponent's 95 % "
    "interval reaches a bound of its fitter (the refits stopped at the optimiser's box, so the interval is the "
    f"box's, not the data's) or is wider than {scaling.MAX_REL_WIDTH:g} × its estimate (the data allow about zero "
    "to twice the value, or either sign). More budgets or sizes narrow the intervals.")
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
_ISOFLOP_NOTE = (
    "L_opt intervals are taken on log L_opt (a loss is positive: L_opt · exp(±t·se/L_opt)). The parabola RMS "
    "residual is how far the measured means lie from each budget's parabola (the isoFLOP figure's lower panel "
    "shows each point); seed noise σ is the spread of a size's train.seed replicates (none without seeds: compare "
    "with the validation standard error in the trials table). A residual well above the noise, or residuals that "
    "follow the size, mean the parabola misses the curve's shape and its vertex is biased (Czech et al. 2026).")


def sections(rep: Report) -> list[Block]:
    """The whole report, section by section."""
    b = extrapolation.blocks(rep.ladder_rows, rep.ladder_error)  # a ladder's pre-registered prediction first
    b += [h2("What the study found")]
    b += [para(f"⚠ The two fitting methods disagree — {h}", True) for h in rep.headline]
    b += _findings(rep) + _laws_blocks(rep) + _holdout(rep) + _allocation(rep) + _isoflop_budgets(rep)
    if rep.frontier_notes:
        b += [h3("Compute-optimal frontier (learning curves)"), ul(rep.frontier_notes)]
    b += bracketing.blocks(rep.bracket_rows, rep.bracket_error, _unbracketed(rep))
    b += posthoc_ema.blocks(rep.trials)  # eval.ema_sigma_rels: the best EMA width per size
    b += loss_metric.blocks(rep)  # loss -> image metrics across trials
    b += [h2("Figures")] + [figure(f) for f in rep.figures]
    return b + _not_claimed(rep) + _conventions(rep) + _notes_and_trials(rep)


# --- formatting -----------------------------------------------------------------------------------


def fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, (float, np.floating)):
        if not math.isfinite(v):
            return "–"
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    return str(v)


def _ci(ci) -> str:
    return f"[{ci[0]:.4g}, {ci[1]:.4g}]" if ci else "[n/a]"


def _with_ci(v, ci) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{fmt(v)} {_ci(ci)}" if ci else fmt(v)


def held(v) -> str:
    """A finding's result in words."""
    if v == study.UNRESOLVED:
        return UNRESOLVED_TEXT
    if v == study.NOT_APPLICABLE:
        return study.NOT_APPLICABLE
    return "held" if v is True else "did not hold" if v is False else "not testable"


# --- what the study found -------------------------------------------------------------------------


def _findings(rep: Report) -> list[Block]:
    rows = [[f["finding"], held(f["held"]), f["evidence"]] for f in rep.findings]
    for r in rep.budget:
        ag = r["agreement"]
        if ag is not None:
            rows.append([f"approaches 2 and 3 agree on N_opt ∝ C^a ({r['group']})", _AGREEMENT_RESULT[ag.verdict],
                         ag.text])
        ho = r["holdout"]
        if ho is not None and ho.ok:
            rows.append([f"the held-out budget was predicted within its interval ({r['group']})",
                         "held" if ho.covered else "did not hold", ho.describe()])
    if not rows:
        return [h3("Findings"), para("No finding could be tested (see the fits not claimed).")]
    b = [h3("Findings"), table(["finding", "result", "evidence"], rows, 1)]
    if any(f["finding"] in (study.SIZE_FINDING, study.PATCH_FINDING) for f in rep.findings):
        b.append(para(_NOISE_TEST))
    return b


def _laws(rep: Report) -> tuple[list[list[str]], list[list[str]]]:
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


def _laws_blocks(rep: Report) -> list[Block]:
    laws, unidentified = _laws(rep)
    b = [h3("Laws claimed (95 % intervals)")]
    if laws:
        b.append(table(["relation", "group", "law", "n"], laws))
    else:
        b.append(para("No law is claimed: see the laws not identified and the fits not claimed below for why.", True))
    if unidentified:
        b += [h3("Laws not identified (fitted, not claimed)"), para(_NOT_IDENTIFIED_RULE),
              table(["relation", "group", "why not identified", "fitted law (for reference only)", "n"],
                    unidentified, 2)]
    return b


def _holdout(rep: Report) -> list[Block]:
    held_out = [r for r in rep.budget if r["holdout"] is not None and r["holdout"].ok]
    if not held_out:
        return []
    rows = []
    for r in held_out:
        h = r["holdout"]
        rows.append([r["group"], f"{h.compute:.4g}", str(h.n_fit_budgets), _with_ci(h.predicted, h.predicted_ci),
                     fmt(h.measured) + (f" ± {fmt(h.measured_std)}" if math.isfinite(h.measured_std) else ""),
                     f"{h.error_pct:+.2f} %", "yes" if h.covered else "no",
                     _with_ci(h.isoflop_predicted, h.isoflop_predicted_ci)
                     + (" (law not identified)" if h.isoflop_not_identified else ""),
                     (f"{h.fd_key}: predicted {_with_ci(h.fd_predicted, h.fd_predicted_ci)}, measured "
                      f"{fmt(h.fd_measured)}, error {h.fd_error_pct:+.2f} %") if h.fd_key else "–"])
    return [h3("Held-out prediction"),
            table(["group", "held-out C", "budgets fitted", "predicted best loss [95 %]", "measured best loss",
                   "error (measured − predicted) / measured", "inside interval", "isoFLOP law L_opt(C) [95 %]",
                   "FD"], rows)]


def _allocation(rep: Report) -> list[Block]:
    alloc = [r for r in rep.budget if r["allocation"]]
    if not alloc:
        return []
    b = [h3("Compute-optimal allocation"),
         para("At compute C (GFLOPs of multiply-adds, 3 × forward × images): train N_opt parameters on D_opt images "
           "(steps = D_opt / batch size) and expect this loss and FD.")]
    for r in alloc:
        if r["surface"] is not None and r["surface"].ok and not r["surface"].identified:
            b.append(para(f"⚠ {r['group']}: the loss surface is not identified (see above), so its columns (N_opt "
                       "surface, D_opt, steps, expected loss and FD) are extrapolations of a law the data do not "
                       "pin down — shown for reference, not claimed.", True))
    rows = []
    for r in alloc:
        for a in r["allocation"]:
            steps = a["d_opt"] / r["batch"] if "d_opt" in a and r.get("batch") and math.isfinite(r["batch"]) \
                else math.nan
            rows.append([r["group"], f"{a['compute']:.4g}" + ("" if a["trained"] else " (extrapolated)"),
                         _with_ci(a.get("n_opt"), a.get("n_opt_ci")), _with_ci(a.get("n_opt_iso"), a.get("n_opt_iso_ci")),
                         _with_ci(a.get("d_opt"), a.get("d_opt_ci")), fmt(steps),
                         _with_ci(a.get("loss"), a.get("loss_ci")), _with_ci(a.get("fd"), a.get("fd_ci"))])
    b.append(table(["group", "C", "N_opt, surface [95 %]", "N_opt, isoFLOP law [95 %]", "D_opt images [95 %]",
                    "steps", "expected loss [95 %]", "expected FD [95 %]"], rows))
    return b


def _isoflop_budgets(rep: Report) -> list[Block]:
    isos = [r for r in rep.budget if r["isoflop"] is not None and not r["isoflop"].budgets.empty]
    if not isos:
        return []
    rows = []
    for r in isos:
        for _, x in r["isoflop"].budgets.iterrows():
            rows.append([r["group"], str(x["budget"]), f"{x['compute']:.4g}", str(x["n_sizes"]), str(x["n_runs"]),
                         _with_ci(x["n_opt"], (x["n_opt_lo"], x["n_opt_hi"]) if math.isfinite(x["n_opt_lo"]) else None),
                         _with_ci(x["loss_opt"], (x["loss_opt_lo"], x["loss_opt_hi"])
                                  if math.isfinite(x["loss_opt_lo"]) else None),
                         f"{x['grid_decades']:.2f}", fmt(x["offset_decades"]),
                         fmt(x.get("rms_resid", math.nan)),
                         fmt(x["noise"]) if x.get("noise_from") == "seeds" else "– (no seeds)",
                         "yes" if x["bracketed"] else f"⚠ {x['note']}"])
    return [h3("isoFLOP budgets"),
            table(["group", "train.flops", "C", "sizes", "runs", "N_opt [95 %]", "L_opt [95 %]",
                   "grid width (decades)", "vertex offset (decades)", "parabola RMS residual", "seed noise σ",
                   "bracketed"], rows, 11),
            para(_ISOFLOP_NOTE)]


def _unbracketed(rep: Report) -> list[str]:
    """The budgets whose isoFLOP optimum the size grid still does not bracket."""
    out = []
    for r in rep.budget:
        iso = r.get("isoflop")
        if iso is not None and not iso.budgets.empty:
            out += [f"{x['budget']} ({r['group']})" for _, x in iso.budgets.iterrows() if not x["bracketed"]]
    return out


# --- what is not claimed, how the numbers were made, the trials -----------------------------------


def _not_claimed(rep: Report) -> list[Block]:
    lines = [f"{r['relation']} ({r['group']}, n = {r['n']}): {r['warning']}" for r in rep.fits if not r["fitted"]]
    lines += rep.not_claimed
    b = [h2("Fits not claimed"), ul(lines) if lines else para("None: every fit attempted is claimed above.")]
    warned = [r for r in rep.fits if not r["fitted"]]
    if warned:
        b.append(para(f"Warning: {len(warned)} of {len(rep.fits)} power-law fits are under-determined or poor and "
                   "are not claimed.", True))
    return b


def _axes_used(rep: Report) -> list[str]:
    return sorted({f"{r['relation']}: x = {r['x']}; y = {r['y']}" for r in rep.fits})


def _conventions(rep: Report) -> list[Block]:
    b = [h2("Conventions"), ul(list(rep.conventions) + [f"Axes — {a}" for a in _axes_used(rep)])]
    if rep.fd_rows:
        b += [h3("Fréchet distances"),
              table(["metric", "extractor", "is FID", "CFG", "configured feature_extractor"],
                    [[d["key"], d["extractor"], "yes" if d["is_fid"] else "no — a stand-in",
                      fmt(d["cfg"]) if d["cfg"] is not None else "", d["configured"]] for d in rep.fd_rows])]
    return b


def summary(trials: pd.DataFrame) -> pd.DataFrame:
    """The trials table of the report: one row per trial, its configuration, compute and final metrics."""
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


def _notes_and_trials(rep: Report) -> list[Block]:
    b = [h2("Notes"), ul(rep.notes)] if rep.notes else []
    b.append(h2("Trials"))
    if rep.excluded:
        b += [para("Left out of every fit:", True),
              ul([f"{x['label']} [{x['trial_id']}]: {x['reason']}" for x in rep.excluded])]
    if not rep.trials.empty:
        s = summary(rep.trials)
        b.append(table(list(s.columns), [[fmt(v) for v in row] for row in s.itertuples(index=False)]))
    return b
