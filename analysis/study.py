"""Trials (one row per MLflow run, from analysis.runs) -> what the fits may use.

- Which trials enter a fit: only finished ones; diverged, failed and unfinished trials are listed
  by name with their reason (`split_usable`).
- Which trials are repeats: trials that differ only in `train.seed` (`replicate_keys`); the fits
  average them or resample them together, and their spread is the noise level.
- Which trials may share one law: never trials that differ in another axis of the grid (patch,
  objective, attention, batch size ...): `analysis_groups` splits by every such axis.
- What the study found about DiT's qualitative claims (`dit_findings`).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

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
            reason = f"diverged ({status})"
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


def dit_findings(trials: pd.DataFrame, loss_col: str | None, fd_col: str | None, fd_name: str = "FD") -> list[dict]:
    """DiT's qualitative findings (Peebles & Xie 2023), checked on this study's finished trials:
    bigger is better at fixed patch; a smaller patch is better at fixed size; the Fréchet distance
    falls with training compute (Spearman ≤ −0.8). Each: {finding, held (True/False/None), evidence}.
    Comparisons are made between trials that share every other axis (and replicate means)."""
    out = []
    if loss_col is None or trials.empty or loss_col not in trials:
        return out
    t = trials.copy()
    t["_loss"] = pd.to_numeric(t[loss_col], errors="coerce")
    fixed = [c for c in varying_axes(t) if c not in ("model.size", "model.patch", "train.seed", "model.family",
                                                          "model.attention") and not _derived_from_size(t, c)]

    def compare(by: str, within: list[str], name: str):
        comps, held = [], True
        for key, g in t.groupby(["arch"] + within + fixed, dropna=False, sort=True):
            m = g.groupby(by)["_loss"].mean()
            if len(m) < 2:
                continue
            # sizes small -> large, patches large -> small: the loss must fall along the sequence
            order = (g.groupby(by)["size_rank"].first() if by == "size"
                     else -pd.Series(m.index.astype(float), index=m.index))
            m = m.loc[order.sort_values(kind="stable").index]
            seq = m.to_numpy(float)
            ok = bool(np.all(np.diff(seq) < 0))
            held &= ok
            key = key if isinstance(key, tuple) else (key,)
            what = ", ".join([str(key[0])] + [f"{c} {v}" for c, v in zip(within, key[1:1 + len(within)])])
            comps.append(f"{what}: " + " → ".join(f"{by} {v}: {x:.4g}" for v, x in zip(m.index, seq))
                         + ("" if ok else " (not monotone)"))
        if comps:
            out.append({"finding": name, "held": held, "evidence": f"{loss_col}, " + "; ".join(comps)})
        else:
            out.append({"finding": name, "held": None, "evidence": f"no two finished trials differ only in {by}"})

    compare("size", ["patch"], "bigger is better at fixed patch size")
    compare("patch", ["size"], "a smaller patch is better at fixed model size")
    if fd_col and fd_col in t and t[fd_col].notna().sum() >= 3:
        rho = spearman(t["train_gflops"], t[fd_col])
        out.append({"finding": f"{fd_name} falls with training compute (Spearman ≤ −0.8)",
                    "held": bool(rho <= -0.8) if math.isfinite(rho) else None,
                    "evidence": f"Spearman({fd_col}, train_gflops) = {rho:.3f} over {int(t[fd_col].notna().sum())} trials"})
    return out
