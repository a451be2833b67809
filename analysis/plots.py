"""Matplotlib figures in the DiT paper's style (Agg backend; every function writes one PNG).

Each function takes tidy tables from analysis.runs / analysis.scaling, writes `path` and returns it,
or returns None — appending the reason to `notes` when given — when its data are absent.
Axis labels always name the metric and the FLOP convention (forward GFLOPs and training compute are
multiply-adds, training compute = 3 × forward × images).
"""

from __future__ import annotations

import io
import math
import os
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import FuncFormatter, NullFormatter  # noqa: E402

COMPUTE_LABEL = "training compute (GFLOPs, multiply-adds; 3 × forward × images)"
FORWARD_LABEL = "forward GFLOPs per image (multiply-adds)"
PARAMS_LABEL = "parameters"
STEPS_LABEL = "training steps"
ARCH_NAMES = {"dit": "DiT", "mmdit-joint": "MM-DiT joint", "mmdit-split": "MM-DiT split"}
_DPI = 110

plt.rcParams.update({
    "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False, "axes.spines.right": False,
    "font.size": 9, "axes.titlesize": 10, "legend.fontsize": 8, "legend.frameon": False,
})


def _skip(notes: list[str] | None, what: str, why: str) -> None:
    if notes is not None:
        notes.append(f"{what}: skipped — {why}")


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, bbox_inches="tight")
    plt.close(fig)
    return write_file(path, buf.getvalue())


def write_file(path: Path, data: str | bytes) -> Path:
    """Write a report file without following a link planted at its name (`--out` may be a shared or
    foreign folder): written to a new temporary file beside it (O_EXCL: never an existing one), then
    renamed over the name, which replaces a symlink itself, never its target."""
    path = Path(path)
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        os.chmod(tmp, 0o644)  # a report is for reading: mkstemp's 0600 would hide it from others
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path




def _grid(n: int, width: float = 4.2, height: float = 3.2, max_cols: int = 3):
    cols = min(n, max_cols)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False,
                             gridspec_kw={"hspace": 0.5, "wspace": 0.3})
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    return fig, axes.ravel()[:n]


def _colors(n: int):
    cmap = plt.get_cmap("viridis")
    return [cmap(0.1 + 0.8 * i / max(1, n - 1)) for i in range(n)] if n > 1 else [cmap(0.35)]


def _arch_name(arch: str) -> str:
    return ARCH_NAMES.get(arch, arch)


def _plain(v, _pos=None) -> str:
    return f"{v:g}"


def _log_axes(ax, x: bool = True, y: bool = True) -> None:
    """Log axes with plain numbers; a y axis spanning under two decades labels its minor ticks."""
    if x:
        ax.set_xscale("log")
        lo, hi = ax.get_xlim()
        if lo > 0 and hi / lo >= 10:  # decade labels suffice
            ax.xaxis.set_minor_formatter(NullFormatter())
    if y:
        ax.set_yscale("log")
        lo, hi = ax.get_ylim()
        ax.yaxis.set_major_formatter(FuncFormatter(_plain))
        few = lo > 0 and hi / lo < 100
        ax.yaxis.set_minor_formatter(FuncFormatter(_plain) if few else NullFormatter())


def _group_colors(n: int):
    return [f"C{i % 10}" for i in range(n)]


