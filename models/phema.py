"""Power-function EMA and post-hoc EMA reconstruction (EDM2).

Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models" (EDM2,
arXiv 2312.02696), section 3 and appendix C; reference code NVlabs/edm2, training/phema.py. The facts
used here (this is an independent implementation):

* A power-function EMA profile averages the weights seen up to step t with density proportional to
  tau^gamma on [0, t]. Its width relative to t is sigma_rel, with
  sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3))  (EDM2 eq. 123); gamma from sigma_rel is the
  largest real root of gamma^3 + 7 gamma^2 + (16 - sigma_rel^-2) gamma + (12 - sigma_rel^-2) = 0.
* It is tracked during training by shadow <- beta_t shadow + (1 - beta_t) weights after every optimizer
  step t = 1, 2, ..., with beta_t = (1 - 1/t)^(gamma + 1) (eq. 127 with one step per update).
* Snapshots of a few tracked profiles, saved every so many steps, are combined linearly into the EMA of
  any other (step, sigma_rel): the weights minimise the L2 distance between the combined profile and the
  target's, i.e. solve A x = b with A the snapshot profiles' inner products and b their inner products
  with the target (Algorithm 3); like EDM2 the weights are then scaled to sum to 1.

sigma_rel is accepted in (0, 0.3]: sigma_rel(gamma) rises from 0 at gamma = -1 to its maximum, about
0.3003 at gamma = (sqrt(5) - 3) / 2 = -0.382, and falls towards 0 as gamma grows. Above ~0.3003 no
power-function profile has that width, and the branch used (the largest root, gamma >= -0.382) is the
one EDM2 uses; 0.3 keeps a round bound inside it. (EDM2 tracks 0.05 and 0.10 and reconstructs
0.01-0.25.)

    ema = PowerFunctionEMA(model, sigma_rels=(0.05, 0.10), gather=None)
    ema.update(model)                          # after each optimizer step
    snap = ema.snapshot(0.05, model)           # {"step", "sigma_rel", "gamma", "shadow", "buffers"}
    weights = solve_weights([(1000, 0.05), (2000, 0.05), (1000, 0.10), (2000, 0.10)], target=(2000, 0.07))

ZeRO-3 works as in models/ema.py: pass `gather` (deepspeed.zero.GatheredParameters' signature); every
read of the model's weights happens inside gather(params), so update() is a collective under ZeRO-3 and
every rank must call it. The shadows are full fp32 copies, identical on every rank. A trial that also keeps
the running EMA updates both with models.ema.update_together(model, ema, phema): one gather per step.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn

from models.ema import GatherFn, full_shadow, update_together

MAX_SIGMA_REL = 0.3
_GAMMA_AT_PEAK = (math.sqrt(5.0) - 3.0) / 2.0  # where sigma_rel(gamma) is largest (d/dgamma = 0)


# -- sigma_rel <-> gamma ----------------------------------------------------------------------------

def gamma_to_sigma_rel(gamma: float) -> float:
    """EDM2 eq. 123: the relative standard deviation of the profile tau^gamma on [0, t]."""
    g = float(gamma)
    return math.sqrt((g + 1.0) / ((g + 2.0) ** 2 * (g + 3.0)))


def check_sigma_rel(sigma_rel, what: str = "sigma_rel") -> float:
    """sigma_rel as a float in (0, 0.3], else ValueError naming `what` (see the module docstring for why)."""
    try:
        value = float(sigma_rel)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: {sigma_rel!r} is not a number") from None
    if not (math.isfinite(value) and 0.0 < value <= MAX_SIGMA_REL):
        raise ValueError(f"{what}: {sigma_rel!r} must be in (0, {MAX_SIGMA_REL}] (EDM2's power-function EMA "
                         f"profiles reach at most sigma_rel ~0.3003)")
    return value


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma of the profile with this sigma_rel: the largest root of EDM2's cubic (eq. 126),
    found by bisection on gamma >= -0.382, where sigma_rel(gamma) falls monotonically."""
    s = check_sigma_rel(sigma_rel)
    lo, hi = _GAMMA_AT_PEAK, 1.0 / s + 10.0  # sigma_rel(gamma) < 1/gamma: the root lies below 1/s
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if gamma_to_sigma_rel(mid) > s:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-15 * max(1.0, abs(mid)):
            break
    return 0.5 * (lo + hi)


def ema_beta(step: int, gamma: float) -> float:
    """The decay of the update after optimizer step `step` (1, 2, ...): (1 - 1/step)^(gamma + 1).
    beta_1 = 0: the first update replaces the shadow with the weights, so the initialisation carries no
    weight (the profile starts at tau = 0)."""
    if step < 1:
        raise ValueError(f"step must be >= 1; got {step}")
    return (1.0 - 1.0 / step) ** (gamma + 1.0)


