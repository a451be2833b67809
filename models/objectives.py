"""Diffusion objectives and their samplers: DDPM as in DiT, rectified flow as in SD3.

One interface for both (`build_objective(kind, **options)`):

    objective.loss(model, x0, cond, t=None, noise=None, reduce=True)   -> scalar (or [B] per sample)
    objective.sample(model, shape, cond, steps, cfg_scale, sampler, generator, uncond=None,
                     guidance_interval=None, ...)                       -> x0 samples [B, C, H, W]
    objective.model_out_channels(data_channels)                         -> channels the model must output

Conventions
-----------
* The model is called as ``model(x_t, timestep, **cond)``; ``cond`` is a dict of keyword arguments
  (DiT: ``{"y": labels}``; MM-DiT: ``{"context", "pooled", "context_mask"}``).
* DDPM: ``timestep`` is the integer step 0..T-1 of the original T = 1000 chain, also when sampling
  on a respaced chain (the model never sees the respaced index), as in the DiT code.
* Rectified flow: x_t = (1 - t) x0 + t eps with t in [0, 1] (1 = pure noise); the model receives
  ``timestep = 1000 * t`` (the SD3 / diffusers FlowMatchEulerDiscreteScheduler convention), so a
  sinusoidal timestep embedder sees the same 0..1000 range under both objectives.
* Noise level (for ``guidance_interval=(lo, hi)``): a number in [0, 1], 1 = pure noise. DDPM: t / (T - 1)
  on the original chain; rectified flow: t itself (sigma, after the resolution shift). Guidance is
  applied only where lo <= level <= hi; elsewhere the model runs once on the conditional batch.
* Classifier-free guidance runs conditional and unconditional halves in ONE forward (concatenated on the
  batch axis) and guides only the first C output channels (noise / velocity), never learned-variance
  channels, which are taken from the conditional half. The unconditional condition is ``uncond`` when
  given (tensors with batch 1 are broadcast), else ``model.null_condition(cond)``.
* Sampling is deterministic given a ``torch.Generator``: all noise is drawn on the generator's device
  and moved to the sampling device, so a CPU generator gives the same samples on any device.
* Losses and sampler arithmetic are fp32 whatever the model's precision (the model output is cast).
"""

from __future__ import annotations

import inspect
import math
from typing import Callable, Iterable

import torch

__all__ = ["Objective", "DDPM", "RectifiedFlow", "build_objective", "space_timesteps", "OBJECTIVES"]


# ------------------------------------------------------------------------------------------------
# helpers shared by both objectives
# ------------------------------------------------------------------------------------------------


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every axis but the batch axis."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


def _bcast(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1, 1, ...] so that it broadcasts against `like`."""
    return values.reshape(-1, *([1] * (like.ndim - 1)))


def _randn(shape, generator: torch.Generator | None, device) -> torch.Tensor:
    # Drawn on the generator's own device, then moved: a CPU generator gives the same numbers for a
    # sampler running on CPU or GPU (and torch refuses a CPU generator for CUDA tensors anyway).
    if generator is None:
        return torch.randn(shape, device=device)
    return torch.randn(shape, generator=generator, device=generator.device).to(device)


def _concat_conditions(cond: dict, uncond: dict) -> dict:
    """{k: cat([cond[k], uncond[k]])} for tensors; non-tensor values (None, flags) must agree."""
    if set(cond) != set(uncond):
        raise ValueError(f"cond and uncond must have the same keys; got {sorted(cond)} and {sorted(uncond)}")
    both = {}
    for key, c in cond.items():
        u = uncond[key]
        if torch.is_tensor(c) and torch.is_tensor(u):
            if u.shape[1:] != c.shape[1:]:
                raise ValueError(f"uncond[{key!r}] has shape {tuple(u.shape)}, cond[{key!r}] {tuple(c.shape)}: "
                                 f"they must match except for the batch axis (pad captions to one length)")
            both[key] = torch.cat([c, u.to(c.device)], dim=0)
        elif torch.is_tensor(c) or torch.is_tensor(u) or c != u:
            raise ValueError(f"cond[{key!r}] and uncond[{key!r}] must both be tensors or equal values")
        else:
            both[key] = c
    return both


def _guided(model: Callable, x: torch.Tensor, t: torch.Tensor, cond: dict, uncond: dict, scale: float) -> torch.Tensor:
    """Classifier-free guidance in one batched forward: [x; x] with [cond; uncond], then
    out = uncond + scale * (cond - uncond) on the first C = x.shape[1] output channels (noise or
    velocity). Any further channels (learned variance) are the conditional half's, unguided."""
    both = _concat_conditions(cond, uncond)
    out = model(torch.cat([x, x]), torch.cat([t, t]), **both).float()
    out_c, out_u = out.chunk(2, dim=0)
    c = x.shape[1]
    guided = out_u[:, :c] + scale * (out_c[:, :c] - out_u[:, :c])
    return torch.cat([guided, out_c[:, c:]], dim=1)


