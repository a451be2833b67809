"""One sample of a shard decoded and checked: the one decoder the training loader and `data verify`
share, so a sample `verify` passes is a sample the loader reads, and the other way round.

A sample is the dict of members the tar reader yields ({"__key__", "png" | "latent.npy", "cls",
"txt", "txt_tokens.npy", ...}). `decode_sample` raises ValueError with the reason when the sample is
not usable; the caller counts it as corrupt.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from harness.data.codec import decode_image_chw, decode_json, decode_npy

IMAGE_MEMBERS = ("png", "jpg", "jpeg", "webp")


@dataclass
class SampleSpec:
    """What a dataset's samples hold (from its manifest; picklable for loader workers). `kind` and
    `shape` left None are fixed by the first sample decoded."""

    kind: str | None = None          # pixels | latents
    shape: tuple | None = None       # [C, H, W]
    want_cls: bool = False
    want_txt: bool = False
    want_embeddings: bool = False
    tokens: int | None = None        # most text tokens a precomputed embedding may have
    num_classes: int | None = None
    fields: frozenset = field(default_factory=frozenset)  # members every sample must carry

    @classmethod
    def from_manifest(cls, manifest: dict | None, **wants) -> "SampleSpec":
        m = manifest or {}
        return cls(kind=m.get("kind"), shape=tuple(m["sample_shape"]) if m.get("sample_shape") else None,
                   tokens=(m.get("text_encoder") or {}).get("tokens"), num_classes=m.get("num_classes"),
                   **wants)


@dataclass
class Decoded:
    x: np.ndarray                  # [C, H, W]: uint8 pixels or float16 latents
    label: int | None
    caption: str | None
    embedding: tuple | None        # (tokens [T, D], mask [T], pooled [P])


def decode_sample(sample: dict, spec: SampleSpec, *, strict: bool = False) -> Decoded:
    """The sample decoded to what `spec` asks for; ValueError when it cannot be. `strict` (verify)
    also decodes what training does not read (captions, json, embeddings) and checks latents are finite."""
    if "__error__" in sample:
        raise ValueError(sample["__error__"])
    missing = spec.fields - set(sample)
    if missing:
        raise ValueError(f"missing {', '.join(sorted(missing))}")
    if spec.kind != "pixels" and "latent.npy" in sample:
        x, kind = decode_npy(sample["latent.npy"]), "latents"
        if strict and not np.isfinite(x).all():
            raise ValueError("latent has non-finite values")
    else:
        member = next((m for m in IMAGE_MEMBERS if m in sample), None)
        if member is None or spec.kind == "latents":
            raise ValueError("no latent.npy" if spec.kind == "latents" else "no image or latent member")
        x, kind = decode_image_chw(sample[member]), "pixels"
    if spec.kind is None:
        spec.kind = kind
    if spec.shape is None:
        spec.shape = tuple(x.shape)
    elif tuple(x.shape) != tuple(spec.shape):
        raise ValueError(f"shape {list(x.shape)}, expected {list(spec.shape)}")
    label = None
    if spec.want_cls or (strict and "cls" in sample):
        label = int(sample["cls"])
        if label < 0 or (spec.num_classes and label >= spec.num_classes):
            raise ValueError(f"class {label} outside 0..{(spec.num_classes or 1) - 1}")
    caption = None
    if spec.want_txt or (strict and "txt" in sample):
        caption = bytes(sample["txt"]).decode("utf-8")
    if strict and "json" in sample:
        decode_json(sample["json"])
    embedding = None
    if spec.want_embeddings or (strict and "txt_tokens.npy" in sample):
        tokens = decode_npy(sample["txt_tokens.npy"])
        mask = decode_npy(sample["txt_mask.npy"])
        pooled = decode_npy(sample["txt_pooled.npy"])
        if tokens.ndim != 2 or tokens.shape[0] != mask.shape[0] or (spec.tokens and tokens.shape[0] > spec.tokens):
            raise ValueError(f"text tokens of shape {tokens.shape} (mask {mask.shape}, at most {spec.tokens})")
        embedding = (tokens, mask, pooled)
    return Decoded(x, label, caption, embedding)
