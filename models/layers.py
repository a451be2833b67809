"""Building blocks shared by DiT and MM-DiT.

Module and attribute names follow the official DiT code (facebookresearch/DiT) so that
state dicts line up key for key: `proj` for the patch convolution, `mlp.0/2` in the timestep
embedder, `embedding_table` for labels, `qkv`/`proj` in attention, `fc1`/`fc2` in the MLP and
`norm_final`/`linear`/`adaLN_modulation` in the final layer. That layout is why these modules are
written here rather than taken from torch or timm; the maths inside them is torch's (SDPA,
GELU, LayerNorm).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x * (1 + scale) + shift, with per-sample shift/scale broadcast over tokens."""
    # addcmul fuses the multiply and the add into one pass over the token tensor.
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))


def gated(x: torch.Tensor, gate: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """adaLN-Zero's gated residual x + gate * update, per-sample gate [B, D], as one fused multiply-add."""
    return torch.addcmul(x, gate.unsqueeze(1), update)


def modulated_norm(dim: int) -> nn.LayerNorm:
    """The LayerNorm before every adaLN modulation: no gain or bias of its own (the modulation
    supplies them), eps 1e-6 as in DiT and SD3."""
    return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


def patch_grid(input_size: int | tuple[int, int], patch_size: int) -> tuple[int, int]:
    """(H, W) or a square size -> the (h, w) grid of p x p patches; ValueError unless p divides both."""
    height, width = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    if height % patch_size or width % patch_size:
        raise ValueError(f"patch size {patch_size} does not divide the input size {height}x{width}")
    return height // patch_size, width // patch_size


def silu_mlp(in_features: int, hidden_size: int) -> nn.Sequential:
    """Linear-SiLU-Linear, the conditioning MLP of DiT's timestep and SD3's pooled-text embedders
    (a Sequential, so the keys are `mlp.{0,2}` as in their checkpoints)."""
    return nn.Sequential(nn.Linear(in_features, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens, as a strided convolution ([B,C,H,W] -> [B,N,D])."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int, bias: bool = True):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A stride-p, kernel-p convolution is a matmul over non-overlapping patches. Written as one,
        # it skips the convolution kernels (slow for this shape on CPU) and yields [B, N, D] directly.
        B, C, H, W = x.shape
        p = self.patch_size
        patches = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(B, -1, C * p * p)
        return F.linear(patches, self.proj.weight.reshape(self.proj.out_channels, -1), self.proj.bias)


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> vectors: sinusoidal features ([cos, sin]) then Linear-SiLU-Linear.
    (torch has no sinusoidal timestep embedding; the [cos, sin] order is DiT's and SD3's.)"""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = silu_mlp(frequency_embedding_size, hidden_size)
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """Sinusoidal embedding of (possibly fractional) timesteps t [B] -> [B, dim], cos half first."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)
        # Under autocast the Linear runs in low precision anyway; outside it, match the weights.
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels -> vectors. Row `num_classes` is the null class used for classifier-free guidance;
    during training labels are replaced by it with probability `dropout_prob`. (An nn.Embedding plus
    the label dropout, which nn.Embedding does not do.)"""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + int(use_cfg_embedding), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, self.num_classes, labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


class Attention(nn.Module):
    """Multi-head self-attention with one fused QKV projection, computed by SDPA. (Not
    nn.MultiheadAttention: its in_proj_weight/out_proj keys are not DiT's qkv/proj.)"""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale: float | None = None  # logits scale; None: SDPA's 1/sqrt(head_dim) (muP sets it, models/mup.py)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, N, C = x.shape
        # [B, N, 3, H, Dh] -> three [B, H, N, Dh] views; SDPA accepts the strided layout directly.
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.scale)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    """Transformer feed-forward: fc1 -> GELU(tanh) -> fc2. (torchvision's MLP is a Sequential with
    keys 0/3, not DiT's fc1/fc2.)"""

    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def get_1d_sincos_pos_embed(embed_dim: int, pos: torch.Tensor) -> torch.Tensor:
    """Positions [M] -> [M, embed_dim] as [sin | cos], frequencies 1/10000^(2i/D); float64 like the reference.
    (torch has no sin-cos position table; checkpoints store this one, so it must match to the bit.)"""
    if embed_dim % 2:
        raise ValueError(f"sin-cos position embedding needs an even width, got {embed_dim}")
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = pos.reshape(-1).to(torch.float64)[:, None] * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def get_2d_sincos_pos_embed(
    embed_dim: int,
    grid_size: int | tuple[int, int],
    base_size: int | None = None,
    interpolation_scale: float = 1.0,
) -> torch.Tensor:
    """Fixed 2-D sin-cos table [H*W, embed_dim] for a grid of H x W patches (row-major tokens).

    The first half of the channels encodes the column, the second half the row, as in the
    official DiT/MAE code. `base_size`/`interpolation_scale` rescale coordinates the way SD3 does
    (coordinate = index / (size / base_size) / interpolation_scale); the defaults leave them as indices.
    """
    gh, gw = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos position embedding needs a width divisible by 4, got {embed_dim}")
    rows = torch.arange(gh, dtype=torch.float64)
    cols = torch.arange(gw, dtype=torch.float64)
    if base_size is not None:
        rows = rows / (gh / base_size) / interpolation_scale
        cols = cols / (gw / base_size) / interpolation_scale
    row_grid, col_grid = torch.meshgrid(rows, cols, indexing="ij")
    emb_col = get_1d_sincos_pos_embed(embed_dim // 2, col_grid)
    emb_row = get_1d_sincos_pos_embed(embed_dim // 2, row_grid)
    return torch.cat([emb_col, emb_row], dim=1)


class PooledEmbedder(nn.Module):
    """A pooled text vector [B, P] -> [B, D]: Linear-SiLU-Linear (SD3's pooled-projection MLP)."""

    def __init__(self, pooled_dim: int, hidden_size: int):
        super().__init__()
        self.mlp = silu_mlp(pooled_dim, hidden_size)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.mlp(pooled)


def run_block(block: nn.Module, checkpointed: bool, *args):
    """block(*args), or with activation checkpointing: recomputed in the backward pass instead of
    stored. The block is called through `__call__` both times, so module hooks (DeepSpeed ZeRO-3
    gathers partitioned parameters in them) run for the recomputation too."""
    if checkpointed:
        from torch.utils.checkpoint import checkpoint

        return checkpoint(block.__call__, *args, use_reentrant=False)
    return block(*args)


class FinalLayer(nn.Module):
    """adaLN (shift, scale) + LayerNorm, then a linear map from each (image) token to its p*p*C_out
    patch values. DiT's and MM-DiT's output layer; keys final_layer.{linear,adaLN_modulation.1}."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = modulated_norm(hidden_size)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def unpatchify(x: torch.Tensor, patch_size: int, out_channels: int, grid: tuple[int, int]) -> torch.Tensor:
    """Tokens [B, h*w, p*p*C] (per token in (p, q, c) order, as FinalLayer emits) -> [B, C, h*p, w*p]."""
    c, p = out_channels, patch_size
    h, w = grid
    x = x.reshape(x.shape[0], h, w, p, p, c)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(x.shape[0], c, h * p, w * p)


def _xavier_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def init_adaln_zero(model: nn.Module, embedder_weights: Iterable[torch.Tensor],
                    modulations: Iterable[nn.Sequential]) -> None:
    """DiT's initialisation, shared by DiT and MM-DiT. In this order (the order of the random draws,
    so a seed gives the same weights as the official code): every Linear xavier-uniform with zero
    bias; the patch convolution `model.x_embedder.proj` likewise, over its flattened kernel;
    `embedder_weights` N(0, 0.02). Then adaLN-Zero: the output Linear of every block's modulation
    in `modulations`, and `model.final_layer`'s modulation and output linear, are zero, so every
    block starts as the identity and the model's output at zero."""
    model.apply(_xavier_linear)
    proj = model.x_embedder.proj
    nn.init.xavier_uniform_(proj.weight.data.view(proj.weight.shape[0], -1))
    nn.init.zeros_(proj.bias)
    for weight in embedder_weights:
        nn.init.normal_(weight, std=0.02)
    final = model.final_layer
    for layer in [*(m[-1] for m in modulations), final.adaLN_modulation[-1], final.linear]:
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