# -- the reconstruction ------------------------------------------------------------------------------

def profile_inner_product(t_a: float, gamma_a: float, t_b: float, gamma_b: float) -> float:
    """Integral over tau of p_a(tau) p_b(tau), with p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) on
    [0, t] (each profile integrates to 1). For t_a <= t_b it is
    (ga + 1)(gb + 1) / ((ga + gb + 1) t_b) * (t_a / t_b)^gb   (EDM2 eq. 151, derived directly)."""
    if t_a > t_b:
        t_a, gamma_a, t_b, gamma_b = t_b, gamma_b, t_a, gamma_a
    return ((gamma_a + 1.0) * (gamma_b + 1.0) / ((gamma_a + gamma_b + 1.0) * t_b)
            * (t_a / t_b) ** gamma_b)


def _normalised(points: Sequence[tuple[int, float]], what: str) -> list[tuple[float, float]]:
    out = []
    for i, point in enumerate(points):
        try:
            step, sigma = point
        except (TypeError, ValueError):
            raise ValueError(f"{what}[{i}]: expected (step, sigma_rel); got {point!r}") from None
        if not (isinstance(step, (int, float)) and math.isfinite(step) and step >= 1):
            raise ValueError(f"{what}[{i}]: step must be >= 1; got {step!r}")
        out.append((float(step), sigma_rel_to_gamma(check_sigma_rel(sigma, f"{what}[{i}] sigma_rel"))))
    return out


def solve_weights(snapshots: Sequence[tuple[int, float]], target: tuple[int, float]) -> list[float]:
    """Combination weights (one per snapshot, summing to 1) whose weighted sum of the snapshots' EMA
    weights best approximates the EMA of profile `target` = (step, sigma_rel), in the least-squares sense
    over profiles (EDM2 Algorithm 3). `snapshots` are (step, sigma_rel) pairs. Solved in float64 by SVD
    least squares, so repeated or nearly dependent snapshots give the minimum-norm weights instead of
    failing. Snapshots taken after the target step may be passed; callers usually leave them out."""
    weights, _ = solve_weights_and_error(snapshots, target)
    return weights


def solve_weights_and_error(snapshots: Sequence[tuple[int, float]],
                            target: tuple[int, float]) -> tuple[list[float], float]:
    """solve_weights, and the relative L2 distance between the combined profile and the target's
    (||sum w_i p_i - p_target|| / ||p_target||): how well the snapshots can express the target at all."""
    snaps = _normalised(snapshots, "snapshots")
    if not snaps:
        raise ValueError("snapshots: at least one (step, sigma_rel) is needed")
    (t_r, g_r), = _normalised([target], "target")
    a = torch.tensor([[profile_inner_product(ti, gi, tj, gj) for tj, gj in snaps] for ti, gi in snaps],
                     dtype=torch.float64)
    b = torch.tensor([[profile_inner_product(ti, gi, t_r, g_r)] for ti, gi in snaps], dtype=torch.float64)
    x = torch.linalg.lstsq(a, b, driver="gelsd").solution[:, 0]
    total = x.sum()
    if not torch.isfinite(total) or abs(float(total)) < 1e-12:
        raise ValueError(f"target {target}: the snapshots cannot express this profile "
                         f"(weights sum to {float(total):g})")
    x = x / total
    target_norm = profile_inner_product(t_r, g_r, t_r, g_r)
    residual = float(x @ a @ x - 2.0 * (x @ b[:, 0]) + target_norm)
    return [float(v) for v in x], math.sqrt(max(residual, 0.0) / target_norm)


# -- tracking during training -----------------------------------------------------------------------

def persistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """The buffers model.state_dict() holds (not averaged, as in models/ema.py and EDM2's get(): their
    newest values), so that shadow + buffers is a complete state dict in the model's own layout."""
    out = {}
    for prefix, module in model.named_modules():
        for name, buf in module._buffers.items():
            if buf is not None and name not in module._non_persistent_buffers_set:
                out[f"{prefix}.{name}" if prefix else name] = buf.detach().clone()
    return out


