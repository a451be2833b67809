"""Post-hoc EMA in the report: which EMA width each trial was evaluated with, and whether one fixed width
would have served every model size (issue 29).

A trial trained with `train.posthoc_ema` and evaluated with `eval.ema_sigma_rels` logs, at its last step,
the validation loss of the EMA of each width sigma_rel rebuilt from its snapshots (metrics
`val_loss_ema<sigma_rel>`, e.g. val_loss_ema0.05), the width with the lowest one (param
`eval.ema_sigma_rel_best`), and then its full evaluation (val_loss, FID/FD, ...) with that width alone
(harness/trial/loop.py, harness/trial/posthoc_ema.py). So every fit and finding of the report, which read
the final val_loss and FD, already uses each trial's best width. EDM2 (Karras et al. 2024, arXiv
2312.02696, Fig. 5) found the best width to move with model size: a single fixed EMA then favours the
sizes it happens to suit. This section shows the evidence: the loss against sigma_rel per trial (figure),
the best width per size (table), and one sentence on whether one fixed width would have been best for
every size, with what the best fixed width would have cost against the validation noise (se_val_loss).

Only pandas/matplotlib: the metric and param names are copies of harness/trial/posthoc_ema's (which
imports torch); tests/trial/test_phema.py checks they agree.

    figure(trials, out, fig, notes)   in analysis/analyse.py: the figure (when runs have val_loss_ema* metrics)
    blocks(trials)                    in analysis/sections.py: the heading, table and sentence
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd

from analysis import plots
from analysis.blocks import Block, h3, para, table

METRIC_PREFIX = "val_loss_ema"          # harness.trial.posthoc_ema.val_loss_metric
BEST_PARAM = "eval.ema_sigma_rel_best"  # harness.trial.posthoc_ema.BEST_PARAM
FIGURE = "val_loss_vs_ema_sigma_rel.png"
_COLUMN = re.compile(r"^final_" + METRIC_PREFIX + r"(\d+(?:\.\d*)?(?:e-?\d+)?)$")


def sigma_columns(trials: pd.DataFrame) -> dict[float, str]:
    """sigma_rel -> its column in the trials table (final_val_loss_ema<sigma_rel>), in sigma_rel order."""
    found = {float(m.group(1)): c for c in trials.columns if (m := _COLUMN.match(str(c)))}
    return dict(sorted(found.items()))


def per_trial(trials: pd.DataFrame) -> pd.DataFrame:
    """One row per trial with a post-hoc EMA choice and width evaluated: trial_id, label, arch, patch,
    size, size_rank, params, sigma_rel, val_loss, best (the width the trial's final evaluation used: the
    logged param, else the lowest loss), se_val_loss (the trial's final one, NaN when not logged)."""
    cols = sigma_columns(trials)
    out = []
    for _, t in trials.iterrows():
        losses = {s: float(t[c]) for s, c in cols.items() if pd.notna(t[c]) and math.isfinite(float(t[c]))}
        if not losses:
            continue
        best = _number(t.get(BEST_PARAM))
        if best is None or not any(math.isclose(best, s) for s in losses):
            best = min(losses, key=losses.get)
        se = _number(t.get("final_se_val_loss"))
        se = math.nan if se is None else se
        for s, v in losses.items():
            out.append({"trial_id": t.get("trial_id"), "label": t.get("label", ""), "arch": t.get("arch", ""),
                        "patch": t.get("patch"), "size": t.get("size", ""), "size_rank": t.get("size_rank", math.inf),
                        "params": t.get("params", math.nan), "sigma_rel": s, "val_loss": v,
                        "best": math.isclose(s, best), "se_val_loss": se})
    return pd.DataFrame(out)


def _number(v) -> float | None:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _panels(long: pd.DataFrame) -> list[tuple]:
    keys = long.groupby(["arch", "patch"], sort=False, dropna=False).size().index.tolist()
    return sorted(keys, key=lambda k: (str(k[0]), float(k[1]) if pd.notna(k[1]) else math.inf))


def _sizes(p: pd.DataFrame) -> list:
    order = p.groupby("size", sort=False).agg(rank=("size_rank", "first"), params=("params", "median"))
    return order.sort_values(["rank", "params"], na_position="last").index.tolist()


def figure(trials: pd.DataFrame, out: Path, fig, notes: list[str]) -> None:
    """Validation loss vs sigma_rel, one line per trial coloured by model size, one panel per architecture
    and patch size; the width each trial's final evaluation used is starred. `fig(path, title, caption)`
    adds it to the report."""
    long = per_trial(trials)
    if long.empty:
        return  # no trial chose its EMA post hoc: nothing to say
    panels = _panels(long)
    f, axes = plots._grid(len(panels))
    for ax, (arch, patch) in zip(axes, panels):
        p = long[(long["arch"] == arch) & ((long["patch"] == patch) if pd.notna(patch) else long["patch"].isna())]
        sizes = _sizes(p)
        for color, size in zip(plots._colors(len(sizes)), sizes):
            for _, g in p[p["size"] == size].groupby("trial_id", sort=False):
                g = g.sort_values("sigma_rel")
                ax.plot(g["sigma_rel"], g["val_loss"], color=color, lw=1.4, marker="o", ms=3, label=str(size))
                b = g[g["best"]]
                ax.plot(b["sigma_rel"], b["val_loss"], color=color, marker="*", ms=11, ls="none")
        ax.set_title(f"{plots._arch_name(arch)}, patch {patch}")
        ax.set_xlabel("EMA width σ_rel (post hoc)")
        ax.set_ylabel("validation loss (final)")
        plots._dedup_legend(ax, title="size")
    f.suptitle("validation loss vs post-hoc EMA width, per trial", y=1.02)
    path = plots._save(f, out / FIGURE)
    fig(path, "Validation loss vs post-hoc EMA width σ_rel",
        "x: the relative EMA width σ_rel (EDM2), each rebuilt after training from the trial's post-hoc EMA "
        "snapshots (eval.ema_sigma_rels); y: the validation loss at the last step with that EMA (the same fixed "
        "samples for every width); one line per trial, coloured by model size, one panel per architecture and "
        "patch size; ★: the width with the lowest loss, the one the trial's final evaluation (val_loss, FD) used.")


def best_by_size(long: pd.DataFrame) -> pd.DataFrame:
    """Per (arch, patch, size): the trials, their best widths ('0.05' or '0.05 ×2, 0.1 ×1' when its
    trials differ) and the largest loss gap between a trial's widths (what the choice was worth)."""
    rows = []
    for arch, patch in _panels(long):
        p = long[(long["arch"] == arch) & ((long["patch"] == patch) if pd.notna(patch) else long["patch"].isna())]
        for size in _sizes(p):
            g = p[p["size"] == size]
            best = g[g["best"]]["sigma_rel"].value_counts().sort_index()
            spread = g.groupby("trial_id")["val_loss"].agg(lambda v: v.max() - v.min()).max()
            rows.append({"arch": arch, "patch": patch, "size": size, "params": g["params"].median(),
                         "trials": g["trial_id"].nunique(),
                         "best": ", ".join(f"{s:g}" + (f" ×{n}" if len(best) > 1 else "") for s, n in best.items()),
                         "gap": spread})
    return pd.DataFrame(rows)


def fixed_width_cost(long: pd.DataFrame) -> tuple[float, float, str, float] | None:
    """The single width every trial evaluated whose worst loss excess over a trial's own best is smallest:
    (its sigma_rel, that excess, the trial that pays it, that trial's se_val_loss), or None when the trials
    share no width."""
    common = set.intersection(*(set(g["sigma_rel"]) for _, g in long.groupby("trial_id")))
    if not common:
        return None
    best_loss = long[long["best"]].set_index("trial_id")["val_loss"]
    choice = None
    for s in sorted(common):
        at = long[long["sigma_rel"] == s].set_index("trial_id")
        excess = at["val_loss"] - best_loss.reindex(at.index)
        worst = excess.idxmax()
        cand = (s, float(excess.max()), str(at.loc[worst, "label"]), float(at.loc[worst, "se_val_loss"]))
        if choice is None or cand[1] < choice[1]:
            choice = cand
    return choice


def verdict(long: pd.DataFrame) -> str:
    """One sentence: would one fixed sigma_rel have been best for every size, and what would the best
    fixed width have cost (in validation loss, against its trial's se_val_loss)?"""
    bests = sorted(long[long["best"]]["sigma_rel"].unique())
    if len(bests) == 1:
        return (f"A single fixed σ_rel = {bests[0]:g} was the best of the widths evaluated for every trial and size, "
                "so a fixed EMA of that width would not have biased the size comparison.")
    cost = fixed_width_cost(long)
    chosen = long[long["best"]]
    per_size = "; ".join(f"{size}: " + ", ".join(f"{s:g}" for s in sorted(chosen[chosen["size"] == size]["sigma_rel"].unique()))
                         for size in _sizes(chosen))
    text = f"No single σ_rel was best for every size ({per_size})"
    if cost is None:
        return text + "; the trials share no width, so what a fixed one would have cost is not measured."
    s, excess, who, se = cost
    noise = (f", {excess / se:.1f}× its se_val_loss {se:.3g}" if math.isfinite(se) and se > 0 else
             ", against no measured se_val_loss")
    biased = "would have biased" if not (math.isfinite(se) and excess <= se) else "would have shifted, within the noise,"
    return (text + f": even the best fixed width, σ_rel = {s:g}, would have cost {who} {excess:.3g} in validation loss"
            f"{noise}, so a fixed EMA {biased} the comparison toward the sizes it suits.")


_USES_THE_BEST = (
    "Each trial with eval.ema_sigma_rels was evaluated with the EMA width σ_rel that gave it the lowest validation "
    "loss (param eval.ema_sigma_rel_best; rebuilt after training from its post-hoc EMA snapshots, EDM2): its final "
    "val_loss and FD, which every fit and finding here uses, are that width's. Its earlier evaluations (eval.every) "
    "used the trial's running EMA (train.ema_decay).")


def blocks(trials: pd.DataFrame) -> list[Block]:
    """The report's section (analysis/blocks.py), empty when no trial chose its EMA post hoc."""
    long = per_trial(trials)
    if long.empty:
        return []
    sizes = best_by_size(long)
    rows = [[plots._arch_name(r["arch"]), plots._plain(r["patch"]) if pd.notna(r["patch"]) else "", str(r["size"]),
             f"{r['params']:.4g}" if math.isfinite(r["params"]) else "–", str(r["trials"]), r["best"],
             f"{r['gap']:.3g}"] for _, r in sizes.iterrows()]
    out = [h3("Post-hoc EMA: the best EMA width per model size"),
           para(_USES_THE_BEST),
           table(["architecture", "patch", "size", "parameters", "trials", "best σ_rel", "loss range over σ_rel"],
                 rows),
           para(verdict(long), len(long[long["best"]]["sigma_rel"].unique()) > 1)]
    others = trials["trial_id"].nunique() - long["trial_id"].nunique()
    if others > 0:
        mixed = (f"{others} other trial(s) were evaluated with their fixed train.ema_decay: comparing them with the "
                 "trials above mixes two ways of choosing the EMA.")
        out.append(para(mixed, True))
    return out