def plot_metric_vs_steps(curves: pd.DataFrame, path, metric_label: str, by: str = "size", fixed: str = "patch",
                         notes: list[str] | None = None, title: str | None = None) -> Path | None:
    """A metric over training steps, one panel per (architecture, fixed value), one line per `by`
    value: by="size", fixed="patch" is the DiT paper's 'scaling model size at fixed patch size';
    by="patch", fixed="size" its 'scaling patch size at fixed model size'."""
    what = title or f"{metric_label} vs steps by {by}"
    if curves is None or curves.empty:
        _skip(notes, what, f"no {metric_label} was logged")
        return None
    c = curves.dropna(subset=["value"])
    panels = c.groupby(["arch", fixed], sort=False).size().index.tolist()
    panels.sort(key=lambda p: (p[0], _order_key(c, fixed, p[1])))
    # only panels that compare something (two or more values of `by`)
    panels = [(a, v) for a, v in panels if c[(c["arch"] == a) & (c[fixed] == v)][by].nunique() > 1]
    if not panels:
        _skip(notes, what, f"no architecture has two values of {by} at the same {fixed}")
        return None
    fig, axes = _grid(len(panels))
    for ax, (arch, value) in zip(axes, panels):
        p = c[(c["arch"] == arch) & (c[fixed] == value)]
        levels = sorted(p[by].unique(), key=lambda v: _order_key(p, by, v))
        for color, level in zip(_colors(len(levels)), levels):
            for _, g in p[p[by] == level].groupby("run_id", sort=False):
                g = g.sort_values("step")
                lbl = f"{by} {level}" if by == "patch" else str(level)
                ax.plot(g["step"], g["value"], color=color, lw=1.4, marker="o" if len(g) < 12 else None, ms=3,
                        label=lbl)
        ax.set_title(f"{_arch_name(arch)}, {fixed} {value}")
        ax.set_xlabel(STEPS_LABEL)
        ax.set_ylabel(metric_label)
        _dedup_legend(ax)
    fig.suptitle(what, y=1.02)
    return _save(fig, path)


def _order_key(df: pd.DataFrame, col: str, value):
    if col == "size" and "size_rank" in df:
        ranks = df.loc[df["size"] == value, "size_rank"]
        fwd = df.loc[df["size"] == value, "forward_gflops"] if "forward_gflops" in df else pd.Series(dtype=float)
        return (float(ranks.iloc[0]) if len(ranks) else 1e9, float(fwd.median()) if len(fwd) else 0.0, str(value))
    try:
        return (float(value), 0.0, "")
    except (TypeError, ValueError):
        return (1e9, 0.0, str(value))


def _dedup_legend(ax, **kw) -> None:
    handles, labels = ax.get_legend_handles_labels()
    seen = {}
    for h, lbl in zip(handles, labels):
        seen.setdefault(lbl, h)
    if seen:
        ax.legend(seen.values(), seen.keys(), **kw)


def plot_fd_vs_compute(curves: pd.DataFrame, path, metric_label: str, notes: list[str] | None = None) -> Path | None:
    """The DiT paper's 'FID vs training compute': log-log, one line per config."""
    what = f"{metric_label} vs training compute"
    if curves is None or curves.empty:
        _skip(notes, what, f"no {metric_label} was logged")
        return None
    c = curves[(curves["compute"] > 0) & (curves["value"] > 0)]
    if c.empty:
        _skip(notes, what, "no point has a known training compute")
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    order = c.drop_duplicates("run_id").sort_values(["arch", "size_rank", "patch"], na_position="last")
    for color, (_, row) in zip(_colors(len(order)), order.iterrows()):
        g = c[c["run_id"] == row["run_id"]].sort_values("compute")
        ax.plot(g["compute"], g["value"], marker="o", ms=3, lw=1.3, color=color, label=row["label"])
    _log_axes(ax)
    ax.set_xlabel(COMPUTE_LABEL)
    ax.set_ylabel(metric_label)
    ax.set_title(what)
    ax.legend(ncol=2 if len(order) > 12 else 1, loc="upper left", bbox_to_anchor=(1.02, 1))
    return _save(fig, path)


