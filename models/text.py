"""Text conditioning front-ends for MM-DiT: captions -> token embeddings, a pooled vector, a padding mask.

Every encoder has `encode(captions: list[str]) -> TextEmbeddings` and the attributes `token_dim`,
`pooled_dim` and `max_length` (tokens per caption, padding included: every caption yields exactly
`max_length` tokens, so batches stack and shapes stay static).

* Frozen Hugging Face encoders, by local path or hub name, through `load_text_encoder(spec)`:
    "clip:PATH"          CLIP text model. Tokens: the penultimate hidden layer (the SDXL/SD3 choice;
                         `clip_layer=-1` gives the final, layer-normed states). Pooled: the projected
                         EOS state (`text_embeds`) for CLIPTextModelWithProjection / full CLIPModel
                         checkpoints, else the EOS state (`pooler_output`). 77 tokens by default.
    "t5:PATH"            T5 encoder. Tokens: last hidden state, computed with the attention mask so
                         real tokens never see padding. Pooled: masked mean of the token states.
                         77 tokens by default (the SD3 paper's; diffusers' SD3 pipeline uses up to 256).
    "sd3:CLIP_L,CLIP_G,T5"  SD3's combination: CLIP-L and CLIP-G token states joined on channels,
                         zero-padded to T5's width, then joined with the T5 tokens on the sequence
                         (77 + 77 = 154 tokens x 4096 for the real encoders); pooled = CLIP-L pooled ++
                         CLIP-G pooled (768 + 1280 = 2048). "sd3:ROOT" reads a diffusers SD3 pipeline
                         folder (or hub name) with text_encoder{,_2,_3} and tokenizer{,_2,_3} subfolders.
                         (SD3 itself feeds the transformer no mask; pass context_mask=None to mimic it.)
  transformers is imported only here, lazily, inside the loaders; its own environment variables
  (HF_HUB_OFFLINE, HF_HOME, ...) govern whether a hub name may be fetched. A local folder holds the
  model and its tokenizer (or a `tokenizer/` subfolder).
* A built-in trainable word-level encoder for offline studies: `WordEncoder.from_captions(captions,
  dim=..., max_length=...)` builds the vocabulary from the training captions; it is an nn.Module
  (embedding + learned positions + a couple of pre-norm transformer layers), trained with the
  diffusion model. Its vocabulary travels in its state_dict (extra state); `save`/`load` (or the spec
  "word:PATH") keep it in one file.

The mask is [B, N] bool with True for real tokens (special tokens such as BOS/EOS count as real).
`TextEmbeddings.as_cond()` gives the keyword arguments of `MMDiT.forward`.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn


@dataclass
class TextEmbeddings:
    """tokens [B, N, D]; pooled [B, P]; mask [B, N] bool (True = real token)."""

    tokens: torch.Tensor
    pooled: torch.Tensor
    mask: torch.Tensor

    def to(self, *args, **kwargs) -> "TextEmbeddings":
        """Like Tensor.to for tokens and pooled; the mask only changes device (it stays bool)."""
        tokens = self.tokens.to(*args, **kwargs)
        return TextEmbeddings(tokens, self.pooled.to(*args, **kwargs), self.mask.to(tokens.device))

    def as_cond(self) -> dict:
        """{"context", "pooled", "context_mask"}: the conditioning keywords of MMDiT.forward."""
        return {"context": self.tokens, "pooled": self.pooled, "context_mask": self.mask}

    def __len__(self) -> int:
        return self.tokens.shape[0]


def masked_mean(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of [B, N, D] states over the real tokens of a [B, N] mask (all tokens where none is real)."""
    m = mask.to(states.dtype).unsqueeze(-1)
    count = m.sum(dim=1)
    mean = (states * m).sum(dim=1) / count.clamp(min=1)
    return torch.where(count > 0, mean, states.mean(dim=1))


# ---------------------------------------------------------------------------------------------
# Frozen Hugging Face encoders


def _is_local(path: str) -> bool:
    return os.path.isdir(os.path.expanduser(path))


def _tokenizer_location(path: str, subfolder: str | None) -> tuple[str, str | None]:
    """Tokenizer files next to the model, or in a `tokenizer/` subfolder of a local folder."""
    if subfolder is None and _is_local(path):
        local = Path(path).expanduser()
        if not any((local / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json",
                                                   "spiece.model")) and (local / "tokenizer").is_dir():
            return str(local), "tokenizer"
    return path, subfolder


