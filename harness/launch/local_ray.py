"""Ray for a sweep: join a cluster (`--address`), or start an embedded local Ray on 127.0.0.1 with token
authentication; the Ray Train switches every trial runs with; how many trials the cluster fits.

Joining `--address HOST:PORT` from a machine that is not a node of that cluster (a login node): a Ray
driver needs a Ray node (raylet, object store) on its own machine, which the cluster's nodes can reach.
start_ray then starts one there for the sweep, with no CPUs and no GPUs (nothing is scheduled on it),
on the address that routes toward the head, in a private temp folder, and stops it at the end. Where
this machine already runs a node of that cluster (the Slurm job's driver, on the head node), the
driver uses it. check_shared_files then asks every other node whether it sees the study's files at
the same paths (storage, shards, assets, an SQLite store) and reaches an MLflow server, and fails in
one line when not.

Private Ray APIs used here (an upper bound on `ray` in pyproject.toml names them): ray._private.
ray_constants.ENABLE_RAY_CLUSTER (the loopback-only embedded Ray), ray._raylet's auth-token cache
reset, and ray.data's autoscaling coordinator (pre-warmed); each fails soft or is a one-line fix.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

from harness.config import TrialConfig
from harness.errors import UserError

# Ray Train V2 starts several helper actors per trial, each a fresh Python process (about a second of
# CPU apiece before it does anything). These switches drop the ones a ditscale trial does not use:
# the preemption watcher (node draining on autoscaled clouds; Slurm preemption goes through the stop
# file instead), the metrics callbacks (Prometheus export) and the per-trial working directory
# (paths are absolute already). The controller polls its workers every 2 s by default; 0.2 s lets a
# short trial start and end sooner. Tune's automatic result files (CSV, JSON and TensorBoard per trial)
# are off, but for the JSON one, which the sweep adds back because Tune's result grid reads it: MLflow
# holds every metric, and Tune's TensorBoard logger imports torch into the sweep's driver (measured:
# 2.1 s of a tiny sweep's start-up here, ~0.5 GB); TUNE_DISABLE_AUTO_CALLBACK_LOGGERS=0 in the sweep's
# environment brings them all back (values already set there win over these).
_RAY_TRAIN_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_METRICS_ENABLED": "0",
    "RAY_CHDIR_TO_TRIAL_DIR": "0",
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
}


def runtime_env() -> dict:
    """The sweep's Ray job environment: the Ray Train switches as env_vars, and MLflow's credential
    variables of this process (harness.tracking.CREDENTIAL_VARS, those taken out of a tracking URI
    included) through a worker setup hook. A cluster joined with --address was started from another
    environment: without them every trial's MLflow requests are refused (HTTP 401) while the driver's
    parent run opens. Not as env_vars: Ray's runtime-env agent logs a job's env_vars, values and all, at
    INFO level into <ray temp>/session_*/logs/runtime_env_agent.log on every node (a 0644 file;
    seen with Ray 2.60). A worker_process_setup_hook is pickled into the GCS and logged by its key
    only (ray/_private/runtime_env/setup_hook.py); Ray merges it into every task's and actor's runtime
    env, Tune's and Train's included, and runs it when a worker process starts."""
    from harness.tracking import CREDENTIAL_VARS

    env = {k: os.environ.get(k, v) for k, v in _RAY_TRAIN_ENV.items()}
    credentials = {k: os.environ[k] for k in CREDENTIAL_VARS if os.environ.get(k)}
    return {"env_vars": env, **({"worker_process_setup_hook": _credentials_hook(credentials)} if credentials else {})}


def _credentials_hook(values: dict[str, str]):
    """A function that sets `values` in the environment of the worker process that runs it (a closure:
    cloudpickle carries `values` with it; Ray wants a function with a name, not a partial)."""

    def set_mlflow_credentials() -> None:
        os.environ.update(values)

    return set_mlflow_credentials


RAY_AUTH_ENV = "DITSCALE_RAY_AUTH"  # token (default) | disabled: the embedded local Ray's authentication
_RAY_AUTH_KEYS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
_embedded_auth: dict = {}  # what start_ray set up for the embedded Ray's token; stop_ray undoes it


def _refresh_ray_auth() -> None:
    """Ray caches its auth mode and token per process: make it read them again (e.g. the second sweep of
    one process gets a new token). Private Ray API: without it only a second in-process sweep is affected."""
    try:
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
    except Exception:
        pass


def _embedded_ray_auth() -> None:
    """Token authentication for the embedded local Ray (any local user can reach its loopback ports):
    a fresh random token per sweep, in a private folder (0700, the file 0600) that Ray's GCS, raylet and
    workers find through RAY_AUTH_TOKEN_PATH, inherited from this process. The token is never printed nor
    logged; the folder goes when the Ray does. A RAY_AUTH_TOKEN[_PATH] of the user's (for joining other
    clusters) is set aside meanwhile. DITSCALE_RAY_AUTH=disabled turns authentication off."""
    mode = os.environ.get(RAY_AUTH_ENV, "token").strip().lower() or "token"
    if mode not in ("token", "disabled"):
        raise UserError(f"{RAY_AUTH_ENV}={mode!r}: use token or disabled")
    _embedded_auth["env"] = {key: os.environ.pop(key, None) for key in _RAY_AUTH_KEYS}
    os.environ["RAY_AUTH_MODE"] = mode
    if mode == "token":
        folder = tempfile.mkdtemp(prefix="ditscale-ray-auth-")  # mode 0700
        _embedded_auth["folder"] = folder
        path = Path(folder) / "token"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_hex(32))
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(path)
    _refresh_ray_auth()


def stop_ray() -> None:
    """Stop the embedded Ray, or the node start_ray started to join a cluster; remove the embedded Ray's
    token and restore the auth variables it replaced."""
    import ray

    try:
        ray.shutdown()
    finally:
        _stop_joining_node()
        folder = _embedded_auth.pop("folder", None)
        if folder:
            shutil.rmtree(folder, ignore_errors=True)
        for key, value in _embedded_auth.pop("env", {}).items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _refresh_ray_auth()


def start_ray(address: str | None, train_workers: bool = True) -> bool:
    """Join `address`, or start an embedded local Ray on 127.0.0.1 with token authentication (a fresh
    token per sweep; _embedded_ray_auth). Returns True if we started it (stop it with stop_ray).
    train_workers: whether any trial will start Ray Train workers (else nothing needs the
    autoscaling coordinator _prewarm_autoscaling_coordinator starts)."""
    for key, value in runtime_env()["env_vars"].items():
        os.environ.setdefault(key, value)  # the driver-side Tune/Train code reads them too
    if not address:
        # Ray resolves 127.0.0.1 to the machine's routable address unless it believes clusters are
        # off (its laptop mode): that keeps the embedded Ray on the loopback interface.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray
    import ray._private.ray_constants as ray_constants

    if ray.is_initialized():
        return False
    if address:
        target = _gcs_target(address)
        node_ip = _local_node(*target) if target else None
        if target and node_ip is None:  # not a node of that cluster (a login node): become one for the sweep
            node_ip = _start_joining_node(address, *target)
        try:
            ray.init(address=address, log_to_driver=True, runtime_env=runtime_env(),
                     **({"_node_ip_address": node_ip} if node_ip else {}))
        except BaseException:
            _stop_joining_node()
            raise
        return bool(_joining)
    ray_constants.ENABLE_RAY_CLUSTER = False
    _embedded_ray_auth()
    try:
        ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=True,
                 configure_logging=False, runtime_env=runtime_env())
    except BaseException:
        stop_ray()
        raise
    if train_workers:
        _prewarm_autoscaling_coordinator()
    return True


def _prewarm_autoscaling_coordinator() -> None:
    """Each Train controller first sends its resource request to a cluster-wide coordinator actor and
    waits up to 5 s for it; on a fresh cluster the first trial pays for that actor's process start
    and times out. Creating it now overlaps its start with the first Tune trial's. (Private Ray API:
    if it moves, the only loss is those seconds.) A trial that trains inside Tune's process (Ray
    Train's local mode: tune_trial.runs_in_process) has no controller: a sweep of only those skips it
    (the actor's process imports ray.data, ~1.5 s of CPU)."""
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )

        get_or_create_autoscaling_coordinator()
    except Exception:
        pass