def plot_fits(group_fits, path, x_label: str, y_label: str, curves: pd.DataFrame | None = None,
              notes: list[str] | None = None, title: str | None = None) -> Path | None:
    """Points of each group, the fitted law y = E + A·x^(−α) and its 95 % bootstrap band (log-log).
    With `curves` (trial_id, compute, value) the full training curves are drawn thinly behind."""
    what = title or f"{y_label} vs {x_label}"
    if not group_fits:
        _skip(notes, what, "no group has both quantities")
        return None
    fig, ax = plt.subplots(figsize=(6.8, 4.6))
    colors = _group_colors(len(group_fits))
    for color, gf in zip(colors, group_fits):
        if curves is not None and not curves.empty:
            for _, g in curves[curves["trial_id"].isin(gf.points["trial_id"])].groupby("run_id"):
                g = g[(g["compute"] > 0) & (g["value"] > 0)].sort_values("compute")
                ax.plot(g["compute"], g["value"], color=color, lw=0.6, alpha=0.35)
        n = len(gf.points)
        ax.scatter(gf.points["x"], gf.points["y"], color=color, s=18, zorder=3,
                   label=f"{gf.label} ({n} trial{'s' if n != 1 else ''})")
        fit = gf.fit
        if fit.ok:
            lo, hi = fit.x_range
            xs = np.logspace(np.log10(lo) - 0.15, np.log10(hi) + 0.15, 120)
            b_lo, b_hi = fit.band(xs)
            ax.fill_between(xs, b_lo, b_hi, color=color, alpha=0.18, lw=0)
            ax.plot(xs, fit.predict(xs), color=color, lw=1.6,
                    label=f"fit: α = {fit.alpha:.3f} [{fit.alpha_ci[0]:.3f}, {fit.alpha_ci[1]:.3f}]"
                    if fit.alpha_ci else f"fit: α = {fit.alpha:.3f}")
        else:
            ax.plot([], [], " ", label=f"no fit: {_short(fit.warning)}")
    _log_axes(ax)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.set_title(what)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1))
    return _save(fig, path)


def _short(text: str | None, n: int = 60) -> str:
    text = text or ""
    return text if len(text) <= n else text[: n - 1] + "…"


def plot_frontier(curves: pd.DataFrame, frontier, path, y_label: str, notes: list[str] | None = None) -> Path | None:
    """Left: every trial's curve against training compute and their lower envelope (the
    compute-optimal frontier) with its fitted law. Right: isoFLOP slices (value vs model size at
    fixed compute) with the parabola's optimum where the grid brackets it."""
    what = "compute-optimal frontier"
    if frontier is None or frontier.envelope.empty:
        _skip(notes, what, "no curve against training compute")
        return None
    has_slices = not frontier.slices.empty
    fig, axes = plt.subplots(1, 2 if has_slices else 1, figsize=(12 if has_slices else 6.5, 4.6), squeeze=False)
    ax = axes[0, 0]
    for _, g in curves.groupby("run_id"):
        g = g[(g["compute"] > 0) & (g["value"] > 0)].sort_values("compute")
        ax.plot(g["compute"], g["value"], color="0.6", lw=0.7, alpha=0.7)
    env = frontier.envelope
    ax.plot(env["compute"], env["value"], color="C3", lw=2.2, label="lower envelope (best at each compute)")
    fit = frontier.envelope_fit
    if fit.ok:
        xs = env["compute"].to_numpy()
        lo, hi = fit.band(xs)
        ax.fill_between(xs, lo, hi, color="C0", alpha=0.2, lw=0)
        ax.plot(xs, fit.predict(xs), "--", color="C0", lw=1.4, label=f"envelope fit: α = {fit.alpha:.3f}")
    else:
        ax.plot([], [], " ", label=f"envelope: no fit ({_short(fit.warning, 45)})")
    for b in frontier.slices["budget"].unique() if has_slices else []:
        ax.axvline(b, color="0.8", lw=0.6, ls=":")
    _log_axes(ax)
    ax.set_xlabel(COMPUTE_LABEL)
    ax.set_ylabel(y_label)
    ax.set_title("frontier over training compute")
    ax.legend(loc="best")
    if has_slices:
        ax = axes[0, 1]
        budgets = sorted(frontier.slices["budget"].unique())
        for color, b in zip(_colors(len(budgets)), budgets):
            s = frontier.slices[frontier.slices["budget"] == b].groupby("size", as_index=False)["value"].min()
            s = s.sort_values("size")
            ax.plot(s["size"], s["value"], "o-", color=color, ms=4, lw=1.2, label=f"C = {b:.3g}")
            opt = frontier.optima[frontier.optima["budget"] == b]
            if len(opt) and bool(opt["interior"].iloc[0]):
                lx = np.log(s["size"].to_numpy(dtype=float))
                coef = np.polyfit(lx, s["value"].to_numpy(dtype=float), 2)
                xx = np.linspace(lx.min(), lx.max(), 60)
                ax.plot(np.exp(xx), np.polyval(coef, xx), color=color, lw=0.8, ls="--")
                ax.plot(opt["size_opt"], opt["value_opt"], "*", color=color, ms=11, mec="k", mew=0.5)
        _log_axes(ax)
        ax.set_xlabel(PARAMS_LABEL if frontier.size_measure == "parameters" else FORWARD_LABEL)
        ax.set_ylabel(y_label)
        sub = f"N_opt ∝ C^{frontier.optimal_size_fit.a:.3f}" if frontier.optimal_size_fit is not None and \
            frontier.optimal_size_fit.ok else "optimum not bracketed by the grid"
        ax.set_title(f"isoFLOP slices ({sub})")
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), title="training compute\n(GFLOPs)")
    return _save(fig, path)


