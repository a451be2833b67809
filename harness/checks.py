"""Cross-field rules of a trial, checked before anything starts: what pydantic's per-field checks in
harness/schema.py cannot see (the patch divides the image, the batch divides across workers, the
schedule fits the steps, `train.deepspeed` makes sense, the shards exist). Each problem is one line
that names the dotted field to change.
"""

from __future__ import annotations

import math

from harness.data.shards import shard_urls
from harness.schema import TrainConfig, TrialConfig

DEFAULT_COOLDOWN = 0.2            # WSD: Hagele et al. 2024 found 10-20 % cooldowns match cosine
MAX_IMAGE_SIZE = 65536            # data.image_size: anything larger is a typo, not a dataset


def cooldown_steps(train: TrainConfig) -> int:
    """The WSD cooldown of a trial with resolved steps (0 for the other schedules)."""
    if train.schedule != "wsd":
        return 0
    if train.cooldown_steps is not None:
        return train.cooldown_steps
    return max(1, round((train.cooldown or DEFAULT_COOLDOWN) * train.steps))


EMA_INIT_WARN = 0.01              # share of the random initial weights in the evaluated EMA worth a warning


def ema_init_share(train: TrainConfig) -> float:
    """How much of the random initialisation the EMA still holds after train.steps updates: decay^steps
    without warm-up; with it (models/ema.py: min(decay, (1+n)/(10+n)), diffusers' EMAModel), the product
    of the per-update decays. DiT's 0.9999 over its 400k steps leaves ~0; 0.99 over 300 steps leaves 4.9 %,
    which measurably degrades the evaluated weights (issue 17: val loss 0.42-0.47 with the EMA vs
    0.24-0.25 with the raw weights of the same checkpoints)."""
    d, steps = train.ema_decay, train.steps
    if not steps or d <= 0:  # no steps yet (a budget trial before its steps are resolved), or no averaging
        return 0.0
    if not train.ema_warmup:
        return math.exp(steps * math.log(d)) if d < 1 else 1.0
    # (1+n)/(10+n) < d for n < n_star; the product of those is Gamma(m+1) Gamma(10) / Gamma(m+10).
    n_star = steps if d >= 1 else min(steps, max(0, math.ceil((10 * d - 1) / (1 - d))))
    log_share = math.lgamma(n_star + 1) + math.lgamma(10) - math.lgamma(n_star + 10)
    return math.exp(log_share + (steps - n_star) * (math.log(d) if d < 1 else 0.0))


def ema_warnings(trials: list[TrialConfig]) -> list[str]:
    """One line per distinct (decay, steps, warm-up) whose EMA keeps >= 1 % of the initial weights."""
    seen: dict[tuple, list] = {}  # (decay, steps, warm-up) -> [share kept, trials]
    for trial in trials:
        t = trial.train
        if trial.eval.ema_sigma_rels and trial.eval.every is None:
            continue  # the one evaluation, at the end, uses the post-hoc EMA reconstructed from the snapshots
        share = ema_init_share(t)
        if share >= EMA_INIT_WARN:
            seen.setdefault((t.ema_decay, t.steps, t.ema_warmup), [share, 0])[1] += 1
    return [f"train.ema_decay: {d} over {steps} steps{' with warm-up' if warm else ''} leaves "
            f"{share:.1%} of the random initial weights in the EMA that is evaluated "
            f"({n} trial{'s' if n > 1 else ''}); set train.ema_warmup: true or a smaller train.ema_decay"
            for (d, steps, warm), (share, n) in seen.items()]


def check_schedule(train: TrainConfig) -> list[str]:
    """Rules that need the step count (for budget trials: after it is resolved from train.flops)."""
    problems = []
    if train.schedule != "constant" and train.warmup_steps >= train.steps:
        problems.append(f"train.warmup_steps: {train.warmup_steps} must be below train.steps ({train.steps})")
    elif train.schedule == "wsd" and train.warmup_steps + cooldown_steps(train) > train.steps:
        problems.append(f"train.cooldown_steps: warm-up ({train.warmup_steps}) + cooldown ({cooldown_steps(train)}) "
                        f"exceed train.steps ({train.steps})")
    every = train.posthoc_ema.snapshot_every
    if train.posthoc_ema.sigma_rels and every and train.steps // every < 2:
        # A reconstruction combines snapshots taken at different steps; one per profile cannot move the width.
        problems.append(f"train.posthoc_ema.snapshot_every: {every} leaves {train.steps // every} snapshot(s) per "
                        f"profile in train.steps ({train.steps}); at least 2 are needed (at most {train.steps // 2})")
    return problems