def max_concurrent_trials(trials: list[TrialConfig], requested: int | None) -> int:
    import ray

    if requested:
        return requested
    total = ray.cluster_resources()
    fits = []
    for trial in trials:
        r = trial.resources
        n = int(total.get("CPU", 0) // (r.cpus_per_worker * r.workers_per_trial))
        if r.gpus_per_worker:
            n = min(n, int(total.get("GPU", 0) // (r.gpus_per_worker * r.workers_per_trial)))
        fits.append(n)
    n = min(fits) if fits else 1
    if n < 1:
        t = trials[0].resources
        raise UserError(
            f"resources: a trial needs {t.workers_per_trial} workers x {t.cpus_per_worker} CPU"
            f"{f' + {t.gpus_per_worker} GPU' if t.gpus_per_worker else ''}; the Ray cluster has {dict(total)}")
    return n


# --- joining a cluster from outside it -----------------------------------------------------------

_joining: dict = {}  # the Ray node start_ray started on this machine to join a cluster: proc, folder


def _gcs_target(address: str) -> tuple[str, int] | None:
    """HOST:PORT (the GCS of a running cluster) as (IPv4 address, port); None for ray://, auto, ...
    An unknown host name is a one-line error."""
    host, sep, port = address.rpartition(":")
    if not sep or "://" in address or not port.isdigit() or not host:
        return None
    try:
        return socket.gethostbyname(host), int(port)
    except OSError:
        raise UserError(f"--address {address}: cannot resolve {host!r}") from None


def _local_node(gcs_ip: str, gcs_port: int) -> str | None:
    """The address of a raylet of the cluster whose GCS is gcs_ip:gcs_port that runs on this machine,
    or None. Ray looks for a local raylet by its command line among all processes; one that belongs to
    the cluster but whose address is not ours (another network namespace, a container sharing the
    process table) would take the driver, which then advertises an address it is not on."""
    import psutil

    from harness.launch.slurm import bindable

    for proc in psutil.process_iter(["cmdline"]):
        try:
            cmd = proc.info["cmdline"] or []
        except (psutil.Error, OSError):
            continue
        if not cmd or os.path.basename(cmd[0]) != "raylet":
            continue
        flags = dict(arg[2:].split("=", 1) for arg in cmd[1:] if arg.startswith("--") and "=" in arg)
        gcs, ip = flags.get("gcs-address", ""), flags.get("node_ip_address", "")
        host, _, port = gcs.rpartition(":")
        try:
            same = port == str(gcs_port) and socket.gethostbyname(host) == gcs_ip
        except OSError:
            same = False
        if same and ip and bindable(ip):
            return ip
    return None


def _ray_executable() -> str:
    beside = Path(sys.executable).parent / "ray"
    if beside.is_file():
        return str(beside)
    found = shutil.which("ray")
    if not found:
        raise UserError("--address: the `ray` command is not installed beside this Python")
    return found


def _start_joining_node(address: str, gcs_ip: str, gcs_port: int, timeout: float = 120.0) -> str:
    """Start a Ray node on this machine that joins the cluster at `address` with no CPUs and no GPUs (the
    sweep's driver needs a node of its own); returns its address. `ray start --block` in its own
    session: stop_ray ends it with SIGTERM (it stops its processes), then its process group."""
    from harness.launch.slurm import node_ip

    ip = node_ip(toward=gcs_ip)
    if ip.startswith("127.") and not gcs_ip.startswith("127."):
        raise UserError(f"--address {address}: this machine has no address toward {gcs_ip} but loopback; "
                        "set DITSCALE_RAY_IFACE to the interface the Ray nodes reach")
    folder = tempfile.mkdtemp(prefix="ditscale-ray-", dir=os.environ.get("RAY_TMPDIR") or None)  # 0700
    log_path = Path(folder) / "ray-start.log"
    cmd = [_ray_executable(), "start", "--block", f"--address={address}", f"--node-ip-address={ip}",
           "--num-cpus=0", "--num-gpus=0", "--disable-usage-stats", f"--temp-dir={folder}"]
    env = {**os.environ, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
    _joining.update(proc=proc, folder=folder)
    print(f"joining the Ray cluster at {address} from {ip}: a Ray node with no CPUs for this sweep's driver "
          f"(temp folder {folder})", flush=True)
    deadline = time.monotonic() + timeout
    while _local_node(gcs_ip, gcs_port) != ip:
        if proc.poll() is not None or time.monotonic() > deadline:
            lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
            why = lines[-1].strip() if lines else f"exit code {proc.returncode}"
            _stop_joining_node()
            what = "`ray start` exited" if proc.returncode is not None else f"no Ray node within {timeout:.0f}s"
            raise UserError(f"--address {address}: cannot join that Ray cluster from {ip}: {what} ({why})")
        time.sleep(0.5)
    return ip


def _stop_joining_node(timeout: float = 30.0) -> None:
    proc, folder = _joining.pop("proc", None), _joining.pop("folder", None)
    if proc is not None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        try:  # whatever of its session is left (raylet, agents): they are ours alone
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
    if folder:
        shutil.rmtree(folder, ignore_errors=True)


# --- what every node of a joined cluster must see --------------------------------------------------


def _look(paths: dict, endpoints: dict, patience: float = 10.0) -> dict:
    """Runs on a Ray node: which of `paths` it cannot see and which of `endpoints` it cannot reach. A
    file the driver has just written may show up late on a network filesystem (NFS caches directory
    entries, missing ones too): a missing path is looked for again, its folder listed, for `patience` s."""
    missing = {label: path for label, path in paths.items() if not os.path.exists(path)}
    deadline = time.monotonic() + patience
    while missing and time.monotonic() < deadline:
        time.sleep(2)
        for label, path in list(missing.items()):
            try:
                os.listdir(os.path.dirname(path))  # revalidates the folder's entries
            except OSError:
                pass
            if os.path.exists(path):
                del missing[label]
    for label, (host, port) in endpoints.items():
        try:
            with socket.create_connection((host, port), timeout=5):
                pass
        except OSError as err:
            missing[label] = f"{host}:{port} ({err.strerror or err})"
    return {"host": os.uname().nodename, "missing": missing}


def _shared_paths(trial: TrialConfig, probe: Path) -> tuple[dict, dict]:
    """{label: local path} and {label: (host, port)} that every Ray node must see / reach."""
    from harness.data.shards import shard_urls

    paths = {"resources.storage": str(Path(probe).resolve())}
    for label, pattern in (("data.shards", trial.data.shards), ("data.val_shards", trial.data.val_shards)):
        if pattern:
            local = [u for u in shard_urls(pattern)[0] if os.path.isabs(u)]
            if local:
                paths[label] = local[0]
    assets = trial.resources.assets or os.environ.get("DITSCALE_ASSETS")
    if assets and os.path.isdir(assets):
        paths["resources.assets"] = str(Path(assets).resolve())
    endpoints = {}
    uri = trial.tracking.uri or ""
    if uri.startswith("sqlite:///"):
        db = uri[len("sqlite:///"):]
        if os.path.isfile(db):
            paths["tracking.uri"] = db
    elif uri.startswith(("http://", "https://")):
        parts = urlsplit(uri)
        if parts.hostname:
            endpoints["tracking.uri"] = (parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
    return paths, endpoints


def check_shared_files(trial: TrialConfig, probe: Path, timeout: float = 180.0) -> None:
    """On a cluster joined with --address: every node but the driver's must see the study's files at
    the same paths (a shared filesystem) and reach an MLflow server; else one line naming what and
    where. A node that cannot run the check in time is named too."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from harness.tracking import redact_uri

    mine = ray.get_runtime_context().get_node_id()
    nodes = [n for n in ray.nodes() if n.get("Alive") and n["NodeID"] != mine]
    if not nodes:
        return
    paths, endpoints = _shared_paths(trial, probe)
    look = ray.remote(num_cpus=0, max_retries=0)(_look)
    refs = {look.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
            .remote(paths, endpoints): n for n in nodes}
    ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout)
    if pending:
        late = ", ".join(refs[r]["NodeManagerAddress"] for r in pending)
        raise UserError(f"--address: Ray node(s) {late} did not run a 0-CPU task within {timeout:.0f}s; "
                        "is the cluster healthy?")
    where: dict[str, list[str]] = {}  # label -> the nodes that miss it
    for ref in ready:
        node, answer = refs[ref], ray.get(ref)
        for label in answer["missing"]:
            where.setdefault(label, []).append(f"{node['NodeManagerAddress']} ({answer['host']})")
    if not where:
        return
    shown = {**paths, "resources.storage": trial.resources.storage}  # the folder, not the probe file in it
    problems = []
    for label, nodes in where.items():
        nodes = ", ".join(sorted(nodes))
        if label in endpoints:
            problems.append(f"{label} {redact_uri(trial.tracking.uri)} cannot be reached from Ray node(s) {nodes}")
        else:
            problems.append(f"{label} {shown[label]} is not visible on Ray node(s) {nodes}")
    raise UserError("; ".join(problems) + ": every Ray node must see the study's files at the same paths (a shared "
                    "filesystem; relative paths are resolved in the folder ditscale sweep runs in) and reach the "
                    "tracking server")
