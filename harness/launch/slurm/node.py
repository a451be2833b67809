"""What slurm/sweep.sbatch runs on the nodes of its allocation: in the batch shell (the per-job Ray token
file, for allocation.py; waiting for Ray and the job's MLflow server; stopping Ray: `ditscale slurm node
stop-ray`) and in its srun steps (the head's address: `ditscale slurm node-ip --head`; `ditscale slurm node
ray head|worker`: one Ray node per Slurm node; `ditscale slurm node ray-stop`).

A Ray node's temp folder is r/ inside a private folder `$RAY_TMP_BASE-NODE.XXXXXXXX` made here by
tempfile.mkdtemp (a random name, made atomically, mode 0700, this user's): job ids are predictable and /tmp
is shared, so nobody can make the folder first, and Ray makes r/ world-writable itself: the private folder
around it keeps others out. The pid of `ray start` and its start time (field 22 of /proc/PID/stat, proc(5))
are written beside r/, so that a reused pid is never signalled. Named after the node, so that nodes sharing
/tmp (or DITSCALE_RAY_TMPDIR) each find their own; such a folder is used, signalled through or removed
only when it is a folder (not a symlink), this user's and mode 0700 (`ours`).

Stopping: `ray-stop` sends SIGTERM to that one `ray start` process, which drains its node and stops Ray's
processes in order (signalling the whole step would hit the GCS at the same moment, and the workers would
wait 30 s for it to drain). The batch shell's `stop-ray` first leaves the stop mark (RAY_STOP_MARK): a
worker whose Ray then ends knows the job is ending, and a step that has not started `ray start` yet starts
nothing (a stop before its pid file exists would otherwise find no pid). A worker whose Ray ends by itself
runs the head-loss watch (watch.py).
"""

from __future__ import annotations

import base64
import glob
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from harness.errors import UserError
from harness.files import process_start_time
from harness.launch.slurm.watch import after_ray_exit, prepare_watch

MLFLOW_CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
PID_FILE = "ray.pid"


# --- addresses -------------------------------------------------------------------------------------