def _value_at(g: pd.DataFrame, c: float) -> float:
    g = g[(g["compute"] > 0) & (g["value"] > 0)].sort_values("compute")
    if g.empty or c < g["compute"].min() * (1 - 1e-9) or c > g["compute"].max() * (1 + 1e-9):
        return math.nan
    if len(g) == 1:
        return float(g["value"].iloc[0])
    return float(np.exp(np.interp(np.log(c), np.log(g["compute"]), np.log(g["value"]))))


def matched_compute(curves: pd.DataFrame) -> tuple[float, pd.DataFrame]:
    """The largest training compute every architecture reached, and each trial's value there
    (interpolated in log-log space; NaN for trials that did not reach it)."""
    reach = curves[curves["compute"] > 0].groupby("arch")["compute"].max()
    c_star = float(reach.min())
    rows = []
    for run_id, g in curves.groupby("run_id"):
        rows.append({"run_id": run_id, "label": g["label"].iloc[0], "arch": g["arch"].iloc[0],
                     "value": _value_at(g, c_star)})
    return c_star, pd.DataFrame(rows)


def plot_arch_comparison(curves_by_metric: dict[str, pd.DataFrame], path, notes: list[str] | None = None
                         ) -> Path | None:
    """DiT vs MM-DiT (joint vs split): each metric against training compute, one colour per
    architecture, and bars of each architecture's best trial at the largest compute all reached."""
    what = "DiT vs MM-DiT at matched compute"
    usable = {m: c for m, c in curves_by_metric.items() if c is not None and not c.empty and c["arch"].nunique() > 1}
    if not usable:
        _skip(notes, what, "the study has a single architecture")
        return None
    fig, axes = plt.subplots(len(usable), 2, figsize=(12, 4.4 * len(usable)), squeeze=False,
                             gridspec_kw={"hspace": 0.55, "wspace": 0.3})
    arch_colors = {a: f"C{i}" for i, a in enumerate(sorted({a for c in usable.values() for a in c["arch"].unique()}))}
    for row, (metric, c) in enumerate(usable.items()):
        ax = axes[row, 0]
        for run_id, g in c.groupby("run_id"):
            g = g[(g["compute"] > 0) & (g["value"] > 0)].sort_values("compute")
            arch = g["arch"].iloc[0] if len(g) else ""
            ax.plot(g["compute"], g["value"], color=arch_colors.get(arch, "k"), lw=1.2,
                    marker="o" if len(g) < 12 else None, ms=3, label=_arch_name(arch))
        c_star, at = matched_compute(c)
        ax.axvline(c_star, color="0.4", ls=":", lw=1)
        _log_axes(ax)
        ax.set_xlabel(COMPUTE_LABEL)
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} vs training compute")
        _dedup_legend(ax)
        ax = axes[row, 1]
        best = at.dropna(subset=["value"]).sort_values("value").drop_duplicates("arch")
        best = best.sort_values("arch")
        ax.bar([_arch_name(a) + "\n" + lbl for a, lbl in zip(best["arch"], best["label"])], best["value"],
               color=[arch_colors[a] for a in best["arch"]])
        for i, v in enumerate(best["value"]):
            ax.text(i, v, f"{v:.4g}", ha="center", va="bottom", fontsize=8)
        ax.set_ylabel(metric)
        ax.set_title(f"best trial of each architecture\nat matched compute C = {c_star:.3g} GFLOPs")
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(axis="x", visible=False)
    fig.suptitle(what, y=1.01)
    return _save(fig, path)