def _null_condition(model, cond: dict) -> dict:
    # Wrappers (DeepSpeed engines, DDP) keep the network in `.module`.
    for candidate in (model, getattr(model, "module", None)):
        fn = getattr(candidate, "null_condition", None)
        if callable(fn):
            return fn(cond)
    raise ValueError("classifier-free guidance needs an unconditional condition: pass uncond=... "
                     "or give the model a null_condition(cond) method")


def _broadcast_uncond(uncond: dict, cond: dict) -> dict:
    """Tensors with batch 1 (one empty-caption embedding) are expanded to the conditional batch."""
    out = {}
    for key, u in uncond.items():
        c = cond.get(key)
        if torch.is_tensor(u) and torch.is_tensor(c) and u.shape[0] == 1 and c.shape[0] != 1:
            u = u.expand(c.shape[0], *u.shape[1:])
        out[key] = u
    return out


def _infer_device(model, cond: dict, device):
    if device is not None:
        return torch.device(device)
    for value in cond.values():
        if torch.is_tensor(value):
            return value.device
    parameters = getattr(model, "parameters", None)
    if callable(parameters):
        for p in parameters():
            return p.device
    return torch.device("cpu")


class _Denoiser:
    """The sampler's view of the model: (x, model timestep [B], noise level) -> fp32 output, with
    classifier-free guidance where it applies."""

    def __init__(self, model, cond: dict, uncond: dict | None, scale: float, interval: tuple[float, float] | None):
        self.model, self.cond, self.scale, self.interval = model, cond, float(scale), interval
        self.uncond = None
        if self.scale != 1.0:  # scale 1 is exactly the conditional prediction: no second half needed
            uncond = _null_condition(model, cond) if uncond is None else uncond
            self.uncond = _broadcast_uncond(uncond, cond)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, level: float) -> torch.Tensor:
        guide = self.uncond is not None and (self.interval is None or self.interval[0] <= level <= self.interval[1])
        if guide:
            return _guided(self.model, x, t, self.cond, self.uncond, self.scale)
        return self.model(x, t, **self.cond).float()


def _progress(iterable: Iterable, enabled: bool, desc: str) -> Iterable:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=False)


# ------------------------------------------------------------------------------------------------
# the shared interface
# ------------------------------------------------------------------------------------------------


