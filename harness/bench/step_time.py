"""`ditscale bench MODEL`: time training steps of one model, and of diffusers' equivalent as a reference.

A training step is forward + backward + AdamW on random inputs. Steps of our model and the
reference are interleaved one by one and the median step time is reported, so background load on
the machine hits both alike and the ratio stays meaningful. Throughput uses the analytic count of
models/flops.py: training FLOPs per image = 3 × forward multiply-adds × 2.
"""

from __future__ import annotations

import json
import resource
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from harness.errors import UserError
from harness.hardware import achieved_tflops, device_name, peak_tflops
from models.flops import SD3_CONTEXT_DIM, SD3_POOLED_DIM, SD3_TEXT_TOKENS, count_model
from models.registry import ModelSpec, build_model, parse_model_name

NUM_CLASSES = 1000


@dataclass
class Contender:
    """One model under test: how to build its inputs and how to run its forward pass."""

    label: str
    module: nn.Module
    make_inputs: Callable[[int, torch.device], dict]
    forward: Callable[[nn.Module, dict], torch.Tensor]


def _dit_inputs(input_size: int, channels: int) -> Callable[[int, torch.device], dict]:
    def make(batch: int, device: torch.device) -> dict:
        return {
            "x": torch.randn(batch, channels, input_size, input_size, device=device),
            "t": torch.randint(0, 1000, (batch,), device=device),
            "y": torch.randint(0, NUM_CLASSES, (batch,), device=device),
        }

    return make


def _ours(spec: ModelSpec, input_size: int, channels: int) -> Contender:
    model = build_model(spec, input_size=input_size, in_channels=channels, num_classes=NUM_CLASSES)
    return Contender(f"ditscale {spec.name}", model, _dit_inputs(input_size, channels),
                     lambda m, a: m(a["x"], a["t"], a["y"]))


def _diffusers_dit(spec: ModelSpec, input_size: int, channels: int) -> Contender:
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel(
        num_attention_heads=spec.heads, attention_head_dim=spec.hidden // spec.heads, in_channels=channels,
        out_channels=2 * channels, num_layers=spec.depth, patch_size=spec.patch, sample_size=input_size,
        num_embeds_ada_norm=NUM_CLASSES,
    )
    return Contender(
        "diffusers DiTTransformer2DModel", model, _dit_inputs(input_size, channels),
        lambda m, a: m(hidden_states=a["x"], timestep=a["t"], class_labels=a["y"]).sample,
    )


def _mmdit_inputs(input_size: int, channels: int) -> Callable[[int, torch.device], dict]:
    """Random latents and SD3-shaped text inputs: the text geometry models/flops.py counts by default."""
    def make(batch: int, device: torch.device) -> dict:
        return {
            "x": torch.randn(batch, channels, input_size, input_size, device=device),
            "t": torch.rand(batch, device=device) * 1000,  # diffusers' timestep scale (1000 * sigma)
            "context": torch.randn(batch, SD3_TEXT_TOKENS, SD3_CONTEXT_DIM, device=device),
            "pooled": torch.randn(batch, SD3_POOLED_DIM, device=device),
        }

    return make


def _ours_mmdit(spec: ModelSpec, input_size: int, channels: int) -> Contender:
    model = build_model(spec, input_size=input_size, in_channels=channels, context_dim=SD3_CONTEXT_DIM,
                        pooled_dim=SD3_POOLED_DIM)  # a typed name parses to SD3's joint attention
    return Contender(f"ditscale {spec.name} ({spec.attention})", model, _mmdit_inputs(input_size, channels),
                     lambda m, a: m(a["x"], a["t"], a["context"], a["pooled"]))


def _diffusers_sd3(spec: ModelSpec, input_size: int, channels: int) -> Contender:
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel(
        sample_size=input_size, patch_size=spec.patch, in_channels=channels, out_channels=channels,
        num_layers=spec.depth, attention_head_dim=spec.hidden // spec.heads, num_attention_heads=spec.heads,
        joint_attention_dim=SD3_CONTEXT_DIM, caption_projection_dim=spec.hidden,
        pooled_projection_dim=SD3_POOLED_DIM, pos_embed_max_size=None,
    )
    return Contender(
        "diffusers SD3Transformer2DModel", model, _mmdit_inputs(input_size, channels),
        lambda m, a: m(hidden_states=a["x"], encoder_hidden_states=a["context"], pooled_projections=a["pooled"],
                       timestep=a["t"]).sample,
    )


