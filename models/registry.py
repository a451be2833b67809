"""Model specs and names -> constructed models.

A `ModelSpec` is one model, typed (family, geometry, patch, MM-DiT's attention variant and QK-norm): the
harness builds it once from the study's model section and hands it to the builder and the FLOP counter
(models/flops.py); names are printed from it. Names are parsed only where a user types one.

Names: `DiT-{XXS,XS,S,B,L,XL}/{patch}` (S/B/L/XL as in the DiT paper, the others CPU presets),
`DiT-d{depth}w{width}/{patch}` (any DiT geometry, head width 32: small ladders for CPU studies) and
`MMDiT-d{depth}/{patch}` (SD3's rule: hidden = 64 * depth, heads = depth; d2/d4 are CPU presets,
d24 is SD3-medium's geometry, d38 the paper's 8 B model). `build_model(spec or name, **kwargs)` passes keyword
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


def mmdit_geometry(depth: int) -> tuple[int, int, int]:
    """depth -> (depth, hidden, heads) by SD3's rule."""
    return depth, MMDIT_HEAD_DIM * depth, depth


ATTENTIONS = ("joint", "split")   # MM-DiT's block: SD3's joint attention, or the decoupled variant
QK_NORMS = (None, "rms_norm")


@dataclass(frozen=True)
class ModelSpec:
    """One model, typed: what the builder, the FLOP counter and the logs read (the study's model section
    gives it: harness.config.ModelConfig.spec()). `name` is printed from it, never parsed back.
    `attention` and `qk_norm` are MM-DiT's variants (a DiT has "joint" and None)."""

    family: str  # "dit" | "mmdit"
    size: str    # the size as a name writes it: "XL", "d2w64" (DiT), "d24" (MM-DiT)
    patch: int
    depth: int
    hidden: int
    heads: int
    attention: str = "joint"
    qk_norm: str | None = None

    @property
    def name(self) -> str:
        return model_name(self.family, self.size, self.patch)


_DIT_NAME = re.compile(r"^DiT-([A-Za-z0-9]+)/(\d+)$")
_MMDIT_NAME = re.compile(r"^MMDiT-([A-Za-z0-9]+)/(\d+)$")
_DIT_GEOMETRY = re.compile(r"^d(\d+)w(\d+)$")
_MMDIT_DEPTH = re.compile(r"^d?(\d+)$")


def model_name(family: str, size: str, patch: int) -> str:
    """The preset name for a (family, size, patch) triple as written in a study file."""
    if family == "dit":
        return f"DiT-{size}/{patch}"
    if family == "mmdit":
        size = str(size)
        return f"MMDiT-{size if size.startswith('d') else 'd' + size}/{patch}"  # "d4" (or 4) -> MMDiT-d4/2
    raise ValueError(f"unknown model family {family!r}; known: dit, mmdit")


def _dit_geometry(size: str, name: str) -> tuple[str, int, int, int]:
    """A DiT size -> (size, depth, hidden, heads): a paper/CPU preset, or d{depth}w{width}."""
    if size in DIT_SIZES:
        return (size, *DIT_SIZES[size])
    m = _DIT_GEOMETRY.match(size)
    if not m:
        raise ValueError(f"unknown DiT size {size!r} in {name!r}; known: {', '.join(DIT_SIZES)} or d{{depth}}w{{width}}")
    depth, width = int(m.group(1)), int(m.group(2))
    if depth < 1 or width < DIT_GEOMETRY_HEAD_DIM or width % DIT_GEOMETRY_HEAD_DIM:
        raise ValueError(f"{name!r}: depth and patch must be positive and the width a multiple of "
                         f"{DIT_GEOMETRY_HEAD_DIM} (the head width), e.g. DiT-d4w128/2")
    return size, depth, width, width // DIT_GEOMETRY_HEAD_DIM


def _mmdit_geometry(size: str, name: str) -> tuple[str, int, int, int]:
    """An MM-DiT size ("d24", or 24 in a study) -> (size, depth, hidden, heads) by SD3's rule."""
    m = _MMDIT_DEPTH.match(size)
    if not m:
        raise ValueError(f"unknown MM-DiT size {size!r} in {name!r}; expected d{{depth}}, e.g. d24")
    depth = int(m.group(1))
    if depth < 1:
        raise ValueError(f"depth and patch size must be positive in {name!r}")
    return (size if size.startswith("d") else f"d{size}", *mmdit_geometry(depth))  # as model_name writes it


