"""`ditscale slurm`: run a study across a Slurm allocation (the batch script is slurm/sweep.sbatch).

    ditscale slurm submit STUDY --nodes N --gpus-per-node G [--partition P] [--time T] [--dry-run]
                                [--mlflow-server (--mlflow-auth | --mlflow-insecure)]

renders slurm/sweep.sbatch with those options (the `#SBATCH` lines), saves the rendered script under
`<resources.storage>/<study>/slurm/`, calls `sbatch`, and says where the log, the MLflow runs and the
report will be. The batch script starts Ray on every node of the allocation, runs
`ditscale sweep STUDY --address HEAD:PORT` and stops Ray; on Slurm's warning signal it asks the
trials to checkpoint (the study's STOP file), waits for the sweep to exit 3 ("stopped, resumable")
and requeues the job, which then resumes the study.

`--mlflow-server`: the job also runs `mlflow server` on the head node (its address, a free port) for
its lifetime, with the store in `<submit dir>/mlflow-server/` (mlflow.db, artifacts/), and every host
and trial logs through it instead of writing to one SQLite file from many hosts. `--mlflow-auth`
runs MLflow's basic-auth app: its admin is MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD of the
submitting environment, which the job inherits (sbatch's default --export=ALL) and the clients use
too; they are never written into the batch script or printed. A server without auth would take
anyone's reads, writes and artifact uploads on the head node's cluster address for the whole job:
`--mlflow-server` alone is refused, and `--mlflow-insecure` asks for that open server by name.

Credentials in a `--set` override (`tracking.uri=http://user:pw@host`) never reach sbatch's command
line (`scontrol show job`, the job log, --dry-run): the URI goes there without its user-info, which
goes to the job as MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD in sbatch's environment.

What runs on the nodes (the batch script's helpers and its srun steps) is harness/launch/slurm/node.py.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from harness.config import load_study
from harness.errors import UserError
from harness.paths import StudyPaths, study_paths
from harness.study import load_trials
from harness.tracking import URL_RE, redact_uri, split_credentials

TEMPLATE = Path(__file__).resolve().parents[3] / "slurm" / "sweep.sbatch"
SETTINGS_MARKER = "# @ditscale-submit-settings@"
DEFAULT_SIGNAL_SECONDS = 300
MLFLOW_SERVER_DIR = "mlflow-server"   # <submit dir>/mlflow-server: the --mlflow-server store
MLFLOW_CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def load(config: str, overrides, check_files: bool = True):
    """The study alone (its paths, for the node helpers); `prepare` loads its trials too."""
    return load_study(config, overrides, check_files=check_files)


# --- rendering -----------------------------------------------------------------------------------


def _option_name(line: str) -> str | None:
    """'#SBATCH --time=1:00' / '##SBATCH --time 1:00' -> 'time'; other lines -> None."""
    m = re.match(r"^#+SBATCH\s+--([A-Za-z0-9-]+)", line)
    return m.group(1) if m else None


# Control characters (C0, DEL, C1): a newline would end the `#SBATCH` line and start a shell command
# (after which sbatch reads no more `#SBATCH` lines); the others have no place in an option either.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# What sbatch's #SBATCH parser (src/sbatch/opt.c, _get_argument) treats specially: whitespace ends an
# argument (even after a backslash), ' and " quote, a backslash escapes the next character, and an
# unquoted # starts a comment.
_SBATCH_SPECIAL = re.compile(r"[\s'\"\\#]")


def check_value(name: str, value: str) -> str:
    """`value`, unless it holds a control character: then a one-line UserError naming `name`."""
    m = _CONTROL.search(value)
    if m:
        raise UserError(f"{name}: {value!r} contains the control character {m.group()!r}; "
                        "refusing to put it into the batch script")
    return value


def sbatch_quote(value: str) -> str:
    """`value` as one argument of an `#SBATCH` line, read back by sbatch exactly: as it is when plain,
    else in double quotes with `"` and `\\` escaped by a backslash (the only quoting sbatch reads for
    spaces: a backslash before a space does not keep the argument together)."""
    if value and not _SBATCH_SPECIAL.search(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_script(template: str, options: dict[str, str | None], settings: dict[str, str]) -> str:
    """Set `#SBATCH --key=value` for every option (value None: a bare flag such as --requeue), dropping
    the template's lines for the same option (active or commented out with '##SBATCH'); the new lines
    go where the template's #SBATCH block ends. `settings` become `export KEY=...` defaults (an
    environment variable set at submission still wins) below the settings marker. Every value is
    refused when it holds a control character, and quoted the way its reader (sbatch, bash) reads it."""
    for k, v in options.items():
        if not re.fullmatch(r"[A-Za-z0-9-]+", k):
            raise UserError(f"--{k!r}: not an sbatch option name")
        if v is not None:
            check_value(f"--{k}", v)
    for k, v in settings.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k):
            raise UserError(f"{k!r}: not an environment variable name")
        check_value(k, v)
    lines = template.splitlines()
    keep, last_sbatch = [], None  # the new lines go after keep[last_sbatch]
    for line in lines:
        name = _option_name(line)
        if name is None or name not in options:
            keep.append(line)
        if name is not None:
            last_sbatch = len(keep) - 1
    if last_sbatch is None:
        raise UserError("the batch script template has no #SBATCH lines")
    new = [f"#SBATCH --{k}" if v is None else f"#SBATCH --{k}={sbatch_quote(v)}" for k, v in options.items()]
    keep[last_sbatch + 1:last_sbatch + 1] = new
    if settings:
        try:
            at = next(i for i, line in enumerate(keep) if line.strip() == SETTINGS_MARKER)
        except StopIteration:
            raise UserError(f"the batch script template has no {SETTINGS_MARKER!r} line") from None
        keep[at + 1:at + 1] = [f'[ -n "${{{k}:-}}" ] || export {k}={shlex.quote(v)}' for k, v in settings.items()]
    return "\n".join(keep) + "\n"


def _cpus_per_node(trials, nodes: int, gpus_per_node: int, node_cpus: int | None) -> int:
    """CPUs to ask per node when --cpus-per-task is not given. With GPUs: the CPUs that go with the
    node's GPUs (cpus_per_worker per gpus_per_worker). Without: a whole node when sinfo says how many
    CPUs a node has (Ray's own processes want some too), else enough to run the trials side by side
    (up to resources.max_concurrent_trials), spread over the nodes."""
    if gpus_per_node:
        return max((math.ceil(gpus_per_node / trial.resources.gpus_per_worker * trial.resources.cpus_per_worker)
                    for trial in trials if trial.resources.gpus_per_worker), default=1)
    biggest = max(trial.resources.workers_per_trial * trial.resources.cpus_per_worker for trial in trials)
    per_node = math.ceil(biggest / nodes)
    if node_cpus:
        if per_node > node_cpus:
            raise UserError(
                f"--nodes: the largest trial needs {biggest:g} CPUs, {per_node} per node on {nodes} node(s), "
                f"but the partition's nodes have {node_cpus}; raise --nodes or lower "
                "resources.workers_per_trial/cpus_per_worker")
        return node_cpus
    together = min(len(trials), trials[0].resources.max_concurrent_trials or len(trials))
    return max(1, math.ceil(biggest * together / nodes))


def partition_cpus(partition: str | None) -> int | None:
    """The CPUs of the smallest node in `partition` (default: the default partition), from sinfo;
    None when sinfo is missing or says nothing."""
    if shutil.which("sinfo") is None:
        return None
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%c %P"], capture_output=True, text=True, timeout=15,
                             check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    cpus = []
    for line in out.stdout.splitlines():
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit():
            continue
        name = parts[1]
        if (partition is None and name.endswith("*")) or (partition is not None and name.rstrip("*") == partition):
            cpus.append(int(parts[0]))
    return min(cpus) if cpus else None


def _check_fits(trials, nodes: int, gpus_per_node: int, cpus_per_node: int) -> None:
    for trial in trials:
        r = trial.resources
        cpus = r.workers_per_trial * r.cpus_per_worker
        gpus = r.workers_per_trial * r.gpus_per_worker
        if gpus > nodes * gpus_per_node:
            raise UserError(
                f"--gpus-per-node: trial {trial.trial_id} ({trial.model_name}) needs {r.workers_per_trial} workers x "
                f"{r.gpus_per_worker:g} GPU = {gpus:g} GPUs but {nodes} node(s) x {gpus_per_node} GPUs have "
                f"{nodes * gpus_per_node}; raise --nodes/--gpus-per-node or lower resources.workers_per_trial")
        if cpus > nodes * cpus_per_node:
            raise UserError(
                f"--cpus-per-task: trial {trial.trial_id} ({trial.model_name}) needs {r.workers_per_trial} workers x "
                f"{r.cpus_per_worker:g} CPU = {cpus:g} CPUs but {nodes} node(s) x {cpus_per_node} CPUs have "
                f"{nodes * cpus_per_node}; raise --cpus-per-task/--nodes or lower resources.cpus_per_worker")


def _log_pattern(folder: Path) -> str:
    """sbatch's --output for `folder`/slurm-JOBID.out: a '%' in the folder written '%%' (sbatch's file
    name patterns). A backslash cannot be written: sbatch drops every backslash of the pattern and
    then expands nothing, so the job id would be lost."""
    text = check_value("--output (the job log folder, <resources.storage>/<study>/slurm)", str(folder))
    if "\\" in text:
        raise UserError(f"--output: the job log folder {text!r} contains a backslash, which sbatch's file name "
                        "patterns cannot express; submit from a folder without one (or set resources.storage)")
    return text.replace("%", "%%") + "/slurm-%j.out"


def _check_sql_store(uri: str, folder: Path) -> None:
    """MLflow's SQL store creates its 'Default' experiment with a hand-written INSERT that holds the
    Python repr of <folder>/mlruns as SQL text. A submit directory whose repr needs an escape (both
    kinds of quote, a backslash), is double-quoted on a database other than SQLite, or holds what
    SQLAlchemy reads as a bind parameter (':name') breaks that statement: the job would end in a
    traceback after Ray has started. Say so before sbatch."""
    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower()
    if scheme not in ("sqlite", "postgresql", "postgres", "mysql", "mariadb", "mssql"):
        return
    literal = repr(str(folder / "mlruns"))
    if "\\" in literal or (scheme != "sqlite" and literal.startswith('"')) \
            or re.search(r"(?<![:\w\\]):\w+(?!:)", literal):
        raise UserError(f"--chdir: MLflow's database store ({scheme}) cannot start in the submit directory "
                        f"{str(folder)!r} (its SQL for the Default experiment breaks on quotes, backslashes or "
                        "':name' in the path); submit from another folder or use an MLflow server "
                        "(--set tracking.uri=http://HOST:PORT)")


def _python_bin() -> str:
    """The folder holding this installation's `ditscale` and `ray` (a virtualenv's bin)."""
    exe = shutil.which("ditscale")
    return str(Path(exe).resolve().parent) if exe else str(Path(sys.executable).parent)


@dataclass
class Submission:
    script: str             # the rendered batch script
    script_path: Path       # where it is saved
    sbatch: list[str]       # the sbatch command line
    paths: StudyPaths
    nodes: int
    gpus_per_node: int
    cpus_per_task: int
    trials: int
    mlflow_server: Path | None = None   # the --mlflow-server folder (mlflow.db, artifacts/)
    mlflow_auth: bool = False
    env: dict[str, str] | None = None   # added to sbatch's environment: credentials taken out of --set


def check_mlflow_server(study, mlflow_server: bool, mlflow_auth: bool, environ=None,
                        mlflow_insecure: bool = False) -> None:
    """The combinations `--mlflow-server` / `--mlflow-auth` / `--mlflow-insecure` refuse, each in one line,
    before sbatch. The job's server listens on the head node's cluster address: without auth anyone who
    reaches it reads, writes and uploads artifacts, so it needs --mlflow-auth or, said out loud,
    --mlflow-insecure (not auth by default: that needs credentials exported and mlflow[auth] installed,
    which a refusal names better than a job that fails on the head node)."""
    environ = os.environ if environ is None else environ
    for flag, given in (("--mlflow-auth", mlflow_auth), ("--mlflow-insecure", mlflow_insecure)):
        if given and not mlflow_server:
            raise UserError(f"{flag}: only with --mlflow-server (it concerns the job's own server); for a "
                            "server of your own, set tracking.uri and export MLFLOW_TRACKING_USERNAME/PASSWORD")
    if mlflow_auth and mlflow_insecure:
        raise UserError("--mlflow-insecure: not with --mlflow-auth; choose one")
    if not mlflow_server:
        return
    if study.tracking.uri:
        raise UserError(f"--mlflow-server: the study logs to tracking.uri={redact_uri(study.tracking.uri)}, but the "
                        "job would log to its own server: drop --mlflow-server or --set tracking.uri=null")
    if environ.get("MLFLOW_TRACKING_URI"):
        raise UserError(f"--mlflow-server: MLFLOW_TRACKING_URI={redact_uri(environ['MLFLOW_TRACKING_URI'])} is set, "
                        "but the job would log to its own server: unset it or drop --mlflow-server")
    if not (mlflow_auth or mlflow_insecure):
        raise UserError("--mlflow-server: the job's MLflow server would be open to anyone who reaches the head "
                        "node (reads, writes, artifact uploads) for the whole job: add --mlflow-auth (export "
                        "MLFLOW_TRACKING_USERNAME/PASSWORD first) or, on a private network, --mlflow-insecure")
    if not mlflow_auth:
        return
    missing = [k for k in MLFLOW_CREDENTIALS if not environ.get(k)]
    if missing:
        raise UserError(f"--mlflow-auth: {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set: "
                        "export the credentials of the server's admin before submitting (the job inherits them "
                        "from this environment; they are never written into the batch script)")
    if importlib.util.find_spec("flask_wtf") is None:
        raise UserError("--mlflow-auth: MLflow's basic-auth app needs mlflow[auth] (Flask-WTF), which is not "
                        "installed: pip install 'mlflow[auth]'")


def prepare(config: str, overrides=(), *, nodes: int = 1, gpus_per_node: int = 0, cpus_per_task: int | None = None,
            partition: str | None = None, time_limit: str | None = None, account: str | None = None,
            job_name: str | None = None, signal_seconds: int = DEFAULT_SIGNAL_SECONDS,
            sbatch_args=(), template: Path | None = None, mlflow_server: bool = False,
            mlflow_auth: bool = False, mlflow_insecure: bool = False) -> Submission:
    if nodes < 1:
        raise UserError("--nodes: at least 1")
    if gpus_per_node < 0:
        raise UserError("--gpus-per-node: 0 or more")
    if cpus_per_task is not None and cpus_per_task < 1:
        raise UserError("--cpus-per-task: at least 1")
    if signal_seconds < 60:
        raise UserError("--signal-seconds: at least 60 (Slurm sends the warning signal with a 60 s resolution)")
    study, trials = load_trials(config, overrides)  # budgets too: a bad one is found before sbatch
    check_mlflow_server(study, mlflow_server, mlflow_auth, mlflow_insecure=mlflow_insecure)
    overrides, credentials = _take_set_credentials(overrides)
    _check_export(sbatch_args, credentials, mlflow_auth)
    paths = study_paths(study)
    cpus = cpus_per_task or _cpus_per_node(trials, nodes, gpus_per_node, partition_cpus(partition))
    _check_fits(trials, nodes, gpus_per_node, cpus)

    template = Path(template) if template else TEMPLATE
    if not template.is_file():
        raise UserError(f"--script: the batch script {template} does not exist (slurm/sweep.sbatch of a "
                        "ditscale checkout; install with `pip install -e .` to keep it beside the package)")
    options: dict[str, str | None] = {
        "job-name": job_name or f"ditscale-{study.name}",
        "nodes": str(nodes),
        "ntasks-per-node": "1",
        "cpus-per-task": str(cpus),
    }
    if gpus_per_node:
        options["gpus-per-node"] = str(gpus_per_node)
    if partition:
        options["partition"] = partition
    if account:
        options["account"] = account
    if time_limit:
        options["time"] = time_limit
    chdir = check_value("--chdir (the submit directory)", str(Path.cwd()))
    output = _log_pattern(paths.slurm_dir)
    server_dir = Path(chdir) / MLFLOW_SERVER_DIR if mlflow_server else None
    if server_dir is None:  # the job's server has no folder path in its SQL (artifacts: mlflow-artifacts:/)
        _check_sql_store(paths.tracking_uri, Path(chdir))
    options |= {
        "chdir": chdir,
        "output": output,
        "open-mode": "append",   # a requeued job appends to its log instead of truncating it
        "signal": f"B:USR1@{signal_seconds}",
        "requeue": None,
    }
    settings = {"DITSCALE_BIN": _python_bin()}
    script = render_script(template.read_text(), options, settings)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    script_path = paths.slurm_dir / f"sweep-{stamp}.sbatch"
    # The batch script's own options come before the study file (see its header).
    own = ["--mlflow-server", str(server_dir)] if server_dir else []
    own += ["--mlflow-auth"] if mlflow_auth else []
    own += ["--mlflow-insecure"] if mlflow_insecure else []
    cmd = ["sbatch", "--parsable", *sbatch_args, str(script_path), *own, str(Path(config).resolve())]
    for text in overrides:
        cmd += ["--set", text]
    return Submission(script, script_path, cmd, paths, nodes, gpus_per_node, cpus, len(trials),
                      mlflow_server=server_dir, mlflow_auth=mlflow_auth, env=credentials)


def _take_set_credentials(overrides) -> tuple[list[str], dict[str, str]]:
    """The --set overrides with the user-info of every HTTP URL in them taken out, and those credentials
    as MLflow's variables for the job's environment (sbatch's argv is readable by every user of the
    cluster: `scontrol show job`, `ps`). Two different credentials cannot both go there: one line."""
    found: dict[str, str] = {}

    def bare(match) -> str:
        uri, credentials = split_credentials(match.group())
        for key, value in credentials.items():
            if found.setdefault(key, value) != value:
                raise UserError("--set: two different credentials in tracking URIs; the job's environment holds "
                                "one MLFLOW_TRACKING_USERNAME/PASSWORD: export them and drop them from the URIs")
        return uri

    return [URL_RE.sub(bare, text) for text in overrides], found


def _check_export(sbatch_args, credentials: dict, mlflow_auth: bool) -> None:
    """The job gets credentials from sbatch's environment (its default --export=ALL): an --export that
    leaves them out would start a job whose every MLflow request is refused. One line instead."""
    needed = [*credentials] or (["MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"] if mlflow_auth else [])
    for arg in sbatch_args:
        if needed and arg.startswith("--export"):
            names = arg.partition("=")[2].split(",")
            missing = [k for k in needed if "ALL" not in names and k not in names]
            if missing:
                raise UserError(f"--sbatch-arg={arg}: the job needs {', '.join(missing)} from this environment; "
                                "add them to --export (names only) or use --export=ALL")


def submit(sub: Submission) -> str:
    """Save the rendered script and sbatch it; returns the job id."""
    if shutil.which("sbatch") is None:
        raise UserError("sbatch not found: run `ditscale slurm submit` on a Slurm login node "
                        "(or look at the script with --dry-run)")
    sub.paths.slurm_dir.mkdir(parents=True, exist_ok=True)
    path = sub.script_path
    n = 1
    while path.exists():  # never overwrite an earlier script
        path = sub.script_path.with_name(f"{sub.script_path.stem}-{n}.sbatch")
        n += 1
    path.write_text(sub.script)
    sub.sbatch[sub.sbatch.index(str(sub.script_path))] = str(path)
    sub.script_path = path
    out = subprocess.run(sub.sbatch, capture_output=True, text=True, check=False, env={**os.environ, **(sub.env or {})})
    if out.returncode != 0:
        msg = (out.stderr or out.stdout).strip().splitlines()
        raise UserError("sbatch failed: " + ("; ".join(msg) or f"exit code {out.returncode}")
                        + f" (script: {path})")
    job_id = out.stdout.strip().split(";")[0]  # --parsable: "jobid" or "jobid;cluster"
    if not job_id.isdigit():
        raise UserError(f"sbatch printed no job id: {out.stdout.strip()!r}")
    return job_id


def print_submitted(sub: Submission, job_id: str) -> None:
    p = sub.paths
    log = p.slurm_dir / f"slurm-{job_id}.out"
    gpus = f" x {sub.gpus_per_node} GPUs" if sub.gpus_per_node else ""
    print(f"Submitted job {job_id}: study {p.name!r}, {sub.trials} trials on {sub.nodes} node(s){gpus}, "
          f"{sub.cpus_per_task} CPUs per node")
    print(f"  script:  {sub.script_path}")
    print(f"  log:     {log}")
    print(f"  trials:  {p.study_dir}/<trial_id>/ (checkpoints)")
    if sub.mlflow_server:
        store = f"sqlite:///{sub.mlflow_server / 'mlflow.db'}"
        auth = (", basic auth as $MLFLOW_TRACKING_USERNAME" if sub.mlflow_auth
                else "; OPEN: no authentication (--mlflow-insecure)")
        print(f"  MLflow:  a server on the head node while the job runs (its URI is in the log{auth}), "
              f"store {store}  (experiment {p.name!r})")
        print(f"           afterwards: mlflow ui --backend-store-uri {shlex.quote(store)} --artifacts-destination "
              f"{shlex.quote(str(sub.mlflow_server / 'artifacts'))} --host 127.0.0.1 --port 5000")
    else:
        print(f"  MLflow:  {redact_uri(p.tracking_uri)}  (experiment {p.name!r})")
        print(f"           mlflow ui --backend-store-uri {redact_uri(p.tracking_uri)} --host 127.0.0.1 --port 5000")
    print(f"  report:  {p.report}  (written when the sweep ends)")
    print(f"  watch:   squeue -j {job_id}; tail -f {log}")
    print(f"  stop:    touch {p.stop_file}  (trials checkpoint; the job ends; resubmit to resume)")
    print(f"  preempt: scancel --batch --signal=USR1 {job_id}  (checkpoint, then the job requeues itself)")
