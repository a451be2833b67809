"""What a trial trains: the backbone built from the study's model section, sized from the dataset.

The dataset's manifest (`dataset.json`, written by `ditscale data pack` beside the shards) supplies
what the study leaves out: the number of classes, whether samples are pixels or VAE latents.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch.nn as nn

from harness.config import REMOTE_PREFIXES, TrialConfig, shard_urls
from harness.errors import UserError
from models.flops import count_model


@dataclass
class DatasetInfo:
    num_classes: int | None
    kind: str  # pixels | latents
    manifest: dict = field(default_factory=dict)
    forward_gflops: float = 0.0


def read_manifest(pattern: str) -> dict:
    """dataset.json beside the first local shard of `pattern`; {} for remote shards or none found."""
    urls, _ = shard_urls(pattern)
    local = [u for u in urls if not u.startswith(REMOTE_PREFIXES)]
    if not local:
        return {}
    path = Path(local[0]).parent / "dataset.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def dataset_info(trial: TrialConfig, need_manifest: bool = True) -> DatasetInfo:
    """need_manifest=False (planning, dry runs): tolerate absent shards and fall back to 1000 classes."""
    manifest = read_manifest(trial.data.shards)
    num_classes = trial.data.num_classes or manifest.get("num_classes") or (None if need_manifest else 1000)
    if trial.data.conditioning == "class" and not num_classes:
        raise UserError("data.num_classes: not set, and no dataset.json beside data.shards says it")
    kind = manifest.get("kind", "pixels")
    count = count_model(trial.model_name, input_size=trial.data.image_size, in_channels=trial.data.channels,
                        **_count_kwargs(trial, num_classes))
    return DatasetInfo(num_classes=num_classes, kind=kind, manifest=manifest, forward_gflops=count.gflops)


def _count_kwargs(trial: TrialConfig, num_classes: int | None) -> dict:
    if trial.model.family == "dit":
        return {"num_classes": num_classes, "learn_sigma": trial.model.learn_sigma,
                "class_dropout_prob": trial.model.class_dropout_prob}
    return {}


def build_denoiser(trial: TrialConfig, info: DatasetInfo) -> nn.Module:
    from models.registry import build_model

    m, d = trial.model, trial.data
    if m.family == "dit":
        return build_model(trial.model_name, input_size=d.image_size, in_channels=d.channels,
                           num_classes=info.num_classes, learn_sigma=m.learn_sigma,
                           class_dropout_prob=m.class_dropout_prob)
    raise UserError(f"model.family: {m.family} training is not wired yet")
