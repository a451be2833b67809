"""The study file's schema: one pydantic model per section, a trial (`TrialConfig`: a study without its
grid) and a study (`Study`: a trial's fields plus grid, points, exclude, ladder, bracket), with what a
trial derives from its fields (the model's spec, its identity and trial_id, MLflow params).

Loading, `--set` overrides and grid expansion are harness/config.py's; the cross-field rules are
harness/checks.py's, which read these types (so the schema imports neither).
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from harness.data.shards import absolute_path
from harness.tracking import redact_uri
from models.registry import ModelSpec, model_spec

DEFAULT_BUDGET_DIVERGENCE = 3.0   # budget trials stop when the smoothed loss triples over its minimum


_ADDED_LATER = {  # section -> field -> the value that means "as before the field existed"
    "train": {"flops": None, "cooldown": None, "cooldown_steps": None, "cooldown_shape": "1-sqrt",
              "divergence_factor": None, "save_at": [],
              "posthoc_ema": {"sigma_rels": [], "snapshot_every": None}},
    "model": {"parametrization": "sp", "mup_base_width": 256},
    "eval": {"fd_spread_draws": 10, "metrics": ["fid"], "ema_sigma_rels": []},
}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    shards: str = Field(description="training shards: brace pattern, local path, pipe: or http(s) URL")
    val_shards: str | None = None
    image_size: int = Field(gt=0, description="spatial size the model sees (the latent size for latents)")
    channels: int = Field(gt=0)
    conditioning: Literal["auto", "class", "text"] = Field(
        "auto", description="auto: class labels for DiT, captions for MM-DiT")
    num_classes: int | None = Field(None, gt=0, description="default: from the shards' dataset.json")
    text_encoder: str = Field("builtin", description=(
        "builtin (a trainable word encoder), precomputed (embeddings packed in the shards), "
        "or a models.text spec of a frozen encoder (clip:PATH, t5:PATH, sd3:CLIP_L,CLIP_G,T5)"))
    flip: bool = Field(False, description="random horizontal flips (class-conditional data only)")
    shuffle_buffer: int = Field(1000, ge=0)
    num_workers: int = Field(1, ge=0, description="DataLoader worker processes per training process")


class ModelConfig(_Section):
    family: Literal["dit", "mmdit"] = "dit"
    size: str = "S"
    patch: int = Field(2, gt=0)
    attention: Literal["joint", "split"] = Field("joint", description="mmdit only")
    qk_norm: Literal["rms_norm"] | None = Field(None, description="mmdit only")
    class_dropout_prob: float = Field(0.1, ge=0, lt=1, description="label/caption dropout for guidance")
    learn_sigma: bool | None = Field(None, description="default: true for ddpm, false for rectified_flow")
    parametrization: Literal["sp", "mup"] = Field("sp", description=(
        "sp: the standard parametrization (the official DiT/SD3 model); mup: muP (models/mup.py), so one "
        "learning rate transfers across widths"))
    mup_base_width: int = Field(256, gt=0, description="mup: the width whose initialisation and learning rates "
                                                        "equal sp's (the width the learning rate was tuned at)")

    def spec(self) -> ModelSpec:
        """The model this section describes, typed (models.registry.ModelSpec): what the builder, the FLOP
        counter and the logs read. ValueError for a size that names no geometry (check_trial: model.size)."""
        return model_spec(self.family, self.size, self.patch, self.attention, self.qk_norm)


class ObjectiveConfig(_Section):
    kind: Literal["ddpm", "rectified_flow"] = "ddpm"
    timestep_sampling: Literal["logit_normal", "uniform"] = Field("logit_normal", description="rectified_flow")
    logit_mean: float = 0.0
    logit_std: float = Field(1.0, gt=0)
    shift: float = Field(1.0, gt=0, description="rectified_flow resolution shift for sampling")
    shift_training: bool = Field(False, description="also shift the training timesteps")


class PosthocEMAConfig(_Section):
    """Post-hoc EMA (EDM2, Karras et al. 2024): power-function EMA profiles tracked during training, their
    snapshots saved in the trial folder (harness/trial/posthoc_ema.py), any EMA width rebuilt afterwards
    with `ditscale ema reconstruct`. Off while sigma_rels is empty."""

    sigma_rels: list[Annotated[float, Field(gt=0, le=0.3, allow_inf_nan=False)]] = Field(
        default_factory=list, description=("the tracked profiles' relative widths, each in (0, 0.3] (EDM2 tracks "
                                           "0.05 and 0.10); empty: off"))
    snapshot_every: int | None = Field(None, gt=0, description=(
        "optimizer steps between snapshots of every profile (and one at the last step); at least 2 per trial"))


class TrainConfig(_Section):
    steps: int | None = Field(None, gt=0, description="training steps (or train.flops)")
    flops: float | None = Field(None, gt=0, allow_inf_nan=False, description=(
        "training compute budget instead of train.steps, counted as the logged train_gflops is (multiply-adds: "
        "3 x forward x images, the DiT paper's convention): steps = flops / (3 x forward x batch_size), rounded"))
    batch_size: int = Field(gt=0, description="global batch size")
    micro_batch_size: int | None = Field(None, gt=0, description="per worker; default batch_size / workers")
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: Literal["constant", "warmup", "cosine", "wsd"] = Field("constant", description=(
        "constant; warmup (linear, then constant); cosine (warm-up, then to 0); wsd: warm-up, stable, "
        "cooldown to 0 (Hagele et al. 2024)"))
    warmup_steps: int = Field(0, ge=0)
    cooldown: float | None = Field(None, gt=0, lt=1, description="wsd: the cooldown's share of the steps (default 0.2)")
    cooldown_steps: int | None = Field(None, gt=0, description="wsd: the cooldown in steps, instead of train.cooldown")
    cooldown_shape: Literal["linear", "1-sqrt"] = Field("1-sqrt", description="wsd: how the LR falls to 0")
    branch: bool = Field(True, description=(
        "wsd: trials that differ only in train.steps/train.flops share one constant-LR trunk and branch their "
        "cooldowns from it (one long run gives every budget)"))
    divergence_factor: float | None = Field(None, gt=1, description=(
        "stop the trial as diverged when its loss, averaged over ~50 steps (harness/trial/divergence.py), exceeds "
        "this multiple of that average's minimum (default: off for train.steps, 3 for train.flops); a non-finite "
        "loss always stops it"))
    grad_clip: float | None = Field(None, gt=0)
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    zero_stage: int = Field(2, ge=0, le=3)
    activation_checkpointing: bool = False
    ema_decay: float = Field(0.9999, ge=0, le=1)
    ema_warmup: bool = False
    posthoc_ema: PosthocEMAConfig = Field(default_factory=PosthocEMAConfig, description=(
        "post-hoc EMA: {sigma_rels: [0.05, 0.10], snapshot_every: N}; replaces choosing train.ema_decay"))
    checkpoint_every: int = Field(1000, gt=0)
    keep_checkpoints: int = Field(2, ge=1, description="newest DeepSpeed checkpoints kept in the trial folder")
    save_at: list[int] = Field(default_factory=list, description=(
        "extra checkpoint steps, kept (the sweep sets them on a WSD trunk: its branch points)"))
    log_every: int = Field(10, gt=0)
    # What numpy's global seed accepts (np.random.seed: 0 <= seed < 2**32); torch's per-rank seed
    # (seed x 1000 + rank + 1, harness/trial/loop.py) then stays inside its 64-bit range too.
    seed: int = Field(0, ge=0, lt=2**32, description="model initialisation, noise and data order: 0 <= seed < 2**32")
    deepspeed: dict[str, Any] = Field(default_factory=dict, description="raw DeepSpeed config merged last")


class EvalConfig(_Section):
    every: int | None = Field(None, gt=0, description="evaluate every N steps (and always at the end)")
    fid_samples: int = Field(10000, ge=0)
    fd_spread_draws: int = Field(10, ge=0, description=(
        "half-samples for the FID's / FD's spread over sampling draws (logged as se_<metric>; 0: not measured)"))
    metrics: list[Literal["fid", "fd_dinov2", "cmmd"]] = Field(default_factory=lambda: ["fid"], description=(
        "image metrics of the eval.fid_samples samples: fid (Inception, or the named stand-in fd_<extractor>), "
        "fd_dinov2 (Stein et al. 2023), cmmd (Jayasumana et al. 2024); their weights: `ditscale assets fetch`"))
    sampler: Literal["auto", "ddpm", "ddim", "euler", "heun"] = Field(
        "auto", description="auto: ddpm for objective ddpm, euler for rectified_flow")
    sampling_steps: int = Field(250, gt=0)
    # Finite: a NaN scale would sample NaN images and log a metric named fd_*_cfgnan.
    cfg_scale: list[Annotated[float, Field(allow_inf_nan=False)]] = Field(default_factory=lambda: [1.0, 1.5])
    val_batches: int = Field(4, ge=0, description="validation-loss batches (fixed timesteps and noise)")
    feature_extractor: Literal["auto", "inception", "lenet", "shapesdet"] = Field(
        "auto", description="auto: Inception when its weights are present, else a named stand-in (fd_<name>)")
    batch_size: int = Field(64, gt=0, description="images per sampling / validation batch on each worker")
    reference_split: Literal["train", "val"] = Field("train", description="real images of the FID reference")
    reference_samples: int | None = Field(None, gt=1, description="reference images (default: the split, <= 50,000)")
    seed: int = Field(0, ge=0, lt=2**32, description="evaluation noise, labels and timesteps (the same for every trial)")
    ema_sigma_rels: list[Annotated[float, Field(gt=0, le=0.3, allow_inf_nan=False)]] = Field(
        default_factory=list, description=(
            "post-hoc EMA widths, each in (0, 0.3], rebuilt from the train.posthoc_ema snapshots at the end of the "
            "trial: the validation loss of each is logged (val_loss_ema<s>), the final evaluation uses the best"))


class ResourcesConfig(_Section):
    workers_per_trial: int = Field(1, gt=0)
    gpus_per_worker: float = Field(0, ge=0)
    cpus_per_worker: float = Field(1, gt=0)
    max_concurrent_trials: int | None = Field(None, gt=0, description="default: as many as the cluster fits")
    max_failures: int = Field(2, ge=0, description=(
        "restarts of a failed trial, each from its last checkpoint: Ray Train restarts a trial's "
        "workers, Tune restarts an in-process trial (and one whose workers ran out of restarts)"))
    reuse_trial_process: bool = Field(True, description=(
        "single-worker trials train inside Tune's reused trial process (Ray Train's local mode: "
        "torch, DeepSpeed and MLflow load once per process, not once per trial); false starts a "
        "Ray Train worker group for them too. Multi-worker and ZeRO-3 trials always get their own workers"))
    storage: str = Field("runs", description="trial folders (checkpoints); a shared filesystem on clusters")
    assets: str | None = Field(None, description=(
        "offline weights (Inception for FID, VAEs) from `ditscale assets fetch`; default $DITSCALE_ASSETS"))


class TrackingConfig(_Section):
    uri: str | None = Field(None, description="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    system_metrics: bool = True


class TrialConfig(_Section):
    """One fully specified training run: a study without its grid."""

    # A folder name (<storage>/<name>, reports/<name>) and an MLflow experiment name: short and plain.
    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    train: TrainConfig
    eval: EvalConfig = Field(default_factory=EvalConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _resolve_defaults(self) -> "TrialConfig":
        # Resolve "auto"/None choices per trial, so a trial's config says exactly what runs. A study
        # keeps them open: a grid over model.family resolves them differently per point.
        if isinstance(self, Study):
            return self
        if self.data.conditioning == "auto":
            self.data.conditioning = "text" if self.model.family == "mmdit" else "class"
        if self.model.learn_sigma is None:
            self.model.learn_sigma = self.objective.kind == "ddpm"
        # Local paths are anchored at the working directory of the command that read the study:
        # Ray workers run elsewhere (their own working folders, other nodes of a shared filesystem).
        self.data.shards = absolute_path(self.data.shards)
        if self.data.val_shards:
            self.data.val_shards = absolute_path(self.data.val_shards)
        self.resources.storage = absolute_path(self.resources.storage)
        if self.resources.assets:
            self.resources.assets = absolute_path(self.resources.assets)
        if self.eval.sampler == "auto":
            self.eval.sampler = "ddpm" if self.objective.kind == "ddpm" else "euler"
        if self.train.flops is not None and self.train.divergence_factor is None:
            self.train.divergence_factor = DEFAULT_BUDGET_DIVERGENCE
        return self

    # --- derived values -------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        """The model's name for people (logs, run names, tables), printed from its spec."""
        return self.model.spec().name

    @property
    def micro_batch_size(self) -> int:
        return self.train.micro_batch_size or self.train.batch_size // self.resources.workers_per_trial

    @property
    def grad_accumulation(self) -> int:
        return self.train.batch_size // (self.micro_batch_size * self.resources.workers_per_trial)

    def identity(self) -> dict:
        """What defines the trial's result: everything but where and how it runs."""
        # Not the result: disk housekeeping; how the sweep schedules the trial (a branch of a shared trunk
        # or alone); the step count of a budget trial (derived from train.flops, resolved after this).
        skip = {"keep_checkpoints", "branch"} | ({"steps"} if self.train.flops is not None else set())
        identity = self.model_dump(mode="json", include={"data", "model", "objective", "train", "eval"},
                                   exclude={"train": skip})
        # Fields added after the first release count only when set, so that earlier trials keep their ids
        # (a re-run finds and resumes them instead of starting them again).
        for section, defaults in _ADDED_LATER.items():
            for key, default in defaults.items():
                if identity[section].get(key, default) == default:
                    identity[section].pop(key, None)
        return identity

    @property
    def trial_id(self) -> str:
        blob = json.dumps(self.identity(), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def flat_params(self) -> dict[str, str]:
        """Dotted key -> string, the same keys for every trial of a study (for MLflow params); the
        tracking URI's credentials redacted (params are readable by everyone who reads the runs)."""
        flat = {k: ("" if v is None else str(v)) for k, v in flatten(self.model_dump(mode="json")).items()}
        if flat.get("tracking.uri"):
            flat["tracking.uri"] = redact_uri(flat["tracking.uri"])
        return flat


class LadderConfig(_Section):
    """Pre-registered extrapolation (harness/launch/ladder.py): after the isoFLOP grid is fitted, each budget's
    compute-optimal size and loss are predicted and registered, then that trial is trained."""

    budgets: list[Annotated[float, Field(gt=0, allow_inf_nan=False)]] = Field(default_factory=list, description=(
        "training FLOPs (as train.flops counts them), each above every grid budget; empty: no ladder"))


class BracketConfig(_Section):
    """Bracketing while the study runs (harness/launch/bracket.py): a budget whose loss minimum sits at its
    smallest or largest size gets the next size beyond that edge, trained, until the minimum is inside."""

    max_extra_sizes: int = Field(0, ge=0, le=16, description=(
        "sizes the sweep may add to each budget whose minimum sits at an edge of its sizes; 0: no bracketing"))


STUDY_ONLY = {"grid", "exclude", "points", "ladder", "bracket"}  # study sections that are not a trial's fields


class Study(TrialConfig):
    ladder: LadderConfig = Field(default_factory=LadderConfig, description=(
        "ladder: {budgets: [C, ...]}: predict, register, then train a compute-optimal trial at each C"))
    bracket: BracketConfig = Field(default_factory=BracketConfig, description=(
        "bracket: {max_extra_sizes: K}: add up to K sizes beyond the edge where a budget's loss minimum sits"))
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    exclude: list[dict[str, Any]] = Field(default_factory=list, description="grid points to leave out")
    points: list[dict[str, Any]] = Field(default_factory=list, description=(
        "explicit trials, each a mapping of dotted keys to values (e.g. the (model.size, train.flops) pairs "
        "`ditscale plan` writes): exactly these, combined with every point of `grid:` when there is one"))


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
