"""The report's budget study: per group of trials that may share one law, the scaling laws fitted from
runs trained to fixed compute budgets, what is not claimed and why, and their figures.

Per group: the loss surface L(N, D) (Chinchilla approach 3; Hoffmann et al. 2022, fitted as Besiroglu
et al. 2024 recommend), the isoFLOP optima when trials are defined by budgets (approach 2; Liang et al.
2024 for DiT, its biases: Czech et al. 2026), whether the two agree, the largest budget held out and
predicted, loss -> FD, and the compute-optimal allocation. The fits themselves are analysis.scaling;
analysis/sections.py puts what this module collects (in analysis.findings.Report) into words.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from analysis import plots, scaling, study
from analysis.findings import Report
from analysis.plots import COMPUTE_LABEL, PARAMS_LABEL

# the report's Conventions section, on the budget study's unit of compute and methods
CONVENTIONS = [
    "Training budgets: a budget trial's `train.flops` param labels its budget; the budget's compute C is the "
    "median measured `train_gflops` of its trials — the one unit of compute in this report (GFLOPs of "
    "multiply-adds, 3 × forward × images). Papers that count FLOPs as 6·N·tokens (Hoffmann et al. 2022, "
    "Liang et al. 2024) use 2 × 1e9 × this number.",
    "Loss surface (Chinchilla approach 3; Hoffmann et al. 2022, fitted as Besiroglu et al. 2024 recommend): "
    "L(N, D) = E + A/N^α + B/D^β with N = parameters and D = training images seen (not tokens); Huber loss "
    "(δ = 1e-3) on log-loss residuals, summed, L-BFGS-B from a grid of starts, the best kept, parameters "
    "unrounded; 95 % intervals from a bootstrap over trials (replicate seeds resampled together). "
    "Compute-optimal allocation for C = k · N · D with k = median train_gflops / (params · images) of the "
    "group's trials.",
    "isoFLOP optima (approach 2): per budget a parabola of loss over log N; its minimum with a delta-method "
    "interval (on log N_opt and log L_opt, so a loss interval is never negative); a budget whose best trained "
    "size is the smallest or largest (or whose vertex is outside the grid) is flagged 'not bracketed' and left "
    "out of N_opt(C) = k·C^a. Parabolas are biased when the grid is wide or off-centre or α ≠ β (Czech et al. "
    "2026, arXiv 2603.22339): the budget table gives each grid's width, the vertex's offset from its centre and "
    "the parabola's RMS residual.",
    "Agreement: the two N_opt exponents agree when their difference is within 1.96 combined standard errors "
    "(from their 95 % intervals, which carry the replicate noise); the comparison is 'not informative' when "
    "each interval contains the other's estimate and both are wider than 50 % of their estimates, and the "
    "report then extrapolates how many budgets would narrow them (width ∝ 1/√budgets). A law is claimed only "
    "when identified: no exponent interval at its fitter's bound or wider than its estimate. Held-out: with at "
    "least 3 budgets the largest is left out, predicted from the others and compared; error % = 100 · "
    "(measured − predicted) / measured (positive: the law predicted too low), as in the Extrapolation section. "
    "FD is predicted through FD = k · loss^a fitted across the other trials.",
]

SURFACE_BOOTSTRAP = 200  # refits of the 5-parameter surface (each from the best optima of the full fit)


def analyse_budgets(rep: Report, trials: pd.DataFrame, y_col: str, fd: dict | None, fd_col: str | None,
                    fd_label: str, y_label: str, out: Path, bootstrap: int, seed: int, holdout: str, fig) -> None:
    """Per group of trials that may share a law (same architecture, patch, objective ...): the loss
    surface L(N, D) (approach 3), the isoFLOP optima when trials are defined by budgets (approach 2),
    whether the two agree, the held-out budget and the compute-optimal allocation.

    Appends to the report as it goes — one dict per group to rep.budget, a line per fit it does not
    claim to rep.not_claimed, methods that disagree to rep.headline — so that what was done survives
    an error further on; fig(path, title, caption) adds each figure in the order they are made."""
    n_boot = min(int(bootstrap), SURFACE_BOOTSTRAP) if bootstrap else 0
    for group, g in study.analysis_groups(trials):
        name = study.group_label(group)
        stem = study.group_stem(group)
        if g["params"].isna().all():
            rep.not_claimed.append(f"loss surface L(N, D) ({name}): parameter counts are not logged (metric params)")
            continue
        rows = study.budget_rows(g, y_col, fd_col)
        has_budgets = study.BUDGET_KEY in g and rows["budget"].notna().any() and rows["budget"].nunique() > 0
        if study.LR_KEY in g and pd.to_numeric(g[study.LR_KEY], errors="coerce").nunique() > 1:
            fig(plots.plot_loss_vs_lr(_lr_rows(g, y_col), out / f"loss_vs_lr_{stem}.png", y_label,
                                      f"{y_label} vs learning rate — {name}"),
                f"Loss vs learning rate per size — {name}",
                "x: train.lr (log); y: the loss; one line per model size (and budget); error bars: seed spread. The "
                "fits use each size's best LR.")
        k = study.compute_per_param_image(rows)
        batch = pd.to_numeric(g.get("train.batch_size", pd.Series(dtype=float)), errors="coerce").median()
        res: dict = {"group": name, "k": k, "rows": rows, "batch": batch, "surface": None, "isoflop": None, "agreement": None,
                     "holdout": None, "allocation": [], "loss_fd": None}
        surf = scaling.fit_loss_surface(rows["n"], rows["d"], rows["loss"], bootstrap=n_boot, seed=seed,
                                        groups=rows["group"], k=k if np.isfinite(k) else 1.0)
        res["surface"] = surf
        if not surf.ok:
            rep.not_claimed.append(f"loss surface L(N, D) ({name}): {surf.warning}")
        if has_budgets:
            _isoflop_and_holdout(rep, res, fd, holdout, bootstrap, n_boot, seed)
        if rows["fd"].notna().sum() >= 3:
            res["loss_fd"] = scaling.fit_loss_to_fd(rows["loss"], rows["fd"], bootstrap=bootstrap or 1000, seed=seed)
        res["allocation"] = _allocation_rows(res, res["isoflop"], surf)
        rep.budget.append(res)
        _figures(res, out, stem, y_label, fig)


def _isoflop_and_holdout(rep: Report, res: dict, fd: dict | None, holdout: str, bootstrap: int, n_boot: int,
                         seed: int) -> None:
    """The isoFLOP optima of a group trained to budgets (res["isoflop"]), whether they agree with its loss
    surface, and its largest budget held out and predicted (res["holdout"])."""
    name, rows, surf, k = res["group"], res["rows"], res["surface"], res["k"]
    iso = scaling.fit_isoflop_optima(rows, bootstrap=bootstrap or 1000, seed=seed)
    res["isoflop"] = iso
    for _, b in iso.budgets.iterrows():
        if not b["bracketed"]:
            rep.not_claimed.append(f"isoFLOP optimum at C = {b['compute']:.4g} ({name}, train.flops = "
                                   f"{b['budget']}): {b['note']}")
    for note in iso.notes:
        rep.not_claimed.append(f"N_opt(C), L_opt(C) from isoFLOP parabolas ({name}): {note}")
    if iso.n_opt_fit is not None and surf.ok:
        res["agreement"] = scaling.compare_optimal_exponents(iso, surf)
        if res["agreement"].agree is False:
            rep.headline.append(f"{name}: {res['agreement'].text}. Neither exponent is trustworthy until "
                                "they agree: check the size grid's bracketing and width (Czech et al. 2026) "
                                "and the replicate noise.")
    if holdout != "largest":
        return
    if rows["budget"].nunique() < 3:
        rep.not_claimed.append(f"held-out prediction ({name}): {rows['budget'].nunique()} budget(s); "
                               "holding one out needs at least 3")
        return
    ho = scaling.holdout_prediction(rows, fd="fd" if rows["fd"].notna().any() else None, k=k, bootstrap=n_boot,
                                    seed=seed)
    if ho.fd_key:
        ho.fd_key = fd["key"] if fd else ho.fd_key
    res["holdout"] = ho
    if not ho.ok:
        rep.not_claimed.append(f"held-out prediction ({name}): {ho.warning}")


def _figures(res: dict, out: Path, stem: str, y_label: str, fig) -> None:
    """A group's isoFLOP curves, compute-optimal laws, loss surface and held-out prediction."""
    name, rows, iso, surf, k = res["group"], res["rows"], res["isoflop"], res["surface"], res["k"]
    pts = rows.groupby("group", as_index=False).agg(n=("n", "first"), d=("d", "median"), loss=("loss", "mean"),
                                                    compute=("compute", "median"))
    if iso is not None:
        fig(plots.plot_isoflop(iso, out / f"isoflop_{stem}.png", y_label, f"isoFLOP curves — {name}"),
            f"isoFLOP curves — {name}",
            f"x: {PARAMS_LABEL}; y: {y_label}; one colour per training budget (train.flops; C = measured training "
            "GFLOPs, multiply-adds); error bars: seed spread; curves: a parabola in log N per budget; stars: its "
            "minimum with the interval; hollow points / dashed: budgets whose optimum the grid does not bracket. "
            "Lower panel: each parabola's residuals (measured − parabola) and, in the legend, their RMS "
            "(also in the isoFLOP budgets table beside the seed noise). The parabola is kept — it is the shape "
            "of Hoffmann et al. 2022 and Liang et al. 2024, so the vertices compare with theirs — but it is a "
            "local approximation: residuals that follow the size (not scatter about 0) mean the curve is "
            "asymmetric in log N and the vertex is biased (Czech et al. 2026, arXiv 2603.22339); approach 3 "
            "(the loss surface) has no such shape constraint.")
    fig(plots.plot_optimal(iso, surf, out / f"optimal_{stem}.png", y_label, f"compute-optimal laws — {name}"),
        f"N_opt(C) and L_opt(C) — {name}",
        f"x: {COMPUTE_LABEL}; left: compute-optimal parameters, right: loss at the optimum; blue: isoFLOP minima "
        "and their power law (approach 2), red dashed: the loss surface's allocation (approach 3); bands: 95 % "
        "intervals.")
    fig(plots.plot_surface(surf, pts, out / f"surface_{stem}.png", y_label, f"fitted loss surface — {name}"),
        f"Fitted loss surface L(N, D) — {name}",
        "x: parameters N; y: images seen D; contours: iso-loss lines of L = E + A/N^α + B/D^β; points: trials "
        f"(colour: measured loss); dotted: constant compute C = k·N·D (k = {k:.4g}); red: the compute-optimal path.")
    if res["holdout"] is not None and res["holdout"].ok:
        fig(plots.plot_holdout(res["holdout"], out / f"holdout_{stem}.png", y_label,
                               f"held-out budget — {name}"),
            f"Predicted vs measured at the held-out budget — {name}",
            f"x: {PARAMS_LABEL}; y: {y_label} at the largest budget; red: predicted by the surface fitted on the "
            "smaller budgets (band: 95 % bootstrap interval, clipped to the plotted range — the points and half "
            "their span either side; a triangle at the edge marks a size whose interval runs beyond it, "
            f"{_band_extent(res['holdout'])}); black: measured (error bars: seed spread). The title's error: "
            "100 · (measured − predicted) / measured.")


