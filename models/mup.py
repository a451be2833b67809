"""muP, the maximal update parametrization, for DiT and MM-DiT trained with Adam(W).

Yang et al. 2022, "Tensor Programs V: Tuning Large Neural Networks via Zero-Shot Hyperparameter
Transfer" (arXiv 2203.03466), table 3: under muP the best learning rate found at a small width holds
at every width. Zheng et al. 2025, "Scaling Diffusion Transformers Efficiently via muP" (arXiv
2505.15270), showed that DiT, PixArt-alpha and MM-DiT follow the standard transformer muP, and that an
LR tuned on small widths transferred to DiT-XL/2.

Every parameter has a role, by what grows with the width w (the hidden size):

    input   fan-in fixed, fan-out ~ w: the patch, timestep, label/pooled and caption embedders'
            first layers (and a caption encoder outside the backbone)
    hidden  fan-in and fan-out ~ w: every matrix inside the blocks, the adaLN linears, the
            embedders' second (w x w) layers
    output  fan-out fixed: the final projection
    vector  biases and norm gains

Relative to the base width b (m = w / b), with Adam:

    role     initial variance             Adam learning rate
    input    as sp at width b             lr
    hidden   ~ 1 / fan-in                 lr / m
    output   zero (adaLN-Zero)            lr / m
    vector   as sp                        lr

Attention: Yang et al.'s 1/d logit scale (instead of sp's 1/sqrt(d), d the head width) is for heads
that widen with the width: once q and k are correlated, their d-wide dot product grows as d, not sqrt(d)
(Yang et al. 2022, section 4 and table 3, take d -> infinity). Where the width grows by adding heads of
a fixed width, d never changes, and sp's 1/sqrt(d) is a constant that does not depend on the width: muP
needs no change there. The registry's ladders grow that way (DiT-d{D}w{W}: 32-wide heads at every width;
MMDiT-d{D}: 64; the DiT paper's S/B/L: 64), so by default the attention stays sp's. For a family whose
heads widen, give the base model's head width d_b: the scale is sqrt(d_b) / d, sp's 1/sqrt(d) at the
base width, falling as 1/d beyond it.

At w = b the model and its learning rates are sp's, bit for bit (tests/models/test_mup.py checks every preset
geometry). sp itself, the official model, is never touched by this module.
"""

from __future__ import annotations

import math

import torch.nn as nn

ROLES = ("input", "hidden", "output", "vector")
# First layers of the embedders: their fan-in is the data's (patch pixels, frequencies, classes, text).
INPUT_PREFIXES = ("x_embedder.", "t_embedder.mlp.0.", "y_embedder.embedding_table.", "y_embedder.mlp.0.",
                  "context_embedder.")
OUTPUT_WEIGHT = "final_layer.linear.weight"
# sp initialises these with a fixed std (N(0, 0.02), DiT's recipe): muP wants 1/fan-in for hidden ones.
FIXED_STD_HIDDEN = ("t_embedder.mlp.2.weight", "y_embedder.mlp.2.weight")
# ... and these xavier-uniform, whose variance 2 / (fan_in + w) shrinks with w: muP keeps width b's.
XAVIER_INPUT = ("x_embedder.proj.weight", "context_embedder.weight")


def find_backbone(module: nn.Module) -> tuple[str, nn.Module]:
    """(name prefix, the DiT/MM-DiT inside `module`): the module itself, or e.g. a caption wrapper's."""
    for name, child in module.named_modules():
        if hasattr(child, "final_layer") and hasattr(child, "x_embedder"):
            return (f"{name}." if name else ""), child
    raise ValueError(f"{type(module).__name__}: no DiT or MM-DiT inside")


def width_of(backbone: nn.Module) -> int:
    return backbone.x_embedder.proj.weight.shape[0]


def parameter_roles(module: nn.Module) -> dict[str, str]:
    """Parameter name -> role, for every parameter of `module` (names as module.named_parameters())."""
    prefix, _ = find_backbone(module)
    roles = {}
    for name, param in module.named_parameters():
        local = name[len(prefix):] if name.startswith(prefix) else None
        if param.ndim < 2:
            roles[name] = "vector"
        elif local is None or local.startswith(INPUT_PREFIXES):
            roles[name] = "input"  # outside the backbone: a caption encoder of its own, fixed width
        elif local == OUTPUT_WEIGHT:
            roles[name] = "output"
        else:
            roles[name] = "hidden"
    return roles


def lr_multipliers(module: nn.Module, base_width: int) -> dict[str, float]:
    """Parameter name -> factor on the learning rate (Adam): 1 / m for hidden and output, else 1."""
    m = width_of(find_backbone(module)[1]) / base_width
    return {name: (1.0 / m if role in ("hidden", "output") else 1.0)
            for name, role in parameter_roles(module).items()}


def apply_mup(module: nn.Module, base_width: int, base_head_dim: int | None = None) -> None:
    """Turn a freshly initialised sp model into its muP counterpart (in place): rescale the
    initialisations that depend on the width the wrong way, and set the attention's logit scale.

    `base_head_dim`: the head width of the base-width model, for a family whose heads widen with the
    width (e.g. a fixed number of heads: base_width // heads). None: heads of a fixed width, whose
    count grows (every registry preset): the attention stays sp's."""
    _, backbone = find_backbone(module)
    m = width_of(backbone) / base_width
    if m != 1.0:  # at the base width every factor below is 1: skip them so that sp stays bit-for-bit
        _rescale_inits(backbone, m)
    for attention in backbone.modules():
        if hasattr(attention, "num_heads") and hasattr(attention, "scale"):
            attention.scale = attention_scale(attention.head_dim, base_head_dim)


def attention_scale(head_dim: int, base_head_dim: int | None) -> float | None:
    """The muP logit scale for `head_dim`-wide heads: None (SDPA's own 1/sqrt(head_dim), exactly sp's)
    where the head is as wide as at the base width, else sqrt(base_head_dim) / head_dim (Yang et al.
    2022's 1/d, anchored so that it equals sp's 1/sqrt(d) at the base width)."""
    if base_head_dim is None or base_head_dim == head_dim:
        return None
    return math.sqrt(base_head_dim) / head_dim


def _rescale_inits(backbone: nn.Module, m: float) -> None:
    params = dict(backbone.named_parameters())
    for name in FIXED_STD_HIDDEN:
        if name in params:
            params[name].data.mul_(1.0 / math.sqrt(m))
    for name in XAVIER_INPUT:
        if name in params:
            weight = params[name].data
            fan_out, fan_in = weight.shape[0], weight[0].numel()
            # xavier's variance 2 / (fan_in + fan_out) at width w -> the one at width b
            weight.mul_(math.sqrt((fan_in + fan_out) / (fan_in + fan_out / m)))