# --- budget studies: isoFLOP parabolas, compute-optimal laws, the loss surface, held-out -----------


def plot_isoflop(iso, path, y_label: str, title: str, size_label: str = PARAMS_LABEL) -> Path | None:
    """Loss over model size at each training budget (replicate means with their spread as error bars),
    each budget's parabola in log N and its minimum with the interval; budgets whose optimum the grid
    does not bracket are drawn hollow and named in the legend."""
    if iso is None or iso.points.empty:
        return None
    fig, (ax, res_ax) = plt.subplots(2, 1, figsize=(7.2, 6.2), sharex=True,
                                     gridspec_kw={"height_ratios": [3, 1.3], "hspace": 0.08})
    budgets = iso.budgets.sort_values("compute")
    for color, (_, b) in zip(_colors(len(budgets)), budgets.iterrows()):
        p = iso.points[iso.points["budget"] == b["budget"]].sort_values("n")
        hollow = not b["bracketed"]
        rms = b.get("rms_resid", math.nan)
        ax.errorbar(p["n"], p["loss"], yerr=p["loss_std"].where(p["n_rep"] > 1), fmt="o", ms=4, color=color,
                    mfc="white" if hollow else color, capsize=2, lw=1,
                    label=f"C = {b['compute']:.3g}" + (f", RMS resid {rms:.2g}" if math.isfinite(rms) else "")
                    + (" (not bracketed)" if hollow else ""))
        if "fitted" in p and p["fitted"].notna().any():
            # the parabola's misfit per size: a systematic pattern (not scatter about 0) is a shape it cannot follow
            res_ax.plot(p["n"], p["loss"] - p["fitted"], "o-", ms=3.5, lw=0.8, color=color,
                        mfc="white" if hollow else color)
        if b["coef"] is not None:
            lx = np.log(p["n"].to_numpy(float))
            xx = np.linspace(lx.min() - 0.1, lx.max() + 0.1, 80)
            ax.plot(np.exp(xx), np.polyval(b["coef"], xx), color=color, lw=1, ls="--" if hollow else "-")
        if math.isfinite(b["n_opt"]) and b["bracketed"]:
            lo, hi = b["n_opt_lo"], b["n_opt_hi"]
            xerr = None
            if math.isfinite(lo) and math.isfinite(hi):
                xerr = [[b["n_opt"] - lo], [hi - b["n_opt"]]]
            ax.errorbar([b["n_opt"]], [b["loss_opt"]], xerr=xerr, fmt="*", ms=12, color=color, mec="k", mew=0.5,
                        capsize=3)
    _log_axes(ax, y=False)
    res_ax.axhline(0, color="k", lw=0.6)
    _log_axes(res_ax, y=False)
    ax.tick_params(labelbottom=False)
    res_ax.set_xlabel(size_label)
    res_ax.set_ylabel("measured − parabola")
    ax.set_ylabel(y_label)
    ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), title="training compute\n(GFLOPs, multiply-adds)")
    return _save(fig, path)