def check_posthoc_ema(train: TrainConfig) -> list[str]:
    """train.posthoc_ema against the rest of the train section (the snapshot count: check_schedule)."""
    p, problems = train.posthoc_ema, []
    if not p.sigma_rels:
        if p.snapshot_every is not None:
            problems.append("train.posthoc_ema.sigma_rels: give the profiles to track (e.g. [0.05, 0.10]) with "
                            "train.posthoc_ema.snapshot_every")
        return problems
    if p.snapshot_every is None:
        problems.append("train.posthoc_ema.snapshot_every: required with train.posthoc_ema.sigma_rels "
                        "(optimizer steps between snapshots)")
    names = [f"{s:g}" for s in p.sigma_rels]  # snapshot files are named after them
    if len(set(names)) != len(names):
        problems.append(f"train.posthoc_ema.sigma_rels: {p.sigma_rels} repeats a value")
    default = type(train).model_fields["ema_decay"].default
    if train.ema_decay != default:
        # Choosing the EMA after training is the point: a fixed decay beside it would be a second answer.
        problems.append(f"train.ema_decay / train.posthoc_ema: set one of them (train.ema_decay is {train.ema_decay}, "
                        f"not its default {default}; post-hoc EMA chooses the width after training)")
    return problems


def check_ema_sigma_rels(trial: TrialConfig) -> list[str]:
    """eval.ema_sigma_rels: the EMAs are rebuilt from train.posthoc_ema's snapshots and chosen by the
    validation loss, so both must be there (harness/trial/posthoc_ema.choose_sigma_rel)."""
    e, problems = trial.eval, []
    if not e.ema_sigma_rels:
        return problems
    if not trial.train.posthoc_ema.sigma_rels:
        problems.append("eval.ema_sigma_rels: needs train.posthoc_ema (the snapshots each EMA is rebuilt from)")
    if not (e.val_batches and trial.data.val_shards):
        problems.append("eval.ema_sigma_rels: the best is chosen by the validation loss; set eval.val_batches > 0 "
                        "and data.val_shards")
    names = [f"{s:g}" for s in e.ema_sigma_rels]  # metric names are made of them
    if len(set(names)) != len(names):
        problems.append(f"eval.ema_sigma_rels: {e.ema_sigma_rels} repeats a value")
    return problems


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


_DS_OWNED = {  # DeepSpeed keys the harness sets from the study; DeepSpeed would ignore these silently
    "optimizer": "ditscale hands DeepSpeed its own AdamW (train.lr, train.betas, train.weight_decay); remove it",
    "scheduler": "ditscale hands DeepSpeed its own schedule (train.schedule, train.warmup_steps); remove it",
}
# section ("" = top level) -> key -> (kind, lowest value): kind "int" | "number" | "bool".
_DS_FIELDS = {
    "": {"train_batch_size": ("int", 1), "train_micro_batch_size_per_gpu": ("int", 1),
         "gradient_accumulation_steps": ("int", 1), "gradient_clipping": ("number", 0),
         "steps_per_print": ("int", 1), "gradient_predivide_factor": ("number", 0),
         "prescale_gradients": ("bool", None), "wall_clock_breakdown": ("bool", None),
         "zero_allow_untested_optimizer": ("bool", None), "zero_force_ds_cpu_optimizer": ("bool", None)},
    "zero_optimization": {"stage": ("int", 0), "reduce_bucket_size": ("number", 0),
                          "allgather_bucket_size": ("number", 0), "overlap_comm": ("bool", None),
                          "contiguous_gradients": ("bool", None), "reduce_scatter": ("bool", None),
                          "allgather_partitions": ("bool", None), "round_robin_gradients": ("bool", None),
                          "stage3_prefetch_bucket_size": ("number", 0), "stage3_param_persistence_threshold": ("number", 0),
                          "stage3_max_live_parameters": ("number", 0), "stage3_max_reuse_distance": ("number", 0),
                          "stage3_gather_16bit_weights_on_model_save": ("bool", None), "sub_group_size": ("number", 1)},
    "fp16": {"enabled": ("bool", None), "loss_scale": ("number", 0), "initial_scale_power": ("int", 0),
             "loss_scale_window": ("int", 1), "hysteresis": ("int", 1), "min_loss_scale": ("number", 0)},
    "bf16": {"enabled": ("bool", None)},
}


