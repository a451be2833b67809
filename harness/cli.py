"""`ditscale` command line. Thin: the root parser, `ditscale report`, and each room's commands.

    models, bench      harness/bench/commands.py
    data               harness/data/commands.py (stats: harness/evaluation/data_stats.py)
    train, eval        harness/trial/commands.py
    plan, sweep, slurm harness/launch/commands.py
    assets             harness/evaluation/commands.py
    ema                harness/ema/commands.py
    report             here (analysis/report.py)

Heavy imports (torch, Ray, DeepSpeed, MLflow) happen inside the handlers so that `ditscale --help`
and argument errors are instant.
"""

from __future__ import annotations

import argparse
import sys
import traceback

from harness.bench.commands import add_bench, add_models
from harness.data.commands import add_data
from harness.ema.commands import add_ema
from harness.errors import UserError
from harness.evaluation.commands import add_assets
from harness.evaluation.data_stats import add_data_stats
from harness.files import not_writable_message, require_writable, write_refused
from harness.launch.commands import add_plan, add_slurm, add_sweep
from harness.paths import report_dir
from harness.tracking import redact
from harness.trial.commands import add_eval, add_train


def _cmd_report(args: argparse.Namespace) -> int:
    from analysis.report import build_report  # matplotlib, pandas, MLflow: only for a report

    out, flag = (args.out, "--out") if args.out is not None else (report_dir(args.experiment), "--out (default)")
    require_writable(out, flag)  # before MLflow is read: a read-only folder was a traceback at the end
    try:
        index = build_report(args.tracking_uri, args.experiment, parent_run_id=args.parent_run, out_dir=args.out,
                             holdout=args.holdout)
    except LookupError as err:  # no such experiment
        raise UserError(f"--experiment: {err}") from None
    except OSError as err:  # made unwritable after the check, or refused where an access check cannot tell
        if not write_refused(err, out):
            raise
        raise UserError(not_writable_message(out, flag, err.strerror or str(err))) from None
    print(f"Report: {index}")
    return 0


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="scaling fits, figures and an HTML/Markdown report of a study from MLflow")
    p.add_argument("--experiment", required=True, help="MLflow experiment = the study's name")
    p.add_argument("--parent-run", default=None, help="only this sweep's trials (default: every trial, newest run)")
    p.add_argument("--out", default=None, help="output folder (default: reports/<experiment>)")
    p.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db")
    p.add_argument("--holdout", choices=["largest", "none"], default="largest",
                   help="largest: fit on all but the largest compute budget and check the prediction on it "
                        "(needs >= 3 budgets); none: fit on every budget")
    p.set_defaults(func=_cmd_report)


def _add_data(sub: argparse._SubParsersAction) -> None:
    add_data_stats(add_data(sub))  # stats runs evaluation's networks: data/ cannot import it, so it is added here


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ditscale", description="Scaling studies of diffusion transformers.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (add_models, _add_data, add_bench, add_train, add_plan, add_sweep, add_eval, _add_report, add_slurm,
                add_assets, add_ema):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as err:
        for line in redact(str(err)).splitlines():
            print(f"ditscale {args.command}: error: {line}", file=sys.stderr)
        return 2
    except Exception as err:  # a bug or a failing service: its traceback, with no credential in it
        sys.stderr.write(redact("".join(traceback.format_exception(err))))
        return 1


if __name__ == "__main__":
    sys.exit(main())