def bindable(ip: str) -> bool:
    """Whether `ip` is an address of this machine (of this network namespace): a socket can bind it."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((ip, 0))
        return True
    except OSError:
        return False


def _is_local_address(ip: str) -> bool:
    """Whether `ip` is a non-loopback address of this machine."""
    return not ip.startswith("127.") and ip != "::1" and bindable(ip)


def slurm_node_addr() -> str | None:
    """This node's address as Slurm reaches it (`NodeAddr` of $SLURMD_NODENAME, resolved to IPv4), when
    it is an address of this machine; else None. Slurm's controller and srun reach every node there,
    so it works where no default route exists (isolated clusters, test hosts in network namespaces)."""
    name = os.environ.get("SLURMD_NODENAME")
    if not name or shutil.which("scontrol") is None:
        return None
    try:
        out = subprocess.run(["scontrol", "-o", "show", "node", name], capture_output=True, text=True,
                             timeout=15, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"\bNodeAddr=(\S+)", out)
    if not m:
        return None
    try:
        ip = socket.gethostbyname(m.group(1))
    except OSError:
        return None
    return ip if _is_local_address(ip) else None


def node_ip(toward: str | None = None) -> str:
    """The IPv4 address Ray should bind on this node: $DITSCALE_RAY_IFACE's address when set, else
    the source address of the route toward `toward` (the head node; default a public address: no
    packet is sent), else Slurm's address for this node (a node without a default route), else what
    the host name resolves to, else 127.0.0.1 (which only a one-node cluster can use)."""
    iface = os.environ.get("DITSCALE_RAY_IFACE")
    if iface:
        try:
            out = subprocess.run(["ip", "-4", "-o", "addr", "show", "dev", iface], capture_output=True,
                                 text=True, check=True).stdout
            return out.split()[3].split("/")[0]
        except (OSError, subprocess.CalledProcessError, IndexError):
            raise UserError(f"DITSCALE_RAY_IFACE={iface}: no IPv4 address on that interface") from None
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((toward or "8.8.8.8", 80))
            return s.getsockname()[0]
    except OSError:  # no route there: e.g. no default route
        pass
    ip = slurm_node_addr()
    if ip:
        return ip
    try:
        ip = socket.gethostbyname(socket.gethostname())
        if _is_local_address(ip):
            return ip
    except OSError:
        pass
    return "127.0.0.1"


def head_ip(env=None) -> str:
    """The Ray head's address, found on the head node (`ditscale slurm node-ip --head`, an srun step there):
    DITSCALE_RAY_HEAD_IP when set (when the address found is not the one the other nodes reach), else
    `node_ip()`. Loopback in a job of several nodes (SLURM_JOB_NUM_NODES), which the others cannot reach,
    is refused in one line."""
    env = os.environ if env is None else env
    ip = env.get("DITSCALE_RAY_HEAD_IP") or node_ip()
    if ip.startswith("127.") and int(env.get("SLURM_JOB_NUM_NODES") or 1) > 1:
        raise UserError(f"the head node {env.get('SLURMD_NODENAME') or socket.gethostname()} found no address but "
                        f"loopback ({ip}), which the other nodes cannot reach: set DITSCALE_RAY_IFACE to the network "
                        "interface the nodes share (or DITSCALE_RAY_HEAD_IP)")
    return ip


def gloo_interface(ray_ip: str) -> str | None:
    """The interface gloo (CPU trials across nodes) should bind, when the default does not work.

    gloo binds the address the host name resolves to, else loopback, and a group spanning nodes cannot
    connect over loopback. Where the name resolves to nothing of this node's but loopback (no DNS entry;
    Debian's 127.0.1.1), gloo gets the interface of the node's Ray address instead; where it resolves
    properly it is left alone (and single-node groups keep their transport on loopback:
    harness/common/process_group.py). None: leave GLOO_SOCKET_IFNAME as it is."""
    if shutil.which("ip") is None:
        return None
    try:
        resolved = socket.getaddrinfo(socket.gethostname(), None)[0][4][0]
    except (OSError, IndexError):
        resolved = ""
    if resolved and _is_local_address(resolved):
        return None
    out = subprocess.run(["ip", "-o", "addr", "show", "to", ray_ip], capture_output=True, text=True,
                         check=False).stdout.split()
    return out[1] if len(out) > 1 else None


# --- the batch shell's waits -----------------------------------------------------------------------


def _check_pids(pids, what: str) -> None:
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            raise UserError(what.format(pid=pid)) from None
        except PermissionError:
            pass


def wait_for_ray(address: str, nodes: int, timeout: float = 300.0, watch_pids=()) -> dict:
    """Block until `nodes` nodes are alive in the Ray cluster at HOST:PORT; returns its resources.
    Fails early when one of `watch_pids` (the srun steps running `ray start --block`) has exited."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout
    exited = (f"the Ray step (pid {{pid}}) exited before {nodes} node(s) joined; "
              "see the job log above for `ray start`'s error")
    while True:  # the GCS port first: ray.init on a port nobody listens on takes long to give up
        _check_pids(watch_pids, exited)
        try:
            with socket.create_connection((host, int(port)), timeout=2):
                break
        except OSError:
            if time.monotonic() > deadline:
                raise UserError(f"no Ray head answers at {address} after {timeout:.0f}s") from None
            time.sleep(1)
    import ray  # heavy: only once the head answers

    ray.init(address=address, logging_level="ERROR", log_to_driver=False, configure_logging=False)
    try:
        while True:
            alive = [n for n in ray.nodes() if n.get("Alive")]
            if len(alive) >= nodes:
                return ray.cluster_resources()
            if time.monotonic() > deadline:
                raise UserError(f"only {len(alive)} of {nodes} nodes joined the Ray cluster at {address} "
                                f"within {timeout:.0f}s")
            _check_pids(watch_pids, exited)
            time.sleep(1)
    finally:
        ray.shutdown()