# family -> builder of diffusers' equivalent model
REFERENCES: dict[str, Callable[[ModelSpec, int, int], Contender]] = {"dit": _diffusers_dit, "mmdit": _diffusers_sd3}
OURS: dict[str, Callable[[ModelSpec, int, int], Contender]] = {"dit": _ours, "mmdit": _ours_mmdit}


def _diffusers_available() -> bool:
    try:
        import diffusers  # noqa: F401
    except ImportError:
        return False
    return True


class _Runner:
    """Holds one contender's optimizer and times single training steps."""

    def __init__(self, c: Contender, device: torch.device, precision: str, batch: int, compile: bool):
        self.c = c
        self.device = device
        c.module.to(device).train()
        self.forward = torch.compile(c.forward) if compile else c.forward
        self.opt = torch.optim.AdamW([p for p in c.module.parameters() if p.requires_grad], lr=1e-4)
        self.inputs = c.make_inputs(batch, device)
        self.target = None
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
        self.times: list[float] = []

    def step(self, record: bool) -> None:
        _sync(self.device)
        start = time.perf_counter()
        with self.autocast:
            out = self.forward(self.c.module, self.inputs)
        if self.target is None:
            self.target = torch.randn(out.shape, device=self.device)
        loss = torch.nn.functional.mse_loss(out.float(), self.target)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        _sync(self.device)
        if record:
            self.times.append(time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _result(r: _Runner, batch: int, forward_gflops: float, peak: float | None) -> dict:
    step = statistics.median(r.times)
    tflops = achieved_tflops(batch / step, forward_gflops)
    return {
        "label": r.c.label,
        "step_s": step,
        "img_per_s": batch / step,
        "tflops": tflops,
        "mfu": tflops / peak if peak else None,
    }


def run_bench(
    name: str,
    batch: int = 8,
    steps: int = 10,
    warmup: int = 3,
    precision: str = "fp32",
    device: str | None = None,
    input_size: int = 32,
    channels: int = 4,
    reference: str = "auto",
    compile: bool = False,
    as_json: bool = False,
) -> dict:
    try:
        spec = parse_model_name(name)
        count = count_model(spec, input_size=input_size, in_channels=channels)
    except ValueError as err:
        raise UserError(str(err)) from None
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but no CUDA device is visible")
    torch.manual_seed(0)

    contenders = [OURS[spec.family](spec, input_size, channels)]
    if reference == "auto" and spec.family in REFERENCES and _diffusers_available():
        contenders.append(REFERENCES[spec.family](spec, input_size, channels))
    runners = [_Runner(c, dev, precision, batch, compile) for c in contenders]
    for i in range(warmup + steps):
        for r in runners:  # interleaved, so background load affects every contender alike
            r.step(record=i >= warmup)

    peak = peak_tflops(dev, precision)
    results = [_result(r, batch, count.gflops, peak) for r in runners]
    report = {
        "model": name,
        "device": device_name(dev),
        "precision": precision,
        "batch": batch,
        "input": [channels, input_size, input_size],
        "forward_gflops_macs": count.gflops,
        "params": count.params,
        "results": results,
        "peak_memory_mib": _peak_memory_mib(dev),
    }
    if len(results) == 2:
        # < 1 means our step is faster than the reference's
        report["step_time_ratio_vs_reference"] = results[0]["step_s"] / results[1]["step_s"]
    if as_json:
        print(json.dumps(report, indent=1))
    else:
        _print_report(report)
    return report


def _peak_memory_mib(dev: torch.device) -> float:
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB; whole process


def _print_report(rep: dict) -> None:
    c, s, _ = rep["input"]
    print(
        f"{rep['model']} on {rep['device']}, {rep['precision']}, batch {rep['batch']}, input {c}x{s}x{s}; "
        f"{rep['forward_gflops_macs']:.3f} forward GFLOPs (multiply-adds), {rep['params'] / 1e6:.1f} M params"
    )
    for r in rep["results"]:
        mfu = f"  MFU {100 * r['mfu']:.1f}%" if r["mfu"] is not None else ""
        print(f"  {r['label']:<34} {r['step_s'] * 1e3:8.1f} ms/step  {r['img_per_s']:9.1f} img/s  "
              f"{r['tflops']:7.3f} TFLOP/s{mfu}")
    if "step_time_ratio_vs_reference" in rep:
        print(f"  step time ratio ours/reference: {rep['step_time_ratio_vs_reference']:.3f} (< 1: ours faster)")
    where = "peak memory allocated" if rep["device"] != "cpu" else "peak process RSS"
    print(f"  {where}: {rep['peak_memory_mib']:.0f} MiB; TFLOP/s count training as 3 x forward, 2 FLOPs per multiply-add")