def plot_optimal(iso, surface, path, y_label: str, title: str) -> Path | None:
    """Left: N_opt(C) — the isoFLOP minima with their intervals, the approach-2 law with its band and
    the loss surface's N_opt(C) with its band. Right: L_opt(C) likewise."""
    have_iso = iso is not None and iso.n_opt_fit is not None and iso.n_opt_fit.ok
    have_surf = surface is not None and surface.ok
    if not (have_iso or have_surf):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4), gridspec_kw={"wspace": 0.3})
    cs = []
    if iso is not None and not iso.budgets.empty:
        cs += list(iso.budgets["compute"].dropna())
    if have_surf and not cs:
        lo = surface.k * surface.n_range[0] * surface.d_range[0]
        cs = [lo, surface.k * surface.n_range[1] * surface.d_range[1]]
    grid = np.logspace(np.log10(min(cs)) - 0.2, np.log10(max(cs)) + 0.5, 60)
    for ax, what in zip(axes, ("n", "loss")):
        if iso is not None and not iso.budgets.empty:
            u = iso.budgets[iso.budgets["bracketed"]]
            col, lo, hi = ("n_opt", "n_opt_lo", "n_opt_hi") if what == "n" else ("loss_opt", "loss_opt_lo", "loss_opt_hi")
            yerr = [(u[col] - u[lo]).clip(lower=0).fillna(0), (u[hi] - u[col]).clip(lower=0).fillna(0)]
            ax.errorbar(u["compute"], u[col], yerr=yerr, fmt="o", color="C0", capsize=3, label="isoFLOP minima")
            fit = iso.n_opt_fit if what == "n" else iso.l_opt_fit
            if fit is not None and fit.ok:
                b_lo, b_hi = fit.band(grid)
                ax.fill_between(grid, b_lo, b_hi, color="C0", alpha=0.18, lw=0)
                ax.plot(grid, fit.predict(grid), color="C0", lw=1.5,
                        label=f"approach 2: C^{fit.a:.3f} [{fit.a_ci[0]:.3f}, {fit.a_ci[1]:.3f}]" if fit.a_ci
                        else f"approach 2: C^{fit.a:.3f}")
        if have_surf:
            vals = surface.n_opt(grid) if what == "n" else surface.loss_opt(grid)
            band = [surface.allocation(c) for c in grid]
            key = "n_opt_ci" if what == "n" else "loss_opt_ci"
            if all(b[key] for b in band):
                ax.fill_between(grid, [b[key][0] for b in band], [b[key][1] for b in band], color="C3", alpha=0.15,
                                lw=0)
            lbl = (f"approach 3 (surface): C^{surface.a:.3f}" + (f" [{surface.a_ci[0]:.3f}, {surface.a_ci[1]:.3f}]"
                                                                if surface.a_ci else "")) if what == "n" \
                else "approach 3 (surface): L(N_opt, D_opt)"
            ax.plot(grid, vals, color="C3", lw=1.5, ls="--", label=lbl)
        _log_axes(ax, y=(what == "n"))
        if what != "n":
            ax.set_xscale("log")
        ax.set_xlabel(COMPUTE_LABEL)
        ax.set_ylabel(PARAMS_LABEL + " (N_opt)" if what == "n" else f"{y_label} at the optimum (L_opt)")
        ax.set_title("compute-optimal size N_opt(C)" if what == "n" else "loss at the optimum L_opt(C)")
        ax.legend(loc="best")
    fig.suptitle(title, y=1.02)
    return _save(fig, path)