def wait_for_mlflow(uri: str, timeout: float = 180.0, watch_pids=(), auth: bool = False) -> None:
    """Block until the MLflow server at `uri` answers /health; with `auth`, also check that it takes
    MLFLOW_TRACKING_USERNAME/PASSWORD (a user store left by an earlier job may hold another password).
    Fails early when one of `watch_pids` (the server) has exited."""
    deadline = time.monotonic() + timeout
    while True:
        _check_pids(watch_pids, f"the MLflow server (pid {{pid}}) exited before it answered at {uri}; see its log")
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as resp:
                if resp.status == 200:
                    break
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise UserError(f"the MLflow server did not answer at {uri} within {timeout:.0f}s; see its log")
        time.sleep(1)
    if not auth:
        return
    user, password = (os.environ.get(k, "") for k in MLFLOW_CREDENTIALS)
    request = urllib.request.Request(uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1")
    request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=30):
            return
    except urllib.error.HTTPError as err:
        if err.code == 401:
            raise UserError(f"the MLflow server refuses MLFLOW_TRACKING_USERNAME={user!r} with this password "
                            f"(HTTP {err.code}): its user store (auth.db beside the server's mlflow.db) was made by "
                            "an earlier job with another password for that user; use that password or remove "
                            "auth.db") from None
        raise UserError(f"the MLflow server at {uri} answered HTTP {err.code} to an authenticated request") from None
    except (urllib.error.URLError, OSError) as err:
        raise UserError(f"the MLflow server at {uri} stopped answering ({getattr(err, 'reason', err)})") from None


# --- the per-job Ray token -------------------------------------------------------------------------


def write_token(path: str | Path) -> None:
    """A fresh Ray token in `path`, created exclusively and without following a symlink
    (O_CREAT|O_EXCL|O_NOFOLLOW), mode 600, owned by this user. A regular file of this user's already
    there (left by an earlier start of this job that was killed before it cleaned up) is replaced;
    anything else there (a symlink, someone else's file, a folder) is left alone: one-line UserError."""
    path = str(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    why = "cannot create the Ray token file: "
    try:
        try:
            fd = os.open(path, flags, 0o600)
        except FileExistsError:
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                raise UserError(f"{why}{path} is a symbolic link (to {os.readlink(path)}); not following it: "
                                "remove it") from None
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                raise UserError(f"{why}{path} already exists and is not a file of this user's (uid {st.st_uid}): "
                                "remove it") from None
            os.unlink(path)
            fd = os.open(path, flags, 0o600)
        try:
            os.fchmod(fd, 0o600)
            st = os.fstat(fd)
            if st.st_uid != os.geteuid():
                os.unlink(path)
                raise UserError(f"{why}{path} was created owned by uid {st.st_uid}, not this user ({os.geteuid()}): "
                                "the folder's file system maps owners (root_squash?); set RAY_AUTH_TOKEN_PATH")
            os.write(fd, (secrets.token_hex(32) + "\n").encode())
        finally:
            os.close(fd)
    except OSError as err:
        raise UserError(f"{why}{path}: {err.strerror}") from None


# --- a Ray node in its srun step -------------------------------------------------------------------


def ours(folder: str | Path) -> bool:
    """Whether `folder` is a folder (not a symlink) of this user's with mode 0700: one this job made."""
    try:
        st = os.lstat(folder)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) == 0o700


SUFFIX = ".????????"   # what tempfile.mkdtemp adds after the prefix's '.': 8 of [a-z0-9_]


def private_folder(prefix: str) -> Path:
    """`prefix` + '.' + eight random characters, made atomically with mode 0700 by tempfile.mkdtemp (as
    `mktemp -d PREFIX.XXXXXXXX`), whose random names are those of SUFFIX."""
    parent = Path(prefix).parent
    parent.mkdir(parents=True, exist_ok=True)
    try:
        folder = Path(tempfile.mkdtemp(prefix=Path(prefix).name + ".", dir=parent))
    except OSError as err:
        raise UserError(f"cannot make a private Ray temp folder {prefix}.XXXXXXXX: {err.strerror}") from None
    folder.chmod(0o700)  # whatever the umask
    return folder


def node_folders(base: str, node: str) -> list[str]:
    """This node's private folders of one start of the job (RAY_TMP_BASE = DIR/ray-JOB-RESTART) that are ours."""
    return [f for f in glob.glob(glob.escape(f"{base}-{node}") + SUFFIX) if ours(f)]


