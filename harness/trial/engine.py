"""The DeepSpeed side of a trial: its config, the optimizer and learning-rate schedule, the engine."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn

from harness.checks import cooldown_steps
from harness.config import TrialConfig
from harness.trial.deepspeed_config import deepspeed_config
from models.mup import lr_multipliers


def lr_multiplier(trial: TrialConfig) -> Callable[[int], float]:
    """Step -> factor on train.lr: constant; linear warm-up then constant; warm-up then cosine to 0; or
    warmup-stable-decay (WSD, Hagele et al. 2024, arXiv 2405.18392): warm-up, constant, then the last
    cooldown steps fall to 0, linearly or as 1 - sqrt (their best shape)."""
    cfg = trial.train
    warmup = cfg.warmup_steps if cfg.schedule != "constant" else 0
    cooldown = cooldown_steps(cfg)
    decay_start = cfg.steps - cooldown

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "cosine":
            progress = min(1.0, (step - warmup) / max(1, cfg.steps - warmup))
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if cooldown and step >= decay_start:
            progress = min(1.0, (step - decay_start) / cooldown)
            return 1.0 - (math.sqrt(progress) if cfg.cooldown_shape == "1-sqrt" else progress)
        return 1.0

    return factor


def param_groups(module: nn.Module, trial: TrialConfig) -> list[dict]:
    """The optimizer's parameter groups: one under sp; under muP one per learning-rate multiplier
    (models/mup.py), the multiplier-1 group first (its LR is the logged `lr`). Each group's `lr` is
    train.lr x its multiplier; the LR schedule then scales every group alike."""
    trainable = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
    if trial.model.parametrization != "mup":
        return [{"params": [p for _, p in trainable]}]
    factors = lr_multipliers(module, trial.model.mup_base_width)
    groups: dict[float, list] = {}
    for name, p in trainable:
        groups.setdefault(factors[name], []).append(p)
    order = sorted(groups, key=lambda f: (f != 1.0, -f))
    return [{"params": groups[f], "lr": trial.train.lr * f, "lr_multiplier": f} for f in order]


def build_engine(module: nn.Module, trial: TrialConfig, world_size: int):
    """deepspeed.initialize with a torch AdamW and a LambdaLR schedule stepped by the engine."""
    import deepspeed

    cfg = trial.train
    if cfg.activation_checkpointing:
        checkpoint_blocks(module)
    # DeepSpeed moves the module to the GPU in place, so the optimizer may be built before that.
    fused = torch.cuda.is_available() and trial.resources.gpus_per_worker > 0
    optimizer = torch.optim.AdamW(param_groups(module, trial), lr=cfg.lr, betas=cfg.betas,
                                  weight_decay=cfg.weight_decay, **({"fused": True} if fused else {}))
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
