"""`ditscale plan`'s arithmetic: where an isoFLOP design puts its sizes, before anything runs.

Pure computation (no torch, Ray or MLflow): the caller gives a parameter count per size name
(`params_of`), so tests can use any law and any counter.

Design (issue 27): the centre of a budget's sizes is the compute-optimal size of a law,
N_opt(C) = N0 · (C / C0)^A. The default A = 0.568 is Liang et al. 2024's fitted exponent
("Scaling Laws for Diffusion Transformers", arXiv 2410.08184: N_opt ∝ C^0.5681). Per budget, K sizes
are spaced evenly in log N from N_opt / F to N_opt · F and snapped to the family's geometries, so the
isoFLOP parabola of that budget is sampled on both sides of its vertex: Czech et al. 2026
(arXiv 2603.22339) showed the fitted optimum is biased when the size grid is off-centre.

Budgets C are in the harness's convention: multiply-adds of training, 3 × forward × images, i.e. the
logged `train_gflops` × 1e9 (models/flops.py, harness/study.py), the value of `train.flops`.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from harness.errors import UserError
from models.registry import DIT_GEOMETRY_HEAD_DIM, MMDIT_HEAD_DIM

DEFAULT_EXPONENT = 0.568          # Liang et al. 2024: N_opt ∝ C^0.5681
DEFAULT_SIZES = 5
DEFAULT_SPREAD = 4.0
DEFAULT_MAX_EPOCHS = 4.0          # Muennighoff et al. 2023 (arXiv 2305.16264): up to ~4 epochs of repeated
                                  # data are worth nearly as much as fresh data; beyond, returns fall off
                                  # and the data-constrained law differs from the one being measured
# DiT-d{D}w{W}: the width/depth band of the DiT paper's own presets (S: 384/12 = 32, L: 1024/24 = 42.7,
# XL: 1152/28 = 41.1, B: 768/12 = 64), i.e. between 1 and 2 heads of width 32 per layer of depth.
DIT_ASPECT_MIN, DIT_ASPECT_MAX = 32, 64
DIT_ASPECT_PREFERRED = math.sqrt(DIT_ASPECT_MIN * DIT_ASPECT_MAX)  # ties: the band's centre, near L/XL's shape
MAX_DEPTH = 256                   # enumeration guard: deeper than any transformer trained


# --- the flags --------------------------------------------------------------------------------------


def _number(text: str, flag: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"{flag}: {text!r} is not a number ({what})") from None
    if not math.isfinite(value) or value <= 0:
        raise UserError(f"{flag}: {text!r} must be a positive number ({what})")
    return value


def parse_budgets(text: str) -> list[float]:
    """'7.5e10,1.5e11,3e11' -> budgets, strictly increasing (one line naming --budgets otherwise)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise UserError("--budgets: give a comma-separated list of training FLOPs, e.g. 7.5e10,1.5e11,3e11")
    budgets = [_number(p, "--budgets", "training FLOPs, multiply-adds") for p in parts]
    for lo, hi in itertools.pairwise(budgets):
        if hi <= lo:
            raise UserError(f"--budgets: {text!r} is not increasing ({hi:g} after {lo:g}); list each budget once, "
                            "smallest first")
    return budgets


def parse_center(text: str) -> tuple[float, float]:
    """'1.2e5@7.5e10' -> (N0 parameters, C0 training FLOPs)."""
    n, sep, c = text.partition("@")
    if not sep or not n.strip() or not c.strip():
        raise UserError(f"--center: {text!r} is not N@C (parameters @ training FLOPs), e.g. 1.2e5@7.5e10")
    return _number(n.strip(), "--center", "N: parameters"), _number(c.strip(), "--center", "C: training FLOPs")


