"""The study file: schema, `--set` overrides, grid expansion and validation.

A study is one YAML file (see experiments/). Everything outside `grid:` is a base value; `grid:`
maps dotted keys to lists and every combination is a trial (minus the `exclude:` entries); `points:`
lists explicit trials (mappings of dotted keys), each combined with every grid combination.
Every problem is reported before anything starts, one line each, with the dotted path of the field
to change: schema errors through pydantic, cross-field rules (patch divides the image, batch
divides across workers, shards exist, ...) per trial.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from harness.checks import check_trial
from harness.data.shards import absolute_path
from harness.errors import UserError
from harness.tracking import redact_uri
from models.registry import model_name as preset_name

DEFAULT_BUDGET_DIVERGENCE = 3.0   # budget trials stop when the smoothed loss triples over its minimum


_ADDED_LATER = {  # section -> field -> the value that means "as before the field existed"
    "train": {"flops": None, "cooldown": None, "cooldown_steps": None, "cooldown_shape": "1-sqrt",
              "divergence_factor": None, "save_at": [],
              "posthoc_ema": {"sigma_rels": [], "snapshot_every": None}},
    "model": {"parametrization": "sp", "mup_base_width": 256},
    "eval": {"fd_spread_draws": 10, "metrics": ["fid"], "ema_sigma_rels": []},
}


class StudyError(UserError):
    """One or more problems in a study file; str() is one line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = list(dict.fromkeys(problems))  # unique, in order
        super().__init__("\n".join(self.problems))


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
        return preset_name(self.model.family, self.model.size, self.model.patch)

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


# --- dotted keys ---------------------------------------------------------------------------


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def set_dotted(d: dict, dotted: str, value: Any) -> None:
    """d["a"]["b"] = value for "a.b", creating sections as needed."""
    *parents, leaf = dotted.split(".")
    node = d
    for part in parents:
        if not isinstance(node.get(part, {}), dict):
            raise StudyError([f"{dotted}: {part} is a value, not a section"])
        node = node.setdefault(part, {})
    if isinstance(value, dict) and isinstance(node.get(leaf), dict):
        # A mapping on a section (e.g. a grid axis `model: [{family: dit, size: B}, ...]`) sets
        # several fields of it at once and keeps the others.
        for key, sub in value.items():
            set_dotted(node[leaf], key, sub)
        return
    node[leaf] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'train.lr=3e-4' -> ("train.lr", 0.0003); values are parsed as YAML (numbers, lists, null)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise StudyError([f"--set {text!r}: expected dotted.key=value"])
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        parsed = value
    # YAML 1.1 reads "1e-4" as a string; a user writing a number means a number.
    if isinstance(parsed, str):
        try:
            parsed = float(parsed)
        except ValueError:
            pass
    return key.strip(), parsed


def _field_paths(cls: type[BaseModel], prefix: str = "") -> set[str]:
    out: set[str] = set()
    for name, field in cls.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            out |= _field_paths(field.annotation, f"{prefix}{name}.")
        else:
            out.add(prefix + name)
    return out


_FIELDS = _field_paths(TrialConfig)


_SECTIONS = {f.rsplit(".", 1)[0] for f in _FIELDS if "." in f}


def _known_field(dotted: str) -> bool:
    return dotted in _FIELDS or dotted in _SECTIONS or dotted.startswith("train.deepspeed.")


# --- loading and validation ----------------------------------------------------------------


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise StudyError([f"{path}: no such study file"])
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise StudyError([f"{path}:{where}: YAML syntax error: {problem}"]) from None
    if not isinstance(raw, dict):
        raise StudyError([f"{path}: a study file is a mapping of sections (name, data, model, train, ...)"])
    return raw


def _pydantic_problems(err: ValidationError, prefix: str = "") -> list[str]:
    problems = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        elif e["type"] == "missing":
            msg = "required field is missing"
        elif e["type"] in ("literal_error", "enum") and "expected" in e.get("ctx", {}):
            msg = f"got {e['input']!r}; allowed: {e['ctx']['expected']}"
        else:
            msg = f"{msg} (got {e['input']!r})" if not isinstance(e.get("input"), dict) else msg
        problems.append(f"{prefix}{loc}: {msg}")
    return problems


MAX_TRIALS = 10_000       # default of `ditscale sweep --max-trials`: a larger grid is refused before expanding
MAX_NAME_LENGTH = 100     # study names: a folder and an MLflow experiment


