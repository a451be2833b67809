"""`ditscale data stats`: compute and cache a packed dataset's FID reference statistics.

The action sits under `ditscale data` because it reads a dataset folder, but it runs evaluation's
feature networks (clean-fid's Inception, the named stand-ins), so it lives in this room and harness.cli
adds it to the data actions: data/ never imports evaluation/ (tests/repo/test_layout.py, ROOMS). torch and
the networks load in the handler, so that `ditscale --help` stays instant."""

from __future__ import annotations

import argparse
import json
import sys

from harness.errors import UserError


def add_data_stats(actions: argparse._SubParsersAction) -> None:
    """Add `stats` to the actions of `ditscale data` (harness.data.commands.add_data returns them)."""
    s = actions.add_parser("stats", help="precompute the FID reference statistics of a packed dataset",
                           description="Compute (once) and cache beside the shards the reference statistics that "
                                       "evaluation compares samples with: clean-fid's Inception features when its "
                                       "weights are available, else the dataset's named stand-in (lenet, shapesdet).")
    s.add_argument("dir", help="dataset folder (with dataset.json)")
    s.add_argument("--split", default="train", choices=["train", "val"], help="real images to use (default: train)")
    s.add_argument("--extractor", default="auto", choices=["auto", "inception", "lenet", "shapesdet"],
                   help="feature extractor (default: auto = Inception when present, else a stand-in)")
    s.add_argument("--samples", type=int, default=None, help="reference images (default: the split, up to 50,000)")
    s.add_argument("--assets", default=None, help="assets folder (default: $DITSCALE_ASSETS)")
    s.add_argument("--device", default="cpu", help="device of the feature network (default: cpu)")
    s.add_argument("--json", action="store_true", help="print the result as JSON")
    s.set_defaults(func=_stats)


def _stats(args: argparse.Namespace) -> int:
    from harness.evaluation.features import EvalData, choose_extractor, reference_stats  # torch

    if args.samples is not None and args.samples < 2:
        raise UserError(f"--samples {args.samples}: need at least 2 images")
    data = EvalData.from_folder(args.dir, assets=args.assets)
    extractor, _ = choose_extractor(args.extractor, data, args.device, progress=sys.stderr.isatty())
    if extractor is None:
        raise UserError(f"{args.dir}: no feature extractor available (no Inception weights, and no stand-in for "
                        "data without class labels)")
    stats = reference_stats(data, extractor, args.split, args.samples, device=args.device,
                            progress=sys.stderr.isatty())
    result = {"path": str(stats["path"]), "extractor": extractor.name, "metric": extractor.metric("fd"),
              "split": args.split, "count": stats["count"], "dims": int(stats["feats"].shape[1]),
              "computed": stats["computed"]}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        state = "computed" if stats["computed"] else "already cached"
        print(f"{result['path']}: {extractor.name} features of {result['count']} {args.split} images "
              f"({result['dims']}-d), {state}; samples are scored as {result['metric']}_cfg*")
    return 0