def parse_ladder(text: str, budgets: list[float]) -> list[float]:
    """'3e19' -> the plan's ladder.budgets (harness/launch/ladder.py), in the same convention as --budgets, each
    above the largest of them (the rule harness/config.py applies to ladder.budgets), refused in one line."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise UserError("--ladder: give a comma-separated list of training FLOPs above the largest --budgets")
    ladder = [_number(p, "--ladder", "training FLOPs, multiply-adds") for p in parts]
    top = max(budgets)
    for c in ladder:
        if c <= top:
            raise UserError(f"--ladder: {c:g} is not above the largest --budgets {top:g}; a ladder trial predicts "
                            "beyond the fitted budgets")
    if len(set(ladder)) < len(ladder):
        raise UserError(f"--ladder: {text!r} lists a budget twice")
    return sorted(ladder)


def check_numbers(exponent: float, sizes: int, spread: float, max_epochs: float) -> None:
    """The plan's other flags, each refused in one line naming it."""
    if not math.isfinite(exponent) or not 0 < exponent < 1:
        raise UserError(f"--exponent: {exponent:g} must be between 0 and 1 (N_opt grows with compute, slower than "
                        "it; Liang et al. 2024 fit 0.568)")
    if sizes < 3:
        raise UserError(f"--sizes-per-budget: {sizes} is fewer than 3, the fewest a parabola through each budget "
                        "needs")
    if not math.isfinite(spread) or spread <= 1:
        raise UserError(f"--spread: {spread:g} must be above 1 (sizes span N_opt / F .. N_opt · F)")
    if not math.isfinite(max_epochs) or max_epochs <= 0:
        raise UserError(f"--max-epochs: {max_epochs:g} must be positive")


# --- the law ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Law:
    """N_opt(C) = n0 · (C / c0)^a, C in training FLOPs (multiply-adds)."""

    n0: float
    c0: float
    a: float
    source: str

    def n_opt(self, c: float) -> float:
        return self.n0 * (c / self.c0) ** self.a


# Liang et al. 2024 ("Scaling Laws for Diffusion Transformers", arXiv 2410.08184), their fitted compute-optimal
# size (in-context DiT, rectified flow, 1e17..6e18 FLOPs): N_opt = 0.0009 · C_L^0.5681 (and D_opt =
# 186.8535 · C_L^0.4319; N_opt · D_opt = C_L / 5.95, i.e. their C_L = 6·N·D with D in tokens (inferred, see
# below): 2 FLOPs per multiply-add, the backward pass = 2 forwards). Ours counts multiply-adds, 3 × forward ×
# images, and a transformer's forward is ≈ N multiply-adds per token, so C_L ≈ 2 · C (ours).
# What is checked and what is not (searched 2026-12-07; the paper's own text was not readable here, only its
# abstract):
#   confirmed, from two independent write-ups of the paper: N_opt = 0.0009 · C^0.5681 and D_opt = 186.8535 ·
#     C^0.4319 (with L = 2.3943 · C^-0.0273), fitted on budgets 1e17..6e18 (a paper-notes page on the ICLR 2026
#     version, en.papernotes.org/ICLR2026/image_generation/scaling_laws_for_diffusion_transformers/, and an
#     OpenReview reviewer's summary of the submission, openreview.net/forum?id=T985gm4sDA); the exponents alone
#     also in emergentmind.com/papers/2410.08184. The numbers agree with each other: 6 · 0.0009 · 186.8535 =
#     1.009, so N_opt · D_opt = C / 6 (their C = 6ND) to 1 %; and 0.0009 · (1.5e21)^0.5681 = 9.65e8 against
#     the ~958.3M parameters the write-up quotes for their 1.5e21 check (0.7 % apart: 0.0009 is rounded; 958.3M
#     implies 0.000894).
#   not confirmed: that their D counts tokens (so that C_L = 2 · C ours) rather than images. Inferred: at 6e18
#     their law gives N_opt ≈ 4.2e7 and D_opt ≈ 2.4e10: 0.9 passes over their 108M image-text pairs at 256
#     tokens per image (assumed: 256 px, an 8x VAE, patch 2), the write-up's "one epoch" setting, but about
#     220 passes if D counted images. If D were images, --center liang2024 would sit ~256^0.57 ≈ 23x too high.
LIANG_CENTER = "liang2024"        # `--center liang2024`
LIANG_K, LIANG_A = 0.0009, 0.5681
LIANG_FLOPS_PER_OURS = 2.0
LIANG_SOURCE = "Liang et al. 2024 (arXiv 2410.08184)"


