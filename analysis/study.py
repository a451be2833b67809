"""Trials (one row per MLflow run, from analysis.runs) -> what the fits may use.

- Which trials enter a fit: only finished ones; diverged, failed and unfinished trials are listed
  by name with their reason (`split_usable`).
- Which trials are repeats: trials that differ only in `train.seed` (`replicate_keys`); the fits
  average them or resample them together, and their spread is the noise level.
- Which trials may share one law: never trials that differ in another axis of the grid (patch,
  objective, attention, batch size ...): `analysis_groups` splits by every such axis.
- What the study found about DiT's qualitative claims (`dit_findings`), each gap tested against the
  measured noise: the validation-draw standard error and the replicates' spread.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from harness.evaluation.noise import stratified_standard_error  # numpy only: the evaluator's estimator

SEED_KEYS = ("train.seed",)
BUDGET_KEY = "train.flops"  # a trial defined by a training-compute budget (the companion budget trials)
LR_KEY = "train.lr"
SIZE_KEYS = ("model.size",)
# axes folded into a study's size / budget / LR structure rather than splitting it into groups
_STRUCTURE_KEYS = {"model.size", "model.family", "model.attention", "train.seed", BUDGET_KEY, "train.steps", LR_KEY}
# axes that are always experiments of their own, even when the grid ties them to a size
_REAL_AXES = {"model.patch", "model.family", "model.attention", "objective.kind"}
_DERIVED = ("final_", "best_")


def config_columns(trials: pd.DataFrame) -> list[str]:
    """The trial config's dotted keys among the columns (params logged by the harness)."""
    keys = trials.attrs.get("config_keys")
    if keys:
        return [k for k in keys if k in trials]
    return [c for c in trials.columns if "." in c and not c.startswith(_DERIVED)]


def varying_axes(trials: pd.DataFrame) -> list[str]:
    """Config keys whose value differs between trials (the grid's axes, and what they imply)."""
    out = []
    for c in config_columns(trials):
        if trials[c].astype(str).nunique(dropna=False) > 1:
            out.append(c)
    return out


def split_usable(trials: pd.DataFrame, loss_col: str | None = None) -> tuple[pd.DataFrame, list[dict]]:
    """(trials every fit may use, excluded trials as {label, trial_id, reason}).

    A trial is used only when its status (the `ditscale.status` tag) is `finished` and its loss is
    finite. Failed trials keep their reason ("failed: non-finite loss ..."); "diverged" anywhere in the
    status, or a non-finite loss, is reported as divergence; anything else is unfinished."""
    excluded, keep = [], []
    for i, row in trials.iterrows():
        status = str(row.get("status") or "")
        loss = row.get(loss_col) if loss_col else None
        bad_loss = loss_col is not None and loss_col in trials and not (
            isinstance(loss, (int, float, np.floating)) and math.isfinite(float(loss)))
        if "diverged" in status.lower() and not status.startswith("failed"):
            reason = status if status.startswith("diverged") else f"diverged ({status})"  # not "diverged (diverged …)"
        elif status.startswith("failed"):
            reason = status
        elif status != "finished":
            reason = f"unfinished (status: {status or 'unknown'})"
        elif bad_loss:
            reason = f"diverged or not evaluated ({loss_col} is {loss})"
        else:
            keep.append(i)
            continue
        excluded.append({"label": str(row.get("label", "")), "trial_id": str(row.get("trial_id", "")),
                         "run_name": str(row.get("run_name", "")), "reason": reason})
    return trials.loc[keep], excluded


def replicate_keys(trials: pd.DataFrame, seed_keys=SEED_KEYS) -> pd.Series:
    """A label per trial; trials that differ only in a seed share it (they are replicates)."""
    axes = [c for c in varying_axes(trials) if c not in seed_keys]
    cols = ["arch"] + [c for c in ("size", "patch") if c in trials] + axes
    return trials[cols].astype(str).agg("|".join, axis=1)


