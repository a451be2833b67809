"""Model names -> constructed models.

Names: `DiT-{XXS,XS,S,B,L,XL}/{patch}` (S/B/L/XL as in the DiT paper, the others CPU presets).
`build_model(name, **kwargs)` passes keyword arguments to the model's constructor, so
`build_model("DiT-XL/2", input_size=32, in_channels=4, num_classes=1000, learn_sigma=True,
class_dropout_prob=0.1)` is the official DiT-XL/2.
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


def model_name(family: str, size: str, patch: int) -> str:
    """The preset name for a (family, size, patch) triple as written in a study file."""
    if family == "dit":
        return f"DiT-{size}/{patch}"
    raise ValueError(f"unknown model family {family!r}; known: dit")


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
    raise ValueError(f"unknown model name {name!r}; expected e.g. DiT-XL/2 (sizes {', '.join(DIT_SIZES)})")


def list_presets() -> list[str]:
    """Every preset name, small to large, each size with the paper's patch sizes 2/4/8."""
    return [f"DiT-{size}/{patch}" for size in DIT_SIZES for patch in DIT_PATCHES]


def build_model(name: str, **kwargs) -> "nn.Module":
    spec = parse_model_name(name)
    if spec.family == "dit":
        from .dit import DiT

        return DiT(patch_size=spec.patch, hidden_size=spec.hidden, depth=spec.depth, num_heads=spec.heads, **kwargs)
    raise AssertionError(spec.family)