def liang_law(anchor: float = 1e18) -> Law:
    """Liang et al.'s N_opt(C) with C in our convention: N_opt = 0.0009 · (2 C)^0.5681. The coefficient and
    exponent are confirmed from two write-ups of the paper (not from its own text); that their D counts tokens,
    which gives the factor 2, is inferred, not confirmed (the comment above LIANG_CENTER says how)."""
    n0 = LIANG_K * (LIANG_FLOPS_PER_OURS * anchor) ** LIANG_A
    return Law(n0, anchor, LIANG_A, (
        f"{LIANG_SOURCE}: N_opt = {LIANG_K:g} * C_L^{LIANG_A:g} with C_L in their FLOPs "
        f"(6*N*D: 2 FLOPs per multiply-add, backward = 2 forwards, D in tokens), i.e. C_L = "
        f"{LIANG_FLOPS_PER_OURS:g} x ours (multiply-adds, 3 x forward x images; forward = N multiply-adds per "
        f"token): N_opt(C) = {LIANG_K:g} * ({LIANG_FLOPS_PER_OURS:g} C)^{LIANG_A:g} = --center "
        f"{n0:.4g}@{anchor:g} --exponent {LIANG_A:g}"))


# What a plan costs in GPU time: training FLOPs (2 per multiply-add) at a stated share of one H100's peak.
H100_BF16_DENSE = 989e12          # FLOP/s: NVIDIA H100 SXM datasheet, BF16 Tensor Core, without sparsity
PLAN_MFU = 0.40                   # model FLOPs utilisation assumed: a well-tuned bf16 transformer at this size
                                  # reaches 35-45 %; a plan's smallest sizes reach less: the hours are a floor


def gpu_hours(macs: float, mfu: float = PLAN_MFU, peak: float = H100_BF16_DENSE) -> float:
    """GPU-hours on one H100 for `macs` training multiply-adds (the harness's FLOPs) at `mfu` of `peak`."""
    return 2 * macs / (mfu * peak) / 3600


def law_from_report(folder: str | Path, group: str | None = None) -> Law:
    """N_opt(C) from a report's fits.json (analysis/report.py writes it): the isoFLOP optima's fitted
    N_opt = k · C^a (Chinchilla's approach 2), else the loss surface's N_opt = G · (C / k)^(β/(α+β)),
    G = (αA / (βB))^(1/(α+β)) (approach 3, analysis/scaling/surface.py). The report's C is training
    GFLOPs (its `compute` column is the logged train_gflops): converted to FLOPs here."""
    path = Path(folder) / "fits.json"
    if not path.is_file():
        raise UserError(f"--from-report: {path} not found (a folder written by `ditscale report`)")
    try:
        rows = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"--from-report: {path} is not readable JSON ({err})") from None
    laws: dict = {}
    rows = [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []
    # Approach 2 first (the parabolas' vertices are what an isoFLOP design centres on), else approach 3.
    for row in sorted(rows, key=lambda r: r.get("relation") != "isoFLOP optima"):
        law = _law_of_row(row, path)
        if law is not None and row.get("group") not in laws:
            laws[row.get("group")] = law
    if not laws:
        raise UserError(f"--from-report: {path} has no fitted N_opt(C) (neither an 'isoFLOP optima' row with a "
                        "fitted n_opt_fit nor a fitted 'loss surface L(N, D)'); give --center instead")
    if group is None and len(laws) > 1:
        raise UserError(f"--from-report: {path} fits N_opt(C) for groups {', '.join(map(str, laws))}; pick one "
                        "with --report-group")
    if group is not None and group not in laws:
        raise UserError(f"--report-group: {group!r} is not among {', '.join(map(str, laws))} in {path}")
    return laws[group if group is not None else next(iter(laws))]


def _law_of_row(row: dict, path: Path) -> Law | None:
    where = f"{path}, {row.get('group')}"
    if row.get("relation") == "isoFLOP optima" and row.get("fitted"):
        fit = row.get("n_opt_fit") or {}
        k, a = fit.get("k"), fit.get("a")
        if _finite(k, a) and k > 0 and 0 < a < 1:
            # N = k · C_g^a with C_g = C / 1e9  ->  centre (N at C0 = 1e9 · 1, exponent a)
            return Law(n0=k, c0=1e9, a=a, source=f"isoFLOP optima (approach 2) of {where}: N_opt = {k:.4g} · "
                                                  f"(C / 1e9)^{a:.4g}")
    if row.get("relation") == "loss surface L(N, D)" and row.get("fitted"):
        A, alpha, B, beta, k = (row.get(x) for x in ("A", "alpha", "B", "beta", "k"))
        if _finite(A, alpha, B, beta, k) and min(A, alpha, B, beta, k) > 0:
            g = (alpha * A / (beta * B)) ** (1 / (alpha + beta))
            a = beta / (alpha + beta)
            # N = g · (C_g / k)^a: the law's value at C_g = 1 GFLOP
            return Law(n0=g * (1 / k) ** a, c0=1e9, a=a,
                       source=f"loss surface (approach 3) of {where}: N_opt ∝ C^{a:.4g}")
    return None


def _finite(*values) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)


