"""Loss → image metrics: how well a study's validation loss predicts each image metric, across its trials.

SD3 (Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis",
arXiv 2403.03206, Sec. 5.3 and Fig. 8) found validation loss to track its image metrics across model
sizes, which is what lets a scaling study fit its laws to the loss. Whether that holds in *this* study is
measured here, from its own trials, for every image metric they logged (final values; each CFG scale is
its own metric): fid*, fd_<extractor>* (FD_DINOv2 and stand-ins), kid*, kd_<extractor>*, cmmd*, and
prompt_alignment* (higher is better: it should fall as the loss rises).

Per metric, over the finished trials that have both values (overall; and per architecture and patch size
— plus objective when the study varies it — for every such group of at least MIN_TRIALS trials, when
there is more than one group):
- Spearman ρ (rank correlation: any monotone relation), with a 95 % percentile bootstrap interval over
  trials (Efron & Tibshirani 1993, "An Introduction to the Bootstrap", ch. 13): trials resampled with
  replacement, resamples whose loss or metric is constant dropped;
- Pearson r (linear association of the raw values), with the 95 % Fisher z interval
  tanh(atanh r ± 1.96/√(n − 3)) (Fisher 1921);
- the fitted relation: the power law metric = a·loss^b by least squares on log metric vs log loss when
  every value is positive, else the line metric = a + b·loss (KID, KD and CMMD are unbiased estimates
  and may be ≤ 0).
The verdict (RULE) reads the overall Spearman interval, signed so that a metric which should worsen as
the loss rises counts positive. Fewer than MIN_TRIALS trials: too few to say anything (a Fisher interval
needs n > 3, and a rank correlation of 3 points takes only 4 values).

    analyse(rep, trials, loss_col, loss_label, out, fig, bootstrap, seed)   in analysis/analyse.py
    blocks(rep)                                                             in analysis/sections.py
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import plots, runs
from analysis.blocks import Block, h3, para, table, ul

MIN_TRIALS = 4
GOOD_PROXY = 0.8  # Spearman's lower bound above which the loss ranks the trials as the metric does
FIGURE = "image_metrics_vs_loss.png"
Z95 = 1.959963984540054
_METRIC = re.compile(r"^final_(?P<key>(?:fid|kid|cmmd|prompt_alignment|fd_.+?|kd_.+?)(?:_cfg\d+(?:\.\d+)?)?)$")
_HIGHER_IS_BETTER = ("prompt_alignment",)
_DETECTOR_METRICS = ("fid", "kid", "fd_", "kd_")  # the ditscale.detector tag names their network...
_OWN_TAG_METRICS = ("fd_dinov2", "cmmd")          # ...these carry their own (ditscale.detector.<metric>)

RULE = (f"good proxy when the lower bound of Spearman's 95 % interval exceeds {GOOD_PROXY:g} (signed so that a "
        "metric which should worsen as the loss rises counts positive: FID, FD, KID, CMMD rise; prompt alignment "
        "falls); not a proxy when the interval includes 0 or lies below it (the metric improves as the loss "
        f"worsens); partial otherwise; too few trials to say anything below {MIN_TRIALS} trials.")


@dataclass
class Corr:
    """One metric in one group of trials."""
    group: str
    n: int
    spearman: float = math.nan
    spearman_ci: tuple[float, float] | None = None
    pearson: float = math.nan
    pearson_ci: tuple[float, float] | None = None
    relation: str = ""
    fit: tuple[str, float, float] | None = None  # ("power" | "linear", a, b)


@dataclass
class MetricResult:
    key: str
    name: str
    sign: int  # +1: should rise with the loss; -1: should fall
    groups: list[Corr] = field(default_factory=list)
    verdict: str = ""
    line: str = ""
    points: pd.DataFrame | None = None  # loss, value, group (for the figure)


def metric_keys(trials: pd.DataFrame) -> list[str]:
    """The image metrics among the trials' final metrics (metric names, without final_), sorted."""
    return sorted(m.group("key") for c in trials.columns if (m := _METRIC.match(str(c))))


def metric_name(key: str) -> str:
    d = runs.describe_fd_metric(key)
    if key.startswith("fd_dinov2"):
        return "FD_DINOv2" + key[len("fd_dinov2"):].replace("_cfg", ", CFG ")
    if d is not None:
        return d["name"]
    base, _, cfg = key.partition("_cfg")
    name = {"kid": "KID", "cmmd": "CMMD", "prompt_alignment": "prompt alignment"}.get(base)
    if name is None and base.startswith("kd_"):
        name = f"KD ({base[3:]} features, stand-in for KID)"
    return (name or base) + (f", CFG {cfg}" if cfg else "")