def model_spec(family: str, size: str, patch: int, attention: str = "joint", qk_norm: str | None = None) -> ModelSpec:
    """(family, size, patch, variant) as a study gives them -> the spec; ValueError names what is wrong."""
    name = model_name(family, size, patch)
    if patch < 1:
        raise ValueError(f"patch size must be positive in {name!r}")
    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be joint or split, got {attention!r}")
    if qk_norm not in QK_NORMS:
        raise ValueError(f"qk_norm must be rms_norm or None, got {qk_norm!r}")
    geometry = _dit_geometry if family == "dit" else _mmdit_geometry
    size, depth, hidden, heads = geometry(str(size), name)
    return ModelSpec(family, size, patch, depth, hidden, heads, attention, qk_norm)


def parse_model_name(name: str, attention: str = "joint", qk_norm: str | None = None) -> ModelSpec:
    """A typed name ("DiT-XL/2", "DiT-d4w128/2", "MMDiT-d24/2") -> its spec: the edge where users type
    names (`ditscale bench`, `build_model("DiT-XL/2")`). A name carries no variant: pass it here."""
    for family, pattern in (("dit", _DIT_NAME), ("mmdit", _MMDIT_NAME)):
        m = pattern.match(name)
        if m and (family == "dit" or m.group(1).startswith("d")):
            return model_spec(family, m.group(1), int(m.group(2)), attention, qk_norm)
    raise ValueError(f"unknown model name {name!r}; expected e.g. DiT-XL/2 (sizes {', '.join(DIT_SIZES)}), "
                     f"DiT-d4w128/2 (any depth and width) or MMDiT-d24/2 (any depth d1, d2, ...)")


def as_spec(model: ModelSpec | str, attention: str | None = None, qk_norm: str | None = None) -> ModelSpec:
    """A spec as given, or a typed name parsed with its variant (the public API's two spellings)."""
    if isinstance(model, ModelSpec):
        if attention is not None or qk_norm is not None:
            raise TypeError(f"{model.name}: a ModelSpec carries attention and qk_norm; set them in the spec")
        return model
    return parse_model_name(model, attention or "joint", qk_norm)


def size_order(family: str, size: str) -> float:
    """A number that orders a family's sizes small to large (depth x width^2, the block parameters'
    scale); nan for a size that does not parse."""
    try:
        spec = model_spec(family, size, 2)
    except ValueError:
        return float("nan")
    return float(spec.depth * spec.hidden**2)


def preset_specs() -> list[ModelSpec]:
    """Every preset, small to large, each size with the patch sizes 2/4/8: DiT first, then MM-DiT."""
    return [model_spec("dit", size, patch) for size in DIT_SIZES for patch in DIT_PATCHES] + [
        model_spec("mmdit", f"d{depth}", patch) for depth in MMDIT_DEPTHS for patch in MMDIT_PATCHES
    ]


def list_presets() -> list[str]:
    """Every preset name (preset_specs' order)."""
    return [spec.name for spec in preset_specs()]


def build_model(model: ModelSpec | str, **kwargs) -> "nn.Module":
    """The module of a spec (or of a typed name, with `attention=` / `qk_norm=` for an MM-DiT's variant);
    other keyword arguments go to the constructor."""
    spec = as_spec(model, kwargs.pop("attention", None), kwargs.pop("qk_norm", None))
    geometry = {"patch_size": spec.patch, "hidden_size": spec.hidden, "depth": spec.depth, "num_heads": spec.heads}
    if spec.family == "dit":
        from .dit import DiT

        if (spec.attention, spec.qk_norm) != ("joint", None):
            raise ValueError(f"{spec.name}: attention={spec.attention!r} and qk_norm apply to MM-DiT only")
        return DiT(**geometry, **kwargs)
    if spec.family == "mmdit":
        from .mmdit import MMDiT

        return MMDiT(**geometry, attention=spec.attention, qk_norm=spec.qk_norm, **kwargs)
    raise AssertionError(spec.family)
