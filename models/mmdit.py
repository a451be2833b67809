"""MM-DiT: the two-stream transformer of Stable Diffusion 3 (Esser et al., 2024), and a decoupled variant.

Image tokens (patches of the noisy latent) and text tokens (a text encoder's token states) each have
their own weights -- adaLN modulation, QKV, output projection, MLP -- and meet in attention:

* ``attention="joint"`` (SD3): each stream computes Q/K/V with its own fused projection, the
  streams' Q/K/V are concatenated along the sequence, one scaled-dot-product attention runs over
  the union, and the result is split back per stream. Optional RMS QK-norm per stream
  (``qk_norm="rms_norm"``, as in SD3.5). The last block's text stream is "pre-only": its
  attention output is discarded, so it has no output projection and no MLP, and its adaLN
  yields only (shift, scale); it keeps SD3's fused QKV weights (so SD3 checkpoints and parameter
  counts carry over), but only its K/V rows are computed and only image tokens query in that
  block's attention -- the discarded text rows are never evaluated (same output, less work).
* ``attention="split"`` (the decoupled block of the seed document, section 2.3): three sub-layers
  per block, each with its own adaLN shift/scale/gate per stream (9 modulation vectors per
  stream):

      X_I += a_I1 * SelfAttn_I(AdaLN(X_I; g_I1, b_I1))        X_T += a_T1 * SelfAttn_T(AdaLN(X_T; g_T1, b_T1))
      H_I = AdaLN(X_I; g_I2, b_I2)                            H_T = AdaLN(X_T; g_T2, b_T2)
      X_I += a_I2 * CrossAttn(Q=H_I, K=V=H_T)                 X_T += a_T2 * CrossAttn(Q=H_T, K=V=H_I)
      X_I += a_I3 * FFN_I(AdaLN(X_I; g_I3, b_I3))             X_T += a_T3 * FFN_T(AdaLN(X_T; g_T3, b_T3))

  Both cross-attentions read the state after the self-attention sub-layer; each stream projects
  its own modulated tokens H with its own fused QKV (modality-specific weights, as in MM-DiT), so
  image queries meet text keys/values projected by the text stream and vice versa. In the last
  block only what reaches the image output is built: the text stream keeps its self-attention
  (it feeds the image stream's cross-attention) and a K/V-only cross projection, the image
  stream's cross-attention projects queries only. No parameter is ever unused (DDP/ZeRO-safe).

Conditioning vector y = TimestepEmbedder(t) + MLP(pooled text embedding) (diffusers'
CombinedTimestepTextProjEmbeddings); context tokens = Linear(text width -> hidden). Position
embedding: fixed 2-D sin-cos; with ``pos_embed_max_size`` M the table covers an M x M patch grid
(coordinates scaled by base_size = input height / patch, as SD3) and the centre crop matching the
input is used, so one model serves several resolutions and aspect ratios. Output: adaLN final
layer and linear on the image stream only, then unpatchify.

State-dict layout follows Stability AI's reference MM-DiT (``x_embedder``, ``pos_embed``,
``t_embedder``, ``y_embedder``, ``context_embedder``, ``{x,context}_block.{adaLN_modulation.1,
attn.qkv, attn.proj, attn.ln_q, attn.ln_k, mlp.fc1, mlp.fc2}``, ``final_layer``) with ``blocks``
for SAI's ``joint_blocks``. adaLN chunk order is DiT's: (shift, scale[, gate] ...) everywhere.
``MMDiT.from_diffusers`` converts a diffusers ``SD3Transformer2DModel``.

Text padding: ``context_mask`` [B, N] (True = real token) becomes an SDPA key mask, so no query
ever attends to a padded text key; padded text tokens therefore never change the image stream.
A sample whose mask has no real token at all falls back to attending to all its text tokens
(otherwise the softmax over text-only keys in the split variant would be empty).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import (FinalLayer, Mlp, PatchEmbed, PooledEmbedder, TimestepEmbedder, gated, get_2d_sincos_pos_embed,
                     init_adaln_zero, modulate, modulated_norm, patch_grid, run_block, unpatchify)

ATTENTION_VARIANTS = ("joint", "split")
QK_NORMS = (None, "rms_norm")
QK_NORM_EPS = 1e-6  # SD3.5's (diffusers' RMSNorm eps for norm_q/norm_k)


class StreamAttention(nn.Module):
    """One stream's share of an attention sub-layer: a fused projection to Q/K/V (`qkv`), or to K/V
    only (`kv`) or Q only (`q`) where the stream only gives keys or only asks queries; optional RMS
    QK-norm per head; the output projection, absent when the stream's attention output is unused.
    `project(x, with_q=False)` uses only the K/V rows of a fused `qkv` (SD3's last text stream keeps
    its Q weights in the layout but its queries would be discarded)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: str | None = None, proj: bool = True,
                 outputs: str = "qkv", q_norm: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
        if qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm must be one of {QK_NORMS}, got {qk_norm!r}")
        if outputs not in ("qkv", "kv", "q"):
            raise ValueError(f"outputs must be qkv, kv or q, got {outputs!r}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale: float | None = None  # logits scale; None: SDPA's 1/sqrt(head_dim) (muP sets it, models/mup.py)
        self.outputs = outputs
        setattr(self, outputs, nn.Linear(dim, len(outputs) * dim))
        rms = qk_norm == "rms_norm"
        self.ln_q = nn.RMSNorm(self.head_dim, eps=QK_NORM_EPS) if rms and "q" in outputs and q_norm else None
        self.ln_k = nn.RMSNorm(self.head_dim, eps=QK_NORM_EPS) if rms and "k" in outputs else None
        self.proj = nn.Linear(dim, dim) if proj else None

    def project(self, x: torch.Tensor, with_q: bool = True) -> torch.Tensor:
        """Packed projection [B, N, len(outputs) * D], in the order q, k, v."""
        layer = getattr(self, self.outputs)
        if with_q or self.outputs != "qkv":
            return layer(x)
        d = self.dim
        return F.linear(x, layer.weight[d:], layer.bias[d:])

    def split_heads(self, packed: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """Packed [B, N, n * D] -> (q, k, v) as [B, N, H, Dh] views, None where not projected; QK-normed."""
        B, N, width = packed.shape
        n = width // self.dim
        parts = packed.view(B, N, n, self.num_heads, self.head_dim).unbind(2)
        q, k, v = {3: parts, 2: (None, *parts), 1: (parts[0], None, None)}[n]
        if self.ln_q is not None and q is not None:
            q = self.ln_q(q)
        if self.ln_k is not None and k is not None:
            k = self.ln_k(k)
        return q, k, v

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return self.split_heads(self.project(x))


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
          scale: float | None = None) -> torch.Tensor:
    """Attention over [B, N, H, Dh] tensors; returns [B, Nq, H*Dh]."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                         scale=scale)
    B, _, Nq, _ = out.shape
    return out.transpose(1, 2).reshape(B, Nq, -1)


class JointStream(nn.Module):
    """One stream of an SD3 joint block (SAI's "DismantledBlock"). A pre-only stream (the last
    block's text) keeps SD3's fused QKV weights but has no output projection, MLP or Q-norm, and
    its adaLN yields (shift, scale) only."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qk_norm: str | None, pre_only: bool):
        super().__init__()
        self.pre_only = pre_only
        self.norm1 = modulated_norm(dim)
        self.attn = StreamAttention(dim, num_heads, qk_norm, proj=not pre_only, q_norm=not pre_only)
        if not pre_only:
            self.norm2 = modulated_norm(dim)
            self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, (2 if pre_only else 6) * dim))

    def pre_attention(self, x: torch.Tensor, y: torch.Tensor):
        """Modulation chunks and the packed Q/K/V projection ([B, N, 3D]; K/V only when pre-only)."""
        mod = self.adaLN_modulation(y).chunk(2 if self.pre_only else 6, dim=1)
        return self.attn.project(modulate(self.norm1(x), mod[0], mod[1]), with_q=not self.pre_only), mod

    def post_attention(self, x: torch.Tensor, attn: torch.Tensor, mod) -> torch.Tensor:
        _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
        x = gated(x, gate_msa, self.attn.proj(attn))
        return gated(x, gate_mlp, self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))


