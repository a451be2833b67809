"""CMMD: the maximum mean discrepancy between CLIP embeddings (eval.metrics: cmmd).

Jayasumana et al. 2024, "Rethinking FID: Towards a Better Evaluation Metric for Image Generation" (CVPR,
arXiv 2401.09603); reference code google-research/google-research/cmmd. No normality assumption (FID's
Gaussian fit is one of the flaws the paper documents) and an unbiased estimate, so far fewer samples
are needed than for an FD.

Embeddings, as the reference code computes them (io_util.py, embedding.py):

    uint8 RGB image -> PIL bicubic resize to 336 x 336 (its centre crop is a no-op on square images) ->
    /255 -> Normalize(OpenAI CLIP mean, std) -> CLIP ViT-L/14@336 (openai/clip-vit-large-patch14-336,
    pinned in harness/assets.py; transformers' CLIPVisionModelWithProjection) -> `image_embeds` (the
    768-d projection) -> divided by its L2 norm.

Distance: the squared MMD with the Gaussian RBF kernel k(x, y) = exp(-||x - y||² / (2σ²)), σ = 10,
scaled by 1000 (the paper's σ and scale), by the unbiased estimator (Gretton et al. 2012, JMLR, Lemma 6):

    MMD²_u = Σ_{i≠j} k(x_i, x_j) / (m(m-1)) + Σ_{i≠j} k(y_i, y_j) / (n(n-1)) − 2 Σ_{i,j} k(x_i, y_j) / (mn)

Its expectation is 0 when both sets come from one distribution (so a value may be slightly negative).
The reference code's distance.py averages over all pairs, diagonal included (the V-statistic), which
adds 1000 · ((1 − mean k_xx)/m + (1 − mean k_yy)/n) ≥ 0; with unit embeddings and σ = 10 every k is in
[exp(−0.02), 1], so that bias is below 20/m + 20/n (0.02 at 1,000 samples against a large reference).

The reference set's own term depends on the reference alone: it is computed once and cached beside
the reference statistics (harness/evaluation/features.py), as those are cached per dataset.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from harness.evaluation.features import Extractor, metric_network

METRIC = "cmmd"
NAME = "clip"
SIZE = 336
SIGMA = 10.0
SCALE = 1000.0
BLOCK = 4096  # rows per kernel block: 4096 x 50,000 float32 is 0.8 GB at most


def reference_resize(image: np.ndarray) -> np.ndarray:
    """The reference code's resize: uint8 HWC -> PIL bicubic to 336 x 336 -> float32 HWC 0..255."""
    from PIL import Image

    resized = Image.fromarray(image).convert("RGB").resize((SIZE, SIZE), Image.BICUBIC)
    return np.asarray(resized, dtype=np.float32)


def clip_extractor(assets, device, identify: bool = True) -> Extractor:
    """The CMMD embedding network from the assets folder (a UserError naming the folder when absent);
    its features are the L2-normalised 768-d image embeddings."""
    from transformers import CLIPVisionModelWithProjection
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    model, digest = metric_network(METRIC, CLIPVisionModelWithProjection, assets, device, identify)
    mean = torch.tensor(OPENAI_CLIP_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD, device=device).view(1, 3, 1, 1)

    def features(batch: torch.Tensor) -> torch.Tensor:  # float [B, 3, 336, 336] 0..255 -> [B, 768], unit norm
        pixels = (batch / 255.0 - mean) / std
        embeds = model(pixel_values=pixels.to(model.dtype)).image_embeds.float()
        return embeds / torch.linalg.norm(embeds, dim=-1, keepdim=True)

    return Extractor(NAME, f"{NAME}-{digest}", features, reference_resize, torch.device(device), module=model,
                     float_resize=True)


def _kernel_sum(x: torch.Tensor, y: torch.Tensor, exclude_diagonal: bool) -> float:
    """Σ k(x_i, y_j) in blocks (float32 kernels, float64 sums), without i = j when x is y."""
    gamma = 1.0 / (2.0 * SIGMA ** 2)
    y_sq = (y * y).sum(1)
    total = 0.0
    for start in range(0, len(x), BLOCK):
        xb = x[start:start + BLOCK]
        d2 = ((xb * xb).sum(1)[:, None] + y_sq[None, :] - 2.0 * xb @ y.T).clamp_min_(0)
        k = torch.exp(-gamma * d2)
        total += float(k.sum(dtype=torch.float64))
        if exclude_diagonal:
            total -= float(torch.diagonal(k, offset=start).sum(dtype=torch.float64))
    return total


def self_term(feats: np.ndarray) -> float:
    """Σ_{i≠j} k(x_i, x_j) / (m(m-1)): a set's own term of MMD²_u."""
    m = len(feats)
    if m < 2:
        raise ValueError("CMMD needs at least 2 embeddings per set")
    x = torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32))
    return _kernel_sum(x, x, exclude_diagonal=True) / (m * (m - 1))


def cmmd(feats: np.ndarray, ref_feats: np.ndarray, ref_self: float | None = None) -> float:
    """1000 · MMD²_u between two sets of embeddings (rows); `ref_self`: the reference's cached self_term."""
    if len(feats) < 2 or len(ref_feats) < 2:
        raise ValueError("CMMD needs at least 2 embeddings per set")
    x = torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32))
    y = torch.from_numpy(np.ascontiguousarray(ref_feats, dtype=np.float32))
    k_yy = self_term(ref_feats) if ref_self is None else ref_self
    k_xy = _kernel_sum(x, y, exclude_diagonal=False) / (len(x) * len(y))
    return SCALE * (self_term(feats) + k_yy - 2.0 * k_xy)


def cached_self_term(reference: dict) -> float:
    """The reference set's self_term, read from (or written once beside) its statistics file."""
    from harness.assets import file_lock
    from harness.files import atomic_write_text

    path = Path(reference["path"])
    cache = path.with_name(f"{path.stem}_cmmd_sigma{SIGMA:g}.json")
    if not cache.is_file():
        with file_lock(cache.with_name(cache.name + ".lock")):
            if not cache.is_file():
                atomic_write_text(cache, json.dumps({"self_term": self_term(reference["feats"]),
                                                     "count": len(reference["feats"])}))
    return float(json.loads(cache.read_text())["self_term"])