def plot_surface(surface, rows: pd.DataFrame, path, y_label: str, title: str) -> Path | None:
    """Iso-loss contours of the fitted L(N, D) over (parameters, images seen), the trials on it
    (colour: measured loss), lines of constant compute C = k·N·D and the compute-optimal path."""
    if surface is None or not surface.ok:
        return None
    n_lo, n_hi = surface.n_range
    d_lo, d_hi = surface.d_range
    nn = np.logspace(np.log10(n_lo) - 0.3, np.log10(n_hi) + 0.3, 120)
    dd = np.logspace(np.log10(d_lo) - 0.3, np.log10(d_hi) + 0.3, 120)
    N, D = np.meshgrid(nn, dd)
    Z = surface.predict(N, D)
    fig, ax = plt.subplots(figsize=(7.4, 5.2))
    levels = np.quantile(Z, np.linspace(0.02, 0.98, 12))
    cs = ax.contour(N, D, Z, levels=np.unique(levels), cmap="viridis", linewidths=1)
    ax.clabel(cs, fmt=lambda v: f"{v:.3g}", fontsize=7)
    sc = ax.scatter(rows["n"], rows["d"], c=rows["loss"], cmap="viridis", edgecolors="k", s=28, zorder=3)
    fig.colorbar(sc, ax=ax, label=f"measured {y_label}")
    cmin, cmax = surface.k * nn[0] * dd[0], surface.k * nn[-1] * dd[-1]
    cgrid = np.logspace(np.log10(cmin), np.log10(cmax), 40)
    ax.plot(surface.n_opt(cgrid), surface.d_opt(cgrid), color="C3", lw=2, label="compute-optimal N_opt(C), D_opt(C)")
    if "compute" in rows:
        for c in sorted(rows["compute"].dropna().unique())[:: max(1, len(rows["compute"].unique()) // 6)]:
            ax.plot(nn, c / (surface.k * nn), color="0.5", lw=0.6, ls=":")
    ax.set_xlim(nn[0], nn[-1])
    ax.set_ylim(dd[0], dd[-1])
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(PARAMS_LABEL + " N")
    ax.set_ylabel("images seen D")
    ax.set_title(title)
    ax.legend(loc="upper right")
    return _save(fig, path)


def plot_holdout(ho, path, y_label: str, title: str) -> Path | None:
    """The held-out budget: measured loss per size (error bars: replicate spread) against the
    surface's prediction from the smaller budgets (band: bootstrap interval)."""
    if ho is None or not ho.ok or ho.points is None:
        return None
    p = ho.points.sort_values("n")
    fig, ax = plt.subplots(figsize=(6.8, 4.4))
    y_lo, y_hi = holdout_ylim(p)
    # the band is clipped to the plotted range (a wide band would flatten every point to the axis); where it
    # runs beyond, a triangle at the edge marks it
    ax.fill_between(p["n"], p["lo"].clip(y_lo, y_hi), p["hi"].clip(y_lo, y_hi), color="C3", alpha=0.18, lw=0,
                    label="predicted (95 % interval, clipped to the plot)")
    for edge, beyond, marker in ((y_hi, p["hi"] > y_hi, "^"), (y_lo, p["lo"] < y_lo, "v")):
        if beyond.any():
            ax.plot(p["n"][beyond], np.full(int(beyond.sum()), edge), marker, color="C3", ms=6, clip_on=False,
                    label="interval continues beyond the plot" if marker == "^" else None)
    ax.plot(p["n"], p["predicted"], "s--", color="C3", ms=4, lw=1.2, label="predicted from the smaller budgets")
    ax.errorbar(p["n"], p["measured"], yerr=p["std"].fillna(0), fmt="o", color="k", capsize=3, ms=5,
                label="measured")
    ax.axhline(ho.measured, color="k", lw=0.6, ls=":")
    ax.set_ylim(y_lo, y_hi)
    ax.set_xscale("log")
    ax.set_xlabel(PARAMS_LABEL)
    ax.set_ylabel(y_label)
    ax.set_title(f"{title}\nbest: predicted {ho.predicted:.4g}, measured {ho.measured:.4g}, "
                 f"error {ho.error_pct:+.2f} %")
    ax.legend(loc="best")
    return _save(fig, path)


def holdout_ylim(p: pd.DataFrame) -> tuple[float, float]:
    """The held-out figure's y range: the measured and predicted points (with the seed spread) and a
    margin of half their span on each side, never below 0 (a loss is positive). The 95 % band is
    clipped to it."""
    std = p["std"].fillna(0) if "std" in p else 0
    vals = pd.concat([p["measured"] - std, p["measured"] + std, p["predicted"]]).astype(float)
    vals = vals[np.isfinite(vals)]
    lo, hi = float(vals.min()), float(vals.max())
    pad = 0.5 * (hi - lo) if hi > lo else 0.1 * abs(hi) or 0.1
    return max(0.0, lo - pad), hi + pad


def plot_loss_vs_lr(rows: pd.DataFrame, path, y_label: str, title: str) -> Path | None:
    """Loss against learning rate, one line per model size (and budget when there are several):
    is each size's LR tuned, i.e. is its minimum inside the LR grid?"""
    r = rows.dropna(subset=["lr", "loss"])
    if r.empty or r["lr"].nunique() < 2:
        return None
    fig, ax = plt.subplots(figsize=(6.8, 4.4))
    keys = ["size"] + (["budget"] if r["budget"].nunique() > 1 else [])
    groups = list(r.groupby(keys, sort=True))
    for color, (key, g) in zip(_colors(len(groups)), groups):
        m = g.groupby("lr")["loss"].agg(["mean", "std"]).reset_index()
        key = key if isinstance(key, tuple) else (key,)
        ax.errorbar(m["lr"], m["mean"], yerr=m["std"].fillna(0), fmt="o-", color=color, ms=4, lw=1.2, capsize=2,
                    label=", ".join(str(k) for k in key))
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (train.lr)")
    ax.set_ylabel(y_label)
    ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1))
    return _save(fig, path)