class Objective:
    """What both objectives offer; subclasses fill in the loss terms and the sampler loops."""

    kind: str = ""
    samplers: tuple[str, ...] = ()
    default_sampler: str = ""
    default_steps: int = 0

    def model_out_channels(self, data_channels: int) -> int:
        """How many output channels the model must produce for data with `data_channels` channels."""
        raise NotImplementedError

    def loss_terms(self, model, x0: torch.Tensor, cond: dict | None, t: torch.Tensor | None = None,
                   noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Per-sample ([B]) loss terms; always has "loss" (what is optimised) and "mse"."""
        raise NotImplementedError

    def loss(self, model, x0: torch.Tensor, cond: dict | None = None, t: torch.Tensor | None = None,
             noise: torch.Tensor | None = None, reduce: bool = True) -> torch.Tensor:
        """Training loss. t / noise default to fresh draws from the global RNG; pass them (e.g. from
        `validation_timesteps` and a seeded generator) for a low-variance validation loss.
        reduce=False returns the per-sample losses [B]."""
        per_sample = self.loss_terms(model, x0, cond, t=t, noise=noise)["loss"]
        return per_sample.mean() if reduce else per_sample

    def validation_timesteps(self, n: int, device=None) -> torch.Tensor:
        """n timesteps stratified over the training distribution (the i-th at its (i + 0.5)/n quantile):
        averaging the loss over them estimates the training loss with far less variance."""
        raise NotImplementedError

    def noise_level(self, t: torch.Tensor) -> torch.Tensor:
        """A timestep as passed to `loss` -> the noise level in [0, 1] used by guidance intervals."""
        raise NotImplementedError

    @torch.no_grad()
    def sample(
        self,
        model,
        shape: tuple[int, ...],
        cond: dict | None = None,
        steps: int | str | None = None,
        cfg_scale: float = 1.0,
        sampler: str | None = None,
        generator: torch.Generator | None = None,
        uncond: dict | None = None,
        guidance_interval: tuple[float, float] | None = None,
        *,
        eta: float = 0.0,
        noise: torch.Tensor | None = None,
        device=None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Draw samples of `shape` ([B, C, H, W]). The model runs in eval mode (label dropout off) and
        its previous mode is restored afterwards. `eta` is DDIM's noise scale (0: deterministic).
        `noise` replaces the initial Gaussian draw. Returns fp32 samples."""
        cond = dict(cond or {})
        sampler = sampler or self.default_sampler
        if sampler not in self.samplers:
            raise ValueError(f"sampler {sampler!r} is not available for {self.kind}; "
                             f"choose one of: {', '.join(self.samplers)}")
        if eta != 0.0 and sampler != "ddim":
            raise ValueError(f"eta is DDIM's parameter; sampler {sampler!r} does not take it")
        if guidance_interval is not None:
            lo, hi = guidance_interval
            if not 0.0 <= lo <= hi <= 1.0:
                raise ValueError(f"guidance_interval must be (lo, hi) with 0 <= lo <= hi <= 1; got {guidance_interval}")
        steps = self.default_steps if steps is None else steps
        device = _infer_device(model, cond, device)
        x = _randn(shape, generator, device) if noise is None else noise.to(device=device, dtype=torch.float32)
        denoise = _Denoiser(model, cond, uncond, cfg_scale, guidance_interval)

        was_training = getattr(model, "training", None)
        if was_training:
            model.eval()
        try:
            return self._sample(denoise, x, sampler, steps, generator, eta=eta, progress=progress)
        finally:
            if was_training:
                model.train(True)

    def _sample(self, denoise: _Denoiser, x: torch.Tensor, sampler: str, steps, generator, *, eta: float,
                progress: bool) -> torch.Tensor:
        raise NotImplementedError

    def _check_out(self, out: torch.Tensor, x: torch.Tensor, allowed: tuple[int, ...]) -> None:
        if out.shape[0] != x.shape[0] or out.shape[2:] != x.shape[2:] or out.shape[1] not in allowed:
            raise ValueError(f"{self.kind}: the model returned shape {tuple(out.shape)} for input {tuple(x.shape)}; "
                             f"expected {' or '.join(str(c) for c in allowed)} channels "
                             f"(see objective.model_out_channels)")


# ------------------------------------------------------------------------------------------------
# DDPM (Ho et al. 2020; learned variance and hybrid loss of Nichol & Dhariwal 2021, as used by DiT)
# ------------------------------------------------------------------------------------------------


def space_timesteps(num_timesteps: int, section_counts: int | str | list[int]) -> list[int]:
    """Which steps of a `num_timesteps` chain a respaced sampler keeps (sorted).

    section_counts: an int or "250" (that many steps, evenly spread with rounding, first and last kept),
    "10,15,20" / [10, 15, 20] (split the chain into equal sections, take that many from each), or
    "ddim50" (the fixed integer stride that gives exactly 50 steps, as in the DDIM paper)."""
    if isinstance(section_counts, str) and section_counts.startswith("ddim"):
        desired = int(section_counts[len("ddim"):])
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == desired:
                return list(range(0, num_timesteps, stride))
        raise ValueError(f"no integer stride gives exactly {desired} steps out of {num_timesteps}")
    if isinstance(section_counts, int):
        section_counts = [section_counts]
    elif isinstance(section_counts, str):
        section_counts = [int(s) for s in section_counts.split(",")]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, kept = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if not 1 <= count <= size:
            raise ValueError(f"cannot take {count} steps from a section of {size} (chain of {num_timesteps})")
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        kept += [start + round(stride * j) for j in range(count)]
        start += size
    return sorted(set(kept))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    # The tanh approximation used by the improved-DDPM / DiT code (kept for identical bits/dim numbers).
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """log P(x) for data in [-1, 1] quantised to 256 levels under N(means, e^(2 log_scales)): the mass of
    the bin of width 2/255 around x, with the outermost bins extended to -inf / +inf. Elementwise, nats."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


class DDPM(Objective):
    """Gaussian diffusion as in DiT: linear betas (1e-4 -> 0.02 over T = 1000), eps-prediction,
    t ~ U{0..T-1}. A model with 2C output channels also learns its variance ("learned range": v in
    [-1, 1] interpolates log beta~_t and log beta_t) and is trained with MSE + VLB, the VLB on the
    detached mean; a model with C channels uses the fixed "large" variance (beta_t) and plain MSE.

    Schedule arrays are computed in float64 and cast to float32 when used, like the reference code."""

    kind = "ddpm"
    samplers = ("ddpm", "ddim")
    default_sampler = "ddpm"
    default_steps = 250  # DiT's FID evaluation: 250 respaced steps

    def __init__(self, *, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                 learn_sigma: bool = True):
        if num_timesteps < 2:
            raise ValueError(f"num_timesteps must be at least 2; got {num_timesteps}")
        if not 0 < beta_start < beta_end < 1:
            raise ValueError(f"need 0 < beta_start < beta_end < 1; got {beta_start}, {beta_end}")
        self.learn_sigma = learn_sigma
        # The reference scales the linear schedule with 1000 / T so that other chain lengths keep the
        # same overall noise; for T = 1000 this is 1e-4 .. 0.02 exactly.
        scale = 1000.0 / num_timesteps
        betas = torch.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=torch.float64)
        self._init_schedule(betas, timestep_map=torch.arange(num_timesteps), base_timesteps=num_timesteps)
        self._respaced: dict = {}

    def _init_schedule(self, betas: torch.Tensor, timestep_map: torch.Tensor, base_timesteps: int) -> None:
        self.num_timesteps = len(betas)
        self.base_timesteps = base_timesteps
        self.timestep_map = timestep_map.long()  # this chain's step -> the original step the model sees
        ac = torch.cumprod(1.0 - betas, dim=0)
        ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
        posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
        self._f64 = {
            "betas": betas,
            "log_betas": torch.log(betas),
            "alphas_cumprod": ac,
            "alphas_cumprod_prev": ac_prev,
            "sqrt_alphas_cumprod": ac.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - ac).sqrt(),
            "sqrt_recip_alphas_cumprod": (1.0 / ac).sqrt(),
            "sqrt_recipm1_alphas_cumprod": (1.0 / ac - 1.0).sqrt(),
            "posterior_variance": posterior_variance,
            # The posterior variance is 0 at t = 0: its log is clipped to the value at t = 1.
            "posterior_log_variance_clipped": torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]])),
            "posterior_mean_coef1": betas * ac_prev.sqrt() / (1.0 - ac),
            "posterior_mean_coef2": (1.0 - ac_prev) * (1.0 - betas).sqrt() / (1.0 - ac),
            # Fixed "large" variance for models without learned sigma (DiT's choice): beta_t, except
            # beta~_1 at t = 0 so the last step's log-variance is finite and sensible.
            "fixed_large_log_variance": torch.log(torch.cat([posterior_variance[1:2], betas[1:]])),
        }
        self._tables: dict = {}

    def __repr__(self) -> str:
        return f"DDPM(T={self.num_timesteps} of {self.base_timesteps}, learn_sigma={self.learn_sigma})"

    # -- schedule lookup --------------------------------------------------------------------------
    @property
    def betas(self) -> torch.Tensor:
        return self._f64["betas"]

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self._f64["alphas_cumprod"]

    def _at(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Schedule array `name` at steps t [B], as float32 broadcastable against `like`."""
        key = (name, t.device)
        table = self._tables.get(key)
        if table is None:  # cast once per device; indexing a float32 copy == casting the float64 value
            table = self._tables[key] = self._f64[name].to(device=t.device, dtype=torch.float32)
        return _bcast(table[t], like)

    # -- the forward process and its posterior ------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps."""
        return self._at("sqrt_alphas_cumprod", t, x0) * x0 + self._at("sqrt_one_minus_alphas_cumprod", t, x0) * noise

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """q(x_{t-1} | x_t, x0) = N(mean, var): returns (mean, var, clipped log var)."""
        mean = self._at("posterior_mean_coef1", t, x_t) * x0 + self._at("posterior_mean_coef2", t, x_t) * x_t
        return mean, self._at("posterior_variance", t, x_t), self._at("posterior_log_variance_clipped", t, x_t)

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
        return (self._at("sqrt_recip_alphas_cumprod", t, x_t) * x_t
                - self._at("sqrt_recipm1_alphas_cumprod", t, x_t) * eps)

    def p_mean_variance(self, model_out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
        """The reverse step p(x_{t-1} | x_t) given the model output: {"mean", "log_variance", "x0", "eps"}.
        With 2C channels the last C are v in [-1, 1]: log var = frac log beta_t + (1 - frac) log beta~_t,
        frac = (v + 1) / 2. Predicted x0 is not clipped (DiT samples latents with clip_denoised=False)."""
        c = x_t.shape[1]
        self._check_out(model_out, x_t, (c, 2 * c))
        eps = model_out[:, :c]
        if model_out.shape[1] == 2 * c:
            frac = (model_out[:, c:] + 1.0) / 2.0
            min_log = self._at("posterior_log_variance_clipped", t, x_t)
            max_log = self._at("log_betas", t, x_t)
            log_variance = frac * max_log + (1.0 - frac) * min_log
        else:
            log_variance = self._at("fixed_large_log_variance", t, x_t).expand_as(x_t)
        x0 = self.predict_x0(x_t, t, eps)
        mean, _, _ = self.q_posterior(x0, x_t, t)
        return {"mean": mean, "log_variance": log_variance, "x0": x0, "eps": eps}

    def vb_terms(self, model_out: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The VLB term per sample, in bits per dimension: the discretised Gaussian decoder NLL at t = 0,
        KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) otherwise."""
        true_mean, _, true_log_variance = self.q_posterior(x0, x_t, t)
        p = self.p_mean_variance(model_out, x_t, t)
        kl = _mean_flat(normal_kl(true_mean, true_log_variance, p["mean"], p["log_variance"])) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, p["mean"], 0.5 * p["log_variance"])
        nll = _mean_flat(nll) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    # -- training ---------------------------------------------------------------------------------
    def model_out_channels(self, data_channels: int) -> int:
        return 2 * data_channels if self.learn_sigma else data_channels

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """This chain's steps -> the original steps the model is conditioned on."""
        if self.num_timesteps == self.base_timesteps:
            return t
        return self.timestep_map.to(t.device)[t]

    def noise_level(self, t: torch.Tensor) -> torch.Tensor:
        return self.model_timesteps(t).float() / (self.base_timesteps - 1)

    def sample_timesteps(self, batch: int, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
        """t ~ U{0..T-1}."""
        if generator is None:
            return torch.randint(0, self.num_timesteps, (batch,), device=device)
        return torch.randint(0, self.num_timesteps, (batch,), generator=generator, device=generator.device).to(device)

    def validation_timesteps(self, n: int, device=None) -> torch.Tensor:
        return ((torch.arange(n, dtype=torch.float64) + 0.5) * self.num_timesteps / n).long().to(device)

    def loss_terms(self, model, x0, cond=None, t=None, noise=None) -> dict[str, torch.Tensor]:
        """Per-sample {"loss", "mse"} (+ "vb" in bits/dim when the model learns its variance)."""
        x0 = x0.float()
        t = self.sample_timesteps(x0.shape[0], x0.device) if t is None else t.to(x0.device).long()
        noise = torch.randn_like(x0) if noise is None else noise.to(x0)
        x_t = self.q_sample(x0, t, noise)
        out = model(x_t, self.model_timesteps(t), **(cond or {})).float()
        c = x0.shape[1]
        self._check_out(out, x0, (c, 2 * c))
        mse = _mean_flat((noise - out[:, :c]) ** 2)
        if out.shape[1] == c:
            return {"loss": mse, "mse": mse}
        # The VLB trains only the variance: the mean (eps) it sees is detached, so the eps channels are
        # trained by the MSE alone (Nichol & Dhariwal's hybrid objective).
        frozen = torch.cat([out[:, :c].detach(), out[:, c:]], dim=1)
        vb = self.vb_terms(frozen, x0, x_t, t)
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    # -- sampling ---------------------------------------------------------------------------------
    def respaced(self, steps: int | str | list[int]) -> "DDPM":
        """The same process on a subset of steps (`space_timesteps`): betas recomputed from abar at the
        kept steps, the model still conditioned on the original step numbers. Cached."""
        key = steps if isinstance(steps, (int, str)) else tuple(steps)
        if key == self.num_timesteps or key == str(self.num_timesteps):
            return self
        if key not in self._respaced:
            kept = space_timesteps(self.num_timesteps, steps)
            ac = self.alphas_cumprod[kept]
            betas = 1.0 - ac / torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
            chain = object.__new__(DDPM)
            chain.learn_sigma = self.learn_sigma
            chain._init_schedule(betas, self.timestep_map[kept], base_timesteps=self.base_timesteps)
            chain._respaced = {}
            self._respaced[key] = chain
        return self._respaced[key]

    def _sample(self, denoise, x, sampler, steps, generator, *, eta, progress):
        chain = self.respaced(steps)
        batch = x.shape[0]
        for i in _progress(range(chain.num_timesteps - 1, -1, -1), progress, f"{sampler} sampling"):
            t = torch.full((batch,), i, device=x.device, dtype=torch.long)
            level = float(chain.timestep_map[i]) / (self.base_timesteps - 1)
            out = denoise(x, chain.model_timesteps(t), level)
            p = chain.p_mean_variance(out, x, t)
            if sampler == "ddpm":  # ancestral: x_{t-1} ~ N(mean, var); no noise on the last step
                x = p["mean"]
                if i > 0:
                    x = x + torch.exp(0.5 * p["log_variance"]) * _randn(x.shape, generator, x.device)
            else:  # DDIM (Song et al. 2021) with noise scale eta; ignores any learned variance
                ac = chain._at("alphas_cumprod", t, x)
                ac_prev = chain._at("alphas_cumprod_prev", t, x)
                sigma = eta * torch.sqrt((1 - ac_prev) / (1 - ac)) * torch.sqrt(1 - ac / ac_prev)
                x = p["x0"] * ac_prev.sqrt() + torch.sqrt(1 - ac_prev - sigma**2) * p["eps"]
                if i > 0 and eta > 0:
                    x = x + sigma * _randn(x.shape, generator, x.device)
        return x


# ------------------------------------------------------------------------------------------------
# Rectified flow (Liu et al. 2022; SD3's logit-normal timesteps and resolution shift, Esser et al. 2024)
# ------------------------------------------------------------------------------------------------


class RectifiedFlow(Objective):
    """x_t = (1 - t) x0 + t eps, the model predicts the velocity v = eps - x0 (MSE). Training t is
    logit-normal(logit_mean, logit_std) (SD3's default 0, 1) or uniform; with shift != 1 the sampling
    schedule (and, with shift_training, the training t) goes through t' = shift t / (1 + (shift - 1) t),
    which spends more time at high noise for larger images (SD3 uses 3.0 at 1024 px).
    The model receives 1000 * t."""

    kind = "rectified_flow"
    samplers = ("euler", "heun")
    default_sampler = "euler"
    default_steps = 50
    timestep_scale = 1000.0  # model timestep = 1000 * t (SD3 / diffusers)

    def __init__(self, *, timestep_sampling: str = "logit_normal", logit_mean: float = 0.0, logit_std: float = 1.0,
                 shift: float = 1.0, shift_training: bool = False):
        if timestep_sampling not in ("logit_normal", "uniform"):
            raise ValueError(f"timestep_sampling must be 'logit_normal' or 'uniform'; got {timestep_sampling!r}")
        if logit_std <= 0 or shift <= 0:
            raise ValueError(f"logit_std and shift must be positive; got {logit_std}, {shift}")
        self.timestep_sampling = timestep_sampling
        self.logit_mean, self.logit_std = float(logit_mean), float(logit_std)
        self.shift, self.shift_training = float(shift), bool(shift_training)

    def __repr__(self) -> str:
        return (f"RectifiedFlow({self.timestep_sampling}, m={self.logit_mean}, s={self.logit_std}, "
                f"shift={self.shift}, shift_training={self.shift_training})")

    def shift_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """sigma' = shift sigma / (1 + (shift - 1) sigma): maps [0, 1] onto itself, fixing 0 and 1."""
        return self.shift * t / (1.0 + (self.shift - 1.0) * t)

    def interpolate(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = _bcast(t, x0)
        return (1.0 - t) * x0 + t * noise

    def model_out_channels(self, data_channels: int) -> int:
        return data_channels

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        return self.timestep_scale * t

    def noise_level(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def sample_timesteps(self, batch: int, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
        gen_device = generator.device if generator is not None else device
        if self.timestep_sampling == "uniform":
            t = torch.rand(batch, generator=generator, device=gen_device)
        else:
            z = torch.randn(batch, generator=generator, device=gen_device)
            t = torch.sigmoid(self.logit_mean + self.logit_std * z)
        t = t.to(device)
        return self.shift_sigma(t) if self.shift_training else t

    def validation_timesteps(self, n: int, device=None) -> torch.Tensor:
        q = (torch.arange(n, dtype=torch.float64) + 0.5) / n
        if self.timestep_sampling == "uniform":
            t = q
        else:
            t = torch.sigmoid(self.logit_mean + self.logit_std * torch.special.ndtri(q))
        t = self.shift_sigma(t) if self.shift_training else t
        return t.float().to(device)

    def loss_terms(self, model, x0, cond=None, t=None, noise=None) -> dict[str, torch.Tensor]:
        """Per-sample {"loss", "mse"}. A given t is used as is (no shift applied to it)."""
        x0 = x0.float()
        t = self.sample_timesteps(x0.shape[0], x0.device) if t is None else t.to(x0.device, torch.float32)
        noise = torch.randn_like(x0) if noise is None else noise.to(x0)
        x_t = self.interpolate(x0, noise, t)
        out = model(x_t, self.model_timesteps(t), **(cond or {})).float()
        self._check_out(out, x0, (x0.shape[1],))
        mse = _mean_flat((out - (noise - x0)) ** 2)
        return {"loss": mse, "mse": mse}

    def sampling_sigmas(self, steps: int) -> torch.Tensor:
        """steps + 1 noise levels from 1 to 0 (evenly spaced, then shifted), float64."""
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"rectified flow needs an integer number of steps >= 1; got {steps!r}")
        return self.shift_sigma(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64))

    def _sample(self, denoise, x, sampler, steps, generator, *, eta, progress):
        sigmas = self.sampling_sigmas(steps).tolist()
        batch = x.shape[0]

        def velocity(x, s):
            t = torch.full((batch,), s, device=x.device, dtype=torch.float32)
            return denoise(x, self.model_timesteps(t), s)

        for i in _progress(range(steps), progress, f"{sampler} sampling"):
            s, s_next = sigmas[i], sigmas[i + 1]
            v = velocity(x, s)
            x_euler = x + (s_next - s) * v
            if sampler == "heun" and s_next > 0:
                # Heun's second-order correction: average the slopes at both ends. The final step to
                # sigma = 0 stays Euler (as in EDM / diffusers), saving one forward.
                x = x + (s_next - s) * 0.5 * (v + velocity(x_euler, s_next))
            else:
                x = x_euler
        return x


# ------------------------------------------------------------------------------------------------
# construction by name
# ------------------------------------------------------------------------------------------------

OBJECTIVES: dict[str, type[Objective]] = {"ddpm": DDPM, "rectified_flow": RectifiedFlow}


def build_objective(kind: str, **options) -> Objective:
    """kind: "ddpm" (options: num_timesteps, beta_start, beta_end, learn_sigma) or "rectified_flow"
    (options: timestep_sampling, logit_mean, logit_std, shift, shift_training)."""
    if kind not in OBJECTIVES:
        raise ValueError(f"unknown objective kind {kind!r}; allowed: {', '.join(OBJECTIVES)}")
    cls = OBJECTIVES[kind]
    allowed = [name for name in inspect.signature(cls.__init__).parameters if name != "self"]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for objective {kind!r}; "
                         f"allowed: {', '.join(allowed)}")
    return cls(**options)
