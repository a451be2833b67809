"""Encoding and decoding of the members of one sample: png, npy, cls, txt, json.

Decoding is on the loader's hot path, so `decode_npy` parses each distinct .npy header once and then
takes a zero-copy `np.frombuffer` view; `decode_png` goes straight from PIL to a uint8 array.
"""

from __future__ import annotations

import ast
import io
import json

import numpy as np

_NPY_MAGIC = b"\x93NUMPY"
_npy_headers: dict[bytes, tuple[np.dtype, tuple[int, ...], int, int]] = {}


def encode_npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def decode_npy(data: bytes | memoryview) -> np.ndarray:
    """A read-only view of an .npy payload (version 1/2/3, C order, no pickled objects)."""
    if bytes(data[:6]) != _NPY_MAGIC:
        raise ValueError("not an .npy payload")
    major = data[6]
    if major == 1:
        end = 10 + int.from_bytes(data[8:10], "little")
    elif major in (2, 3):
        end = 12 + int.from_bytes(data[8:12], "little")
    else:
        raise ValueError(f"unsupported .npy version {major}")
    header = bytes(data[:end])
    parsed = _npy_headers.get(header)
    if parsed is None:
        meta = ast.literal_eval(header[10 if major == 1 else 12:].decode("latin1"))
        if meta.get("fortran_order"):
            raise ValueError("Fortran-ordered .npy payloads are not supported")
        dtype = np.dtype(meta["descr"])
        if dtype.hasobject:
            raise ValueError("object arrays are not allowed in shards")
        shape = tuple(int(d) for d in meta["shape"])
        count = 1
        for d in shape:
            count *= d
        parsed = (dtype, shape, count, count * dtype.itemsize)
        if len(_npy_headers) < 1024:
            _npy_headers[header] = parsed
    dtype, shape, count, nbytes = parsed
    if len(data) - end != nbytes:
        raise ValueError(f".npy payload has {len(data) - end} data bytes, expected {nbytes}")
    return np.frombuffer(data, dtype=dtype, count=count, offset=end).reshape(shape)


def encode_png(image: np.ndarray) -> bytes:
    """uint8 [H, W] or [H, W, 1|3] -> PNG bytes (grayscale or RGB)."""
    from PIL import Image

    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG")
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """PNG (or any PIL-readable image) bytes -> uint8 [H, W, C] with C = 1 (grayscale) or 3 (RGB)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        if img.mode not in ("L", "RGB"):
            img = img.convert("RGB" if img.mode not in ("1", "I", "I;16", "F") else "L")
        array = np.asarray(img)
    return array[:, :, None] if array.ndim == 2 else array


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_tv_decode_png = None


def torchvision_png_decoder():
    """torchvision.io.decode_png, imported on first use (False when torchvision is unavailable)."""
    global _tv_decode_png
    if _tv_decode_png is None:
        try:
            from torchvision.io import decode_png as tv_decode_png
        except Exception:  # noqa: BLE001 - torchvision missing or broken: PIL does the work
            tv_decode_png = False
        _tv_decode_png = tv_decode_png
    return _tv_decode_png


def decode_image_chw(data: bytes) -> np.ndarray:
    """Image bytes -> uint8 [C, H, W], C = 1 or 3 (the loader's layout). 8-bit grayscale/RGB PNGs go
    through torchvision's libpng decoder (about twice as fast as PIL on small images); anything else
    (JPEG, palette, alpha, 16-bit) through PIL."""
    if bytes(data[:8]) == _PNG_SIGNATURE:
        decode = torchvision_png_decoder()
        if decode:
            import torch

            try:
                image = decode(torch.frombuffer(bytearray(data), dtype=torch.uint8))
            except RuntimeError:
                image = None
            if image is not None and image.dtype == torch.uint8 and image.shape[0] in (1, 3):
                return image.numpy()
    return np.ascontiguousarray(decode_png(data).transpose(2, 0, 1))


def encode_cls(label: int) -> bytes:
    return str(int(label)).encode()


def decode_cls(data: bytes) -> int:
    return int(data)


def encode_txt(text: str) -> bytes:
    return text.encode("utf-8")


def decode_txt(data: bytes) -> str:
    return bytes(data).decode("utf-8")


def encode_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")


def decode_json(data: bytes):
    return json.loads(bytes(data).decode("utf-8"))
