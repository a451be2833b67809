"""Arguments and handlers of `ditscale sweep` and `ditscale slurm ...`.

The handlers import what they run (Ray, MLflow and torch load there), so that `ditscale --help` and
argument errors stay instant.
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import sys
from pathlib import Path

from harness.config import MAX_TRIALS
from harness.errors import UserError
from harness.launch.slurm import allocation, mlflow_server, node, submit
from harness.launch.slurm.submit import DEFAULT_SIGNAL_SECONDS
from harness.options import add_set_option
from harness.paths import study_paths
from harness.tracking import redact_uri


def _cmd_sweep(args: argparse.Namespace) -> int:
    from harness.launch.sweep import run_sweep

    if args.json and not args.dry_run:
        raise UserError("--json: prints the planned trials, with --dry-run only")
    result = run_sweep(args.config, args.set, address=args.address, dry_run=args.dry_run,
                       max_concurrent=args.max_concurrent, report=not args.no_report, max_trials=args.max_trials,
                       as_json=args.json)
    if result.get("stopped"):
        return 3  # stopped on request (stop file / Slurm warning signal): resumable
    return 1 if result.get("failed") else 0


def add_sweep(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="run every trial of a study on Ray (the main command)")
    p.add_argument("config", help="study YAML file")
    p.add_argument("--address", default=None,
                   help="join an existing Ray cluster (auto | HOST:PORT | ray://...); from a machine that is not "
                        "one of its nodes, a Ray node with no CPUs is started here for the sweep. Every node must "
                        "see the study's files at the same paths. Default: start a local Ray")
    p.add_argument("--dry-run", action="store_true",
                   help="print the planned trials and start nothing (the data need not be here: the counts come "
                        "from the study's image size and channels)")
    p.add_argument("--json", action="store_true",
                   help="with --dry-run: the planned trials as JSON on stdout (trial id, model, parameters, budget, "
                        "steps, images, ...); the table goes to stderr")
    p.add_argument("--max-concurrent", type=int, default=None, help="trials at once (default: what the cluster fits)")
    p.add_argument("--no-report", action="store_true", help="skip the scaling report at the end")
    p.add_argument("--max-trials", type=int, default=MAX_TRIALS, metavar="N",
                   help=f"refuse a grid of more than N trials, before expanding it (default {MAX_TRIALS:,})")
    add_set_option(p)
    p.set_defaults(func=_cmd_sweep)


def _study_paths(args: argparse.Namespace):
    return study_paths(submit.load(args.config, args.set, check_files=False))


def _cmd_submit(args: argparse.Namespace) -> int:
    sub = submit.prepare(
        args.config, args.set, nodes=args.nodes, gpus_per_node=args.gpus_per_node, cpus_per_task=args.cpus_per_task,
        partition=args.partition, time_limit=args.time, account=args.account, job_name=args.job_name,
        signal_seconds=args.signal_seconds, sbatch_args=args.sbatch_arg, template=args.script,
        mlflow_server=args.mlflow_server, mlflow_auth=args.mlflow_auth, mlflow_insecure=args.mlflow_insecure,
    )
    if args.dry_run:
        sys.stdout.write(sub.script)
        print(f"\n# would be saved as {sub.script_path} and submitted with:\n# " + shlex.join(sub.sbatch))
        if sub.env:
            print(f"# and {', '.join(sorted(sub.env))} (from --set's tracking URI) in sbatch's environment")
        return 0
    submit.print_submitted(sub, submit.submit(sub))
    return 0


def _cmd_stop_file(args: argparse.Namespace) -> int:
    print(_study_paths(args).stop_file)
    return 0


def _cmd_paths(args: argparse.Namespace) -> int:
    """The study's paths for the batch script, one `KEY=value` a line (read with `read`, never evaluated),
    from the sweep's own command line: the sweep's parser reads its options (--set, ...). The job's
    --mlflow-server options are refused here as `ditscale slurm submit` refuses them, in one line."""
    parser = argparse.ArgumentParser(prog="ditscale")
    add_sweep(parser.add_subparsers())
    sweep = parser.parse_args(["sweep", *args.sweep_args])
    study = submit.load(sweep.config, sweep.set, check_files=False)
    submit.check_mlflow_server(study, args.mlflow_server is not None, args.mlflow_auth,
                               mlflow_insecure=args.mlflow_insecure)
    p = study_paths(study)
    sys.stdout.write(allocation.as_lines({
        "STUDY_NAME": p.name, "STUDY_DIR": p.study_dir, "STOP_FILE": p.stop_file, "SLURM_DIR": p.slurm_dir,
        "TRACKING_URI": p.tracking_uri,
        "TRACKING_URI_SHOWN": redact_uri(p.tracking_uri),  # what the job may print: the URI without credentials
        "REPORT": p.report}, fix="rename it (name, resources.storage or tracking.uri)"))
    return 0


def _cmd_node_ip(args: argparse.Namespace) -> int:
    print(node.head_ip() if args.head else node.node_ip(args.toward))
    return 0


def _cmd_wait_ray(args: argparse.Namespace) -> int:
    res = node.wait_for_ray(args.address, args.nodes, args.timeout, args.watch_pid)
    gpus = f", {res.get('GPU', 0):g} GPUs" if res.get("GPU") else ""
    print(f"Ray cluster at {args.address}: {args.nodes} node(s), {res.get('CPU', 0):g} CPUs{gpus}", flush=True)
    return 0


def _cmd_node_ray(args: argparse.Namespace) -> int:
    return node.run_ray_node(args.role, args.ip, args.head_ip, args.port, args.cpus, args.gpus)


def _cmd_node_ray_stop(args: argparse.Namespace) -> int:
    node.stop_ray_node()
    return 0


def _cmd_node_allocation(args: argparse.Namespace) -> int:
    sys.stdout.write(allocation.prepare(args.slurm_dir))
    return 0


def _cmd_node_stop_ray(args: argparse.Namespace) -> int:
    node.stop_ray(args.head, args.head_pid, args.workers, args.workers_pid, args.cpus)
    return 0


def _cmd_node_mlflow_server(args: argparse.Namespace) -> int:
    if args.action == "start":
        mlflow_server.start(args.mlflow_server, mlflow_server.server_ip(args.head_ip), args.mlflow_auth)
    elif args.action == "wait":
        with contextlib.redirect_stdout(sys.stderr):  # stdout is the URI, for the batch shell
            uri = mlflow_server.wait(args.mlflow_server)
        print(uri, flush=True)
    else:
        mlflow_server.stop(args.mlflow_server)
    return 0


def _add_mlflow_server_options(parser: argparse.ArgumentParser, required: bool) -> None:
    """The batch script's own options (`sbatch slurm/sweep.sbatch --mlflow-server DIR --mlflow-auth ...`)."""
    parser.add_argument("--mlflow-server", type=Path, required=required, default=None, metavar="DIR",
                        help="the job's MLflow server's folder")
    parser.add_argument("--mlflow-auth", action="store_true", help="MLflow's basic-auth app")
    parser.add_argument("--mlflow-insecure", action="store_true", help="no authentication")


