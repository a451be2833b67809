"""The DeepSpeed side of a trial: its config, the optimizer and learning-rate schedule, the engine."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn

from harness.config import TrialConfig


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


def lr_multiplier(trial: TrialConfig) -> Callable[[int], float]:
    """Step -> factor on train.lr: constant, linear warm-up then constant, or warm-up then cosine to 0."""
    cfg = trial.train
    warmup = cfg.warmup_steps if cfg.schedule != "constant" else 0

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "cosine":
            progress = min(1.0, (step - warmup) / max(1, cfg.steps - warmup))
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return factor


def build_engine(module: nn.Module, trial: TrialConfig, world_size: int):
    """deepspeed.initialize with a torch AdamW and a LambdaLR schedule stepped by the engine."""
    import deepspeed

    cfg = trial.train
    if cfg.activation_checkpointing:
        checkpoint_blocks(module)
    params = [p for p in module.parameters() if p.requires_grad]
    # DeepSpeed moves the module to the GPU in place, so the optimizer may be built before that.
    fused = torch.cuda.is_available() and trial.resources.gpus_per_worker > 0
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                                  **({"fused": True} if fused else {}))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(trial))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(trial, world_size),
    )
    if cfg.zero_stage == 3:
        _register_borrowed_parameters(engine.module)
    return engine, optimizer, scheduler


def _register_borrowed_parameters(module: nn.Module) -> None:
    """ZeRO-3 gathers a module's parameters when that module is called. nn.MultiheadAttention (inside
    the built-in text encoder's TransformerEncoderLayer) reads its `out_proj` weights without calling
    `out_proj`, so DeepSpeed must be told to gather them with the attention module."""
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter

    for child in module.modules():
        if isinstance(child, nn.MultiheadAttention):
            for param in (child.out_proj.weight, child.out_proj.bias):
                if param is not None:
                    register_external_parameter(child, param)


def checkpoint_blocks(module: nn.Module) -> int:
    """Turn on activation checkpointing in every DiT/MM-DiT inside `module` (their blocks' activations
    are recomputed in the backward pass instead of stored). Returns the number of models switched."""
    switched = 0
    for child in module.modules():
        if hasattr(child, "grad_checkpointing"):
            child.grad_checkpointing = True
            switched += 1
    if not switched:
        raise ValueError(f"train.activation_checkpointing: {type(module).__name__} does not support it")
    return switched