def clear_previous_starts(base: str, node: str, restart: int, keep: bool) -> None:
    """What an earlier start of this job left on the node (a requeue after a lost node: Ray's processes
    escape Slurm's process tracking when they re-parent). Ray's daemons (ray start, raylet, GCS, agents)
    name their temp folder on their command line and are killed by it; Ray's worker processes (renamed
    ray::...) exit with their raylet. The folders go too, unless `keep`."""
    job = base.rsplit("-", 1)[0]
    for r in range(restart):
        for old in node_folders(f"{job}-{r}", node):
            needle = f"{old}/".encode()
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit() or int(entry.name) == os.getpid():
                    continue
                try:
                    if needle in (entry / "cmdline").read_bytes():
                        os.kill(int(entry.name), signal.SIGKILL)
                except (OSError, ValueError):
                    pass
            if not keep:
                shutil.rmtree(old, ignore_errors=True)


def ray_start_args(role: str, ip: str, port: int, cpus: int, gpus: int, temp: str | Path,
                   address: str | None = None, dashboard: str = "auto") -> list[str]:
    """`ray start`'s command line for one node: explicit ports (the GCS at `port`, the node's others at
    PORT+1..PORT+8, worker processes at PORT+100..PORT+999; no Ray Client server: the driver runs in
    the job and joins with HEAD:PORT), the node's address and its temp folder. The dashboard (head
    only; it also serves the state API Ray Train's placement-group cleaner queries): '0' none, '1' on,
    else Ray's choice (on when ray[default] is installed)."""
    args = ["ray", "start", f"--node-ip-address={ip}", f"--temp-dir={temp}", "--block", "--disable-usage-stats",
            f"--num-cpus={cpus}", f"--num-gpus={gpus}",
            f"--node-manager-port={port + 1}", f"--object-manager-port={port + 2}",
            f"--dashboard-agent-listen-port={port + 4}", f"--dashboard-agent-grpc-port={port + 5}",
            f"--metrics-export-port={port + 6}", f"--runtime-env-agent-port={port + 7}",
            f"--min-worker-port={port + 100}", f"--max-worker-port={port + 999}"]
    if role == "worker":
        return [*args, f"--address={address}"]
    args += ["--head", f"--port={port}", f"--dashboard-host={ip}"]
    if dashboard == "0":
        return [*args, "--include-dashboard=false"]
    if dashboard == "1":
        return [*args, "--include-dashboard=true", f"--dashboard-port={port + 8}"]
    return [*args, f"--dashboard-port={port + 8}"]


def _say(text: str) -> None:
    print(f"{socket.gethostname()}: {text}", file=sys.stderr, flush=True)


def run_ray_node(role: str, ip: str | None, head_ip: str, port: int, cpus: int, gpus: int) -> int:
    """One Ray node, in its srun step, until it is stopped: clear what an earlier start of the job left,
    start `ray start --block` in a private temp folder (its pid beside it), wait; then, on a worker whose
    Ray ended by itself, the head-loss watch (watch.py). The folder is removed at the end unless
    DITSCALE_KEEP_RAY_TMP=1. Returns `ray start`'s exit status."""
    env = os.environ
    node = env.get("SLURMD_NODENAME") or socket.gethostname()
    base, keep = env["RAY_TMP_BASE"], env.get("DITSCALE_KEEP_RAY_TMP", "0") == "1"
    clear_previous_starts(base, node, int(env.get("SLURM_RESTART_COUNT") or 0), keep)
    ip = ip or node_ip(toward=head_ip)
    if not env.get("GLOO_SOCKET_IFNAME") and int(env.get("SLURM_JOB_NUM_NODES") or 1) > 1:
        iface = gloo_interface(ip)
        if iface:
            env["GLOO_SOCKET_IFNAME"] = iface
    head_watch = prepare_watch() if role == "worker" else None
    stop_mark = Path(env.get("RAY_STOP_MARK", "/nonexistent"))
    if stop_mark.exists():  # the job ended before this step got this far: nothing to start
        return 0
    folder = private_folder(f"{base}-{node}")
    cmd = ray_start_args(role, ip, port, cpus, gpus, folder / "r", f"{head_ip}:{port}",
                         env.get("DITSCALE_RAY_DASHBOARD", "auto"))
    proc = subprocess.Popen(cmd)
    (folder / PID_FILE).write_text(f"{proc.pid} {process_start_time(proc.pid)}\n")
    # The batch shell makes the mark before `ray-stop` reads the pid files: a stop that came between the
    # look above and the pid file would find no pid to signal, so look again now that the file is there.
    if stop_mark.exists():
        proc.send_signal(signal.SIGTERM)
    signalled = []

    def forward(signum, _frame):  # Slurm ending the step: `ray start` stops its node in order
        signalled.append(signum)
        proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    rc = proc.wait()
    if head_watch is not None and not signalled:
        after_ray_exit(head_watch)
    if not keep and ours(folder):
        shutil.rmtree(folder, ignore_errors=True)
    return rc