def _band_extent(ho) -> str:
    """How far the held-out band runs beyond the plot, in words for the caption."""
    p = ho.points
    lo, hi = plots.holdout_ylim(p)
    out = []
    if (p["hi"] > hi).any():
        out.append(f"up to {p['hi'].max():.4g} at N = {p.loc[p['hi'].idxmax(), 'n']:.4g}")
    if (p["lo"] < lo).any():
        out.append(f"down to {p['lo'].min():.4g}")
    return "it reaches " + " and ".join(out) if out else "none does here"


def fits_json_rows(rep: Report) -> list[dict]:
    """fits.json rows for the surface, isoFLOP, agreement and held-out results (beside the power laws)."""
    out = []
    for r in rep.budget:
        s, iso, ag, ho = r["surface"], r["isoflop"], r["agreement"], r["holdout"]
        if s is not None:
            out.append({"relation": "loss surface L(N, D)", "group": r["group"], "fitted": s.ok, "n": s.n,
                        "warning": s.warning, **s.as_dict()})
        if iso is not None:
            out.append({"relation": "isoFLOP optima", "group": r["group"], "n": len(iso.budgets),
                        "fitted": bool(iso.n_opt_fit is not None and iso.n_opt_fit.ok),
                        "warning": "; ".join(iso.notes) or None, **iso.as_dict()})
        if ag is not None:
            out.append({"relation": "agreement of the N_opt exponents", "group": r["group"], "n": 2,
                        "fitted": ag.agree is not None, "warning": None, **ag.as_dict()})
        if ho is not None:
            out.append({"relation": "held-out prediction", "group": r["group"], "n": ho.n_fit_budgets,
                        "fitted": ho.ok, **ho.as_dict()})
        if r["allocation"]:
            out.append({"relation": "compute-optimal allocation", "group": r["group"], "n": len(r["allocation"]),
                        "fitted": True, "warning": None, "k": r["k"], "rows": r["allocation"]})
    return out