# --- geometries -------------------------------------------------------------------------------------


def dit_ladder(params_of: Callable[[str], int], up_to: float) -> list[tuple[int, str]]:
    """(params, size) of every DiT-d{D}w{W} with 32 <= W/D <= 64 (W a multiple of the head width 32,
    models/registry.py), up to ~`up_to` parameters, smallest first.

    The shape rule: width/depth within the band of the DiT paper's presets (S 32, L 42.7, XL 41.1, B 64).
    Kaplan et al. 2020 (arXiv 2001.08361, fig. 5) found the loss at fixed N changes by only a few percent
    over aspect ratios from ~20 to ~200, so any shape in the band measures the same N; a band (rather than
    one ratio) keeps about 2x parameter steps at CPU scale, where a fixed ratio (N ∝ W³) jumps 8x from
    depth 1 to 2. Within the band, equal counts prefer the band's centre (W/D ≈ 45)."""
    out = []
    for depth in range(1, MAX_DEPTH + 1):
        widths = range(max(DIT_ASPECT_MIN * depth, DIT_GEOMETRY_HEAD_DIM), DIT_ASPECT_MAX * depth + 1,
                       DIT_GEOMETRY_HEAD_DIM)
        sizes = [(params_of(f"d{depth}w{w}"), f"d{depth}w{w}", w / depth) for w in widths]
        if sizes and sizes[0][0] > up_to:
            break
        out += [(p, s, abs(math.log(r / DIT_ASPECT_PREFERRED))) for p, s, r in sizes if p <= 2 * up_to]
    return [(p, s) for p, s, _ in sorted(out)]


def mmdit_ladder(params_of: Callable[[str], int], up_to: float) -> list[tuple[int, str]]:
    """(params, size) of MMDiT-d{depth}, SD3's rule hidden = 64 · depth (Esser et al. 2024, arXiv
    2403.03206): the family's one shape, as the paper scaled it."""
    out = []
    for depth in range(1, MAX_DEPTH + 1):
        p = params_of(f"d{depth}")
        out.append((p, f"d{depth}"))
        if p > up_to:
            break
    return out


SHAPE_RULES = {
    "dit": f"DiT-d{{D}}w{{W}}, W a multiple of {DIT_GEOMETRY_HEAD_DIM} with {DIT_ASPECT_MIN} <= W/D <= "
           f"{DIT_ASPECT_MAX} (the DiT presets' band)",
    "mmdit": f"MMDiT-d{{D}}, hidden = {MMDIT_HEAD_DIM} · D (SD3's rule)",
}
LADDERS = {"dit": dit_ladder, "mmdit": mmdit_ladder}


# --- the plan -----------------------------------------------------------------------------------------


@dataclass
class BudgetPlan:
    budget: float
    n_opt: float
    sizes: list[tuple[int, str]] = field(default_factory=list)   # (params, size), smallest first
    notes: list[str] = field(default_factory=list)

    @property
    def below(self) -> int:
        return sum(p < self.n_opt for p, _ in self.sizes)

    @property
    def above(self) -> int:
        return sum(p > self.n_opt for p, _ in self.sizes)


def log_targets(n_opt: float, k: int, spread: float) -> list[float]:
    """K sizes evenly in log N from n_opt / spread to n_opt · spread."""
    lo, hi = math.log(n_opt / spread), math.log(n_opt * spread)
    return [math.exp(lo + (hi - lo) * i / (k - 1)) for i in range(k)]


def sides_needed(k: int) -> int:
    """Sizes each side of the centre: 2 when K >= 4 (a parabola's both flanks), else 1."""
    return 2 if k >= 4 else 1


