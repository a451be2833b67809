"""DiT: Scalable Diffusion Models with Transformers (Peebles & Xie, 2023).

The architecture, initialisation and state_dict layout follow the official implementation, so the
released checkpoints (e.g. DiT-XL-2-256x256.pt) load with `load_state_dict(strict=True)`.
Differences that do not change results: attention runs through PyTorch SDPA, adaLN modulation is
fused with `addcmul`, non-square inputs are allowed, and classifier-free guidance by default guides
every noise channel (the official code guided only the first three; `guide_channels=3` restores it).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .layers import (Attention, FinalLayer, LabelEmbedder, Mlp, PatchEmbed, TimestepEmbedder, gated,
                     get_2d_sincos_pos_embed, init_adaln_zero, modulate, modulated_norm, patch_grid, run_block,
                     unpatchify)


class DiTBlock(nn.Module):
    """Pre-norm transformer block whose norms are modulated by the conditioning vector c (adaLN-Zero):

        x = x + gate_msa * Attn(modulate(LN(x), shift_msa, scale_msa))
        x = x + gate_mlp * MLP (modulate(LN(x), shift_mlp, scale_mlp))
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = modulated_norm(hidden_size)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
        self.norm2 = modulated_norm(hidden_size)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = gated(x, gate_msa, self.attn(modulate(self.norm1(x), shift_msa, scale_msa)))
        return gated(x, gate_mlp, self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))


class DiT(nn.Module):
    """Diffusion transformer over a [B, C, H, W] input (pixels or latents), conditioned on a timestep
    and a class label. With `learn_sigma` the output has 2*C channels: noise, then variance values."""

    def __init__(
        self,
        input_size: int | tuple[int, int] = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
    ):
        super().__init__()
        self.grad_checkpointing = False  # activation checkpointing of the blocks while training
        self.grid_size = patch_grid(input_size, patch_size)
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = self.grid_size[0] * self.grid_size[1]
        # Fixed sin-cos table. A frozen Parameter (not a buffer) as in the official code, so the key and
        # the parameter count (675.1 M for XL/2) are the official ones.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        pos_embed = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], self.grid_size)
        self.pos_embed.data.copy_(pos_embed.float().unsqueeze(0))
        init_adaln_zero(
            self,
            [self.y_embedder.embedding_table.weight, self.t_embedder.mlp[0].weight, self.t_embedder.mlp[2].weight],
            [block.adaLN_modulation for block in self.blocks],
        )

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, p*p*C] -> [B, C, H, W]."""
        return unpatchify(x, self.patch_size, self.out_channels, self.grid_size)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x: [B, C, H, W] noisy input; t: [B] diffusion timesteps (0..999); y: [B] class labels
        (the value `num_classes` is the null label)."""
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training)
        for block in self.blocks:
            x = run_block(block, self.grad_checkpointing and self.training, x, c)
        x = self.final_layer(x, c)
        return self.unpatchify(x)

    def null_condition(self, cond: dict) -> dict:
        """The unconditional input for classifier-free guidance: every label set to the null class."""
        if self.y_embedder.dropout_prob <= 0:
            raise ValueError("this DiT was built with class_dropout_prob=0 and has no null class to guide with")
        return {"y": torch.full_like(cond["y"], self.num_classes)}

    def forward_with_cfg(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        cfg_scale: float,
        guide_channels: int | None = None,
    ) -> torch.Tensor:
        """Classifier-free guidance in one batched forward. The batch is [conditional; unconditional]:
        the second half carries the null label and its x is ignored (the first half is used twice).

        Guides the first `guide_channels` output channels (default: all noise channels, i.e. every
        channel but the learned-variance ones); `guide_channels=3` is the official DiT behaviour."""
        half = x[: len(x) // 2]
        combined = torch.cat([half, half], dim=0)
        model_out = self.forward(combined, t, y)
        n_guided = self.in_channels if guide_channels is None else guide_channels
        eps, rest = model_out[:, :n_guided], model_out[:, n_guided:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        eps = torch.cat([half_eps, half_eps], dim=0)
        return torch.cat([eps, rest], dim=1)

