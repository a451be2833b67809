"""The dataset as evaluation sees it: its shards and manifest (EvalData), its real images read the
way clean-fid reads image files, generated latents decoded by the dataset's VAE, and folders of images.
The feature extractors and statistics computed from these images are in harness/evaluation/features.py.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from cleanfid.utils import EXTENSIONS
from PIL import Image

from harness.assets import resolve_vae
from harness.data.codec import decode_npy, decode_png
from harness.data.errors import DataError
from harness.data.manifest import read_manifest
from harness.data.shards import expand_shards, manifest_beside, open_shard
from harness.data.tario import iter_samples
from harness.data.vae import load_vae
from harness.errors import UserError

log = logging.getLogger("harness.evaluation")

_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message)


# --- the dataset as evaluation sees it ----------------------------------------------------------------


@dataclass
class EvalData:
    """Where the real images are: the training shards, the held-out shards, their dataset.json."""

    train: str  # shard pattern, list or dataset folder
    val: str | None = None
    manifest: dict = field(default_factory=dict)
    folder: Path | None = None  # the dataset folder (caches go to folder/eval)
    assets: str | None = None

    @classmethod
    def from_trial(cls, trial) -> "EvalData":
        manifest, folder = manifest_beside(expand_shards(trial.data.shards))
        return cls(trial.data.shards, trial.data.val_shards, manifest or {}, Path(folder) if folder else None,
                   getattr(trial.resources, "assets", None))

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, assets: str | None = None) -> "EvalData":
        folder = Path(folder)
        manifest = read_manifest(folder)
        if manifest is None:
            raise UserError(f"{folder}: no dataset.json; give the folder `ditscale data pack` wrote")
        val = str(folder) if "val" in manifest.get("splits", {}) else None
        return cls(str(folder), val, manifest, folder, assets)

    # -- facts ----------------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        return self.manifest.get("kind", "pixels")

    @property
    def is_shapes(self) -> bool:
        source = self.manifest.get("source") or {}
        return source.get("kind") == "builtin" and source.get("name") == "shapes"

    @property
    def has_labels(self) -> bool:
        return bool(self.manifest.get("num_classes")) and "cls" in self.manifest.get("fields", ["cls"])

    @property
    def pixel_size(self) -> int | None:
        return self.manifest.get("pixel_size") or self.manifest.get("image_size")

    def urls(self, split: str) -> list[str]:
        pattern = self.train if split == "train" else self.val
        if split not in ("train", "val"):
            if self.folder is None:
                raise UserError(f"eval.reference_split: {split!r}; use train or val")
            pattern = str(self.folder)
        if not pattern:
            raise UserError(f"eval.reference_split: {split}, but the study has no data.val_shards")
        return expand_shards(pattern, split)

    def split_identity(self, split: str) -> str:
        """Changes when the split is re-packed (cached statistics then become stale)."""
        entry = (self.manifest.get("splits") or {}).get(split) or {}
        if entry.get("shards"):
            blob = json.dumps([entry.get("pack_id"), [s.get("sha256") for s in entry["shards"]]])
        else:
            blob = json.dumps(self.urls(split))
        return hashlib.sha256(blob.encode()).hexdigest()[:8]

    def split_count(self, split: str) -> int | None:
        entry = (self.manifest.get("splits") or {}).get(split) or {}
        return entry.get("count")

    def cache_dir(self) -> Path:
        """folder/eval when it can be written, else a per-dataset folder under ~/.cache/ditscale/eval."""
        if self.folder is not None:
            candidate = self.folder / "eval"
            try:
                candidate.mkdir(exist_ok=True)
                probe = tempfile.NamedTemporaryFile(dir=candidate, prefix=".probe", delete=True)
                probe.close()
                return candidate
            except OSError:
                pass
        key = hashlib.sha256(str(self.folder or self.train).encode()).hexdigest()[:12]
        fallback = Path.home() / ".cache" / "ditscale" / "eval" / key
        fallback.mkdir(parents=True, exist_ok=True)
        return fallback


# --- reading real images ---------------------------------------------------------------------------


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] float [B, C, H, W] -> uint8 [B, H, W, 3] (grayscale repeated, as PIL's convert("RGB") does)."""
    u = ((x.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    if u.shape[1] == 1:
        u = u.expand(-1, 3, -1, -1)
    return u.permute(0, 2, 3, 1).contiguous().cpu().numpy()


class LatentDecoder:
    """The dataset's VAE: latents (as the loader yields them, or raw as stored) -> uint8 RGB images."""

    def __init__(self, manifest: dict, device, assets: str | None = None):
        meta = manifest.get("vae") or {}
        if not meta.get("name"):
            raise UserError("the shards hold latents but dataset.json names no VAE to decode them with")
        spec = resolve_vae(meta["name"], assets)
        try:
            self.vae = load_vae(spec, str(device))
        except DataError as err:
            raise UserError(f"FID on latents needs their VAE: {err}; copy it with `ditscale assets fetch --vae "
                            f"{meta['name']}` into the assets folder") from None
        self.scale = float(meta.get("scaling_factor", 1.0))
        self.shift = float(meta.get("shift_factor") or 0.0)
        self.device = device

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, scaled: bool = True) -> np.ndarray:
        z = latents.to(self.device, torch.float32)
        if scaled:  # the loader's (latent - shift) * scale, undone
            z = z / self.scale + self.shift
        images = self.vae.decode(z.to(self.vae.dtype)).sample
        return to_uint8(images)


def iter_real_images(data: EvalData, split: str, limit: int | None, batch_size: int = 256, *,
                     decoder: LatentDecoder | None = None, want_json: bool = False) -> Iterator[dict]:
    """Batches of real images of a split, in shard order: {"images": uint8 [B, H, W, 3], "cls": int64
    [B] or None, "txt": [...], "json": [...] (want_json)}; at most `limit` images."""
    rows: list = []
    taken = 0

    def flush():
        nonlocal rows
        xs = [r[0] for r in rows]
        if isinstance(xs[0], np.ndarray) and xs[0].dtype == np.uint8:
            images = np.stack([x if x.shape[2] == 3 else np.repeat(x, 3, axis=2) for x in xs])
        else:
            if decoder is None:
                raise UserError("the shards hold latents: decoding them needs the dataset's VAE")
            images = decoder.decode(torch.from_numpy(np.stack(xs).astype(np.float32)), scaled=False)
        cls = [r[1] for r in rows]
        batch = {"images": images, "cls": None if any(c is None for c in cls) else torch.tensor(cls),
                 "txt": [r[2] for r in rows], "json": [r[3] for r in rows]}
        rows = []
        return batch

    for url in data.urls(split):
        with open_shard(url) as stream:
            for sample in iter_samples(stream):
                if "__error__" in sample:
                    continue
                member = next((m for m in ("png", "jpg", "jpeg", "webp") if m in sample), None)
                try:
                    if member is not None:
                        x = decode_png(bytes(sample[member]))
                    elif "latent.npy" in sample:
                        x = np.array(decode_npy(sample["latent.npy"]))
                    else:
                        continue
                    label = int(bytes(sample["cls"])) if "cls" in sample else None
                    caption = bytes(sample["txt"]).decode("utf-8") if "txt" in sample else None
                    meta = json.loads(bytes(sample["json"])) if want_json and "json" in sample else None
                except (ValueError, OSError):
                    continue  # corrupt samples are counted by the loader in training; here they are skipped
                rows.append((x, label, caption, meta))
                taken += 1
                if len(rows) == batch_size:
                    yield flush()
                if limit is not None and taken >= limit:
                    break
        if limit is not None and taken >= limit:
            break
    if rows:
        yield flush()


# --- folders of images (tools, tests) -------------------------------------------------------------------


def folder_images(folder: str | os.PathLike) -> np.ndarray:
    """Every image under `folder` (clean-fid's extensions, sorted, recursive) as uint8 [N, H, W, 3],
    read the way clean-fid reads them (PIL, convert("RGB"))."""
    files = sorted(f for ext in EXTENSIONS for f in glob.glob(os.path.join(str(folder), f"**/*.{ext}"), recursive=True))
    if not files:
        raise UserError(f"{folder}: no images")
    return np.stack([np.array(Image.open(f).convert("RGB")) for f in files])