def _ds_value_problem(kind: str, low, value) -> str | None:
    if kind == "bool":
        return None if isinstance(value, bool) else f"{value!r} must be true or false"
    if kind == "int" and not (_is_number(value) and float(value).is_integer()):
        return f"{value!r} must be a whole number"
    if kind == "number" and not _is_number(value):
        return f"{value!r} must be a number"
    if low is not None and value < low:
        return f"{value!r} must be at least {low}"
    return None


def check_deepspeed(trial: TrialConfig) -> list[str]:
    """`train.deepspeed` (merged last into the DeepSpeed config) checked without DeepSpeed: sections are
    mappings, the known numeric and boolean fields have their types, ZeRO stage 0-3, one of fp16/bf16,
    the batch keys agree with train.batch_size and the workers, and no optimizer/scheduler of its own.
    One line per problem, naming `train.deepspeed.<key>`. (The sweep also runs DeepSpeed's own config
    class over the merged config before Ray starts.)"""
    raw, t, r = trial.train.deepspeed, trial.train, trial.resources
    problems = [f"train.deepspeed.{key}: {why}" for key, why in _DS_OWNED.items() if key in raw]
    for section, fields in _DS_FIELDS.items():
        values = raw if not section else raw.get(section, {})
        if not isinstance(values, dict):
            problems.append(f"train.deepspeed.{section}: {values!r} must be a mapping")
            continue
        for key, (kind, low) in fields.items():
            if key in values:
                problem = _ds_value_problem(kind, low, values[key])
                if problem:
                    problems.append(f"train.deepspeed.{section + '.' if section else ''}{key}: {problem}")
    zero = raw.get("zero_optimization", {})
    if isinstance(zero, dict) and _is_number(zero.get("stage")) and zero["stage"] > 3:
        problems.append(f"train.deepspeed.zero_optimization.stage: {zero['stage']!r} must be 0, 1, 2 or 3")
    enabled = {}
    for mode in ("fp16", "bf16"):
        section = raw.get(mode, {})
        if isinstance(section, dict) and isinstance(section.get("enabled"), bool):
            enabled[mode] = section["enabled"]
    if enabled.get("fp16") and enabled.get("bf16"):
        problems.append("train.deepspeed.fp16.enabled: fp16 and bf16 cannot both be enabled")
    for mode, on in enabled.items():
        if on != (t.precision == mode):
            problems.append(f"train.deepspeed.{mode}.enabled: {str(on).lower()} contradicts train.precision "
                            f"({t.precision}); set train.precision instead")
    batch = {k: raw[k] for k in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
             if k in raw}
    if batch and all(_is_number(v) and v >= 1 for v in batch.values()):
        total = batch.get("train_batch_size", t.batch_size)
        micro = batch.get("train_micro_batch_size_per_gpu", trial.micro_batch_size)
        accumulation = batch.get("gradient_accumulation_steps", trial.grad_accumulation)
        if total != t.batch_size:
            problems.append(f"train.deepspeed.train_batch_size: {total} differs from train.batch_size "
                            f"({t.batch_size}); set train.batch_size instead")
        elif micro * accumulation * r.workers_per_trial != total:
            key = ("gradient_accumulation_steps" if "gradient_accumulation_steps" in batch
                   else "train_micro_batch_size_per_gpu")
            problems.append(f"train.deepspeed.{key}: micro-batch {micro} x accumulation {accumulation} x "
                            f"{r.workers_per_trial} workers is not train.batch_size ({total})")
    return problems


