"""Image preprocessing for packing: ADM-style centre crop for photos, plain resizes for small sets."""

from __future__ import annotations

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm")


def center_crop_arr(image: Image.Image, size: int) -> np.ndarray:
    """The guided-diffusion (ADM) preprocessing that DiT uses: halve with a BOX filter while the
    short side is at least twice `size`, resize with BICUBIC so the short side equals `size`, then
    crop the centre square. Returns uint8 [size, size, C]."""
    while min(image.size) >= 2 * size:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), resample=Image.BICUBIC)
    array = np.asarray(image)
    top = (array.shape[0] - size) // 2
    left = (array.shape[1] - size) // 2
    array = array[top: top + size, left: left + size]
    return np.ascontiguousarray(array if array.ndim == 3 else array[:, :, None])


def load_rgb(path: str) -> Image.Image:
    """An image file as RGB (palette, alpha, grayscale and CMYK converted; alpha over white)."""
    with Image.open(path) as img:
        img.load()
        if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return img.convert("RGB")


def resize_square(array: np.ndarray, size: int, resample=Image.BICUBIC) -> np.ndarray:
    """uint8 [h, w] or [h, w, C] -> uint8 [size, size, C] (small sets such as the 8x8 digits)."""
    squeeze = array.ndim == 3 and array.shape[2] == 1
    image = Image.fromarray(array[:, :, 0] if squeeze else array)
    out = np.asarray(image.resize((size, size), resample=resample))
    return np.ascontiguousarray(out if out.ndim == 3 else out[:, :, None])