class HFTextEncoder:
    """Shared machinery of the frozen encoders: tokenizer, model in eval mode without gradients."""

    token_dim: int
    pooled_dim: int
    max_length: int

    def __init__(self, tokenizer, model, max_length: int, device, dtype):
        self.tokenizer = tokenizer
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.max_length = max_length
        self.device = torch.device(device)
        self.dtype = dtype

    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(captions, str):
            raise TypeError("encode() takes a list of captions, not a single string")
        batch = self.tokenizer(list(captions), padding="max_length", truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        return batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device).bool()

    def encode(self, captions: list[str]) -> TextEmbeddings:
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({type(self.model).__name__}, token_dim={self.token_dim}, "
                f"pooled_dim={self.pooled_dim}, max_length={self.max_length})")


class CLIPEncoder(HFTextEncoder):
    """CLIP text tower. tokens = hidden layer `clip_layer` (-2: penultimate, as SDXL/SD3), pooled =
    projected EOS state when the checkpoint has a text projection, else the EOS state."""

    def __init__(self, path: str, device="cpu", dtype=torch.float32, max_length: int | None = None,
                 clip_layer: int = -2, subfolder: str | None = None, tokenizer_subfolder: str | None = None):
        from transformers import AutoConfig, AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

        sub = {"subfolder": subfolder} if subfolder else {}
        config = AutoConfig.from_pretrained(path, **sub)
        if getattr(config, "text_config", None) is not None:  # a full CLIPModel checkpoint: its text tower
            text_config = config.text_config
            text_config.projection_dim = config.projection_dim
            with_projection = True
            model = CLIPTextModelWithProjection.from_pretrained(path, config=text_config, dtype=dtype, **sub)
        else:
            archs = getattr(config, "architectures", None) or []
            with_projection = "CLIPTextModelWithProjection" in archs
            cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
            model = cls.from_pretrained(path, dtype=dtype, **sub)
        tok_path, tok_sub = _tokenizer_location(path, tokenizer_subfolder)
        tokenizer = AutoTokenizer.from_pretrained(tok_path, **({"subfolder": tok_sub} if tok_sub else {}))
        text_config = model.config
        super().__init__(tokenizer, model, max_length or text_config.max_position_embeddings, device, dtype)
        self.with_projection = with_projection
        self.clip_layer = clip_layer
        self.token_dim = text_config.hidden_size
        self.pooled_dim = text_config.projection_dim if with_projection else text_config.hidden_size

    @torch.no_grad()
    def encode(self, captions: list[str]) -> TextEmbeddings:
        ids, mask = self.tokenize(captions)
        out = self.model(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True)
        if self.clip_layer == -1:
            tokens = out.last_hidden_state
        else:
            tokens = out.hidden_states[self.clip_layer]
        pooled = out.text_embeds if self.with_projection else out.pooler_output
        return TextEmbeddings(tokens, pooled, mask)


class T5Encoder(HFTextEncoder):
    """T5 encoder. tokens = last hidden state (attention-masked), pooled = masked mean of the tokens."""

    def __init__(self, path: str, device="cpu", dtype=torch.float32, max_length: int | None = None,
                 subfolder: str | None = None, tokenizer_subfolder: str | None = None):
        from transformers import AutoTokenizer, T5EncoderModel

        sub = {"subfolder": subfolder} if subfolder else {}
        model = T5EncoderModel.from_pretrained(path, dtype=dtype, **sub)
        tok_path, tok_sub = _tokenizer_location(path, tokenizer_subfolder)
        tokenizer = AutoTokenizer.from_pretrained(tok_path, **({"subfolder": tok_sub} if tok_sub else {}))
        super().__init__(tokenizer, model, max_length or 77, device, dtype)
        self.token_dim = model.config.d_model
        self.pooled_dim = model.config.d_model

    @torch.no_grad()
    def encode(self, captions: list[str]) -> TextEmbeddings:
        ids, mask = self.tokenize(captions)
        tokens = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        return TextEmbeddings(tokens, masked_mean(tokens, mask), mask)