def _lr_rows(g: pd.DataFrame, y_col: str) -> pd.DataFrame:
    return pd.DataFrame({"size": g["size"].astype(str), "lr": pd.to_numeric(g[study.LR_KEY], errors="coerce"),
                         "loss": pd.to_numeric(g[y_col], errors="coerce"),
                         "budget": g[study.BUDGET_KEY] if study.BUDGET_KEY in g else np.nan})


def _allocation_rows(res: dict, iso, surf) -> list[dict]:
    """At each trained budget and one decade beyond the largest: the compute-optimal size, images and
    steps (at the study's batch size), the expected loss and FD, with intervals."""
    rows = res["rows"]
    if not surf.ok and (iso is None or iso.n_opt_fit is None or not iso.n_opt_fit.ok):
        return []
    cs = sorted(rows.groupby("budget")["compute"].median()) if rows["budget"].notna().any() else []
    if not cs and surf.ok:
        cs = [float(rows["compute"].median())]
    cs = list(cs) + [10 * max(cs)] if cs else []
    out = []
    for c in cs:
        r = {"compute": c, "trained": c <= float(rows["compute"].max()) * 1.01}
        if surf.ok:
            a = surf.allocation(c)
            r.update(n_opt=a["n_opt"], n_opt_ci=a["n_opt_ci"], d_opt=a["d_opt"], d_opt_ci=a["d_opt_ci"],
                     loss=a["loss_opt"], loss_ci=a["loss_opt_ci"])
        if iso is not None and iso.n_opt_fit is not None and iso.n_opt_fit.ok:
            lo, hi = iso.n_opt_fit.band(np.array([c]))
            r.update(n_opt_iso=float(iso.n_opt_fit.predict(c)),
                     n_opt_iso_ci=(float(lo[0]), float(hi[0])) if np.isfinite(lo[0]) else None)
        rel = res.get("loss_fd")
        if rel is not None and rel.ok and "loss" in r:
            r["fd"] = float(rel.predict(r["loss"]))
            if r.get("loss_ci"):
                ends = [float(rel.predict(x)) for x in r["loss_ci"]]
                r["fd_ci"] = (min(ends), max(ends))
        out.append(r)
    return out
