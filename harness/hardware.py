"""What the hardware can do (dense peak throughput per accelerator, for MFU) and what a training
run achieved on it, in hardware FLOP/s."""

from __future__ import annotations

import torch

from models.flops import training_gflops

FLOPS_PER_MAC = 2  # model compute is counted in multiply-adds (models/flops.py); hardware does 2 FLOPs each

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


def achieved_tflops(images_per_s: float, forward_gflops: float) -> float:
    """Hardware TFLOP/s of training at `images_per_s`: training compute per image (3 x forward
    multiply-adds, models.flops.training_gflops) x 2 FLOPs per multiply-add."""
    return images_per_s * training_gflops(forward_gflops, 1) * FLOPS_PER_MAC / 1e3
