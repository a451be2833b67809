"""What a trial trains: the backbone built from the study's model section, sized from the dataset,
the objective, and the frozen text encoder when there is one. Training and `ditscale eval` build a
trial through `build_trial` alike.

The dataset's manifest (`dataset.json`, written by `ditscale data pack` beside the shards) supplies
what the study leaves out: the number of classes, whether samples are pixels or VAE latents.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn

from harness.config import TrialConfig
from harness.data.shards import manifest_of_shards
from harness.errors import UserError
from harness.study import TextGeometry, count_trial
from harness.trial.conditioning import (CaptionDenoiser, Conditioner, build_word_encoder, load_frozen_encoder,
                                        text_geometry)
from models.mup import apply_mup
from models.objectives import build_objective
from models.registry import build_model


@dataclass
class DatasetInfo:
    num_classes: int | None
    kind: str  # pixels | latents
    manifest: dict = field(default_factory=dict)
    forward_gflops: float = 0.0
    params: int = 0
    text: TextGeometry | None = None  # MM-DiT: the text tokens it reads


def dataset_info(trial: TrialConfig, frozen_encoder=None) -> DatasetInfo:
    """What the trial's data says (classes, pixels or latents, text geometry) and its model's counts from
    it; the sample geometry checked against the study. (Planning counts without data: harness.study.)"""
    manifest = manifest_of_shards(trial.data.shards)
    num_classes = trial.data.num_classes or manifest.get("num_classes")
    if trial.data.conditioning == "class" and not num_classes:
        raise UserError("data.num_classes: not set, and no dataset.json beside data.shards says it")
    _check_geometry(trial, manifest)
    text = text_geometry(trial, manifest, frozen_encoder) if trial.model.family == "mmdit" else None
    count = count_trial(trial, num_classes, text)
    return DatasetInfo(num_classes=num_classes, kind=manifest.get("kind", "pixels"), manifest=manifest,
                       forward_gflops=count.gflops, params=count.params, text=text)


def _check_geometry(trial: TrialConfig, manifest: dict) -> None:
    shape = manifest.get("sample_shape")
    if not shape:
        return
    channels, height = int(shape[0]), int(shape[1])
    if trial.data.channels != channels:
        raise UserError(f"data.channels: {trial.data.channels}, but the shards hold {channels}-channel samples")
    if trial.data.image_size != height:
        raise UserError(f"data.image_size: {trial.data.image_size}, but the shards hold {height}x{height} samples")


def build_denoiser(trial: TrialConfig, info: DatasetInfo, device, frozen_encoder=None) -> tuple[nn.Module, Conditioner]:
    """(the module DeepSpeed trains, the batch -> model-input converter that goes with it)."""
    m, d, spec = trial.model, trial.data, trial.model.spec()
    if spec.family == "dit":
        module = build_model(spec, input_size=d.image_size, in_channels=d.channels, num_classes=info.num_classes,
                             learn_sigma=m.learn_sigma, class_dropout_prob=m.class_dropout_prob)
        if m.parametrization == "mup":
            apply_mup(module, m.mup_base_width)
        return module, Conditioner(trial, device)
    backbone = build_model(spec, input_size=d.image_size, in_channels=d.channels, context_dim=info.text.context_dim,
                           pooled_dim=info.text.pooled_dim, learn_sigma=m.learn_sigma,
                           class_dropout_prob=m.class_dropout_prob)
    if m.parametrization == "mup":
        apply_mup(backbone, m.mup_base_width)
    if d.text_encoder == "builtin":
        words = build_word_encoder(trial)
        return CaptionDenoiser(backbone, words, m.class_dropout_prob), Conditioner(trial, device, word_encoder=words)
    return backbone, Conditioner(trial, device, text_encoder=frozen_encoder)


def build_objective_for(trial: TrialConfig):
    """The study's objective section -> a models.objectives objective."""
    o = trial.objective
    if o.kind == "ddpm":
        return build_objective("ddpm")
    return build_objective(
        "rectified_flow", timestep_sampling=o.timestep_sampling, logit_mean=o.logit_mean, logit_std=o.logit_std,
        shift=o.shift, shift_training=o.shift_training,
    )


def uses_frozen_encoder(trial: TrialConfig) -> bool:
    return trial.data.conditioning == "text" and trial.data.text_encoder not in ("builtin", "precomputed")


@dataclass
class BuiltTrial:
    info: DatasetInfo
    objective: object
    denoiser: nn.Module      # what DeepSpeed trains (and the EMA tracks)
    conditioner: Conditioner


def build_trial(trial: TrialConfig, device) -> BuiltTrial:
    """Everything a trial's weights need, for training and for evaluating a checkpoint alike. Seed
    the RNG first: the denoiser's initial weights come from it."""
    frozen = load_frozen_encoder(trial, device) if uses_frozen_encoder(trial) else None
    info = dataset_info(trial, frozen_encoder=frozen)
    objective = build_objective_for(trial)
    denoiser, conditioner = build_denoiser(trial, info, device, frozen_encoder=frozen)
    return BuiltTrial(info, objective, denoiser, conditioner)