def _add_node(ss: argparse._SubParsersAction) -> None:
    """`ditscale slurm node ...`: the batch script's steps on the nodes (harness/launch/slurm/node.py)."""
    nodes = ss.add_parser("node").add_subparsers(dest="node_command", required=True)
    s = nodes.add_parser("ray", help="one Ray node in this srun step, until it is stopped")
    s.add_argument("role", choices=["head", "worker"])
    s.add_argument("--head-ip", required=True, help="the head's address (a worker's route toward it picks its own)")
    s.add_argument("--ip", default=None, help="this node's address (default: found toward --head-ip)")
    s.add_argument("--port", type=int, required=True, help="the head's GCS port; the others follow it")
    s.add_argument("--cpus", type=int, required=True)
    s.add_argument("--gpus", type=int, required=True)
    s.set_defaults(func=_cmd_node_ray)
    s = nodes.add_parser("ray-stop", help="SIGTERM to this node's `ray start` of this start of the job")
    s.set_defaults(func=_cmd_node_ray_stop)
    s = nodes.add_parser("allocation", help="the job's settings as KEY=value lines for the batch script, and its "
                         "Ray token (harness/launch/slurm/allocation.py)")
    s.add_argument("--slurm-dir", required=True, help="the study's slurm/ folder (the token, the stop mark)")
    s.set_defaults(func=_cmd_node_allocation)
    s = nodes.add_parser("stop-ray", help="the batch shell's Ray stop: ray-stop on the nodes left, the steps' end")
    s.add_argument("--head", required=True, help="the head's node")
    s.add_argument("--head-pid", type=int, default=None, help="the head's srun step")
    s.add_argument("--workers", default="", help="the workers' nodes (a Slurm node list)")
    s.add_argument("--workers-pid", type=int, default=None, help="the workers' srun step")
    s.add_argument("--cpus", type=int, required=True, help="the steps' CPUs per task")
    s.set_defaults(func=_cmd_node_stop_ray)
    s = nodes.add_parser("mlflow-server", help="the job's MLflow server: start (returns at once), wait (prints "
                         "its URI), stop (harness/launch/slurm/mlflow_server.py)")
    s.add_argument("action", choices=["start", "wait", "stop"])
    s.add_argument("--head-ip", default=None, help="start: the head's address (the server's, on the head)")
    _add_mlflow_server_options(s, required=True)
    s.set_defaults(func=_cmd_node_mlflow_server)


