"""Precomputed text embeddings for packing, through models.text (`--text-encoder SPEC`).

Per sample the shards hold `txt_tokens.npy` [L, D] fp16 — the encoder's tokens cut after the last
real token (L <= N) — `txt_mask.npy` [L] bool and `txt_pooled.npy` [P] fp16. The loader pads tokens
and mask back to the manifest's N.
"""

from __future__ import annotations

import numpy as np

from harness.assets import resolve_text_spec
from harness.data.errors import DataError
from models.text import load_text_encoder


def load_encoder(spec: str, device: str = "cpu", field: str = "--text-encoder", assets: str | None = None):
    """A frozen text encoder in eval mode, hub names looked up in the assets folder first
    (harness/assets.py); a bad `spec` is one line naming `field` (the flag or study field it came from)."""
    try:
        encoder = load_text_encoder(resolve_text_spec(spec, assets), device=device)
    except (ValueError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"{field}: {spec}: {first}") from None
    if hasattr(encoder, "eval"):
        encoder.eval()
    return encoder


def encode_captions(encoder, captions: list[str]) -> tuple[list[dict[str, np.ndarray]], int]:
    """(per caption {"txt_tokens.npy", "txt_mask.npy", "txt_pooled.npy"} with tokens trimmed, N)."""
    import torch

    with torch.inference_mode():
        emb = encoder.encode(list(captions))
    tokens = emb.tokens.float().cpu().numpy().astype(np.float16)
    pooled = emb.pooled.float().cpu().numpy().astype(np.float16)
    mask = emb.mask.cpu().numpy().astype(bool)
    out = []
    for i in range(len(captions)):
        real = np.flatnonzero(mask[i])
        length = int(real[-1]) + 1 if real.size else 0
        out.append({"txt_tokens.npy": tokens[i, :length], "txt_mask.npy": mask[i, :length],
                    "txt_pooled.npy": pooled[i]})
    return out, tokens.shape[1]


def encoder_info(spec: str, encoder, sample: dict[str, np.ndarray], tokens: int) -> dict:
    return {"spec": spec, "tokens": int(tokens), "token_dim": int(sample["txt_tokens.npy"].shape[-1]),
            "pooled_dim": int(sample["txt_pooled.npy"].shape[-1]), "encoder": type(encoder).__name__}
