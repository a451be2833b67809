"""The job's own MLflow server (`sbatch slurm/sweep.sbatch --mlflow-server DIR (--mlflow-auth | --mlflow-insecure)`):
`ditscale slurm node mlflow-server start | wait | stop`, run by the batch shell on the head node.

- start: the folder DIR (mode 0700, artifacts/ in it), with --mlflow-auth the basic-auth app's config
  DIR/basic_auth.ini (no secret in it: the admin's credentials go to the server's environment only, never
  its command line), then `mlflow server` on the head's address and a free port in a session of its own
  (as `setsid`), its output appended to DIR/server-JOBID.log. It returns at once: the server starts while
  Ray does. What the other two need (pid, start time, URI, where this start's log begins) is in
  DIR/server-JOBID.state.
- wait: until the server answers (and takes the credentials: node.wait_for_mlflow); a port taken between
  choosing it and binding it: another port, up to three starts. Prints the server's URI, the job's
  MLFLOW_TRACKING_URI.
- stop: SIGTERM to the server's session, SIGKILL to what is left after DITSCALE_MLFLOW_STOP_TIMEOUT (20 s);
  only the process whose start time is the recorded one (a reused pid is never signalled).

MLflow's server options: https://mlflow.org/docs/latest/cli.html#mlflow-server; the basic-auth app and its
config: https://mlflow.org/docs/latest/auth/index.html.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

from harness.common.net import free_port
from harness.errors import UserError
from harness.files import process_start_time
from harness.launch.slurm.node import MLFLOW_CREDENTIALS, node_ip, wait_for_mlflow

AUTH_INI = ("[mlflow]\ndefault_permission = NO_PERMISSIONS\ndatabase_uri = sqlite:///{folder}/auth.db\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
TRIES = 3


def log(text: str) -> None:
    """One line of the job's log, as the batch script's own `log` writes them (`wait` sends them to stderr:
    its stdout is the URI)."""
    print(f"[ditscale {time.strftime('%F %T')}] {text}", flush=True)


def _files(folder: Path) -> tuple[Path, Path]:
    job = os.environ.get("SLURM_JOB_ID", "0")
    return folder / f"server-{job}.log", folder / f"server-{job}.state"


def server_args(folder: Path, ip: str, port: int, workers: int, auth: bool) -> list[str]:
    """`mlflow server`'s command line: the store and artifacts in `folder`, the head's address."""
    args = ["mlflow", "server", *(["--app-name", "basic-auth"] if auth else []), "--host", ip, "--port", str(port),
            # MLflow takes only localhost and private addresses in the Host header by default: name ours.
            "--allowed-hosts", f"{ip}:{port},localhost:*,127.0.0.1:*", "--workers", str(workers),
            "--backend-store-uri", f"sqlite:///{folder}/mlflow.db", "--artifacts-destination", f"{folder}/artifacts"]
    if workers != 1:
        # uvicorn restarts a worker that does not answer its health check within 5 s, which a worker still
        # importing MLflow on a busy node does not (a restart loop).
        args += ["--uvicorn-opts", "--timeout-worker-healthcheck 120"]
    return args


def server_env(folder: Path, auth: bool) -> dict:
    """The server's environment: with auth, the admin's credentials (from the job's MLFLOW_TRACKING_*) and a
    fresh CSRF key per start; no jobs run by the server."""
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    if auth:
        user, password = (os.environ.get(k, "") for k in MLFLOW_CREDENTIALS)
        env |= {"MLFLOW_AUTH_CONFIG_PATH": str(folder / "basic_auth.ini"), "MLFLOW_AUTH_ADMIN_USERNAME": user,
                "MLFLOW_AUTH_ADMIN_PASSWORD": password, "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32)}
    return env


def _prepare(folder: Path, auth: bool) -> None:
    try:
        (folder / "artifacts").mkdir(parents=True, exist_ok=True)
        folder.chmod(0o700)
        if auth:
            ini = folder / "basic_auth.ini"
            fd = os.open(ini, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w") as f:
                os.fchmod(f.fileno(), 0o600)
                f.write(AUTH_INI.format(folder=str(folder).replace("%", "%%")))  # configparser's interpolation
    except OSError as err:
        raise UserError(f"--mlflow-server: cannot prepare the MLflow server folder {folder}: {err.strerror}") from None


def start(folder: Path, ip: str, auth: bool, tries: int = 1) -> dict:
    """Start the server (returns at once) and record it in the state file; returns the state."""
    folder = folder.absolute()
    logfile, statefile = _files(folder)
    _prepare(folder, auth)
    fixed = os.environ.get("DITSCALE_MLFLOW_PORT")
    try:
        port = int(fixed) if fixed else free_port(ip)
    except OSError as err:
        raise UserError(f"--mlflow-server: no free port on {ip} for the MLflow server ({err.strerror})") from None
    offset = logfile.stat().st_size if logfile.exists() else 0
    args = server_args(folder, ip, port, int(os.environ.get("DITSCALE_MLFLOW_WORKERS", "1")), auth)
    with open(logfile, "ab") as out:
        try:
            proc = subprocess.Popen(args, env=server_env(folder, auth), stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as err:
            raise UserError(f"--mlflow-server: cannot run `mlflow server` ({err.strerror}): is MLflow installed "
                            "in the job's environment (DITSCALE_VENV)?") from None
    state = {"pid": proc.pid, "started": process_start_time(proc.pid), "uri": f"http://{ip}:{port}", "ip": ip, "auth": auth,
             "offset": offset, "tries": tries}
    statefile.write_text(json.dumps(state) + "\n")
    log(f"MLflow server starting at {state['uri']} (store sqlite:///{folder}/mlflow.db, "
        f"{'basic auth' if auth else 'NO authentication: --mlflow-insecure'}; log {logfile})")
    return state


def _state(folder: Path) -> dict | None:
    try:
        return json.loads(_files(folder.absolute())[1].read_text())
    except (OSError, ValueError):
        return None


def _session_alive(sid: int) -> bool:
    """Whether any process (not a zombie) is left in session `sid` (`pgrep -s SID`)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            return True
    return False


def stop(folder: Path) -> None:
    """SIGTERM to the server's session, then SIGKILL to what is left; forget the state."""
    state = _state(folder)
    if state is None:
        return
    sid = state["pid"]
    if process_start_time(sid) == state["started"]:
        timeout = float(os.environ.get("DITSCALE_MLFLOW_STOP_TIMEOUT", "20"))
        deadline = time.monotonic() + timeout
        _signal_session(sid, signal.SIGTERM)
        while _session_alive(sid) and time.monotonic() < deadline:
            time.sleep(0.5)
        if _session_alive(sid):
            log(f"the MLflow server did not stop within {timeout:g}s: killing it")
        _signal_session(sid, signal.SIGKILL)
    _files(folder.absolute())[1].unlink(missing_ok=True)
    log("MLflow server stopped")


def _signal_session(sid: int, signum: int) -> None:
    try:
        os.killpg(sid, signum)  # the session leader's group: start_new_session made pgid = sid = pid
    except OSError:
        pass


def wait(folder: Path) -> str:
    """Until the started server answers; a port taken meanwhile: another, up to TRIES starts. Returns its URI."""
    timeout = float(os.environ.get("DITSCALE_MLFLOW_START_TIMEOUT", "180"))
    while True:
        state = _state(folder)
        if state is None:
            raise UserError(f"--mlflow-server: no MLflow server was started in {folder.absolute()}")
        try:
            wait_for_mlflow(state["uri"], timeout, [state["pid"]], auth=state["auth"])
            log(f"MLflow server at {state['uri']}: up{' (basic auth)' if state['auth'] else ''}")
            return state["uri"]
        except UserError as err:
            stop(folder)
            logfile = _files(folder.absolute())[0]
            with open(logfile, "rb") as f:
                f.seek(state["offset"])
                new = f.read().decode(errors="replace")
            if (not os.environ.get("DITSCALE_MLFLOW_PORT") and state["tries"] < TRIES
                    and "address already in use" in new.lower()):
                log("the MLflow server's port was taken meanwhile: trying another")
                start(folder, state["ip"], state["auth"], state["tries"] + 1)
                continue
            for line in new.splitlines()[-20:]:
                print(f"[mlflow server] {line}", file=sys.stderr)
            raise UserError(f"{err} (log: {logfile})") from None


def server_ip(head_ip: str) -> str:
    """The server's address: the head's (this shell runs on the head: Slurm's batch host is the first node)."""
    if os.environ.get("SLURMD_NODENAME") == os.environ.get("DITSCALE_HEAD_NODE"):
        return head_ip
    return node_ip(toward=head_ip)