class JointBlock(nn.Module):
    """SD3 MM-DiT block: per-stream modulation and projections, one attention over [image; text].
    In the last block (text stream pre-only) only the image tokens query; text tokens are keys/values."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: str | None = None,
                 context_pre_only: bool = False):
        super().__init__()
        self.context_pre_only = context_pre_only
        self.qk_norm = qk_norm
        self.x_block = JointStream(dim, num_heads, mlp_ratio, qk_norm, pre_only=False)
        self.context_block = JointStream(dim, num_heads, mlp_ratio, qk_norm, pre_only=context_pre_only)

    def forward(self, x: torch.Tensor, c: torch.Tensor, y: torch.Tensor, masks: dict):
        B, n_img, D = x.shape
        attn = self.x_block.attn
        H, Dh = attn.num_heads, attn.head_dim
        px, mod_x = self.x_block.pre_attention(x, y)
        pc, mod_c = self.context_block.pre_attention(c, y)
        n = n_img + c.shape[1]
        # Image tokens first, as diffusers; the order does not change the result.
        if self.qk_norm is None:  # one concatenation of the packed projections
            if self.context_pre_only:
                q = px[..., :D].view(B, n_img, H, Dh)
                k, v = torch.cat([px[..., D:], pc], dim=1).view(B, n, 2, H, Dh).unbind(2)
            else:
                q, k, v = torch.cat([px, pc], dim=1).view(B, n, 3, H, Dh).unbind(2)
        else:  # per-stream QK-norm first
            qx, kx, vx = attn.split_heads(px)
            qc, kc, vc = self.context_block.attn.split_heads(pc)
            q = qx if self.context_pre_only else torch.cat([qx, qc], dim=1)
            k, v = torch.cat([kx, kc], dim=1), torch.cat([vx, vc], dim=1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=masks["joint"], scale=attn.scale)  # [B, H, Nq, Dh]
        out_x = out[:, :, :n_img].transpose(1, 2).reshape(B, n_img, D)
        x = self.x_block.post_attention(x, out_x, mod_x)
        if self.context_pre_only:
            return x, None
        out_c = out[:, :, n_img:].transpose(1, 2).reshape(B, n - n_img, D)
        return x, self.context_block.post_attention(c, out_c, mod_c)


class SplitStream(nn.Module):
    """One stream of a decoupled block: self-attention, cross-attention, FFN, 9 modulation vectors.

    In the last block only what reaches the image output is built: the text stream is pre-only
    (self-attention, then K/V for the image's cross-attention: 5 modulation vectors, no FFN) and
    the image stream's cross-attention asks queries only (text no longer queries the image)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qk_norm: str | None, pre_only: bool,
                 cross_outputs: str = "qkv"):
        super().__init__()
        self.pre_only = pre_only
        self.norm1 = modulated_norm(dim)
        self.attn = StreamAttention(dim, num_heads, qk_norm)
        self.norm2 = modulated_norm(dim)
        self.cross_attn = StreamAttention(dim, num_heads, qk_norm, proj=not pre_only,
                                          outputs="kv" if pre_only else cross_outputs)
        if not pre_only:
            self.norm3 = modulated_norm(dim)
            self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, (5 if pre_only else 9) * dim))

    def self_attention(self, x: torch.Tensor, mod, mask: torch.Tensor | None) -> torch.Tensor:
        q, k, v = self.attn.heads(modulate(self.norm1(x), mod[0], mod[1]))
        return gated(x, mod[2], self.attn.proj(_sdpa(q, k, v, mask, self.attn.scale)))

    def cross_inputs(self, x: torch.Tensor, mod):
        return self.cross_attn.heads(modulate(self.norm2(x), mod[3], mod[4]))

    def cross_and_mlp(self, x: torch.Tensor, attn: torch.Tensor, mod) -> torch.Tensor:
        x = gated(x, mod[5], self.cross_attn.proj(attn))
        return gated(x, mod[8], self.mlp(modulate(self.norm3(x), mod[6], mod[7])))