def _sign(key: str) -> int:
    return -1 if key.startswith(_HIGHER_IS_BETTER) else 1


def spearman(x, y) -> float:
    from scipy.stats import spearmanr

    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(spearmanr(x, y).statistic)


def pearson(x, y) -> float:
    from scipy.stats import pearsonr

    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(pearsonr(x, y).statistic)


def fisher_interval(r: float, n: int) -> tuple[float, float] | None:
    """95 % interval of Pearson's r: tanh(atanh r ± 1.96/√(n − 3)) (Fisher 1921); None for n ≤ 3."""
    if n <= 3 or not math.isfinite(r):
        return None
    z = math.atanh(min(max(r, -1 + 1e-12), 1 - 1e-12))
    half = Z95 / math.sqrt(n - 3)
    return math.tanh(z - half), math.tanh(z + half)


def bootstrap_spearman(x, y, n_boot: int, seed: int) -> tuple[float, float] | None:
    """95 % percentile interval of Spearman's ρ over trials resampled with replacement (vectorised:
    Pearson of the resamples' average ranks). Resamples with a constant side are dropped; None when
    fewer than half remain."""
    from scipy.stats import rankdata

    x, y = np.asarray(x, float), np.asarray(y, float)
    idx = np.random.default_rng(seed).integers(0, len(x), size=(n_boot, len(x)))
    rx, ry = rankdata(x[idx], axis=1), rankdata(y[idx], axis=1)
    rx -= rx.mean(axis=1, keepdims=True)
    ry -= ry.mean(axis=1, keepdims=True)
    den = np.sqrt((rx ** 2).sum(axis=1) * (ry ** 2).sum(axis=1))
    ok = den > 0
    if ok.sum() < n_boot / 2:
        return None
    rho = (rx[ok] * ry[ok]).sum(axis=1) / den[ok]
    lo, hi = np.percentile(np.clip(rho, -1, 1), [2.5, 97.5])
    return float(lo), float(hi)


def fit_relation(loss, value) -> tuple[str, float, float] | None:
    """("power", a, b) for value = a·loss^b (least squares in log-log) when every value is positive, else
    ("linear", a, b) for value = a + b·loss; None when the loss or the metric does not vary."""
    loss, value = np.asarray(loss, float), np.asarray(value, float)
    if np.ptp(loss) == 0 or np.ptp(value) == 0:
        return None
    if (loss > 0).all() and (value > 0).all():
        b, log_a = np.polyfit(np.log(loss), np.log(value), 1)
        return "power", float(math.exp(log_a)), float(b)
    b, a = np.polyfit(loss, value, 1)
    return "linear", float(a), float(b)


def _describe_fit(fit) -> str:
    if fit is None:
        return "–"
    kind, a, b = fit
    return f"metric = {a:.4g} · loss^{b:.3g}" if kind == "power" else f"metric = {a:.4g} {'+' if b >= 0 else '−'} " \
        f"{abs(b):.4g} · loss"


def correlate(x, y, group: str, n_boot: int, seed: int) -> Corr:
    x, y = np.asarray(x, float), np.asarray(y, float)
    c = Corr(group, len(x))
    if len(x) < MIN_TRIALS:
        return c
    c.spearman, c.pearson = spearman(x, y), pearson(x, y)
    if math.isfinite(c.spearman):
        c.spearman_ci = bootstrap_spearman(x, y, n_boot, seed)
    c.pearson_ci = fisher_interval(c.pearson, len(x))
    c.fit = fit_relation(x, y)
    c.relation = _describe_fit(c.fit)
    return c


def verdict(c: Corr, sign: int) -> str:
    """RULE applied to one metric's overall correlation."""
    if c.n < MIN_TRIALS:
        return "too few trials"
    if not math.isfinite(c.spearman):
        return "not testable"
    if c.spearman_ci is None:
        return "not testable"
    lo = min(sign * c.spearman_ci[0], sign * c.spearman_ci[1])  # the bound nearest 'no relation'
    if lo > GOOD_PROXY:
        return "good proxy"
    if lo <= 0:
        return "not a proxy"
    return "partial"


def _ci(ci) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "[n/a]"


def _group_keys(trials: pd.DataFrame) -> list[str]:
    keys = ["arch", "patch"]
    return keys + (["objective"] if "objective" in trials and trials["objective"].nunique() > 1 else [])


