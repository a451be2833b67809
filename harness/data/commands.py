"""Arguments and handlers of `ditscale data pack|verify|bench` (argparse only at import time).
`ditscale data stats` (FID reference statistics) is added by harness/evaluation/data_stats.py: it runs
evaluation's feature networks, and data/ sits below evaluation/ (tests/repo/test_layout.py, ROOMS)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict


def add_arguments(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    """The actions of `ditscale data`, each with its handler; returns them so a higher room can add one."""
    sub = parser.add_subparsers(dest="data_command", required=True, metavar="ACTION")

    p = sub.add_parser("pack", help="pack images (+ labels, captions) into WebDataset shards",
                       description="Pack SOURCE into OUT/NAME-000000.tar ..., OUT/val-000000.tar ... and "
                                   "OUT/dataset.json.")
    p.add_argument("source", help="digits | shapes (built-in sets), an image folder with class sub-folders, "
                                  "or a .jsonl/.json/.csv/.tsv file of image paths and captions")
    p.add_argument("out", help="output folder")
    p.add_argument("--image-size", type=int, default=None,
                   help="pixel size (default: digits 16, shapes 32, photos 256; photos get the ADM centre crop)")
    p.add_argument("--name", default="train", help="name of the main split (default: train)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="held-out split 'val' (default: 0.05; 0: none)")
    p.add_argument("--shard-size", type=int, default=5000, help="samples per shard (default: 5000)")
    p.add_argument("--seed", type=int, default=0, help="split, order and shapes seed (default: 0)")
    p.add_argument("--count", type=int, default=None,
                   help="shapes: how many to draw (default 10000); others: a deterministic random subset")
    p.add_argument("--vae", default=None,
                   help="store latents from this diffusers AutoencoderKL (local folder or hub name)")
    p.add_argument("--text-encoder", default=None,
                   help="store precomputed text embeddings (models.text spec: clip:PATH, t5:PATH, sd3:..., word:FILE)")
    p.add_argument("--device", default="cpu", help="device of the VAE and text encoder (default: cpu)")
    p.add_argument("--batch-size", type=int, default=64, help="VAE / text encoder batch (default: 64)")
    p.add_argument("--workers", type=int, default=0, help="image decoding processes (default: 0, in-process)")
    p.add_argument("--overwrite", action="store_true", help="replace existing shards and manifest entries of "
                                                            "the splits being written")
    p.set_defaults(func=_pack)

    v = sub.add_parser("verify", help="read every shard, check samples, counts and sha256 against dataset.json")
    v.add_argument("dir", help="dataset folder (with dataset.json)")
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    v.set_defaults(func=_verify)

    b = sub.add_parser("bench", help="loader samples/s per process on a packed dataset")
    b.add_argument("dir", help="dataset folder, or a shard pattern")
    b.add_argument("--split", default="train")
    b.add_argument("--batch-size", type=int, default=256)
    b.add_argument("--seconds", type=float, default=5.0, help="timed seconds after warm-up (default: 5)")
    b.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default: 0)")
    b.add_argument("--shuffle", type=int, default=1000, help="shuffle buffer (default: 1000)")
    b.add_argument("--json", action="store_true", help="print the result as JSON")
    b.set_defaults(func=_bench)
    return sub


def add_data(sub: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """`ditscale data`; returns its actions (harness.cli adds `stats` from the evaluation room)."""
    p = sub.add_parser("data", help="pack, verify and benchmark WebDataset shards")
    return add_arguments(p)


def _pack(args: argparse.Namespace) -> int:
    from harness.data.pack import Terminated, pack_dataset, terminate_as_interrupt

    try:
        with terminate_as_interrupt():
            manifest = pack_dataset(
                args.source, args.out, name=args.name, image_size=args.image_size, val_fraction=args.val_fraction,
                shard_size=args.shard_size, seed=args.seed, count=args.count, vae=args.vae,
                text_encoder=args.text_encoder, device=args.device, batch_size=args.batch_size,
                workers=args.workers, overwrite=args.overwrite,
            )
    except KeyboardInterrupt as err:  # pack builds in a scratch folder it removes: OUT is untouched
        how, code = ("terminated (SIGTERM)", 143) if isinstance(err, Terminated) else ("interrupted", 130)
        print(f"ditscale data pack: {how}; {args.out} left as it was", file=sys.stderr)
        return code
    shape = "x".join(str(d) for d in manifest["sample_shape"])
    for split, entry in manifest["splits"].items():
        print(f"{args.out}/{entry['pattern']}: {entry['count']} samples in {len(entry['shards'])} shard(s)")
    print(f"{args.out}/dataset.json: {manifest['kind']} {shape}, {manifest['num_classes'] or 'no'} classes"
          + (f", {manifest['skipped']} unreadable images skipped" if manifest["skipped"] else ""))
    return 0


def _verify(args: argparse.Namespace) -> int:
    from harness.data.verify import verify_dataset

    result = verify_dataset(args.dir)
    if args.json:
        print(json.dumps({"ok": result.ok, "good": result.good, "corrupt": result.corrupt,
                          "problems": result.problems, "shards": [asdict(s) for s in result.shards]}, indent=2))
    else:
        print("\n".join(result.lines()))
    return 0 if result.ok else 1


def _bench(args: argparse.Namespace) -> int:
    from harness.data.throughput import format_throughput, measure_loader_throughput

    result = measure_loader_throughput(args.dir, args.batch_size, seconds=args.seconds, num_workers=args.workers,
                                       shuffle=args.shuffle, split=args.split)
    print(json.dumps(result, indent=2) if args.json else format_throughput(result))
    return 0
