"""What the denoiser is conditioned on, and how a loader batch becomes the model's keyword inputs.

Three routes, chosen by the study's `data.conditioning` and `data.text_encoder`:

    class labels (DiT)          cond = {"y": labels}; label dropout and the null class live in DiT.
    captions, builtin encoder   a small trainable WordEncoder (models/text.py) wrapped together with
                                the MM-DiT in `CaptionDenoiser`, so DeepSpeed trains both; cond =
                                {"txt_ids", "txt_mask"}; caption dropout and the guidance input are
                                the *empty caption*, so training and sampling agree.
    captions, frozen encoder    clip:/t5:/sd3: specs are run here, outside the trained module (no
                                gradients, never partitioned); cond = {"context", "pooled",
                                "context_mask"}; dropout and guidance use MM-DiT's zero condition.
    captions, precomputed       embeddings packed in the shards by `ditscale data pack --text-encoder`.

`Conditioner.from_batch(batch)` serves training and validation; `from_labels` / `from_captions`
serve sampling (evaluation picks the labels or captions to generate).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from harness.config import TrialConfig
from harness.data.codec import decode_txt
from harness.data.shards import expand_shards, open_shard
from harness.data.tario import iter_samples
from harness.data.text_embeddings import load_encoder
from harness.errors import UserError
from harness.study import BUILTIN_TEXT, TextGeometry
from harness.study import text_geometry as study_text_geometry
from models.text import WordEncoder

_VOCAB_SCAN_LIMIT = 200_000  # captions read to build the builtin encoder's vocabulary


class CaptionDenoiser(nn.Module):
    """A trainable WordEncoder in front of an MM-DiT: forward(x, t, txt_ids, txt_mask)."""

    def __init__(self, backbone: nn.Module, encoder: nn.Module, caption_dropout: float):
        super().__init__()
        self.backbone = backbone
        self.encoder = encoder
        self.caption_dropout = caption_dropout
        self.backbone.class_dropout_prob = 0.0  # dropout happens here, to the empty caption

    def forward(self, x, t, txt_ids, txt_mask):
        if self.training and self.caption_dropout > 0:
            drop = torch.rand(txt_ids.shape[0], device=txt_ids.device) < self.caption_dropout
            empty_ids, empty_mask = self._empty_like(txt_ids)
            txt_ids = torch.where(drop[:, None], empty_ids, txt_ids)
            txt_mask = torch.where(drop[:, None], empty_mask, txt_mask)
        emb = self.encoder(txt_ids, txt_mask)
        return self.backbone(x, t, context=emb.tokens.to(x.dtype), pooled=emb.pooled.to(x.dtype),
                             context_mask=emb.mask)

    def _empty_like(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        empty = torch.zeros_like(ids)
        empty[:, 0] = self.encoder.index[self.encoder.CLS]
        return empty, empty != 0

    def null_condition(self, cond: dict) -> dict:
        ids, mask = self._empty_like(cond["txt_ids"])
        return {"txt_ids": ids, "txt_mask": mask}


class Conditioner:
    """Batch -> the denoiser's keyword arguments, on `device`."""

    def __init__(self, trial: TrialConfig, device: torch.device, text_encoder=None, word_encoder=None):
        self.kind = trial.data.conditioning
        self.text_route = trial.data.text_encoder if self.kind == "text" else None
        self.device = device
        self.text_encoder = text_encoder  # frozen encoder (clip:/t5:/sd3:), else None
        self.word_encoder = word_encoder  # builtin route: tokenizes only; the module itself is trained

    def from_batch(self, batch: dict) -> dict:
        if self.kind == "class":
            return {"y": batch["cls"].to(self.device, non_blocking=True)}
        if self.text_route == "precomputed":
            return {"context": batch["txt_tokens"].to(self.device, non_blocking=True),
                    "pooled": batch["txt_pooled"].to(self.device, non_blocking=True),
                    "context_mask": batch["txt_mask"].to(self.device, non_blocking=True)}
        return self.from_captions(list(batch["txt"]))

    def from_labels(self, labels: torch.Tensor) -> dict:
        if self.kind != "class":
            raise ValueError("this trial is caption-conditioned; use from_captions")
        return {"y": labels.to(self.device)}

    def from_captions(self, captions: list[str]) -> dict:
        if self.kind != "text":
            raise ValueError("this trial is class-conditioned; use from_labels")
        if self.word_encoder is not None:
            ids, mask = self.word_encoder.tokenize(captions)
            return {"txt_ids": ids.to(self.device), "txt_mask": mask.to(self.device)}
        if self.text_encoder is None:
            raise ValueError("precomputed text embeddings: captions cannot be encoded without the packing "
                             "encoder; sample with captions from the validation shards' embeddings")
        with torch.no_grad():
            return self.text_encoder.encode(captions).to(self.device, torch.float32).as_cond()


# --- building ------------------------------------------------------------------------------------


def caption_vocabulary(trial: TrialConfig) -> list[str]:
    """Captions of the training shards (up to a limit), read in a fixed order: every rank builds the
    same builtin-encoder vocabulary without talking to the others. Only the tar members are read;
    no image is decoded. Damaged samples are passed over (the loader counts them)."""
    captions: list[str] = []
    for url in expand_shards(trial.data.shards):
        with open_shard(url) as stream:
            for sample in iter_samples(stream):
                if "txt" in sample and "__error__" not in sample:
                    captions.append(decode_txt(sample["txt"]))
                if len(captions) >= _VOCAB_SCAN_LIMIT:
                    return captions
    if not captions:
        raise UserError(f"data.shards: no captions found in {trial.data.shards} (conditioning is text)")
    return captions


def build_word_encoder(trial: TrialConfig):
    return WordEncoder.from_captions(caption_vocabulary(trial), **BUILTIN_TEXT)


def load_frozen_encoder(trial: TrialConfig, device: torch.device):
    return load_encoder(trial.data.text_encoder, device=device, field="data.text_encoder",
                        assets=trial.resources.assets)


def text_geometry(trial: TrialConfig, manifest: dict, frozen_encoder=None) -> TextGeometry:
    """Token count and widths of the text the MM-DiT reads (for building it and counting FLOPs): a loaded
    frozen encoder's, probed; else what the study and dataset.json say (harness.study.text_geometry)."""
    if frozen_encoder is None:
        return study_text_geometry(trial, manifest)
    probe = frozen_encoder.encode(["a"])
    return TextGeometry(probe.tokens.shape[1], probe.tokens.shape[2], probe.pooled.shape[1])