def _derived_from_size(trials: pd.DataFrame, key: str) -> bool:
    """A key the grid ties to the model size (one value per size, several sizes): μP-style rules."""
    if key in _REAL_AXES or "size" not in trials:
        return False
    per_size = trials.groupby("size")[key].nunique(dropna=False)
    return bool(len(per_size) > 1 and (per_size <= 1).all())


def group_axes(trials: pd.DataFrame) -> list[str]:
    """Columns that split trials into separately fitted groups: architecture, plus every varying
    axis that is not the size, a seed, the budget, the step count (the D axis) or the LR (tuned per
    size), nor tied one-to-one to the size."""
    axes = [c for c in varying_axes(trials) if c not in _STRUCTURE_KEYS and not _derived_from_size(trials, c)]
    cols = ["arch"] + (["objective"] if "objective" in trials and trials["objective"].nunique() > 1 else [])
    if "patch" in trials and trials["patch"].nunique() > 1:
        cols.append("patch")
    return cols + [c for c in axes if c not in ("model.patch", "objective.kind")]


def analysis_groups(trials: pd.DataFrame) -> list[tuple[dict, pd.DataFrame]]:
    """[(group as {column: value}, its trials)], one per combination of group_axes."""
    cols = [c for c in group_axes(trials) if c in trials]
    if trials.empty:
        return []
    out = []
    for key, df in trials.groupby(cols, sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        out.append((dict(zip(cols, key)), df))
    return out


def group_label(group: dict) -> str:
    from analysis.plots import ARCH_NAMES

    parts = []
    for k, v in group.items():
        parts.append(ARCH_NAMES.get(v, v) if k == "arch" else f"{k} {v}")
    return ", ".join(str(p) for p in parts) or "all trials"


def group_stem(group: dict) -> str:
    return "_".join(str(v) for v in group.values()).replace("/", "-").replace(" ", "").replace(".", "p") or "all"


def budget_rows(trials: pd.DataFrame, loss_col: str, fd_col: str | None = None) -> pd.DataFrame:
    """One row per trial for the budget fits: budget (the `train.flops` label), compute (measured
    training GFLOPs, multiply-adds), n (parameters), d (images seen), loss, fd, group (replicate
    label), lr, label. With an LR axis only the best LR (lowest replicate-mean loss) of each
    (budget, size) is kept: the LR is tuned per size (Porian et al. 2024, arXiv 2406.19146)."""
    t = trials
    rows = pd.DataFrame({
        "budget": t[BUDGET_KEY] if BUDGET_KEY in t else np.nan,
        "compute": pd.to_numeric(t["train_gflops"], errors="coerce"),
        "n": pd.to_numeric(t["params"], errors="coerce"),
        "d": pd.to_numeric(t["samples_seen"], errors="coerce"),
        "loss": pd.to_numeric(t[loss_col], errors="coerce"),
        "fd": pd.to_numeric(t[fd_col], errors="coerce") if fd_col and fd_col in t else np.nan,
        "group": replicate_keys(t), "label": t["label"].astype(str), "trial_id": t["trial_id"],
        "lr": pd.to_numeric(t[LR_KEY], errors="coerce") if LR_KEY in t else np.nan,
        "size": t["size"].astype(str),
    })
    rows = rows.dropna(subset=["n", "d", "loss"])
    if rows["lr"].nunique() > 1:
        means = rows.groupby(["budget", "n", "lr"], dropna=False)["loss"].mean().reset_index()
        best = means.loc[means.groupby(["budget", "n"], dropna=False)["loss"].idxmin(), ["budget", "n", "lr"]]
        rows = rows.merge(best, on=["budget", "n", "lr"], how="inner")
    return rows.reset_index(drop=True)


def compute_per_param_image(rows: pd.DataFrame) -> float:
    """k in C = k · N · D for these runs: median of compute / (params · images)."""
    k = rows["compute"] / (rows["n"] * rows["d"])
    k = k[np.isfinite(k) & (k > 0)]
    return float(k.median()) if len(k) else math.nan


def spearman(x, y) -> float:
    x, y = pd.Series(np.asarray(x, dtype=float)), pd.Series(np.asarray(y, dtype=float))
    ok = x.notna() & y.notna()
    if ok.sum() < 3:
        return math.nan
    return float(x[ok].rank().corr(y[ok].rank()))


Z_NOISE = 2.0  # a step between two configurations counts when its gap exceeds this many combined standard errors
UNRESOLVED = "unresolved"  # a finding's `held` when some steps are within the noise and none goes the wrong way
NOT_APPLICABLE = "not applicable"  # a finding's `held` when the study's design cannot test it
SIZE_FINDING = "bigger is better at fixed patch size"
PATCH_FINDING = "a smaller patch is better at fixed model size"


def _signed(x: float) -> str:
    return f"{x:+.3g}".replace("-", "−")


def _ordered_cells(g: pd.DataFrame, by: str) -> pd.DataFrame:
    """One configuration per row (mean, sd, k replicates, mean se, replicate variance of the mean), in the
    order the loss must fall: sizes small -> large, patches large -> small."""
    cells = g.groupby(by).agg(mean=("_loss", "mean"), sd=("_loss", "std"), k=("_loss", "count"), se=("_se", "mean"))
    if len(cells) < 2:
        return cells
    order = (g.groupby(by)["size_rank"].first() if by == "size"
             else -pd.Series(cells.index.astype(float), index=cells.index))
    cells = cells.loc[order.sort_values(kind="stable").index]
    cells["rep_var"] = np.where(cells["k"] >= 2, cells["sd"] ** 2 / cells["k"], np.nan)
    return cells


def _step(cells: pd.DataFrame, i: int, ids: dict, samples: dict) -> tuple[str, str, str | None, bool]:
    """Step i of the sequence against its noise: (verdict, detail, noise kind, tested against noise)."""
    a, b = cells.index[i - 1], cells.index[i]
    gap = cells["mean"].iloc[i] - cells["mean"].iloc[i - 1]
    sigma, kind = _gap_sigma(cells.loc[a], cells.loc[b], ids[a], ids[b], samples)
    if not math.isfinite(sigma):  # no noise estimate on one side: the loss must fall, as before noise was measured
        return ("better" if gap < 0 else "worse"), f"Δ {_signed(gap)}", None, False
    band = Z_NOISE * sigma
    verdict = "better" if gap < -band else "worse" if gap > band else "within noise"
    return verdict, f"Δ {_signed(gap)}, {Z_NOISE:g}σ {band:.3g}", kind, True


def _noise_text(kinds: set, replicates: set, untested: int) -> str:
    noise = " + ".join([_NOISE_KINDS[k] for k in sorted(kinds)]
                       + ([f"replicate spread where a configuration has {_seed_counts(replicates)} seeds"] if replicates else []))
    if not noise:
        return "no noise estimate: gaps not tested against noise"
    return f"gaps tested against {Z_NOISE:g}σ of the noise ({noise})" + (
        f"; {untested} step(s) without a noise estimate compared strictly" if untested else "")


def _loss_finding(t: pd.DataFrame, fixed: list[str], by: str, within: list[str], name: str, loss_col: str,
                  samples: dict) -> dict:
    """One loss finding (see dit_findings): every step of `by`'s sequence in every group of trials that
    share `within` and the `fixed` axes, tested against its noise."""
    comps, verdicts, kinds, replicates, untested = [], [], set(), set(), 0
    for key, g in t.groupby(["arch"] + within + fixed, dropna=False, sort=True):
        cells = _ordered_cells(g, by)
        if len(cells) < 2:
            continue
        replicates |= {int(k) for k in cells["k"] if k >= 2}
        ids = {v: list(g.loc[g[by] == v, "trial_id"]) for v in cells.index}
        key = key if isinstance(key, tuple) else (key,)
        what = ", ".join([str(key[0])] + [f"{c} {v}" for c, v in zip(within, key[1:1 + len(within)])])
        text = f"{what}: {by} {cells.index[0]}: {cells['mean'].iloc[0]:.4g}"
        for i in range(1, len(cells)):
            verdict, detail, kind, tested = _step(cells, i, ids, samples)
            if tested:
                kinds |= {kind} - {None}
            else:
                untested += 1
            verdicts.append(verdict)
            mark = "" if verdict == "better" else f": {verdict}"
            text += f" → {by} {cells.index[i]}: {cells['mean'].iloc[i]:.4g} ({detail}{mark})"
        comps.append(text)
    if not comps:
        return {"finding": name, "held": None, "evidence": f"no two finished trials differ only in {by}"}
    held = False if "worse" in verdicts else True if all(v == "better" for v in verdicts) else UNRESOLVED
    return {"finding": name, "held": held,
            "evidence": f"{loss_col}, " + "; ".join(comps) + f"; {_noise_text(kinds, replicates, untested)}"}


def dit_findings(trials: pd.DataFrame, loss_col: str | None, fd_col: str | None, fd_name: str = "FD",
                 se_col: str | None = None, samples: dict | None = None) -> list[dict]:
    """DiT's qualitative findings (Peebles & Xie 2023), checked on this study's finished trials:
    bigger is better at fixed patch; a smaller patch is better at fixed size; the Fréchet distance
    falls with training compute (Spearman ≤ −0.8; in an isoFLOP design judged on its compute-optimal
    frontier, `_fd_on_frontier`). Each: {finding, held, evidence}, held one of True, False, UNRESOLVED
    ("unresolved": a truthy string, compare with `is True`), NOT_APPLICABLE (the design cannot test it)
    or None (not testable).
    Comparisons are made between trials that share every other axis (and replicate means).

    The loss findings test every step of their sequence (sizes small → large at fixed patch, patches
    large → small at fixed size) against the measured noise σ of the step's gap (`_gap_sigma`): paired
    per-sample validation losses (`samples`, trial_id -> the evaluator's val_losses table) when every
    trial of both configurations has them, else each trial's validation-draw standard error (`se_col`,
    the evaluator's se_val_loss, averaged over a configuration's replicates and combined as
    independent: conservative), plus the replicates' variance of the mean s²/k (trials differing only
    in train.seed). A step is better / worse when the loss falls / rises by more than Z_NOISE · σ, else
    within noise. A finding held when every step is better, did not hold when any step is worse, and
    is UNRESOLVED otherwise. A step with no noise estimate on a side is compared strictly (it must
    fall), as are all steps of trials without per-sample losses, se and replicates."""
    out = []
    if loss_col is None or trials.empty or loss_col not in trials:
        return out
    t = trials.copy()
    t["_loss"] = pd.to_numeric(t[loss_col], errors="coerce")
    t["_se"] = pd.to_numeric(t[se_col], errors="coerce") if se_col and se_col in t else np.nan
    fixed = [c for c in varying_axes(t) if c not in ("model.size", "model.patch", "train.seed", "model.family",
                                                          "model.attention") and not _derived_from_size(t, c)]

    out.append(_loss_finding(t, fixed, "size", ["patch"], SIZE_FINDING, loss_col, samples or {}))
    out.append(_loss_finding(t, fixed, "patch", ["size"], PATCH_FINDING, loss_col, samples or {}))
    if fd_col and fd_col in t and t[fd_col].notna().sum() >= 3:
        if is_isoflop_design(t):
            out.append(_fd_on_frontier(t, fd_col, fd_name))
            return out
        rho = spearman(t["train_gflops"], t[fd_col])
        evidence = f"Spearman({fd_col}, train_gflops) = {rho:.3f} over {int(t[fd_col].notna().sum())} trials"
        out.append({"finding": f"{fd_name} falls with training compute (Spearman ≤ −0.8)",
                    "held": bool(rho <= -0.8) if math.isfinite(rho) else None,
                    "evidence": evidence + _fd_ties(t, fd_col)})
    return out


def is_isoflop_design(trials: pd.DataFrame) -> bool:
    """Trials defined by training-compute budgets (the `train.flops` param) where several model sizes
    share a budget: along one budget compute is fixed by construction, so compute and model size are
    traded against each other rather than compute growing."""
    if BUDGET_KEY not in trials or "size" not in trials:
        return False
    t = trials[trials[BUDGET_KEY].notna() & (trials[BUDGET_KEY].astype(str) != "")]
    return bool(len(t) and t.groupby(BUDGET_KEY)["size"].nunique().max() >= 2)


def _fd_on_frontier(t: pd.DataFrame, fd_col: str, fd_name: str) -> dict:
    """DiT's "FD falls with training compute" (Peebles & Xie 2023, a fixed-step grid: every size trained
    longer) judged the way an isoFLOP design can test it: on its compute-optimal frontier, the best FD
    (lowest replicate mean over the sizes) of each budget against the budget's compute (median
    train_gflops), Spearman ≤ −0.8 over at least 3 budgets. Across all trials it would rank sizes that
    share a budget by construction, which says nothing about compute. Fewer budgets: not applicable."""
    name = f"{fd_name} falls with training compute — isoFLOP design, judged on the compute-optimal frontier " \
           "(best FD per budget; Spearman ≤ −0.8)"
    d = t.assign(_fd=pd.to_numeric(t[fd_col], errors="coerce"),
                 _c=pd.to_numeric(t["train_gflops"], errors="coerce")).dropna(subset=["_fd"])
    d = d.assign(_cfg=replicate_keys(d)) if len(d) else d.assign(_cfg="")
    sizes = int(d.groupby(BUDGET_KEY)["size"].nunique().max()) if len(d) else 0
    # one cell per configuration (its seeds averaged); the frontier: each budget's best cell
    cells = d.groupby("_cfg").agg(budget=(BUDGET_KEY, "first"), size=("size", "first"), fd=("_fd", "mean"))
    best = cells.loc[cells.groupby("budget")["fd"].idxmin()] if len(cells) else cells
    best = best.assign(c=best["budget"].map(d.groupby(BUDGET_KEY)["_c"].median())).sort_values("c")
    design = f"{len(d)} trials, up to {sizes} sizes per budget over {len(best)} budget(s) (train.flops)"
    if len(best) < 3:
        return {"finding": name, "held": NOT_APPLICABLE,
                "evidence": f"not applicable: {design}; the frontier has {len(best)} point(s) and a trend needs 3 "
                            f"budgets (across all trials sizes that share a budget would be ranked as compute)"}
    rho = spearman(best["c"], best["fd"])
    path = " → ".join(f"C {c:.4g}: {fd:.4g} ({size})" for c, fd, size in zip(best["c"], best["fd"], best["size"]))
    return {"finding": name, "held": bool(rho <= -0.8) if math.isfinite(rho) else None,
            "evidence": f"{design}; best {fd_col} per budget: {path}; Spearman = {rho:.3f} over {len(best)} budgets "
                        f"(with 3 budgets only a strictly falling frontier reaches −0.8)"
                        + _fd_ties(t[t["trial_id"].isin(d.loc[d["_cfg"].isin(best.index), "trial_id"])], fd_col)}


def _fd_ties(t: pd.DataFrame, fd_col: str) -> str:
    """How much of the FD ranking the sampling noise could reorder: the pairs of trials whose FDs differ
    by less than Z_NOISE · √(σ_i² + σ_j²), σ the evaluator's se_<fd> (the FD's spread over sampling
    draws). Empty when the runs did not log it."""
    se_col = "final_se_" + fd_col.removeprefix("final_")
    if se_col not in t:
        return ""
    d = t[[fd_col, se_col]].apply(pd.to_numeric, errors="coerce").dropna()
    if len(d) < 2:
        return ""
    fd, se = d[fd_col].to_numpy(), d[se_col].to_numpy()
    i, j = np.triu_indices(len(d), k=1)
    ties = int((np.abs(fd[i] - fd[j]) < Z_NOISE * np.hypot(se[i], se[j])).sum())
    return (f"; the FD's spread over sampling draws: σ {np.min(se):.3g}–{np.max(se):.3g} (median {np.median(se):.3g}); "
            f"{ties} of {len(i)} pairs of trials differ by less than {Z_NOISE:g}σ (their order is not resolved)")


_NOISE_KINDS = {"paired": "paired per-sample validation losses",
                "unpaired": "each trial's validation-draw SE, unpaired: conservative"}


def _gap_sigma(a: pd.Series, b: pd.Series, ids_a: list, ids_b: list, samples: dict) -> tuple[float, str | None]:
    """(σ of the loss gap between configurations a and b, how it was measured).

    Paired when every trial of both has its per-sample validation losses (`samples`: trial_id ->
    DataFrame of sample, t, loss) on the same samples: the trials scored the same images at the same t
    with the same noise, so the gap's validation noise is the standard error of the per-sample
    differences (the replicate means' difference, sample by sample), by the collapsed-strata estimator
    — common random numbers (e.g. Glasserman, Monte Carlo Methods in Financial Engineering, 2003, §4.2)
    cancel what the two trials' losses share. Else unpaired: √(se_a² + se_b²), conservative. Either
    way the replicates' variance of the mean (s²/k, training-seed noise) is added. NaN: no noise
    estimate (neither per-sample losses, se nor replicates)."""
    rep = float(np.nan_to_num(a["rep_var"]) + np.nan_to_num(b["rep_var"]))
    tables = [samples.get(i) for i in ids_a + ids_b]
    if tables and all(_numeric_table(x) for x in tables) and all(
            np.array_equal(x["sample"].to_numpy(), tables[0]["sample"].to_numpy())
            and np.allclose(x["t"].to_numpy(), tables[0]["t"].to_numpy()) for x in tables):
        mean_a = np.mean([samples[i]["loss"].to_numpy(float) for i in ids_a], axis=0)
        mean_b = np.mean([samples[i]["loss"].to_numpy(float) for i in ids_b], axis=0)
        se = stratified_standard_error(tables[0]["t"].to_numpy(float), mean_b - mean_a)
        if math.isfinite(se):
            return math.sqrt(se**2 + rep), "paired"
    se_a, se_b = a["se"], b["se"]
    if not ((np.isfinite(se_a) or np.isfinite(a["rep_var"])) and (np.isfinite(se_b) or np.isfinite(b["rep_var"]))):
        return math.nan, None  # a side without any noise estimate: compared strictly
    sigma = math.sqrt(float(np.nan_to_num(se_a) ** 2 + np.nan_to_num(se_b) ** 2) + rep)
    return sigma, ("unpaired" if np.isfinite(se_a) or np.isfinite(se_b) else None)


def _numeric_table(x) -> bool:
    """A per-sample table the paired gap can use: sample, t and loss numeric (runs.load_val_samples
    refuses malformed files; a table handed in some other way with e.g. a string or a nested list in t
    or loss means unpaired, not an analysis stopped by a TypeError)."""
    return (isinstance(x, pd.DataFrame) and len(x) > 1 and {"sample", "t", "loss"} <= set(x.columns)
            and all(pd.api.types.is_numeric_dtype(x[c]) and not pd.api.types.is_bool_dtype(x[c])
                    for c in ("sample", "t", "loss")))


def _seed_counts(ks: set[int]) -> str:
    """{3} -> "3"; {2, 3} -> "2–3" (replicates per configuration)."""
    return str(min(ks)) if min(ks) == max(ks) else f"{min(ks)}–{max(ks)}"
