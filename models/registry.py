"""Model names -> constructed models.

Names: `DiT-{XXS,XS,S,B,L,XL}/{patch}` (S/B/L/XL as in the DiT paper, the others CPU presets),
`DiT-d{depth}w{width}/{patch}` (any DiT geometry, head width 32: small ladders for CPU studies) and
`MMDiT-d{depth}/{patch}` (SD3's rule: hidden = 64 * depth, heads = depth; d2/d4 are CPU presets,
d24 is SD3-medium's geometry, d38 the paper's 8 B model). `build_model(name, **kwargs)` passes keyword
arguments to the model's constructor, so `build_model("DiT-XL/2", input_size=32, in_channels=4,
num_classes=1000, learn_sigma=True, class_dropout_prob=0.1)` is the official DiT-XL/2 and
`build_model("MMDiT-d24/2", input_size=128, in_channels=16, context_dim=4096, pooled_dim=2048,
pos_embed_max_size=192)` is SD3-medium's transformer (add `attention="split"` for the decoupled
variant, `qk_norm="rms_norm"` for QK-norm).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported only when a model is built: config validation stays fast
    import torch.nn as nn

# name -> (depth, hidden, heads). S/B/L/XL are the paper's; the small ones are CPU presets of ours.
DIT_SIZES: dict[str, tuple[int, int, int]] = {
    "XXS": (2, 64, 2),
    "XS": (6, 192, 3),
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
DIT_PATCHES = (2, 4, 8)
# DiT-d{depth}w{width}: any geometry, so a CPU study can have a ladder of 4+ sizes (e.g. d2w64 d3w96 d4w128
# d6w192, about 3x parameters per rung). Head width 32 keeps several heads at these widths.
DIT_GEOMETRY_HEAD_DIM = 32

# MM-DiT sizes follow SD3's rule: hidden = 64 * depth, heads = depth (head width 64). Any depth parses;
# these are the listed presets: d2/d4 for CPUs, d24 = SD3-medium's geometry, d38 = the paper's 8 B model.
MMDIT_HEAD_DIM = 64
MMDIT_DEPTHS = (2, 4, 8, 12, 16, 18, 24, 30, 38)
MMDIT_PATCHES = (2, 4, 8)
# DiT-d{depth}w{width}: any geometry, so a CPU study can have a ladder of 4+ sizes (e.g. d2w64 d3w96 d4w128
# d6w192, about 3x parameters per rung). Head width 32 keeps several heads at these widths.
DIT_GEOMETRY_HEAD_DIM = 32


def mmdit_geometry(depth: int) -> tuple[int, int, int]:
    """depth -> (depth, hidden, heads) by SD3's rule."""
    return depth, MMDIT_HEAD_DIM * depth, depth


@dataclass(frozen=True)
class ModelSpec:
    """What a preset name fixes: the family and the transformer geometry."""

    name: str
    family: str  # "dit" | "mmdit"
    size: str
    patch: int
    depth: int
    hidden: int
    heads: int


_DIT_NAME = re.compile(r"^DiT-([A-Z]+)/(\d+)$")
_DIT_GEOMETRY_NAME = re.compile(r"^DiT-d(\d+)w(\d+)/(\d+)$")
_MMDIT_NAME = re.compile(r"^MMDiT-d(\d+)/(\d+)$")


def model_name(family: str, size: str, patch: int) -> str:
    """The preset name for a (family, size, patch) triple as written in a study file."""
    if family == "dit":
        return f"DiT-{size}/{patch}"
    if family == "mmdit":
        size = str(size)
        return f"MMDiT-{size if size.startswith('d') else 'd' + size}/{patch}"  # "d4" (or 4) -> MMDiT-d4/2
    raise ValueError(f"unknown model family {family!r}; known: dit, mmdit")


def parse_model_name(name: str) -> ModelSpec:
    m = _DIT_NAME.match(name)
    if m:
        size, patch = m.group(1), int(m.group(2))
        if size not in DIT_SIZES:
            raise ValueError(f"unknown DiT size {size!r} in {name!r}; known: {', '.join(DIT_SIZES)}")
        if patch < 1:
            raise ValueError(f"patch size must be positive in {name!r}")
        depth, hidden, heads = DIT_SIZES[size]
        return ModelSpec(name, "dit", size, patch, depth, hidden, heads)
    m = _DIT_GEOMETRY_NAME.match(name)
    if m:
        depth, width, patch = (int(g) for g in m.groups())
        if depth < 1 or patch < 1 or width < DIT_GEOMETRY_HEAD_DIM or width % DIT_GEOMETRY_HEAD_DIM:
            raise ValueError(f"{name!r}: depth and patch must be positive and the width a multiple of "
                             f"{DIT_GEOMETRY_HEAD_DIM} (the head width), e.g. DiT-d4w128/2")
        return ModelSpec(name, "dit", f"d{depth}w{width}", patch, depth, width, width // DIT_GEOMETRY_HEAD_DIM)
    m = _MMDIT_NAME.match(name)
    if m:
        depth, patch = int(m.group(1)), int(m.group(2))
        if depth < 1 or patch < 1:
            raise ValueError(f"depth and patch size must be positive in {name!r}")
        depth, hidden, heads = mmdit_geometry(depth)
        return ModelSpec(name, "mmdit", f"d{depth}", patch, depth, hidden, heads)
    raise ValueError(f"unknown model name {name!r}; expected e.g. DiT-XL/2 (sizes {', '.join(DIT_SIZES)}), "
                     f"DiT-d4w128/2 (any depth and width) or MMDiT-d24/2 (any depth d1, d2, ...)")


def size_order(family: str, size: str) -> float:
    """A number that orders a family's sizes small to large (depth x width^2, the block parameters'
    scale); nan for a size that does not parse."""
    try:
        spec = parse_model_name(model_name(family, size, 2))
    except ValueError:
        return float("nan")
    return float(spec.depth * spec.hidden**2)


def list_presets() -> list[str]:
    """Every preset name, small to large, each size with the patch sizes 2/4/8: DiT first, then MM-DiT."""
    return [f"DiT-{size}/{patch}" for size in DIT_SIZES for patch in DIT_PATCHES] + [
        f"MMDiT-d{depth}/{patch}" for depth in MMDIT_DEPTHS for patch in MMDIT_PATCHES
    ]


def build_model(name: str, **kwargs) -> "nn.Module":
    spec = parse_model_name(name)
    if spec.family == "dit":
        from .dit import DiT

        return DiT(patch_size=spec.patch, hidden_size=spec.hidden, depth=spec.depth, num_heads=spec.heads, **kwargs)
    if spec.family == "mmdit":
        from .mmdit import MMDiT

        return MMDiT(patch_size=spec.patch, hidden_size=spec.hidden, depth=spec.depth, num_heads=spec.heads, **kwargs)
    raise AssertionError(spec.family)
