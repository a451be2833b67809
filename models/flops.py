"""Analytic parameter and compute counts.

Convention (the DiT paper's): forward compute is counted in multiply-adds (MACs) and reported as
"GFLOPs"; we call the field `gflops` and name it "forward GFLOPs (multiply-adds)" wherever shown.
Counted: every linear layer, the patch convolution, and the two attention matmuls (Q·Kᵀ and A·V).
Not counted: norms, activations, softmax, bias adds, residual adds — this reproduces the paper's
Table 4 to within 0.05 %.

Training compute of one image = 3 × forward (forward + backward ≈ 2 × forward).
Hardware FLOPs = 2 × multiply-adds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .registry import parse_model_name

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

    def as_dict(self) -> dict:
        return asdict(self)


def _linear(n_in: int, n_out: int, bias: bool = True) -> int:
    return n_in * n_out + (n_out if bias else 0)


def dit_count(
    name: str,
    input_size: int = 32,
    in_channels: int = 4,
    num_classes: int = 1000,
    learn_sigma: bool = True,
    class_dropout_prob: float = 0.1,
    mlp_ratio: float = 4.0,
) -> ModelCount:
    spec = parse_model_name(name)
    if spec.family != "dit":
        raise ValueError(f"{name} is not a DiT")
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
        name=name, family="dit", depth=L, hidden=D, heads=spec.heads, patch=p, input_size=input_size,
        in_channels=in_channels, tokens=N, params=trainable + params_fixed, trainable_params=trainable,
        gflops=macs / 1e9,
    )


def count_model(name: str, input_size: int, in_channels: int, **kwargs) -> ModelCount:
    """Analytic counts for any preset name at a given model input size and channel count."""
    family = parse_model_name(name).family
    if family == "dit":
        return dit_count(name, input_size=input_size, in_channels=in_channels, **kwargs)
    raise AssertionError(family)


def latent_geometry(image_size: int) -> tuple[int, int]:
    """Pixel size of a latent-diffusion image -> (latent size, latent channels) for the SD VAE."""
    if image_size % VAE_DOWNSAMPLE:
        raise ValueError(f"image size {image_size} is not divisible by the VAE factor {VAE_DOWNSAMPLE}")
    return image_size // VAE_DOWNSAMPLE, VAE_CHANNELS


def training_gflops(forward_gflops: float, images: int) -> float:
    """Training compute in multiply-adds (GFLOPs, paper convention) for `images` samples seen."""
    return TRAIN_FLOPS_PER_FORWARD * forward_gflops * images