def check_metrics(trial: TrialConfig, check_files: bool = True) -> list[str]:
    """eval.metrics: no repeats; fd_dinov2 / cmmd need 2 samples (a covariance, a pair) when sampling is on
    and, when files are checked, their networks in the assets folder (one line naming the folder and the
    fetch command) — found here, before Ray starts, not by the first evaluation."""
    from harness.assets import METRIC_WEIGHTS, find_metric_weights, missing_metric_weights

    e = trial.eval
    problems = [f"eval.metrics: {e.metrics} repeats a metric"] if len(set(e.metrics)) != len(e.metrics) else []
    extra = [m for m in dict.fromkeys(e.metrics) if m in METRIC_WEIGHTS]
    if extra and e.fid_samples == 1:  # 0 turns sampled metrics off altogether
        verb = "needs" if len(extra) == 1 else "need"
        problems.append(f"eval.fid_samples: 1 sample; {' and '.join(extra)} {verb} at least 2 (a covariance, a pair "
                        "of samples): raise it, set 0 for no sampled metrics, or remove them from eval.metrics")
    elif extra and e.fid_samples and check_files:
        assets = trial.resources.assets
        problems += [missing_metric_weights(m, assets) for m in extra if find_metric_weights(m, assets) is None]
    return problems


def check_trial(trial: TrialConfig, check_files: bool = True) -> list[str]:
    """Cross-field rules that pydantic's per-field checks cannot see."""
    problems = []
    m, d, t, r = trial.model, trial.data, trial.train, trial.resources
    try:
        spec = m.spec()
    except ValueError as err:
        return [f"model.size: {err}"]
    if spec.hidden % spec.heads:
        problems.append(f"model.size: hidden size {spec.hidden} is not divisible by {spec.heads} heads")
    if d.image_size > MAX_IMAGE_SIZE:
        problems.append(f"data.image_size: {d.image_size} is larger than {MAX_IMAGE_SIZE}")
    elif d.image_size % m.patch:
        problems.append(f"model.patch: {m.patch} does not divide data.image_size {d.image_size}")
    if m.family == "dit" and d.conditioning == "text":
        problems.append("data.conditioning: DiT is class-conditional; use model.family: mmdit for captions")
    if m.family != "mmdit" and (m.attention != "joint" or m.qk_norm):
        problems.append("model.attention: joint/split and qk_norm apply to model.family: mmdit only")
    if d.flip and d.conditioning == "text":
        problems.append("data.flip: flips would contradict captions that say left/right; use it with class labels")
    if t.batch_size % r.workers_per_trial:
        problems.append(f"train.batch_size: {t.batch_size} is not divisible by resources.workers_per_trial "
                        f"({r.workers_per_trial})")
    elif t.batch_size % (trial.micro_batch_size * r.workers_per_trial):
        problems.append(f"train.batch_size: {t.batch_size} is not divisible by resources.workers_per_trial "
                        f"({r.workers_per_trial}) x train.micro_batch_size ({trial.micro_batch_size})")
    for i, beta in enumerate(t.betas):
        if not 0 <= beta < 1:
            problems.append(f"train.betas: betas[{i}] = {beta:g} must be in [0, 1)")
    problems += check_deepspeed(trial)
    samplers = ("ddpm", "ddim") if trial.objective.kind == "ddpm" else ("euler", "heun")
    if trial.eval.sampler not in samplers + ("auto",):
        problems.append(f"eval.sampler: {trial.eval.sampler} does not sample {trial.objective.kind}; "
                        f"use {' or '.join(samplers)}")
    if (t.steps is None) == (t.flops is None):
        problems.append("train.steps / train.flops: give exactly one of them (a step count or a compute budget)")
    if t.steps is not None:
        problems += check_schedule(t)
    if t.schedule == "wsd" and t.cooldown is not None and t.cooldown_steps is not None:
        problems.append("train.cooldown / train.cooldown_steps: give one of them (a share of the steps or a count)")
    if t.schedule != "wsd" and (t.cooldown is not None or t.cooldown_steps is not None):
        problems.append(f"train.cooldown: only train.schedule: wsd has a cooldown (schedule is {t.schedule})")
    problems += check_posthoc_ema(t)
    problems += check_ema_sigma_rels(trial)
    problems += check_metrics(trial, check_files)
    if check_files:
        for field in ("shards", "val_shards"):
            pattern = getattr(d, field)
            if not pattern:
                continue
            urls, missing = shard_urls(pattern)
            if not urls:
                problems.append(f"data.{field}: no file matches {pattern!r}")
            elif missing:
                problems.append(f"data.{field}: {len(missing)} of {len(urls) + len(missing)} shards are missing "
                                f"(first: {missing[0]})")
    return problems
