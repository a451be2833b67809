"""FD_DINOv2: the Fréchet distance in DINOv2 ViT-L/14 features (eval.metrics: fd_dinov2).

Stein et al. 2023, "Exposing flaws of generative model evaluation metrics and their unfair treatment
of diffusion models" (NeurIPS, arXiv 2306.04675) found Inception features under-rate diffusion models
and recommend this distance; EDM2 (Karras et al. 2024) reports it beside FID. The features and the
preprocessing are those of their reference code, layer6ai-labs/dgm-eval (dgm_eval/models/dinov2.py,
DINOv2Encoder with its default clean_resize=False):

    uint8 RGB image -> PIL -> torchvision Resize((224, 224), BICUBIC) on the PIL image (PIL's bicubic,
    antialiased, rounded back to uint8) -> ToTensor (/255) -> Normalize(ImageNet mean (0.485, 0.456,
    0.406), std (0.229, 0.224, 0.225)) -> ViT-L/14 -> the CLS token after the final LayerNorm (1024-d).

dgm-eval loads the network from torch.hub (facebookresearch/dinov2, dinov2_vitl14); here it is the same
weights as published on the Hugging Face hub (facebook/dinov2-large, pinned in harness/assets.py), loaded
by transformers' Dinov2Model, whose `pooler_output` is that CLS token. One known difference: at 224 px
the 37 x 37 position embeddings are resampled to 16 x 16; transformers resizes them by target size, the
torch.hub model by a scale factor with a 0.1 offset, so the two positional grids differ slightly.

The distance, its reference statistics (cached per dataset, keyed by the weights' sha256) and its spread
over half-samples (se_fd_dinov2_cfg<s>) are the FID's own: harness/evaluation/features.py. With 1024
features, the spread needs more than 2048 samples (a half must outnumber the features) and is NaN below.
"""

from __future__ import annotations

import numpy as np
import torch

from harness.evaluation.features import Extractor, metric_network

METRIC = "fd_dinov2"
NAME = "dinov2"  # Extractor.metric("fd") -> fd_dinov2; identity dinov2@<sha256 of the weights>
SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def dgm_eval_resize(image: np.ndarray) -> np.ndarray:
    """dgm-eval's resize: uint8 HWC -> PIL bicubic to 224 x 224 -> float32 HWC 0..255 (uint8 values)."""
    from PIL import Image

    resized = Image.fromarray(image).convert("RGB").resize((SIZE, SIZE), Image.BICUBIC)
    return np.asarray(resized, dtype=np.float32)


def dinov2_extractor(assets, device, identify: bool = True) -> Extractor:
    """The FD_DINOv2 feature network from the assets folder (a UserError naming the folder when absent)."""
    from transformers import Dinov2Model

    model, digest = metric_network(METRIC, Dinov2Model, assets, device, identify)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)

    def features(batch: torch.Tensor) -> torch.Tensor:  # float [B, 3, 224, 224] 0..255 -> [B, 1024]
        pixels = (batch / 255.0 - mean) / std
        return model(pixel_values=pixels.to(model.dtype)).pooler_output

    return Extractor(NAME, f"{NAME}-{digest}", features, dgm_eval_resize, torch.device(device), module=model,
                     float_resize=True)
