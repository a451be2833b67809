"""`ditscale` command line. Thin: each sub-command parses its arguments and calls one module.

Heavy imports (torch, Ray, DeepSpeed, MLflow) happen inside the handlers so that `ditscale --help`
and argument errors are instant.
"""

from __future__ import annotations

import argparse
import sys


from harness.errors import UserError  # noqa: F401  (re-exported for sub-command modules)
from harness.eval_cli import add_assets, add_eval


def _cmd_models(args: argparse.Namespace) -> int:
    from harness.model_table import print_model_table

    print_model_table(
        image_size=args.image_size, input_size=args.input_size, channels=args.channels, as_json=args.json
    )
    return 0


def _add_models(sub: argparse._SubParsersAction) -> None:
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
        from harness.bench_startup import MODES, run_startup_bench

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
    from harness.bench import run_bench

    run_bench(
        args.model, batch=args.batch, steps=args.steps, warmup=args.warmup, precision=args.precision,
        device=args.device, input_size=args.input_size, channels=args.channels, reference=args.reference,
        compile=args.compile, as_json=args.json,
    )
    return 0


def _add_bench(sub: argparse._SubParsersAction) -> None:
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


def _cmd_train(args: argparse.Namespace) -> int:
    from harness.config import expand_grid, load_study

    study = load_study(args.config, args.set)
    trials = expand_grid(study)
    if args.trial is None and len(trials) > 1:
        listing = "; ".join(f"{i}: {t.model_name} {t.objective.kind} ({t.trial_id})" for i, t in enumerate(trials))
        raise UserError(f"the study has {len(trials)} trials; choose one with --trial INDEX ({listing}) "
                        "or run them all with `ditscale sweep`")
    index = args.trial or 0
    if not 0 <= index < len(trials):
        raise UserError(f"--trial {index}: the study has trials 0..{len(trials) - 1}")
    from harness.tracking import check_tracking_uri, resolve_tracking_uri

    check_tracking_uri(resolve_tracking_uri(trials[index].tracking.uri))
    from harness.train import train_trial

    result = train_trial(trials[index])
    print(f"trial {trials[index].trial_id}: {result.status} at step {result.step}; MLflow run {result.run_id}")
    return 0 if result.status in ("finished", "killed") else 1


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", action="append", default=[], metavar="DOTTED.KEY=VALUE",
                   help="override a study field, e.g. --set train.steps=100 (repeatable)")


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train one trial of a study (alone or under torchrun)")
    p.add_argument("config", help="study YAML file")
    p.add_argument("--trial", type=int, default=None, help="index of the grid point to train (see --dry-run of sweep)")
    _add_set(p)
    p.set_defaults(func=_cmd_train)


def _cmd_sweep(args: argparse.Namespace) -> int:
    from harness.sweep import run_sweep

    result = run_sweep(args.config, args.set, address=args.address, dry_run=args.dry_run,
                       max_concurrent=args.max_concurrent, report=not args.no_report)
    if result.get("stopped"):
        return 3  # stopped on request (stop file / Slurm warning signal): resumable
    return 1 if result.get("failed") else 0


def _add_sweep(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="run every trial of a study on Ray (the main command)")
    p.add_argument("config", help="study YAML file")
    p.add_argument("--address", default=None,
                   help="join an existing Ray cluster (auto | HOST:PORT | ray://...); default: start a local one")
    p.add_argument("--dry-run", action="store_true", help="print the planned trials and start nothing")
    p.add_argument("--max-concurrent", type=int, default=None, help="trials at once (default: what the cluster fits)")
    p.add_argument("--no-report", action="store_true", help="skip the scaling report at the end")
    _add_set(p)
    p.set_defaults(func=_cmd_sweep)


def _cmd_report(args: argparse.Namespace) -> int:
    from analysis.report import build_report

    try:
        index = build_report(args.tracking_uri, args.experiment, parent_run_id=args.parent_run, out_dir=args.out)
    except LookupError as err:  # no such experiment
        raise UserError(f"--experiment: {err}") from None
    print(f"Report: {index}")
    return 0


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="scaling fits, figures and an HTML/Markdown report of a study from MLflow")
    p.add_argument("--experiment", required=True, help="MLflow experiment = the study's name")
    p.add_argument("--parent-run", default=None, help="only this sweep's trials (default: every trial, newest run)")
    p.add_argument("--out", default=None, help="output folder (default: reports/<experiment>)")
    p.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db")
    p.set_defaults(func=_cmd_report)


def _cmd_data(args: argparse.Namespace) -> int:
    from harness.data.commands import run

    return run(args)


def _add_data(sub: argparse._SubParsersAction) -> None:
    from harness.data.commands import add_arguments  # argparse only; torch loads in the handlers

    p = sub.add_parser("data", help="pack, verify and benchmark WebDataset shards")
    add_arguments(p)
    p.set_defaults(func=_cmd_data)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ditscale", description="Scaling studies of diffusion transformers.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from harness.slurm import add_slurm

    for add in (_add_models, _add_data, _add_bench, _add_train, _add_sweep, add_eval, _add_report, add_slurm,
                add_assets):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as err:
        for line in str(err).splitlines():
            print(f"ditscale {args.command}: error: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