class PowerFunctionEMA:
    """Power-function EMAs of one model's weights, one full fp32 shadow per sigma_rel. The step t of an
    update is the number of updates so far (the trial's optimizer steps: a resumed trial restores it
    with load_state_dict, a WSD branch inherits it with its trunk's checkpoint)."""

    def __init__(self, model: nn.Module, sigma_rels: Sequence[float], gather: GatherFn | None = None):
        if not sigma_rels:
            raise ValueError("sigma_rels: give at least one sigma_rel")
        self.sigma_rels = tuple(check_sigma_rel(s, f"sigma_rels[{i}]") for i, s in enumerate(sigma_rels))
        if len(set(self.sigma_rels)) != len(self.sigma_rels):
            raise ValueError(f"sigma_rels: {list(self.sigma_rels)} has a repeated value")
        self.gammas = tuple(sigma_rel_to_gamma(s) for s in self.sigma_rels)
        self.gather = gather
        self.num_updates = 0
        first = full_shadow(model, gather)  # one read; the other profiles start as copies of it
        self.shadows: list[dict[str, torch.Tensor]] = [first] + [
            {name: value.clone() for name, value in first.items()} for _ in self.sigma_rels[1:]]

    def update(self, model: nn.Module) -> list[float]:
        """One optimizer step more: shadow_k <- beta_k shadow_k + (1 - beta_k) weights for every profile.
        Returns the betas used. With the trial's running EMA as well, models.ema.update_together(model, ema,
        self) updates both from one read of the weights (one ZeRO-3 gather)."""
        return update_together(model, self)[0]

    def _apply(self, names: list[str], values: list[torch.Tensor]) -> list[float]:
        """The update from the weights already read (`values`, in the shadows' dtype and device): one fused
        lerp per profile over all tensors (a per-tensor loop cost ~50 ms per step for two profiles of
        DiT-d4w128 on a CPU)."""
        step = self.num_updates + 1
        betas = [ema_beta(step, g) for g in self.gammas]
        for shadow, beta in zip(self.shadows, betas):
            torch._foreach_lerp_([shadow[n] for n in names], values, 1.0 - beta)
        self.num_updates = step
        return betas

    def _reference(self) -> dict[str, torch.Tensor]:
        return self.shadows[0]

    def index(self, sigma_rel: float) -> int:
        try:
            return self.sigma_rels.index(float(sigma_rel))
        except ValueError:
            raise ValueError(f"sigma_rel {sigma_rel} is not tracked (tracked: {list(self.sigma_rels)})") from None

    def snapshot(self, sigma_rel: float, model: nn.Module | None = None) -> dict:
        """The profile's EMA now, as saved for a post-hoc reconstruction: {"step", "sigma_rel", "gamma",
        "shadow": {param name: fp32 tensor}, "buffers": {name: tensor}} (buffers from `model`, when given).
        Tensors are references: save them before the next update."""
        k = self.index(sigma_rel)
        return {"step": self.num_updates, "sigma_rel": self.sigma_rels[k], "gamma": self.gammas[k],
                "shadow": dict(self.shadows[k]),
                "buffers": persistent_buffers(model) if model is not None else {}}

    # -- checkpoints ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """{"sigma_rels", "num_updates", "shadows": [{name: fp32 tensor}, ...]} (references)."""
        return {"sigma_rels": list(self.sigma_rels), "num_updates": self.num_updates,
                "shadows": [dict(s) for s in self.shadows]}

    def load_state_dict(self, state: dict) -> None:
        saved = [float(s) for s in state["sigma_rels"]]
        if saved != list(self.sigma_rels):
            raise ValueError(f"power-function EMA state tracks sigma_rels {saved}, this EMA {list(self.sigma_rels)}")
        for k, (mine, theirs) in enumerate(zip(self.shadows, state["shadows"])):
            missing, unexpected = sorted(set(mine) - set(theirs)), sorted(set(theirs) - set(mine))
            if missing or unexpected:
                raise ValueError(f"power-function EMA state (sigma_rel {self.sigma_rels[k]}) does not match the "
                                 f"model: missing {missing[:5]}, unexpected {unexpected[:5]}")
            for name, value in theirs.items():
                if value.shape != mine[name].shape:
                    raise ValueError(f"power-function EMA state for {name!r} has shape {tuple(value.shape)}, "
                                     f"the model {tuple(mine[name].shape)}")
        for mine, theirs in zip(self.shadows, state["shadows"]):
            for name, value in theirs.items():
                mine[name].copy_(value)
        self.num_updates = int(state["num_updates"])

    # -- internals ------------------------------------------------------------------------------------
    def _named(self, model: nn.Module) -> tuple[list[str], list[nn.Parameter]]:
        named = list(model.named_parameters())
        names = [n for n, _ in named]
        shadows = getattr(self, "shadows", None)
        if shadows is not None and (len(names) != len(shadows[0]) or any(n not in shadows[0] for n in names)):
            unknown = [n for n in names if n not in shadows[0]][:3]
            raise ValueError(f"the model's parameters do not match the EMA's (e.g. {unknown}); pass the same "
                             f"network the EMA was built from (engine.module, not a wrapper)")
        return names, [p for _, p in named]

