"""What the hardware can do: dense peak throughput per accelerator, for MFU."""

from __future__ import annotations

import torch

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendors' data sheets (SXM parts).
BF16_PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def peak_tflops(device: torch.device, precision: str) -> float | None:
    """Peak dense TFLOP/s for `precision` on `device`, or None when we do not know it (CPUs,
    unlisted GPUs, fp32). MFU is only reported where this is known."""
    if device.type != "cuda" or precision not in ("bf16", "fp16"):
        return None
    name = device_name(device)
    for key, peak in BF16_PEAK_TFLOPS.items():
        if key in name:
            return peak
    return None
