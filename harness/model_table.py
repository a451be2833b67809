"""`ditscale models`: every preset with its analytic parameter count and forward GFLOPs."""

from __future__ import annotations

import json

from models.flops import count_model, latent_geometry
from models.registry import list_presets

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
    for name in list_presets():
        try:
            rows.append(count_model(name, input_size=input_size, in_channels=channels).as_dict())
        except ValueError:  # patch does not divide this input size
            continue
    return rows


def print_model_table(image_size=None, input_size=None, channels=None, as_json: bool = False) -> None:
    rows = model_rows(image_size, input_size, channels)
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    print(f"{'model':<14}{'depth':>6}{'hidden':>7}{'heads':>6}{'tokens':>7}{'params (M)':>12}{'GFLOPs':>10}")
    for r in rows:
        print(
            f"{r['name']:<14}{r['depth']:>6}{r['hidden']:>7}{r['heads']:>6}{r['tokens']:>7}"
            f"{r['params'] / 1e6:>12.1f}{r['gflops']:>10.2f}"
        )
    first = rows[0] if rows else None
    where = f" at input {first['input_size']}x{first['input_size']}x{first['in_channels']}" if first else ""
    print(f"\n{GFLOPS_CONVENTION}{where}; params include the frozen position table.")
