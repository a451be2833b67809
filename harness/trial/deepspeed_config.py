"""The trial's DeepSpeed config, and DeepSpeed's own check of it before anything starts.

Torch-free (DeepSpeed is imported only to check a raw `train.deepspeed`): the sweep's driver calls
check_deepspeed_configs, and importing torch there cost 1.9 s of a tiny sweep's start-up here."""

from __future__ import annotations

import json
import logging

from harness.config import StudyError, TrialConfig


def deepspeed_config(trial: TrialConfig, world_size: int) -> dict:
    """DeepSpeed config for the trial; `train.deepspeed` (raw, for experts) is merged last."""
    train = trial.train
    micro = train.micro_batch_size or train.batch_size // world_size
    config = {
        "train_batch_size": train.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": train.batch_size // (micro * world_size),
        "zero_optimization": {"stage": train.zero_stage},
        "bf16": {"enabled": train.precision == "bf16"},
        # loss_scale 0 = dynamic loss scaling
        "fp16": {"enabled": train.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "gradient_clipping": train.grad_clip or 0.0,
        # We hand DeepSpeed a torch AdamW (its fused Adam needs CUDA); it is fine with ZeRO.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    return _merge(config, train.deepspeed)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


_DEEPSPEED_SECTIONS = {"DeepSpeedZeroConfig": "zero_optimization", "DeepSpeedFP16Config": "fp16",
                       "DeepSpeedBF16Config": "bf16"}


def check_deepspeed_configs(trials: list[TrialConfig]) -> None:
    """DeepSpeed's own config class over each trial's merged DeepSpeed config, before Ray starts: only
    for trials with a raw `train.deepspeed` (the harness's own part is known good, and importing
    DeepSpeed costs seconds). The batch keys are checked by harness.checks.check_deepspeed against the
    real worker count; DeepSpeed, without a process group, would check them against one worker."""
    raw = [trial for trial in trials if trial.train.deepspeed]
    if not raw:
        return
    from pydantic import ValidationError

    ds_logger = logging.getLogger("DeepSpeed")
    level = ds_logger.level
    ds_logger.setLevel(logging.WARNING)
    try:
        from deepspeed.runtime.config import DeepSpeedConfig

        problems, seen = [], set()
        for trial in raw:
            config = deepspeed_config(trial, trial.resources.workers_per_trial)
            config.update(train_batch_size=1, train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1)
            key = json.dumps(config, sort_keys=True, default=str)
            if key in seen:
                continue
            seen.add(key)
            try:
                DeepSpeedConfig(config)
            except ValidationError as err:
                section = _DEEPSPEED_SECTIONS.get(err.title, "")
                for e in err.errors():
                    loc = ".".join(str(p) for p in (section, *e["loc"]) if p != "")
                    problems.append(f"train.deepspeed.{loc}: {e['msg']} (DeepSpeed)")
            except Exception as err:  # DeepSpeed's assertions and DeepSpeedConfigError
                text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                problems.append(f"train.deepspeed: {text} (DeepSpeed)")
    finally:
        ds_logger.setLevel(level)
    if problems:
        raise StudyError(problems)