def _group_label(keys: list[str], value) -> str:
    value = value if isinstance(value, tuple) else (value,)
    parts = {k: v for k, v in zip(keys, value)}
    out = f"{plots._arch_name(str(parts['arch']))}, patch {parts['patch']}"
    return out + (f", {parts['objective']}" if "objective" in parts else "")


def _mixed_detector(t: pd.DataFrame, key: str) -> str | None:
    """FID/FD/KID of stand-in networks trained on different machines have different scales: a
    correlation across them measures the networks, not the loss (analysis/analyse.py's _mixed_detectors rule)."""
    if "detector" not in t or not key.startswith(_DETECTOR_METRICS) or key.startswith(_OWN_TAG_METRICS):
        return None
    found = sorted({str(d) for d in t["detector"].dropna() if str(d)})
    return f"its values come from {len(found)} different detectors ({', '.join(found)})" if len(found) > 1 else None


def analyse_metric(trials: pd.DataFrame, loss_col: str, key: str, n_boot: int, seed: int) -> MetricResult:
    res = MetricResult(key, metric_name(key), _sign(key))
    col = f"final_{key}"
    t = trials[[c for c in ["arch", "patch", "objective", "detector", loss_col, col] if c in trials]].copy()
    t[loss_col] = pd.to_numeric(t[loss_col], errors="coerce")
    t[col] = pd.to_numeric(t[col], errors="coerce")
    t = t[np.isfinite(t[loss_col]) & np.isfinite(t[col])]
    keys = _group_keys(t)
    t["group"] = [_group_label(keys, v) for v in zip(*(t[k] for k in keys))] if len(t) else []
    res.points = t.rename(columns={loss_col: "loss", col: "value"})[["loss", "value", "group"]]
    mixed = _mixed_detector(t, key)
    if mixed:
        res.verdict = "not testable"
        res.line = f"{key}: not tested — {mixed}, whose scales differ; compare trials of one detector."
        return res
    overall = correlate(t[loss_col], t[col], "all trials", n_boot, seed)
    res.groups.append(overall)
    labels = t["group"].unique()
    if len(labels) > 1:
        for label in sorted(labels, key=str):
            g = t[t["group"] == label]
            if len(g) >= MIN_TRIALS:
                res.groups.append(correlate(g[loss_col], g[col], label, n_boot, seed))
    res.verdict = verdict(overall, res.sign)
    res.line = _line(res, overall)
    return res


def _line(res: MetricResult, c: Corr) -> str:
    if res.verdict == "too few trials":
        return (f"{res.key}: too few trials ({c.n}, fewer than {MIN_TRIALS}) to say whether the loss is a proxy "
                "for it in this study.")
    if res.verdict == "not testable" and not math.isfinite(c.spearman):
        return f"{res.key}: not testable — the loss or the metric is the same in every trial ({c.n} trials)."
    if res.verdict == "not testable":
        return (f"{res.key}: not testable — Spearman ρ = {c.spearman:.3f}, but most bootstrap resamples of its {c.n} "
                "trials have a constant loss or metric, so there is no interval.")
    direction = "rises" if res.sign > 0 else "falls"
    return (f"{res.key}: {res.verdict} — Spearman ρ = {c.spearman:.3f} {_ci(c.spearman_ci)}, Pearson r = "
            f"{c.pearson:.3f} {_ci(c.pearson_ci)} over {c.n} trials (the metric should {direction[:-1]} as the "
            "loss rises).")


@dataclass
class LossMetric:
    loss_label: str
    n_boot: int
    results: list[MetricResult]
    figure: str | None = None
    warnings: list[str] = field(default_factory=list)


def analyse(rep, trials: pd.DataFrame, loss_col: str | None, loss_label: str, out: Path, fig, bootstrap: int,
            seed: int) -> None:
    """Correlate every image metric with the loss over `trials` (the finished ones), draw the figure
    (fig(path, title, caption) adds it to the report) and keep the result as rep.loss_metric for blocks()."""
    keys = metric_keys(trials)
    if loss_col is None or loss_col not in trials or not keys:
        rep.loss_metric = None  # no image metric (or no loss): nothing to correlate
        return
    results = [analyse_metric(trials, loss_col, k, bootstrap, seed) for k in keys]
    rep.loss_metric = LossMetric(loss_label, bootstrap, results)
    if "objective" in trials and trials["objective"].nunique() > 1:
        rep.loss_metric.warnings.append(
            "The trials use different objectives, whose losses have different scales: the 'all trials' rows and "
            "verdicts pool them; the per-group rows (one objective each) are the comparable ones.")
    path = plot(results, out / FIGURE, loss_label)
    if path is not None:
        rep.loss_metric.figure = path.name
        fig(path, "Image metrics vs loss across trials (is the loss a proxy?)",
            f"x: {loss_label}; y: the image metric (final), one panel per metric and CFG scale; points: trials, "
            "coloured by architecture and patch size; line: the fitted relation over all trials (power law "
            "metric = a·loss^b, straight in log-log, when every value is positive; else a line). Panel titles: "
            "Spearman ρ and Pearson r over all trials and the verdict (see 'Loss → image metrics').")


