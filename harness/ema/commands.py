"""Arguments and handler of `ditscale ema reconstruct`: the EMA of any width sigma_rel rebuilt from a trial's
post-hoc EMA snapshots (train.posthoc_ema; EDM2, Karras et al. 2024, arXiv 2312.02696). torch loads in the
handler, so that `ditscale --help` stays instant."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from harness.errors import UserError
from harness.files import require_writable

POOR_FIT = 0.1  # relative L2 distance of the combined profile from the target's worth a warning


def _cmd_reconstruct(args: argparse.Namespace) -> int:
    trial_dir = Path(args.trial_dir)
    if not trial_dir.is_dir():
        raise UserError(f"TRIAL_DIR {trial_dir}: no such folder (a trial folder is "
                        "<resources.storage>/<study>/<trial id>)")
    out = Path(args.out)
    if out.is_dir():
        raise UserError(f"--out {out}: is a folder; give a file name (e.g. ema-0.07.pt)")
    require_writable(out.parent if str(out.parent) else Path("."), "--out", shown=out)  # before any work
    from harness.trial.posthoc_ema import reconstruct_to_file  # torch

    plan, seconds = reconstruct_to_file(trial_dir, args.sigma_rel, out, args.step)
    if plan.fit_error > POOR_FIT:
        print(f"warning: the snapshots express sigma_rel {plan.sigma_rel:g} at step {plan.step} only to a profile fit "
              f"error of {plan.fit_error:.0%} (tracked: {plan.manifest['sigma_rels']}); widths far outside the tracked "
              "ones, or few snapshots, do this", file=sys.stderr)
    if args.json:
        print(json.dumps({**plan.as_json(), "out": str(out), "seconds": seconds}, indent=2))
    else:
        print(f"{out}: EMA sigma_rel {plan.sigma_rel:g} at step {plan.step} from {len(plan.snapshots)} snapshots "
              f"(profile fit error {plan.fit_error:.2%}, {seconds:.1f} s); load it with "
              "model.load_state_dict(torch.load(FILE, weights_only=True))")
    return 0


def add_ema(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ema", help="post-hoc EMA: rebuild the EMA of any width from a trial's snapshots")
    actions = p.add_subparsers(dest="ema_command", required=True, metavar="ACTION")
    r = actions.add_parser(
        "reconstruct", help="write the EMA weights of one sigma_rel at one step as a state dict",
        description="Combine a trial's post-hoc EMA snapshots (trained with train.posthoc_ema) into the EMA of "
                    "relative width SIGMA_REL at step N, by EDM2's least squares over power-function profiles. "
                    "The file is a state dict in the model's own layout (load_state_dict(strict=True)).")
    r.add_argument("trial_dir", metavar="TRIAL_DIR", help="the trial folder (<resources.storage>/<study>/<trial id>)")
    r.add_argument("--sigma-rel", type=float, required=True,
                   help="the EMA's width relative to the training length, in (0, 0.3] (EDM2's best: 0.05-0.15)")
    r.add_argument("--step", type=int, default=None, help="the step (default: the last snapshot step)")
    r.add_argument("--out", required=True, help="the state dict file to write")
    r.add_argument("--json", action="store_true", help="print the weight of every snapshot used, as JSON")
    r.set_defaults(func=_cmd_reconstruct)
