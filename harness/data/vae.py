"""VAE latents for packing: a diffusers AutoencoderKL by local path or hub name.

The stored latent is the posterior mean, unscaled, as fp16; the manifest keeps the VAE's
scaling_factor and shift_factor and the loader applies (latent - shift) * scale.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from harness.data.errors import DataError


def load_vae(spec: str, device: str = "cpu"):
    """A diffusers AutoencoderKL from a folder (its own, or a pipeline folder with vae/) or a hub name
    (downloads follow Hugging Face's own settings, e.g. HF_HUB_OFFLINE)."""
    try:
        import torch  # noqa: F401
        from diffusers import AutoencoderKL
    except ImportError as err:
        raise DataError(f"--vae needs diffusers ({err}); install it or pack pixels") from None
    kwargs = {}
    path = Path(spec)
    if path.is_dir() and not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
        kwargs["subfolder"] = "vae"
    try:
        vae = AutoencoderKL.from_pretrained(spec, **kwargs)
    except Exception as err:  # noqa: BLE001 - diffusers/hub raise many types; the user fixes the path
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"--vae {spec}: cannot load an AutoencoderKL ({first})") from None
    return vae.to(device).eval()


def vae_downsample(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def vae_info(vae, spec: str) -> dict:
    config = vae.config
    return {
        "name": spec,
        "class": type(vae).__name__,
        "scaling_factor": float(config.scaling_factor),
        "shift_factor": float(getattr(config, "shift_factor", None) or 0.0),
        "latent_channels": int(config.latent_channels),
        "downsample": vae_downsample(vae),
        "latent": "posterior mean, unscaled, fp16",
    }


def encode_latents(vae, images: np.ndarray, device: str = "cpu") -> np.ndarray:
    """uint8 [B, H, W, C] -> fp16 [B, latent_channels, H/f, W/f] posterior means."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float().div_(127.5).sub_(1)
    wanted = vae.config.in_channels
    if x.shape[1] != wanted:
        if x.shape[1] == 1 and wanted == 3:
            x = x.expand(-1, 3, -1, -1)
        else:
            raise DataError(f"--vae: the VAE takes {wanted}-channel images, the source has {x.shape[1]}")
    with torch.inference_mode():
        mean = vae.encode(x.to(vae.dtype)).latent_dist.mean
    return mean.float().cpu().numpy().astype(np.float16)