def stop_ray_node() -> None:
    """SIGTERM to this node's `ray start` of this start of the job, through the pid file beside its temp
    folder (only in folders that are ours, only the process whose start time is the one recorded)."""
    node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    for folder in node_folders(os.environ["RAY_TMP_BASE"], node):
        try:
            pid, started = (Path(folder) / PID_FILE).read_text().split()
            if process_start_time(int(pid)) == started:
                os.kill(int(pid), signal.SIGTERM)
        except (OSError, ValueError):
            pass



# --- the batch shell's Ray stop (`ditscale slurm node stop-ray`) -----------------------------------


def _log(text: str) -> None:
    """One line of the job's log, as the batch script's own `log` writes them."""
    print(f"[ditscale {time.strftime('%F %T')}] {text}", flush=True)


def hostnames(nodelist: str) -> list[str]:
    """`scontrol show hostnames NODELIST`: node1,node[3-4] -> [node1, node3, node4]."""
    if not nodelist:
        return []
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=False)
    return out.stdout.split()


def live_nodes(nodes: list[str]) -> list[str]:
    """Those of `nodes` still in the job's allocation (Slurm removes a node it declared DOWN: --no-kill);
    all of them when squeue does not answer."""
    try:
        now = subprocess.run(["squeue", "-h", "-j", os.environ["SLURM_JOB_ID"], "-o", "%N"], capture_output=True,
                             text=True, timeout=30, check=False).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        now = ""
    if not now:
        return nodes
    left = set(hostnames(now))
    return [n for n in nodes if n in left]


def _running(pid: int) -> bool:
    """Whether `pid` runs (a zombie the batch shell has not reaped yet has exited)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except OSError:
        pass


def stop_step(pid: int, nodes: list[str], name: str, cpus: int, timeout: float) -> None:
    """`ditscale slurm node ray-stop` on those of `nodes` still in the job (an srun step beside the Ray
    step `pid`, a child of the batch shell; SIGTERM to that step when this cannot run), then wait for the
    step to end: killed after `timeout` seconds."""
    live = live_nodes(nodes)
    step = ["srun", "--overlap", "--export=ALL", "--ntasks-per-node=1", f"--cpus-per-task={cpus}",
            "--kill-on-bad-exit=0", f"--nodes={len(live)}", f"--ntasks={len(live)}", f"--nodelist={','.join(live)}",
            "ditscale", "slurm", "node", "ray-stop"]
    if not live or subprocess.run(step, stderr=subprocess.DEVNULL, check=False).returncode != 0:
        _kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(1)
    if _running(pid):
        _log(f"Ray ({name}) did not stop within {timeout:g}s: killing its step")
        _kill(pid, signal.SIGTERM)
        time.sleep(2)
        _kill(pid, signal.SIGKILL)


def stop_ray(head: str, head_pid: int | None, workers: str, workers_pid: int | None, cpus: int) -> None:
    """The batch shell's Ray stop: the stop mark first (the workers' Ray ends now: not a lost head; a step
    not started yet starts nothing), the workers' step, then the head's (the head drains the workers);
    each node's step removes its Ray temp folder. Says which nodes the job lost."""
    _log("stopping Ray")
    mark = os.environ["RAY_STOP_MARK"]
    try:
        Path(mark).touch()
    except OSError as err:
        _log(f"cannot create the stop mark {mark}: {err.strerror}")
    timeout = float(os.environ.get("DITSCALE_STOP_TIMEOUT", "60"))
    if workers_pid:
        stop_step(workers_pid, hostnames(workers), "workers", cpus, timeout)
    if head_pid:
        stop_step(head_pid, [head], "head", cpus, timeout)
    allocated = hostnames(os.environ["SLURM_JOB_NODELIST"])
    live = live_nodes(allocated)
    if len(live) < len(allocated):
        _log(f"nodes lost during the job: {len(allocated)} allocated, {len(live)} left ({','.join(live)})")
