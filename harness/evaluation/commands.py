"""Arguments and handlers of `ditscale assets fetch|status` (the weights evaluation needs; `ditscale eval`
rebuilds a trained trial, so it lives beside `ditscale train` in harness/trial/commands.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from harness import assets


def add_assets(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("assets", help="download evaluation weights (Inception, VAEs, text encoders) for offline use")
    actions = p.add_subparsers(dest="assets_command", required=True, metavar="ACTION")
    f = actions.add_parser("fetch", help="download into an assets folder (on a machine with internet)",
                           description="Download clean-fid's Inception weights (and optionally VAEs / text encoders "
                                       "by hub name) into DEST. Point resources.assets or $DITSCALE_ASSETS at DEST "
                                       "on the cluster: evaluation then computes real FID offline.")
    f.add_argument("--dest", required=True, help="assets folder to fill")
    f.add_argument("--vae", action="append", default=[], metavar="NAME",
                   help="a diffusers AutoencoderKL, e.g. stabilityai/sd-vae-ft-ema (repeatable)")
    f.add_argument("--text-encoder", action="append", default=[], metavar="NAME",
                   help="a Hugging Face text encoder repository, e.g. openai/clip-vit-large-patch14 (repeatable)")
    f.add_argument("--metric", action="append", default=[], choices=sorted(assets.METRIC_WEIGHTS),
                   help="the network of an eval.metrics entry beyond fid, at its pinned revision (repeatable)")
    f.add_argument("--no-inception", action="store_true", help="skip the Inception weights")
    f.add_argument("--inception-url", default=None, help="another address of inception-2015-12-05.pt (a mirror)")
    f.set_defaults(func=_cmd_assets_fetch)
    s = actions.add_parser("status", help="say which evaluation weights this machine can use")
    s.add_argument("--assets", default=None,
                   help="assets folder (default: $DITSCALE_ASSETS, else ~/.cache/ditscale/assets)")
    s.set_defaults(func=_cmd_assets_status)


def _cmd_assets_fetch(args: argparse.Namespace) -> int:
    dest = Path(args.dest).expanduser().resolve()
    dest.mkdir(parents=True, exist_ok=True)
    if not args.no_inception:
        path = assets.fetch_inception(dest, url=args.inception_url or assets.INCEPTION_URL)
        print(f"inception: {path} ({path.stat().st_size / 1e6:.1f} MB, sha256 verified)")
    for name in args.vae:
        print(f"vae {name}: {assets.fetch_vae(name, dest)}")
    for name in args.text_encoder:
        print(f"text encoder {name}: {assets.fetch_text_encoder(name, dest)}")
    for metric in args.metric:
        print(f"{metric}: {assets.fetch_metric_weights(metric, dest)}")
    print(f"use it with: export {assets.ASSETS_ENV}={dest}   (or resources.assets: {dest} in the study)")
    return 0


def _cmd_assets_status(args: argparse.Namespace) -> int:
    from harness.errors import UserError

    folder = assets.assets_dir(args.assets)
    try:
        found, rejected = assets.find_inception(args.assets, place=False), None
    except UserError as err:  # a file with the wrong sha256: said here, and an error when evaluating
        found, rejected = None, err
    print(f"assets folder: {folder}{'' if folder.is_dir() else ' (missing)'}")
    if rejected is not None:
        print(f"inception: REJECTED -> eval stops with this error until it is fixed: {rejected}")
    elif found:
        print(f"inception: {found} (sha256 verified) -> eval computes FID (metrics fid_cfg*, kid_cfg*)")
    else:
        print(f"inception: missing -> eval computes a named stand-in (fd_<extractor>_cfg*), not FID; "
              f"{assets.missing_inception_hint(args.assets)}")
    for kind in ("vae", "text"):
        names = sorted(p.name for p in (folder / kind).iterdir()) if (folder / kind).is_dir() else []
        print(f"{kind}: {', '.join(names) if names else 'none'}")
    for metric in sorted(assets.METRIC_WEIGHTS):
        print(_metric_status(metric, args.assets))
    return 0


def _metric_status(metric: str, folder: str | None) -> str:
    """One line per eval.metrics network: where it is and at which revision, or what evaluation will say."""
    found = assets.find_metric_weights(metric, folder)
    if found is None:
        return f"{metric}: missing -> a study listing it in eval.metrics stops before training; " \
               f"run `ditscale assets fetch --dest DIR --metric {metric}`"
    name, pinned, what = assets.METRIC_WEIGHTS[metric]
    # written by `assets fetch`; a folder placed by hand has none, so its revision is unknown
    revision = assets.read_fetched(found).get("revision")
    origin = (f"{name} at the pinned revision {pinned[:12]}" if revision == pinned
              else f"{name} at revision {revision[:12]}, NOT the pinned {pinned[:12]}" if revision
              else f"placed by hand, revision unknown (the pinned one is {name} {pinned[:12]})")
    return f"{metric}: {found} ({what}; {origin}) -> eval.metrics may list {metric}"
