"""`ditscale models`: every preset with its analytic parameter count and forward GFLOPs.

MM-DiT presets get one row per attention variant (`attention`: joint = SD3, split = the decoupled
block) and are counted with SD3's text geometry (154 text tokens of width 4096, 2048-wide pooled;
fields `text_tokens`, `context_dim`, `pooled_dim`). SD3-medium is the `MMDiT-d24/2` joint row at
its latent geometry: `ditscale models --json --input-size 128 --channels 16` -> 2,028,328,000
params (its sin-cos table is a buffer and is not counted).
"""

from __future__ import annotations

import json
from dataclasses import replace

from models.flops import count_model, latent_geometry
from models.registry import ATTENTIONS, preset_specs

GFLOPS_CONVENTION = "forward GFLOPs = multiply-adds of one forward pass, as in the DiT paper"


def model_rows(image_size: int | None = None, input_size: int | None = None, channels: int | None = None) -> list[dict]:
    """One dict per preset whose patch divides the input. `image_size` is a latent-diffusion pixel
    size (SD VAE geometry); `input_size`/`channels` describe the raw model input instead."""
    if input_size is None:
        input_size, default_channels = latent_geometry(256 if image_size is None else image_size)
    else:
        default_channels = 4
    channels = default_channels if channels is None else channels
    rows = []
    for spec in preset_specs():
        for attention in ATTENTIONS if spec.family == "mmdit" else ("joint",):
            try:
                rows.append(count_model(replace(spec, attention=attention), input_size=input_size,
                                        in_channels=channels).as_dict())
            except ValueError:  # patch does not divide this input size
                break
    return rows


def print_model_table(image_size=None, input_size=None, channels=None, as_json: bool = False) -> None:
    rows = model_rows(image_size, input_size, channels)
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    print(f"{'model':<14}{'attn':>6}{'depth':>6}{'hidden':>7}{'heads':>6}{'tokens':>7}{'params (M)':>12}{'GFLOPs':>10}")
    for r in rows:
        print(
            f"{r['name']:<14}{r.get('attention') or '':>6}{r['depth']:>6}{r['hidden']:>7}{r['heads']:>6}"
            f"{r['tokens']:>7}"
            f"{r['params'] / 1e6:>12.1f}{r['gflops']:>10.2f}"
        )
    first = rows[0] if rows else None
    where = f" at input {first['input_size']}x{first['input_size']}x{first['in_channels']}" if first else ""
    print(f"\n{GFLOPS_CONVENTION}{where}; DiT params include the frozen position table.")
    if any(r.get("family") == "mmdit" for r in rows):
        print("MM-DiT rows: text stream included, SD3 text geometry (154 tokens x 4096, pooled 2048); "
              "params exclude the sin-cos buffer (SD3-medium = MMDiT-d24/2 joint at --input-size 128 --channels 16).")