def snap_budget(budget: float, n_opt: float, k: int, spread: float, ladder: list[tuple[int, str]],
                family: str) -> BudgetPlan:
    """The budget's sizes: each log target snapped to the nearest geometry in log N, duplicates dropped;
    when that leaves fewer than `sides_needed(k)` sizes below or above the centre, the geometries nearest
    to that side's targets are added (the spacing widens where the ladder is coarse). Refuses, naming
    --center, when the ladder has too few geometries on a side."""
    plan = BudgetPlan(budget, n_opt)
    targets = log_targets(n_opt, k, spread)
    chosen = {}
    for t in targets:
        p, s = min(ladder, key=lambda g: abs(math.log(g[0] / t)))
        chosen[s] = p
    if len(chosen) < len(targets):
        plan.notes.append(f"{len(targets) - len(chosen)} target(s) snapped onto the same geometry")
    need = sides_needed(k)
    for side, wanted in (("below", [t for t in targets if t < n_opt]), ("above", [t for t in targets if t > n_opt])):
        on_side = (lambda p: p < n_opt) if side == "below" else (lambda p: p > n_opt)
        while sum(on_side(p) for p in chosen.values()) < need:
            spare = [g for g in ladder if on_side(g[0]) and g[1] not in chosen]
            if not spare:
                have = [s for s, p in chosen.items() if on_side(p)]
                raise UserError(_too_few(side, budget, n_opt, need, have, ladder, family))
            p, s = min(spare, key=lambda g: min(abs(math.log(g[0] / t)) for t in wanted))
            chosen[s] = p
            plan.notes.append(f"added {s} {side} the centre (snapping left fewer than {need} there)")
    plan.sizes = sorted((p, s) for s, p in chosen.items())
    return plan


def _too_few(side: str, budget: float, n_opt: float, need: int, have: list[str], ladder, family: str) -> str:
    edge = f"the smallest, {ladder[0][1]}, has {ladder[0][0]:,}" if side == "below" else \
        f"the largest listed, {ladder[-1][1]}, has {ladder[-1][0]:,}"
    fix = "a larger centre" if side == "below" else "a smaller centre"
    return (f"--center: at budget {budget:.3g}, N_opt = {n_opt:.3g} parameters leaves fewer than {need} "
            f"{family} geometries {side} it ({edge} parameters; {SHAPE_RULES[family]}); give {fix}, other "
            "--budgets, or fewer --sizes-per-budget")


def plan_budgets(law: Law, budgets: list[float], k: int, spread: float, family: str,
                 params_of: Callable[[str], int]) -> list[BudgetPlan]:
    """Every budget's sizes (see snap_budget). params_of(size) -> parameters of that size in the study."""
    if family not in LADDERS:
        raise UserError(f"--base: model.family {family!r} has no shape rule; known: {', '.join(LADDERS)}")
    cache: dict[str, int] = {}

    def count(size: str) -> int:
        if size not in cache:
            cache[size] = params_of(size)
        return cache[size]

    top = max(law.n_opt(c) for c in budgets) * spread
    ladder = LADDERS[family](count, 4 * top)  # room for neighbours beyond the outermost target
    return [snap_budget(c, law.n_opt(c), k, spread, ladder, family) for c in budgets]


def plan_points(plans: list[BudgetPlan]) -> list[dict]:
    """The study's `points:` (harness/config.py): one {model.size, train.flops} per planned pair."""
    return [{"model.size": size, "train.flops": float(p.budget)} for p in plans for _, size in p.sizes]


def epochs_warnings(rows: list[dict], max_epochs: float) -> list[str]:
    """One line per trial that would repeat its training split more than `max_epochs` times."""
    return [f"trial {r['trial_id']} ({r['model']}, budget {r['budget']:.3g}): {r['epochs']:.3g} epochs of the "
            f"training split, above --max-epochs {max_epochs:g}: data-constrained (Muennighoff et al. 2023), "
            "where the law being measured changes" for r in rows if r.get("epochs") and r["epochs"] > max_epochs]


def read_throughput(path: str | Path) -> dict[str, float]:
    """Images per second by model: a YAML/JSON mapping {model name or size: img/s}, or `ditscale bench
    --json` output (one object or a list of them: model, results[0].img_per_s)."""
    import yaml

    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise UserError(f"--throughput: cannot read {path} ({err})") from None
    bench = raw if isinstance(raw, list) else [raw] if isinstance(raw, dict) and "results" in raw else None
    if bench is not None:
        raw = {b.get("model"): (b.get("results") or [{}])[0].get("img_per_s") for b in bench if isinstance(b, dict)}
    if not isinstance(raw, dict):
        raise UserError(f"--throughput: {path} is not a mapping of model name -> images per second")
    out = {}
    for name, value in raw.items():
        if not _finite(value) or value <= 0:
            raise UserError(f"--throughput: {path}: {name}: {value!r} is not a positive number of images per second")
        out[str(name)] = float(value)
    return out