class SD3TextEncoder:
    """SD3's three encoders combined: [CLIP-L ++ CLIP-G on channels, zero-padded] ++ T5 on the sequence."""

    def __init__(self, clip_l: CLIPEncoder, clip_g: CLIPEncoder, t5: T5Encoder):
        if clip_l.max_length != clip_g.max_length:
            raise ValueError(f"CLIP-L and CLIP-G must share a token length, got {clip_l.max_length} "
                             f"and {clip_g.max_length}")
        self.clip_l, self.clip_g, self.t5 = clip_l, clip_g, t5
        clip_width = clip_l.token_dim + clip_g.token_dim
        self.token_dim = max(clip_width, t5.token_dim)
        self.pooled_dim = clip_l.pooled_dim + clip_g.pooled_dim
        self.max_length = clip_l.max_length + t5.max_length
        self.device, self.dtype = t5.device, t5.dtype

    @staticmethod
    def _pad(x: torch.Tensor, width: int) -> torch.Tensor:
        return torch.nn.functional.pad(x, (0, width - x.shape[-1]))

    @torch.no_grad()
    def encode(self, captions: list[str]) -> TextEmbeddings:
        el, eg, et = (enc.encode(captions) for enc in (self.clip_l, self.clip_g, self.t5))
        clip = torch.cat([el.tokens, eg.tokens.to(el.tokens)], dim=-1)
        tokens = torch.cat([self._pad(clip, self.token_dim), self._pad(et.tokens.to(clip), self.token_dim)], dim=1)
        pooled = torch.cat([el.pooled, eg.pooled.to(el.pooled)], dim=-1)
        mask = torch.cat([el.mask | eg.mask, et.mask], dim=1)
        return TextEmbeddings(tokens, pooled, mask)

    def __repr__(self) -> str:
        return (f"SD3TextEncoder(token_dim={self.token_dim}, pooled_dim={self.pooled_dim}, "
                f"max_length={self.max_length})")


# ---------------------------------------------------------------------------------------------
# Built-in trainable encoder

_WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