def plot(results: list[MetricResult], path: Path, loss_label: str) -> Path | None:
    shown = [r for r in results if r.points is not None and not r.points.empty]
    if not shown:
        return None
    f, axes = plots._grid(len(shown), width=4.4, height=3.6)
    groups = sorted({g for r in shown for g in r.points["group"]}, key=str)
    colors = dict(zip(groups, plots._group_colors(len(groups))))
    for ax, r in zip(axes, shown):
        for g, p in r.points.groupby("group", sort=True):
            ax.scatter(p["loss"], p["value"], s=20, color=colors[g], label=g, zorder=3)
        overall = r.groups[0] if r.groups else None
        if overall is not None and overall.fit is not None:
            kind, a, b = overall.fit
            lo, hi = r.points["loss"].min(), r.points["loss"].max()
            xs = np.geomspace(lo, hi, 80) if kind == "power" else np.linspace(lo, hi, 80)
            ax.plot(xs, a * xs ** b if kind == "power" else a + b * xs, color="k", lw=1.2,
                    label=f"fit: {overall.relation}")
            if kind == "power":
                _log_log(ax)
        stats = (f"ρ = {overall.spearman:.2f}, r = {overall.pearson:.2f}" if overall is not None
                 and math.isfinite(overall.spearman) else f"{len(r.points)} trials")
        ax.set_title(f"{r.key}\n{stats} — {r.verdict}")
        ax.set_xlabel(loss_label)
        ax.set_ylabel(r.name)
        ax.legend(fontsize=7)
    f.suptitle("image metrics vs loss across trials", y=1.02)
    return plots._save(f, path)


def _tick(v, _pos=None) -> str:
    """Plain numbers at 1, 2, 3 and 5 × a power of ten (a loss axis often spans under one decade)."""
    if v <= 0:
        return ""
    lead = round(v / 10 ** math.floor(math.log10(v)), 6)
    return f"{v:g}" if lead in (1, 2, 3, 5) else ""


def _log_log(ax) -> None:
    from matplotlib.ticker import FuncFormatter

    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(FuncFormatter(_tick))
        axis.set_minor_formatter(FuncFormatter(_tick))


def _intro(lm: LossMetric) -> str:
    return (f"Does the loss predict the image metrics in this study? SD3 (Esser et al. 2024, arXiv 2403.03206) found "
            "validation loss to track its image metrics; here each metric's final value is set against the trials' "
            f"{lm.loss_label}, across finished trials (each CFG scale is a metric of its own). Spearman ρ: rank "
            f"correlation, 95 % percentile bootstrap over trials ({lm.n_boot} resamples; Efron & Tibshirani 1993). "
            "Pearson r: linear correlation of the raw values, 95 % Fisher z interval (Fisher 1921). Fitted relation: "
            "metric = a·loss^b by least squares in log-log when every value is positive, else metric = a + b·loss. "
            f"Groups: all trials, and each architecture and patch size with at least {MIN_TRIALS} trials. Rule: {RULE}")


def blocks(rep) -> list[Block]:
    """The report's section (analysis/blocks.py), empty when the study logged no image metric."""
    lm = getattr(rep, "loss_metric", None)
    if lm is None or not lm.results:
        return []
    rows = []
    for r in lm.results:
        for c in r.groups:
            enough = c.n >= MIN_TRIALS
            rows.append([r.key, c.group, str(c.n),
                         f"{c.spearman:.3f} {_ci(c.spearman_ci)}" if enough and math.isfinite(c.spearman) else "–",
                         f"{c.pearson:.3f} {_ci(c.pearson_ci)}" if enough and math.isfinite(c.pearson) else "–",
                         c.relation or "–"])
    out = [h3("Loss → image metrics: is the loss a proxy?"), para(_intro(lm))]
    out += [para(w, True) for w in lm.warnings]
    if rows:
        out.append(table(["metric", "trials", "n", "Spearman ρ [95 % bootstrap]", "Pearson r [95 % Fisher z]",
                          "fitted relation"], rows))
    out.append(ul([r.line for r in lm.results]))
    if lm.figure:
        out.append(para("Figure: 'Image metrics vs loss across trials' under Figures."))
    return out