class SplitBlock(nn.Module):
    """Decoupled MM-DiT block (seed document, section 2.3): per-stream self-attention, then
    bidirectional cross-attention, then per-stream FFN."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: str | None = None,
                 context_pre_only: bool = False):
        super().__init__()
        self.context_pre_only = context_pre_only
        self.x_block = SplitStream(dim, num_heads, mlp_ratio, qk_norm, pre_only=False,
                                   cross_outputs="q" if context_pre_only else "qkv")
        self.context_block = SplitStream(dim, num_heads, mlp_ratio, qk_norm, pre_only=context_pre_only)

    def forward(self, x: torch.Tensor, c: torch.Tensor, y: torch.Tensor, masks: dict):
        mod_x = self.x_block.adaLN_modulation(y).chunk(9, dim=1)
        mod_c = self.context_block.adaLN_modulation(y).chunk(5 if self.context_pre_only else 9, dim=1)
        x = self.x_block.self_attention(x, mod_x, None)
        c = self.context_block.self_attention(c, mod_c, masks["text"])
        qx, kx, vx = self.x_block.cross_inputs(x, mod_x)
        qc, kc, vc = self.context_block.cross_inputs(c, mod_c)
        x_new = self.x_block.cross_and_mlp(x, _sdpa(qx, kc, vc, masks["text"], self.x_block.cross_attn.scale), mod_x)
        if self.context_pre_only:
            return x_new, None
        # Text queries over image keys: every image token is real, no mask.
        return x_new, self.context_block.cross_and_mlp(c, _sdpa(qc, kx, vx, None, self.context_block.cross_attn.scale),
                                                       mod_c)


class MMDiT(nn.Module):
    """Text-conditioned two-stream diffusion transformer over [B, C, H, W] latents.

    forward(x, t, context, pooled, context_mask=None):
        x: [B, C, H, W] noisy latents; any H, W divisible by the patch (and, with
           `pos_embed_max_size`, at most that many patches per side).
        t: [B] timesteps on diffusers' `timestep` scale 0..1000 (float allowed): DDPM steps
           0..999 as they are, rectified-flow / SD3 sigmas in [0, 1] as 1000 * sigma.
        context: [B, N, context_dim] text token embeddings; pooled: [B, pooled_dim].
        context_mask: optional [B, N] bool, True = real token.
    Called by training code as ``model(x_t, t, **cond)`` with cond = {"context", "pooled",
    "context_mask"} (``TextEmbeddings.as_cond()``); ``null_condition(cond)`` is the guidance input.
    ``class_dropout_prob`` > 0 drops whole captions to that null condition while training (leave it
    at 0 when the caller does caption dropout itself, e.g. with a real empty-caption embedding).
    Returns [B, out_channels, H, W] (out_channels = in_channels, or 2 * in_channels with learn_sigma).
    """

    def __init__(
        self,
        input_size: int | tuple[int, int] = 128,  # defaults: SD3-medium's geometry (no crop table)
        patch_size: int = 2,
        in_channels: int = 16,
        hidden_size: int = 1536,
        depth: int = 24,
        num_heads: int = 24,
        mlp_ratio: float = 4.0,
        context_dim: int = 4096,
        pooled_dim: int = 2048,
        attention: str = "joint",
        qk_norm: str | None = None,
        pos_embed_max_size: int | None = None,
        out_channels: int | None = None,
        learn_sigma: bool = False,
        class_dropout_prob: float = 0.0,
    ):
        super().__init__()
        self.grad_checkpointing = False  # activation checkpointing of the blocks while training
        if attention not in ATTENTION_VARIANTS:
            raise ValueError(f"attention must be one of {ATTENTION_VARIANTS}, got {attention!r}")
        if qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm must be None or 'rms_norm', got {qk_norm!r}")
        self.grid_size = patch_grid(input_size, patch_size)
        if pos_embed_max_size is not None and max(self.grid_size) > pos_embed_max_size:
            gh, gw = self.grid_size
            raise ValueError(f"input {gh * patch_size}x{gw * patch_size} is {self.grid_size} patches, more than "
                             f"pos_embed_max_size={pos_embed_max_size}")
        self.in_channels = in_channels
        if out_channels is None:
            out_channels = 2 * in_channels if learn_sigma else in_channels
        self.out_channels = out_channels
        self.learn_sigma = learn_sigma
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.depth = depth
        self.attention = attention
        self.qk_norm = qk_norm
        self.context_dim = context_dim
        self.pooled_dim = pooled_dim
        self.pos_embed_max_size = pos_embed_max_size
        self.class_dropout_prob = class_dropout_prob
        # SD3: coordinates are scaled so that the native grid (input height / patch) spans base_size.
        self.base_size = self.grid_size[0]

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        table_grid = (pos_embed_max_size, pos_embed_max_size) if pos_embed_max_size else self.grid_size
        # Fixed table as a (persistent) buffer, as in diffusers and SAI's code: not a parameter.
        self.register_buffer("pos_embed", torch.zeros(1, table_grid[0] * table_grid[1], hidden_size))
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = PooledEmbedder(pooled_dim, hidden_size)
        self.context_embedder = nn.Linear(context_dim, hidden_size)
        block = JointBlock if attention == "joint" else SplitBlock
        self.blocks = nn.ModuleList(
            [block(hidden_size, num_heads, mlp_ratio, qk_norm, context_pre_only=i == depth - 1) for i in range(depth)]
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, out_channels)
        self.initialize_weights()

    # ---------------------------------------------------------------- init
    def initialize_weights(self) -> None:
        self.pos_embed.copy_(self._sincos_table().unsqueeze(0))
        init_adaln_zero(
            self,
            [mlp[i].weight for mlp in (self.t_embedder.mlp, self.y_embedder.mlp) for i in (0, 2)],
            [stream.adaLN_modulation for blk in self.blocks for stream in (blk.x_block, blk.context_block)],
        )

    def _sincos_table(self, grid: tuple[int, int] | None = None) -> torch.Tensor:
        if grid is None:
            m = self.pos_embed_max_size
            grid = (m, m) if m else self.grid_size
        return get_2d_sincos_pos_embed(self.hidden_size, grid, base_size=self.base_size).float()

    # ---------------------------------------------------------------- helpers
    def position_embedding(self, h: int, w: int) -> torch.Tensor:
        """[1, h*w, D] table for an h x w patch grid: the centre crop of the M x M table with
        pos_embed_max_size, the stored table at the native grid, else a freshly computed one."""
        m = self.pos_embed_max_size
        if m:
            if h > m or w > m:
                raise ValueError(f"{h}x{w} patches exceed pos_embed_max_size={m}")
            top, left = (m - h) // 2, (m - w) // 2
            table = self.pos_embed.view(1, m, m, -1)[:, top:top + h, left:left + w]
            return table.reshape(1, h * w, -1)
        if (h, w) == self.grid_size:
            return self.pos_embed
        return self._sincos_table((h, w)).to(self.pos_embed).unsqueeze(0)

    @staticmethod
    def attention_masks(context_mask: torch.Tensor | None, n_img: int, attention: str) -> dict:
        """SDPA key masks (True = may be attended to) from a [B, N] text mask."""
        if context_mask is None:
            return {"joint": None, "text": None}
        mask = context_mask.bool()
        # A sample without any real token attends to all of its (padding) tokens instead of none.
        mask = mask | ~mask.any(dim=1, keepdim=True)
        if attention == "joint":
            keys = torch.cat([mask.new_ones(mask.shape[0], n_img), mask], dim=1)
            return {"joint": keys[:, None, None, :], "text": None}
        return {"joint": None, "text": mask[:, None, None, :]}

    def null_condition(self, cond: dict) -> dict:
        """The unconditional input for classifier-free guidance: zero context and pooled vectors of
        the same shapes; a mask, if present, is kept as it is. Callers may instead encode an empty
        caption with their text encoder and use that."""
        out = {"context": torch.zeros_like(cond["context"]), "pooled": torch.zeros_like(cond["pooled"])}
        if cond.get("context_mask") is not None:
            out["context_mask"] = cond["context_mask"]
        return out

    # ---------------------------------------------------------------- forward
    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        pooled: torch.Tensor,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        h, w = patch_grid(tuple(x.shape[-2:]), self.patch_size)
        if self.training and self.class_dropout_prob > 0:
            # Caption dropout for guidance: whole samples get the null condition (zeros).
            keep = (torch.rand(x.shape[0], device=x.device) >= self.class_dropout_prob).to(context.dtype)
            context = context * keep[:, None, None]
            pooled = pooled * keep[:, None].to(pooled.dtype)
        x = self.x_embedder(x)
        # The table is a buffer: engines that cast parameters to bf16 (DeepSpeed) leave it in fp32.
        x = x + self.position_embedding(h, w).to(x.dtype)
        y = self.t_embedder(t) + self.y_embedder(pooled)
        c = self.context_embedder(context)
        masks = self.attention_masks(context_mask, x.shape[1], self.attention)
        for block in self.blocks:
            x, c = run_block(block, self.grad_checkpointing and self.training, x, c, y, masks)
        x = self.final_layer(x, y)
        return unpatchify(x, self.patch_size, self.out_channels, (h, w))

    # ---------------------------------------------------------------- diffusers interop
    @classmethod
    def from_diffusers(cls, transformer=None, *, state_dict: Mapping | None = None, config: Mapping | None = None,
                       **overrides) -> "MMDiT":
        """Our model with the weights of a diffusers ``SD3Transformer2DModel`` (SD3 / SD3-medium
        layout: no dual-attention layers). Pass the module, or ``state_dict=`` and ``config=``
        (its ``config`` dict). Fused QKV per stream is built by concatenating to_q/to_k/to_v
        (add_q/k/v_proj for text); diffusers' AdaLayerNormContinuous chunks are (scale, shift)
        and are reordered to our (shift, scale). `overrides` go to the constructor."""
        if transformer is not None:
            state_dict = transformer.state_dict()
            config = transformer.config
        if state_dict is None or config is None:
            raise ValueError("pass a diffusers SD3Transformer2DModel, or both state_dict= and config=")
        cfg = dict(config)
        if cfg.get("dual_attention_layers"):
            raise ValueError("SD3.5 dual-attention layers (attn2) are not supported")
        hidden = cfg["num_attention_heads"] * cfg["attention_head_dim"]
        if cfg.get("caption_projection_dim", hidden) != hidden:
            raise ValueError(f"caption_projection_dim {cfg['caption_projection_dim']} differs from the hidden "
                             f"size {hidden}; MM-DiT needs both streams at the same width")
        kwargs = dict(
            input_size=cfg["sample_size"], patch_size=cfg["patch_size"], in_channels=cfg["in_channels"],
            hidden_size=hidden, depth=cfg["num_layers"], num_heads=cfg["num_attention_heads"],
            context_dim=cfg["joint_attention_dim"], pooled_dim=cfg["pooled_projection_dim"],
            attention="joint", qk_norm=cfg.get("qk_norm"), pos_embed_max_size=cfg.get("pos_embed_max_size"),
            out_channels=cfg.get("out_channels") or cfg["in_channels"],
        )
        kwargs.update(overrides)
        ref = next(iter(state_dict.values()))
        with torch.device("meta"):
            model = cls(**kwargs)
        # diffusers keeps the table only with pos_embed_max_size (else a non-persistent buffer): recompute it.
        model.load_state_dict(convert_diffusers_state_dict(state_dict, cfg["num_layers"], model), strict=True,
                              assign=True)
        return model.to(device=ref.device, dtype=ref.dtype)


def _swap_halves(w: torch.Tensor) -> torch.Tensor:
    """(scale, shift) <-> (shift, scale) along the output dimension."""
    a, b = w.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def convert_diffusers_state_dict(sd: Mapping, depth: int, model: MMDiT | None = None) -> dict:
    """diffusers SD3Transformer2DModel keys -> MMDiT keys (joint attention)."""
    out: dict[str, torch.Tensor] = {}

    def lin(src: str, dst: str, fn=None) -> None:
        for p in ("weight", "bias"):
            if f"{src}.{p}" in sd:
                v = sd[f"{src}.{p}"]
                out[f"{dst}.{p}"] = fn(v) if fn else v

    if "pos_embed.pos_embed" in sd:
        out["pos_embed"] = sd["pos_embed.pos_embed"]
    elif model is not None:
        out["pos_embed"] = model._sincos_table().unsqueeze(0)
    lin("pos_embed.proj", "x_embedder.proj")
    lin("time_text_embed.timestep_embedder.linear_1", "t_embedder.mlp.0")
    lin("time_text_embed.timestep_embedder.linear_2", "t_embedder.mlp.2")
    lin("time_text_embed.text_embedder.linear_1", "y_embedder.mlp.0")
    lin("time_text_embed.text_embedder.linear_2", "y_embedder.mlp.2")
    lin("context_embedder", "context_embedder")
    for i in range(depth):
        s, d = f"transformer_blocks.{i}", f"blocks.{i}"
        last = i == depth - 1
        lin(f"{s}.norm1.linear", f"{d}.x_block.adaLN_modulation.1")
        lin(f"{s}.norm1_context.linear", f"{d}.context_block.adaLN_modulation.1", _swap_halves if last else None)
        for p in ("weight", "bias"):
            out[f"{d}.x_block.attn.qkv.{p}"] = torch.cat([sd[f"{s}.attn.to_{n}.{p}"] for n in "qkv"], dim=0)
            out[f"{d}.context_block.attn.qkv.{p}"] = torch.cat(
                [sd[f"{s}.attn.add_{n}_proj.{p}"] for n in "qkv"], dim=0)
        for src, dst in (("norm_q", "x_block.attn.ln_q"), ("norm_k", "x_block.attn.ln_k"),
                         ("norm_added_q", "context_block.attn.ln_q"), ("norm_added_k", "context_block.attn.ln_k")):
            if last and src == "norm_added_q":
                continue  # the last block's text queries are never used (pre-only): no Q-norm kept
            if f"{s}.attn.{src}.weight" in sd:
                out[f"{d}.{dst}.weight"] = sd[f"{s}.attn.{src}.weight"]
        lin(f"{s}.attn.to_out.0", f"{d}.x_block.attn.proj")
        lin(f"{s}.ff.net.0.proj", f"{d}.x_block.mlp.fc1")
        lin(f"{s}.ff.net.2", f"{d}.x_block.mlp.fc2")
        if not last:
            lin(f"{s}.attn.to_add_out", f"{d}.context_block.attn.proj")
            lin(f"{s}.ff_context.net.0.proj", f"{d}.context_block.mlp.fc1")
            lin(f"{s}.ff_context.net.2", f"{d}.context_block.mlp.fc2")
    lin("norm_out.linear", "final_layer.adaLN_modulation.1", _swap_halves)
    lin("proj_out", "final_layer.linear")
    return out