def add_slurm(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("slurm", help="run a study on a Slurm cluster (Ray across the allocation)",
                       description="Run a study across a Slurm allocation; see slurm/sweep.sbatch.")
    ss = p.add_subparsers(dest="slurm_command", required=True, metavar="{submit,stop-file}")

    s = ss.add_parser("submit", help="render slurm/sweep.sbatch for this study and sbatch it",
                      description="Render slurm/sweep.sbatch with these options, save it under "
                                  "<resources.storage>/<study>/slurm/ and submit it with sbatch.")
    s.add_argument("config", help="study YAML file")
    s.add_argument("--nodes", type=int, default=1, help="nodes in the allocation (default 1); one Ray node each")
    s.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node (default 0)")
    s.add_argument("--cpus-per-task", type=int, default=None,
                   help="CPUs per node for Ray (default: with GPUs, resources.cpus_per_worker per GPU; "
                        "without, a whole node, or what the trials need side by side when sinfo is not there)")
    s.add_argument("--partition", default=None)
    s.add_argument("--time", default=None, help="time limit, e.g. 24:00:00 (default: the script's 24 h)")
    s.add_argument("--account", default=None)
    s.add_argument("--job-name", default=None, help="default: ditscale-<study name>")
    s.add_argument("--signal-seconds", type=int, default=DEFAULT_SIGNAL_SECONDS,
                   help="warning before the time limit: trials checkpoint and the job requeues "
                        f"(default {DEFAULT_SIGNAL_SECONDS})")
    s.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                   help="extra sbatch option, e.g. --sbatch-arg=--qos=high (repeatable)")
    s.add_argument("--script", type=Path, default=None, help="batch script template (default slurm/sweep.sbatch)")
    s.add_argument("--mlflow-server", action="store_true",
                   help="run `mlflow server` on the head node for the job (store in ./mlflow-server/); "
                        "every host and trial logs through it instead of to one SQLite file. Needs "
                        "--mlflow-auth or --mlflow-insecure: it listens on the head node's cluster address")
    s.add_argument("--mlflow-auth", action="store_true",
                   help="with --mlflow-server: MLflow's basic-auth app, admin = $MLFLOW_TRACKING_USERNAME / "
                        "$MLFLOW_TRACKING_PASSWORD (exported before submitting; never written into the script)")
    s.add_argument("--mlflow-insecure", action="store_true",
                   help="with --mlflow-server: run it without authentication, open to anyone who reaches the "
                        "head node (reads, writes, artifact uploads). Not the default: a server left open "
                        "unannounced for a whole job is a hole; say so only on a private network")
    s.add_argument("--dry-run", action="store_true", help="print the rendered script and submit nothing")
    add_set_option(s)
    s.set_defaults(func=_cmd_submit)

    s = ss.add_parser("stop-file", help="print the file whose creation makes a running study checkpoint and stop")
    s.add_argument("config", help="study YAML file")
    add_set_option(s)
    s.set_defaults(func=_cmd_stop_file)

    # Helpers for slurm/sweep.sbatch (not listed in the help).
    s = ss.add_parser("paths")
    _add_mlflow_server_options(s, required=False)
    s.add_argument("sweep_args", nargs=argparse.REMAINDER, help="STUDY.yaml [ditscale sweep options]")
    s.set_defaults(func=_cmd_paths)
    _add_node(ss)

    s = ss.add_parser("node-ip")
    s.add_argument("--toward", default=None, help="the head node's address (workers)")
    s.add_argument("--head", action="store_true", help="the head's: DITSCALE_RAY_HEAD_IP when set; never loopback "
                   "in a job of several nodes")
    s.set_defaults(func=_cmd_node_ip)

    s = ss.add_parser("wait-ray")
    s.add_argument("--address", required=True)
    s.add_argument("--nodes", type=int, required=True)
    s.add_argument("--timeout", type=float, default=300.0)
    s.add_argument("--watch-pid", type=int, action="append", default=[])
    s.set_defaults(func=_cmd_wait_ray)


