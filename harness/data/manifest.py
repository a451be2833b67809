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
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, ValidationError

from harness.data.errors import DataError
from harness.files import atomic_write_text

MANIFEST = "dataset.json"
FORMAT = "ditscale-webdataset"

SPLIT_NAME = re.compile(r"^[A-Za-z0-9_]+$")  # split names become file names (train-000000.tar)


class ManifestError(DataError):
    """dataset.json is there but unusable. `parsed`: it is a JSON object that breaks the schema (its
    names cannot be trusted), as opposed to a file that is not JSON at all."""

    def __init__(self, message: str, parsed: bool):
        super().__init__(message)
        self.parsed = parsed


def _plain_file_name(name: str) -> str:
    # Shard names are joined to the dataset folder: a path in one would read (or, for `pack
    # --overwrite`, delete) files outside the dataset.
    if name in ("", ".", "..") or any(c in name for c in "/\\") or any(ord(c) < 32 for c in name):
        raise ValueError(f"{name!r} is not a plain file name (shards must lie in the dataset folder)")
    return name


def _split_name(name: str) -> str:
    if not SPLIT_NAME.match(name):
        raise ValueError(f"split name {name!r}: use letters, digits and underscores")
    return name


class _Open(BaseModel):
    """Checks the fields ditscale reads and keeps every other one as it is."""

    model_config = ConfigDict(extra="allow")


class ShardEntry(_Open):
    name: Annotated[str, AfterValidator(_plain_file_name)]
    count: NonNegativeInt | None = None
    bytes: NonNegativeInt | None = None
    sha256: str | None = None


class SplitEntry(_Open):
    shards: list[ShardEntry]
    count: NonNegativeInt | None = None
    pattern: str | None = None
    fields: list[str] | None = None
    pack_id: str | None = None


class VaeEntry(_Open):
    name: str | None = None
    scaling_factor: float | None = None
    shift_factor: float | None = None
    latent_channels: PositiveInt | None = None
    downsample: PositiveInt | None = None


class TextEncoderEntry(_Open):
    spec: str | None = None
    tokens: PositiveInt | None = None
    token_dim: PositiveInt | None = None
    pooled_dim: PositiveInt | None = None


class ManifestSchema(_Open):
    splits: dict[Annotated[str, AfterValidator(_split_name)], SplitEntry]
    format: str | None = None
    kind: Literal["pixels", "latents"] | None = None
    sample_shape: Annotated[list[PositiveInt], Field(min_length=3, max_length=3)] | None = None
    channels: PositiveInt | None = None
    image_size: PositiveInt | None = None
    pixel_size: PositiveInt | None = None
    num_classes: NonNegativeInt | None = None
    class_names: list[str] | None = None
    fields: list[str] = Field(default_factory=list)
    source: dict | None = None
    vae: VaeEntry | None = None
    text_encoder: TextEncoderEntry | None = None
    counts: dict[str, NonNegativeInt] | None = None


def read_manifest(folder: str | os.PathLike) -> dict | None:
    """The dataset.json in `folder`, checked against the schema; None when there is none. Every
    reader (verify, the loader, pack, training) goes through here. Raises ManifestError naming the
    field, e.g. `.../dataset.json: splits.train.shards.0.name: '../x' is not a plain file name`."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ManifestError(f"{path}: unreadable manifest ({err})", parsed=False) from None
    if not isinstance(raw, dict):
        raise ManifestError(f"{path}: not a ditscale dataset manifest (a JSON {type(raw).__name__}, "
                            "not an object)", parsed=False)
    return check_manifest(raw, str(path))


def check_manifest(raw: dict, where: str = MANIFEST) -> dict:
    """A manifest dict checked against the schema (values coerced, unknown keys kept)."""
    try:
        return ManifestSchema.model_validate(raw).model_dump(exclude_unset=True)
    except ValidationError as err:
        raise ManifestError(f"{where}: {_first_problem(err)}", parsed=True) from None


def _first_problem(err: ValidationError) -> str:
    """One line: the first problem's dotted field, what is wrong, and how many more there are."""
    problems = err.errors(include_url=False)
    first = problems[0]
    loc = first["loc"][:-2] if first["loc"][-1:] == ("[key]",) else first["loc"]  # a bad key: name its dict
    where = ".".join(str(part) for part in loc) or "(top level)"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] not in ("missing", "value_error"):
        message += f" (got {str(first.get('input'))[:60]!r})"
    more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
    return f"{where}: {message}{more}"


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