def load_study(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = (), check_files: bool = True,
               max_trials: int | None = MAX_TRIALS) -> Study:
    """Read, override, validate. Raises StudyError listing every problem found. A grid of more than
    `max_trials` points (None: no limit) is refused before it is expanded."""
    raw = _read_yaml(Path(path))
    for text in overrides:
        key, value = parse_override(text)
        if not _known_field(key) and not key.startswith("grid."):
            raise StudyError([f"--set {key}: unknown field"])
        if key.startswith("grid."):
            raw.setdefault("grid", {})[key[len("grid."):]] = value
        else:
            set_dotted(raw, key, value)
    name = raw.get("name")
    if isinstance(name, str) and len(name) > MAX_NAME_LENGTH:
        raise StudyError([(f"name: {len(name)} characters; a study name has at most {MAX_NAME_LENGTH} (it names "
                           "a folder and an MLflow experiment): letters, digits, _ . -")])
    try:
        study = Study.model_validate(raw)
    except ValidationError as err:
        raise StudyError(_pydantic_problems(err)) from None
    problems = [f"grid.{key}: not a study field" for key in study.grid if not _known_field(key)]
    problems += [f"grid.{key}: a grid axis needs a non-empty list of values"
                 for key, values in study.grid.items() if not isinstance(values, list) or not values]
    point_keys = {key for point in study.points for key in point}
    for i, point in enumerate(study.points):
        problems += [f"points.{i}: an empty mapping; give dotted.key: value pairs"] if not point else []
        problems += [f"points.{i}.{key}: not a study field" for key in point if not _known_field(key)]
        problems += [f"points.{i}.{key}: also a grid axis; give it in one place" for key in point if key in study.grid]
    for i, entry in enumerate(study.exclude):
        problems += [f"exclude.{i}.{key}: not a grid axis" for key in entry
                     if key not in study.grid and key not in point_keys]
    if problems:
        raise StudyError(problems)
    trials = expand_grid(study, max_trials=max_trials)
    problems = []
    for trial in trials:
        problems += check_trial(trial, check_files=check_files)
    problems += _ladder_problems(study, trials) + _bracket_problems(study, trials)
    if problems:
        raise StudyError(problems)
    return study


def _ladder_problems(study: Study, trials: list[TrialConfig]) -> list[str]:
    """ladder.budgets: extrapolations of an isoFLOP (train.flops) design, each beyond its largest budget."""
    budgets = study.ladder.budgets
    if not budgets:
        return []
    grid = [t.train.flops for t in trials]
    if any(b is None for b in grid):
        return [("ladder.budgets: a ladder extrapolates an isoFLOP design; give the grid's trials train.flops "
                 "budgets (not train.steps)")]
    return [f"ladder.budgets: {b:.3g} is not above the grid's largest budget {max(grid):.3g}; a ladder predicts "
            "beyond the fitted budgets" for b in budgets if b <= max(grid)]


def _bracket_problems(study: Study, trials: list[TrialConfig]) -> list[str]:
    """bracket.max_extra_sizes: bracketing compares the final val_loss of sizes at one train.flops budget."""
    if not study.bracket.max_extra_sizes:
        return []
    if any(t.train.flops is None for t in trials):
        return [("bracket.max_extra_sizes: bracketing extends an isoFLOP design; give the grid's trials "
                 "train.flops budgets (not train.steps)")]
    if any(not t.eval.val_batches for t in trials):
        return ["bracket.max_extra_sizes: bracketing compares each size's final val_loss; set eval.val_batches > 0"]
    return []


def grid_size(study: Study) -> int:
    """How many points the grid's cartesian product has (before `exclude:`), from the axis lengths."""
    n = 1
    for values in study.grid.values():
        n *= len(values) if isinstance(values, list) else 1
    return n * max(1, len(study.points))


def expand_grid(study: Study, max_trials: int | None = MAX_TRIALS) -> list[TrialConfig]:
    """The cartesian product of the grid axes (in file order), minus excluded points, as trials.
    More than `max_trials` points (None: no limit) is an error, found before anything is expanded."""
    n = grid_size(study)
    if max_trials is not None and n > max_trials:
        axes = " x ".join([f"{len(v)} {k}" for k, v in study.grid.items() if isinstance(v, list)]
                          + ([f"{len(study.points)} points"] if study.points else []))
        raise StudyError([(f"grid: {n:,} trials ({axes}) is more than --max-trials {max_trials:,}; "
                           "make the grid smaller or raise --max-trials")])
    base = study.model_dump(mode="python", exclude=STUDY_ONLY)
    keys = list(study.grid)
    trials, problems = [], []
    for values, extra in itertools.product(itertools.product(*(study.grid[k] for k in keys)), study.points or [{}]):
        point = dict(zip(keys, values)) | extra  # `points:` entries: exactly these, at every grid point
        if any(all(point.get(k) == v for k, v in entry.items()) for entry in study.exclude):
            continue
        raw = copy.deepcopy(base)
        for k, v in point.items():
            set_dotted(raw, k, v)
        try:
            trials.append(TrialConfig.model_validate(raw))
        except ValidationError as err:
            where = ", ".join(f"{k}={v}" for k, v in point.items())
            problems += [f"{p} (grid point {where})" for p in _pydantic_problems(err)]
    if problems:
        raise StudyError(problems)
    return trials


def override_trial(trial: TrialConfig, overrides: list[str] | tuple[str, ...] = ()) -> TrialConfig:
    """The trial with `--set` overrides applied and validated (a different trial_id, when anything
    changed: find checkpoints and runs by the original)."""
    if not overrides:
        return trial
    raw = trial.model_dump(mode="python")
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(raw, key, value)
    try:
        changed = TrialConfig.model_validate(raw)
    except ValidationError as err:
        raise StudyError(_pydantic_problems(err)) from None
    problems = check_trial(changed, check_files=False)
    if problems:
        raise StudyError(problems)
    return changed
