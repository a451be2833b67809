"""`dataset.json`, the manifest `ditscale data pack` writes beside the shards.

    {
      "format": "ditscale-webdataset", "version": 1,
      "source": {"kind": "builtin" | "folder" | "captions", ...},
      "kind": "pixels" | "latents",
      "sample_shape": [C, H, W],   # what the loader yields per sample
      "channels": C, "image_size": H, "pixel_size": 256,
      "fields": ["cls", "json", "latent.npy", "txt"],   # members every sample has
      "num_classes": 10, "class_names": [...],          # null when the source has no labels
      "vae": {"name", "scaling_factor", "shift_factor", "latent_channels", "downsample", ...} | null,
      "text_encoder": {"spec", "tokens", "token_dim", "pooled_dim"} | null,
      "counts": {"train": 1707, "val": 90},
      "splits": {"train": {"count", "pattern", "shards": [{"name", "count", "bytes", "sha256"}]}, ...},
      "seed": 0, "val_fraction": 0.05, "skipped": 0
    }

The loader scales latents as (latent - shift_factor) * scaling_factor.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from harness.data.errors import DataError
from harness.files import atomic_write_text

MANIFEST = "dataset.json"
FORMAT = "ditscale-webdataset"


def read_manifest(folder: str | os.PathLike) -> dict | None:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: unreadable manifest ({err})") from None
    if not isinstance(manifest, dict) or "splits" not in manifest:
        raise DataError(f"{path}: not a ditscale dataset manifest (no 'splits')")
    return manifest


def write_manifest(folder: str | os.PathLike, manifest: dict) -> Path:
    """Atomic: a reader sees the old manifest or the new one, never half of one."""
    return atomic_write_text(Path(folder) / MANIFEST, json.dumps(manifest, indent=2) + "\n")


def shard_pattern(name: str, count: int) -> str:
    """The brace pattern of a split's shards, e.g. train-{000000..000003}.tar."""
    if count == 1:
        return f"{name}-000000.tar"
    return f"{name}-{{000000..{count - 1:06d}}}.tar"


def split_paths(folder: str | os.PathLike, manifest: dict, split: str) -> list[str]:
    """Local paths of a split's shards, in order."""
    splits = manifest.get("splits", {})
    if split not in splits:
        known = ", ".join(sorted(splits)) or "none"
        raise DataError(f"{Path(folder) / MANIFEST}: no split {split!r} (splits: {known})")
    return [str(Path(folder) / s["name"]) for s in splits[split]["shards"]]


def shard_counts(manifest: dict | None) -> dict[str, int]:
    """{shard file name: sample count} over every split of a manifest."""
    if not manifest:
        return {}
    return {s["name"]: s["count"] for split in manifest.get("splits", {}).values() for s in split["shards"]}