class WordEncoder(nn.Module):
    """A small trainable text encoder over a word vocabulary built from the training captions.

    Captions are lower-cased and split into words and punctuation; unknown words map to <unk>.
    Every caption starts with a <cls> token (so no caption is empty), is cut to `max_length`
    tokens and padded with <pad>. Embedding + learned positions -> `layers` pre-norm transformer
    layers (key-padding masked) -> LayerNorm. tokens: [B, max_length, dim] (zero at padding);
    pooled: masked mean of the tokens [B, dim]; mask: [B, max_length].
    """

    PAD, UNK, CLS = "<pad>", "<unk>", "<cls>"
    SPECIALS = (PAD, UNK, CLS)

    def __init__(self, vocab: list[str], dim: int = 256, max_length: int = 32, layers: int = 2,
                 heads: int | None = None):
        super().__init__()
        if list(vocab[:3]) != list(self.SPECIALS):
            raise ValueError(f"the vocabulary must start with {self.SPECIALS}")
        heads = heads or max(1, dim // 64)
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by {heads} heads")
        self.vocab = list(vocab)
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.token_dim = self.pooled_dim = dim
        self.max_length = max_length
        self.config = {"dim": dim, "max_length": max_length, "layers": layers, "heads": heads}
        self.embed = nn.Embedding(len(self.vocab), dim, padding_idx=0)
        # Learned positions as a module (not a bare Parameter): DeepSpeed ZeRO-3 gathers partitioned
        # weights around module calls, and a bare parameter of this module would not be re-gathered
        # for the backward pass (the module returns a dataclass, which its hooks cannot see into).
        self.pos = nn.Embedding(max_length, dim)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, activation="gelu", batch_first=True,
                                       norm_first=True)
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(dim)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)
        with torch.no_grad():
            self.embed.weight[0].zero_()

    # -- vocabulary
    @staticmethod
    def words(caption: str) -> list[str]:
        return _WORD.findall(caption.lower())

    @classmethod
    def from_captions(cls, captions, dim: int = 256, max_length: int = 32, min_count: int = 1,
                      max_vocab: int | None = None, layers: int = 2, heads: int | None = None) -> "WordEncoder":
        """Vocabulary = words seen at least `min_count` times (most frequent first, at most
        `max_vocab` including the 3 special tokens)."""
        counts = Counter(w for c in captions for w in cls.words(c))
        words = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
        if max_vocab is not None:
            words = words[: max(0, max_vocab - len(cls.SPECIALS))]
        return cls([*cls.SPECIALS, *words], dim=dim, max_length=max_length, layers=layers, heads=heads)

    def get_extra_state(self) -> dict:
        return {"vocab": self.vocab, "config": self.config}

    def set_extra_state(self, state: dict) -> None:
        if state["vocab"] != self.vocab:
            raise ValueError("the checkpoint's WordEncoder vocabulary differs from this one; "
                             "build the encoder with WordEncoder.load or from the same captions")

    # -- encoding
    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [B, max_length] long and mask [B, max_length] bool on the module's device."""
        if isinstance(captions, str):
            raise TypeError("tokenize() takes a list of captions, not a single string")
        unk, cls_id = self.index[self.UNK], self.index[self.CLS]
        ids = torch.zeros(len(captions), self.max_length, dtype=torch.long)
        for row, caption in enumerate(captions):
            seq = [cls_id] + [self.index.get(w, unk) for w in self.words(caption)]
            seq = seq[: self.max_length]
            ids[row, : len(seq)] = torch.tensor(seq)
        device = self.embed.weight.device
        ids = ids.to(device)
        return ids, ids != 0

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> TextEmbeddings:
        h = self.embed(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        pad = ~mask
        for layer in self.layers:
            h = layer(h, src_key_padding_mask=pad)
        h = self.norm(h) * mask.unsqueeze(-1).to(h.dtype)
        return TextEmbeddings(h, masked_mean(h, mask), mask)

    def encode(self, captions: list[str]) -> TextEmbeddings:
        return self(*self.tokenize(captions))

    # -- persistence
    def save(self, path: str | os.PathLike) -> None:
        torch.save({"vocab": self.vocab, "config": self.config, "state_dict": self.state_dict()}, path)

    @classmethod
    def load(cls, path: str | os.PathLike, map_location="cpu") -> "WordEncoder":
        blob = torch.load(path, map_location=map_location, weights_only=True)
        enc = cls(blob["vocab"], **blob["config"])
        enc.load_state_dict(blob["state_dict"])
        return enc


# ---------------------------------------------------------------------------------------------


def load_text_encoder(spec: str, device="cpu", dtype=torch.float32, max_length: int | None = None, **options):
    """"clip:PATH", "t5:PATH", "sd3:CLIP_L,CLIP_G,T5" (or "sd3:PIPELINE_ROOT"), or "word:FILE" (a
    saved WordEncoder) -> an encoder with encode(captions) -> TextEmbeddings. PATH is a local folder or
    a hub name. `max_length` overrides the token length (for sd3: the T5 part; CLIP stays at 77).
    `options`: clip_layer for CLIP encoders."""
    kind, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise ValueError(f"text encoder spec {spec!r}: expected clip:PATH, t5:PATH, sd3:CLIP_L,CLIP_G,T5 or word:FILE")
    kind = kind.strip().lower()
    if kind == "clip":
        return CLIPEncoder(rest, device, dtype, max_length=max_length, **options)
    if kind == "t5":
        return T5Encoder(rest, device, dtype, max_length=max_length)
    if kind == "sd3":
        parts = [p.strip() for p in rest.split(",")]
        if len(parts) == 3:
            clip_l = CLIPEncoder(parts[0], device, dtype, **options)
            clip_g = CLIPEncoder(parts[1], device, dtype, **options)
            t5 = T5Encoder(parts[2], device, dtype, max_length=max_length)
        elif len(parts) == 1:  # a diffusers SD3 pipeline folder or hub name
            root = parts[0]
            clip_l = CLIPEncoder(root, device, dtype, subfolder="text_encoder", tokenizer_subfolder="tokenizer",
                                 **options)
            clip_g = CLIPEncoder(root, device, dtype, subfolder="text_encoder_2",
                                 tokenizer_subfolder="tokenizer_2", **options)
            t5 = T5Encoder(root, device, dtype, max_length=max_length, subfolder="text_encoder_3",
                           tokenizer_subfolder="tokenizer_3")
        else:
            raise ValueError(f"text encoder spec {spec!r}: sd3 takes three comma-separated paths "
                             "(CLIP-L, CLIP-G, T5) or one SD3 pipeline folder")
        return SD3TextEncoder(clip_l, clip_g, t5)
    if kind == "word":
        return WordEncoder.load(rest, map_location=device).to(device=device, dtype=dtype)
    raise ValueError(f"text encoder spec {spec!r}: unknown kind {kind!r} (clip, t5, sd3, word)")
