"""Arguments and handlers of `ditscale bench` and `ditscale models`. The handlers import what they
measure (torch loads there), so that `ditscale --help` stays instant."""

from __future__ import annotations

import argparse

from harness.errors import UserError


def _cmd_models(args: argparse.Namespace) -> int:
    from harness.bench.model_table import print_model_table

    print_model_table(
        image_size=args.image_size, input_size=args.input_size, channels=args.channels, as_json=args.json
    )
    return 0


def add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list model presets with parameters and forward GFLOPs")
    size = p.add_mutually_exclusive_group()
    size.add_argument(
        "--image-size", type=int, default=None,
        help="pixel size of a latent-diffusion image (SD VAE: /8, 4 channels; 256 -> 32x32x4, the DiT setting)",
    )
    size.add_argument("--input-size", type=int, default=None, help="raw model input size (pixels or latents)")
    p.add_argument("--channels", type=int, default=None, help="input channels with --input-size (default 4)")
    p.add_argument("--json", action="store_true", help="one JSON object per preset, in a JSON list")
    p.set_defaults(func=_cmd_models)


def _cmd_bench(args: argparse.Namespace) -> int:
    if not args.model and not args.data and not args.startup:
        raise UserError("bench: name a model preset (e.g. DiT-S/2), and/or give --data DIR, and/or --startup")
    if args.startup:
        from harness.bench.startup import MODES, run_startup_bench

        run_startup_bench(args.startup_trials, args.startup_workers,
                          MODES if args.startup_mode == "both" else (args.startup_mode,))
    for folder in args.data:
        from harness.data import DataError
        from harness.data.throughput import format_throughput, measure_loader_throughput

        try:
            result = measure_loader_throughput(folder, args.data_batch, seconds=args.data_seconds,
                                               num_workers=args.data_workers)
        except DataError as err:
            raise UserError(f"--data {folder}: {err}") from None
        print(f"{folder}: {format_throughput(result)}")
    if not args.model:
        return 0
    from harness.bench.step_time import run_bench

    run_bench(
        args.model, batch=args.batch, steps=args.steps, warmup=args.warmup, precision=args.precision,
        device=args.device, input_size=args.input_size, channels=args.channels, reference=args.reference,
        compile=args.compile, as_json=args.json,
    )
    return 0


def add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="time training steps of a model (vs diffusers), the data loader, trial start-up")
    p.add_argument("model", nargs="?", default=None, help="preset name, e.g. DiT-S/2")
    p.add_argument("--data", action="append", default=[], metavar="DIR",
                   help="packed dataset folder: print loader samples/s per process (repeatable: latents, pixels)")
    p.add_argument("--data-batch", type=int, default=256, help="loader batch size for --data")
    p.add_argument("--data-workers", type=int, default=0, help="DataLoader worker processes for --data")
    p.add_argument("--data-seconds", type=float, default=5.0, help="how long to stream each --data folder")
    p.add_argument("--startup", action="store_true",
                   help="time a sweep trial's start-up (to its first step) on an embedded Ray, per phase")
    p.add_argument("--startup-trials", type=int, default=4, help="trials per --startup mode, one at a time")
    p.add_argument("--startup-workers", type=int, default=1, help="Ray Train workers per --startup trial")
    p.add_argument("--startup-mode", choices=["both", "in-process", "workers"], default="both",
                   help="in-process: single-worker trials in Tune's reused process; workers: a worker group per trial")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10, help="timed steps after warm-up")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--input-size", type=int, default=32, help="model input size (latents: 32 for 256 px)")
    p.add_argument("--channels", type=int, default=4)
    p.add_argument(
        "--reference", choices=["auto", "none"], default="auto",
        help="auto: also time diffusers' equivalent model in this process, when diffusers is installed",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile both models first")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=_cmd_bench)
