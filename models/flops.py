"""Analytic parameter and compute counts.

Convention (the DiT paper's): forward compute is counted in multiply-adds (MACs) and reported as
"GFLOPs"; we call the field `gflops` and name it "forward GFLOPs (multiply-adds)" wherever shown.
Counted: every linear layer, the patch convolution, and the two attention matmuls (Q·Kᵀ and A·V).
Not counted: norms, activations, softmax, bias adds, residual adds — this reproduces the paper's
Table 4 to within 0.05 %.

Training compute of one image = 3 × forward (forward + backward ≈ 2 × forward).
Hardware FLOPs = 2 × multiply-adds.

MM-DiT counts include the text stream: by default SD3's text geometry, 154 text tokens (77 CLIP +
77 T5) of width 4096 and a 2048-wide pooled vector (`text_tokens`, `context_dim`, `pooled_dim` change
it); the context embedder, the text stream's projections/MLPs and attention over image + text tokens
are all counted. MM-DiT's sin-cos table is a buffer, not a parameter, so `params` excludes it (as
diffusers' and SAI's counts do: SD3-medium, MMDiT-d24/2 at 128x128x16, has 2,028,328,000).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .registry import ModelSpec, as_spec

# Latent-diffusion convention of the DiT paper: the SD VAE downsamples by 8 into 4 channels.
VAE_DOWNSAMPLE = 8
VAE_CHANNELS = 4
TRAIN_FLOPS_PER_FORWARD = 3


@dataclass(frozen=True)
class ModelCount:
    name: str
    family: str
    depth: int
    hidden: int
    heads: int
    patch: int
    input_size: int
    in_channels: int
    tokens: int
    params: int  # all parameters, including the frozen position table (the official DiT count)
    trainable_params: int
    gflops: float  # forward, multiply-adds, one sample
    # MM-DiT only (None/0 for DiT): attention variant, QK-norm, text geometry the count assumes
    attention: str | None = None
    qk_norm: str | None = None
    text_tokens: int = 0
    context_dim: int = 0
    pooled_dim: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def _linear(n_in: int, n_out: int, bias: bool = True) -> int:
    return n_in * n_out + (n_out if bias else 0)


def dit_count(
    model: ModelSpec | str,
    input_size: int = 32,
    in_channels: int = 4,
    num_classes: int = 1000,
    learn_sigma: bool = True,
    class_dropout_prob: float = 0.1,
    mlp_ratio: float = 4.0,
) -> ModelCount:
    spec = as_spec(model)
    if spec.family != "dit":
        raise ValueError(f"{spec.name} is not a DiT")
    if (spec.attention, spec.qk_norm) != ("joint", None):
        raise ValueError(f"{spec.name}: attention={spec.attention!r} and qk_norm apply to MM-DiT only")
    D, p, L = spec.hidden, spec.patch, spec.depth
    if input_size % p:
        raise ValueError(f"patch {p} does not divide input size {input_size}")
    N = (input_size // p) ** 2
    out_channels = 2 * in_channels if learn_sigma else in_channels
    mlp_hidden = int(D * mlp_ratio)
    freq = 256

    block_params = (
        _linear(D, 3 * D) + _linear(D, D) + _linear(D, mlp_hidden) + _linear(mlp_hidden, D) + _linear(D, 6 * D)
    )
    params_fixed = N * D  # pos_embed
    trainable = (
        _linear(p * p * in_channels, D)  # patch conv
        + _linear(freq, D) + _linear(D, D)  # timestep MLP
        + (num_classes + int(class_dropout_prob > 0)) * D  # label table incl. null class
        + L * block_params
        + _linear(D, 2 * D) + _linear(D, p * p * out_channels)  # final layer
    )

    # Multiply-adds of one forward pass.
    per_token_block = 3 * D * D + D * D + 2 * D * mlp_hidden  # qkv, proj, fc1, fc2
    attention = 2 * N * N * D  # Q·Kᵀ and A·V over all heads
    per_sample_block = 6 * D * D  # adaLN modulation
    macs = (
        N * p * p * in_channels * D  # patch conv
        + freq * D + D * D  # timestep MLP
        + L * (N * per_token_block + attention + per_sample_block)
        + 2 * D * D + N * D * p * p * out_channels  # final layer
    )
    return ModelCount(
        name=spec.name, family="dit", depth=L, hidden=D, heads=spec.heads, patch=p, input_size=input_size,
        in_channels=in_channels, tokens=N, params=trainable + params_fixed, trainable_params=trainable,
        gflops=macs / 1e9,
    )


# SD3's text conditioning: CLIP-L+G (77 tokens) joined with T5-XXL (77 tokens) on the sequence,
# zero-padded to T5's 4096 channels; pooled = CLIP-L pooled (768) ++ CLIP-G pooled (1280).
SD3_TEXT_TOKENS = 154
SD3_CONTEXT_DIM = 4096
SD3_POOLED_DIM = 2048


def mmdit_count(
    model: ModelSpec | str,
    input_size: int = 32,
    in_channels: int = 4,
    attention: str | None = None,  # with a name only ("joint" when not given): a spec carries its variant
    qk_norm: str | None = None,
    text_tokens: int = SD3_TEXT_TOKENS,
    context_dim: int = SD3_CONTEXT_DIM,
    pooled_dim: int = SD3_POOLED_DIM,
    mlp_ratio: float = 4.0,
    learn_sigma: bool = False,
    out_channels: int | None = None,
    pos_embed_max_size: int | None = None,  # the table is a buffer: changes neither params nor MACs
    class_dropout_prob: float = 0.0,  # accepted for symmetry with build_model; no effect on counts
) -> ModelCount:
    """Parameters and forward multiply-adds of `MMDiT` (models/mmdit.py), text stream included."""
    spec = as_spec(model, attention, qk_norm)
    if spec.family != "mmdit":
        raise ValueError(f"{spec.name} is not an MM-DiT")
    attention, qk_norm = spec.attention, spec.qk_norm
    D, p, L, H = spec.hidden, spec.patch, spec.depth, spec.heads
    if input_size % p:
        raise ValueError(f"patch {p} does not divide input size {input_size}")
    Ni, Nt = (input_size // p) ** 2, text_tokens
    if out_channels is None:
        out_channels = 2 * in_channels if learn_sigma else in_channels
    M = int(D * mlp_ratio)
    qk = D // H if qk_norm else 0  # one RMSNorm gain of head width
    freq = 256
    mlp_params = _linear(D, M) + _linear(M, D)
    attn_params = _linear(D, 3 * D) + _linear(D, D)  # fused qkv + output projection

    if attention == "joint":
        full = attn_params + mlp_params + _linear(D, 6 * D) + 2 * qk
        # the last text stream: SD3's fused qkv (only K/V computed: its queries would be discarded),
        # K-norm and (shift, scale); only image tokens query in the last block's attention
        last_block = full + _linear(D, 3 * D) + _linear(D, 2 * D) + qk
        block_macs = (2 * 6 * D * D + (Ni + Nt) * (4 * D * D + 2 * D * M) + 2 * (Ni + Nt) ** 2 * D)
        last_macs = (8 * D * D + Ni * (4 * D * D + 2 * D * M) + Nt * 2 * D * D + 2 * Ni * (Ni + Nt) * D)
    else:
        full = 2 * attn_params + mlp_params + _linear(D, 9 * D) + 4 * qk
        # last block: the text stream keeps self-attention and gives K/V to the image's cross-attention
        # (5 modulation vectors); the image stream's cross-attention projects queries only
        last_x = full - _linear(D, 3 * D) + _linear(D, D) - qk
        last_block = last_x + attn_params + _linear(D, 2 * D) + _linear(D, 5 * D) + 3 * qk
        self_attn = 2 * (Ni * Ni + Nt * Nt) * D
        block_macs = (2 * 9 * D * D + (Ni + Nt) * (8 * D * D + 2 * D * M) + self_attn + 2 * 2 * Ni * Nt * D)
        last_macs = (14 * D * D + Ni * (6 * D * D + 2 * D * M) + Nt * 6 * D * D + self_attn + 2 * Ni * Nt * D)

    trainable = (
        _linear(p * p * in_channels, D)  # patch conv
        + _linear(freq, D) + _linear(D, D)  # timestep MLP
        + _linear(pooled_dim, D) + _linear(D, D)  # pooled-text MLP
        + _linear(context_dim, D)  # context embedder
        + 2 * (L - 1) * full + last_block  # the last block's text stream is pre-only
        + _linear(D, 2 * D) + _linear(D, p * p * out_channels)  # final layer
    )
    macs = (
        Ni * p * p * in_channels * D
        + freq * D + D * D + pooled_dim * D + D * D
        + Nt * context_dim * D
        + (L - 1) * block_macs + last_macs
        + 2 * D * D + Ni * D * p * p * out_channels
    )
    return ModelCount(
        name=spec.name, family="mmdit", depth=L, hidden=D, heads=H, patch=p, input_size=input_size,
        in_channels=in_channels, tokens=Ni, params=trainable, trainable_params=trainable, gflops=macs / 1e9,
        attention=attention, qk_norm=qk_norm, text_tokens=Nt, context_dim=context_dim, pooled_dim=pooled_dim,
    )


def count_model(model: ModelSpec | str, input_size: int, in_channels: int, **kwargs) -> ModelCount:
    """Analytic counts of a spec (or a typed name, with `attention=` / `qk_norm=` for an MM-DiT) at a given
    model input size and channel count. Needs no torch: planning and budgets count without building."""
    spec = as_spec(model, kwargs.pop("attention", None), kwargs.pop("qk_norm", None))
    if spec.family == "dit":
        return dit_count(spec, input_size=input_size, in_channels=in_channels, **kwargs)
    if spec.family == "mmdit":
        return mmdit_count(spec, input_size=input_size, in_channels=in_channels, **kwargs)
    raise AssertionError(spec.family)


def latent_geometry(image_size: int) -> tuple[int, int]:
    """Pixel size of a latent-diffusion image -> (latent size, latent channels) for the SD VAE."""
    if image_size % VAE_DOWNSAMPLE:
        raise ValueError(f"image size {image_size} is not divisible by the VAE factor {VAE_DOWNSAMPLE}")
    return image_size // VAE_DOWNSAMPLE, VAE_CHANNELS


def training_gflops(forward_gflops: float, images: int) -> float:
    """Training compute in multiply-adds (GFLOPs, paper convention) for `images` samples seen."""
    return TRAIN_FLOPS_PER_FORWARD * forward_gflops * images