def _cmd_plan(args: argparse.Namespace) -> int:
    from harness.launch.plan import write_plan

    write_plan(args.base, args.budgets, args.center, args.from_report, args.exponent, args.sizes_per_budget,
               args.spread, args.max_epochs, args.throughput, args.out, name=args.name,
               report_group=args.report_group, argv=sys.argv[2:] if sys.argv[1:2] == ["plan"] else None,
               ladder=args.ladder)
    return 0


def add_plan(sub: argparse._SubParsersAction) -> None:
    from harness.launch import planner

    p = sub.add_parser(
        "plan", help="write an isoFLOP study centred on a scaling law, and print what it costs",
        description="Per budget C, K model sizes evenly in log N from N_opt(C)/F to N_opt(C)*F, "
                    "N_opt(C) = N0 (C/C0)^A, each snapped to a geometry of the base's family; written as an "
                    "ordinary study (`points:` lists the planned (size, budget) pairs). Compute is the harness's "
                    "convention: training multiply-adds, 3 x forward x images, i.e. the logged train_gflops x 1e9, "
                    "the value of train.flops. Starts nothing and needs no data.")
    p.add_argument("--base", required=True, metavar="STUDY.yaml",
                   help="the study whose data, objective, family, patch, train and eval settings the plan keeps")
    p.add_argument("--budgets", required=True, metavar="C1,C2,...",
                   help="training budgets, increasing, in FLOPs as train.flops counts them (multiply-adds: "
                        "3 x forward x images = the logged train_gflops x 1e9)")
    p.add_argument("--center", default=None, metavar="N0@C0",
                   help="the law's anchor: N0 parameters are compute-optimal at C0 training FLOPs; or "
                        "`liang2024`: Liang et al.'s fit N_opt = 0.0009 C_L^0.5681, their C_L = 6ND FLOPs = 2 x "
                        "ours, i.e. N_opt(C) = 0.0009 (2C)^0.5681")
    p.add_argument("--ladder", default=None, metavar="C[,C...]",
                   help="the plan's ladder.budgets: pre-registered trials above the largest budget, trained after "
                        "the grid at the size its fits predict (same FLOP convention as --budgets)")
    p.add_argument("--from-report", default=None, metavar="DIR",
                   help="instead of --center: N_opt(C) fitted by a `ditscale report` folder (its fits.json: the "
                        "isoFLOP law, else the L(N, D) surface's)")
    p.add_argument("--report-group", default=None, help="with --from-report: which fitted group (e.g. DiT)")
    p.add_argument("--exponent", type=float, default=planner.DEFAULT_EXPONENT, metavar="A",
                   help=f"N_opt ∝ C^A with --center (default {planner.DEFAULT_EXPONENT}, Liang et al. 2024, "
                        "arXiv 2410.08184)")
    p.add_argument("--sizes-per-budget", type=int, default=planner.DEFAULT_SIZES, metavar="K",
                   help=f"sizes per budget, at least 3 (default {planner.DEFAULT_SIZES}); with K >= 4 at least 2 "
                        "sit below and 2 above N_opt(C)")
    p.add_argument("--spread", type=float, default=planner.DEFAULT_SPREAD, metavar="F",
                   help=f"sizes span N_opt/F .. N_opt*F (default {planner.DEFAULT_SPREAD:g})")
    p.add_argument("--max-epochs", type=float, default=planner.DEFAULT_MAX_EPOCHS, metavar="E",
                   help=f"warn for a trial that repeats its training split more often (default "
                        f"{planner.DEFAULT_MAX_EPOCHS:g}; Muennighoff et al. 2023)")
    p.add_argument("--throughput", default=None, metavar="FILE",
                   help="YAML/JSON {model name or size: images/s of one trial}, or `ditscale bench --json` "
                        "output: prints the estimated wall time")
    p.add_argument("--name", default=None, help="the planned study's name (default: the base's)")
    p.add_argument("--out", required=True, metavar="PLAN.yaml", help="the study file to write")
    p.set_defaults(func=_cmd_plan)
