"""Issue 19: scaling out over several hosts — the job's own MLflow server, and joining a Ray cluster.

- `ditscale slurm submit --mlflow-server [--mlflow-auth]`: the batch script runs `mlflow server` on the
  head node for the job's lifetime and every host logs through it. Fast tests: the combinations that
  are refused (one line, before sbatch), and the real slurm/sweep.sbatch run with stand-ins (a fake
  `mlflow` that records how it was started): the admin's password reaches the server's environment
  only, never its command line, a file or the log, and the server is stopped at the end. Slow test:
  a real job with `--mlflow-server --mlflow-auth` across the three hosts of the namespace cluster,
  one of its trials on two hosts (issue 19 items 2 and 4 in one job).
- `ditscale sweep STUDY --address HEAD:PORT` from outside the cluster (the machine's own namespace,
  playing a login node) against Ray on the namespace hosts: the sweep starts a 0-CPU Ray node of its
  own to drive from, trains on the hosts, and refuses in one line a resources.storage the hosts do
  not see (a tmpfs mounted only in the driver's mount namespace).

The namespace cluster (slurm/testing/start-netns-cluster.sh) is tests/slurm/test_netns_cluster.py's fixture;
without root, Slurm or network namespaces these tests are skipped (failed under DITSCALE_REQUIRE_SLURM=1).
"""

from __future__ import annotations

import http.server
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.support import tiny_study, write_study
from tests.support.netns import run_to_completion, submitted
from tests.support.slurm import SBATCH, stub_batch_env

_CLEAN_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "RAY_AUTH_MODE",
              "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS", "DITSCALE_RAY_AUTH")


def _env(**extra: str) -> dict:
    return {**{k: v for k, v in os.environ.items() if k not in _CLEAN_ENV}, "PYTHONUNBUFFERED": "1", **extra}


def _run(*args: str, cwd: Path, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=timeout, check=False)


def _one_error_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """The command failed with one `ditscale ...: error:` line (a sweep's stderr also has Ray's and
    MLflow's INFO lines), no traceback, holding every needle."""
    assert proc.returncode == 2, (proc.stdout[-2000:], proc.stderr[-3000:])
    lines = [line for line in proc.stderr.strip().splitlines() if re.match(r"ditscale [\w -]+: error: ", line)]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _files_containing(folder: Path, secret: str) -> list[str]:
    needle = secret.encode()
    return [str(p) for p in folder.rglob("*") if p.is_file() and not p.is_symlink() and needle in p.read_bytes()]


def _processes_mentioning(text: str) -> list[str]:
    """Processes (not zombies) whose command line or environment holds `text`: `mlflow server` passes its
    store to its uvicorn process in the environment."""
    found, needle = [], text.encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes()
            env = (entry / "environ").read_bytes()
            zombie = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            continue
        if not zombie and (needle in cmd or needle in env):
            shown = cmd.replace(b"\0", b" ").decode(errors="replace")[:200]
            found.append(f"{entry.name}: {shown}")
    return found


def _study(digits: Path, folder: Path, two_host_trial: bool = False) -> Path:
    """Two one-CPU trials of four steps; with `two_host_trial`, the second has two workers (with one CPU
    per host, they need two hosts, and its gloo group spans them)."""
    grid, exclude, resources = {"model.patch": [4, 8]}, [], {"cpus_per_worker": 1}
    if two_host_trial:
        grid["resources.workers_per_trial"] = [1, 2]
        resources["max_concurrent_trials"] = 2
        exclude = [{"model.patch": 4, "resources.workers_per_trial": 2},
                   {"model.patch": 8, "resources.workers_per_trial": 1}]
    return write_study(folder / "study.yaml", tiny_study(
        digits, "scaleout", train={"steps": 4, "log_every": 2, "checkpoint_every": 4},
        resources=resources, grid=grid, exclude=exclude))


@pytest.fixture(scope="module")
def scale_study(digits_dir, tmp_path_factory) -> Path:
    return _study(digits_dir, tmp_path_factory.mktemp("scaleout"))


# --- --mlflow-server / --mlflow-auth: what is refused before sbatch ----------------------------------


def test_bad_mlflow_server_combinations_are_one_line_before_anything_is_submitted(scale_study, tmp_path):
    folder = scale_study.parent
    sub = ("slurm", "submit", str(scale_study), "--cpus-per-task", "2")
    fake = tmp_path / "bin"  # an sbatch that must never run
    fake.mkdir()
    (fake / "sbatch").write_text(f"#!/bin/sh\ntouch {tmp_path}/called\necho 1\n")
    (fake / "sbatch").chmod(0o755)
    env = _env(PATH=f"{fake}:{os.environ['PATH']}")
    _one_error_line(_run(*sub, "--mlflow-auth", cwd=folder, env=env), "--mlflow-auth", "--mlflow-server")
    _one_error_line(_run(*sub, "--mlflow-server", "--set", "tracking.uri=http://bob:s3cret@tracker:5000",
                         cwd=folder, env=env), "--mlflow-server", "tracking.uri=http://***@tracker:5000")
    line = _one_error_line(_run(*sub, "--mlflow-server", cwd=folder,
                                env={**env, "MLFLOW_TRACKING_URI": "http://bob:s3cret@tracker:5000"}),
                           "MLFLOW_TRACKING_URI")
    assert "s3cret" not in line
    _one_error_line(_run(*sub, "--mlflow-server", "--mlflow-auth", cwd=folder, env=env),
                    "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
    _one_error_line(_run(*sub, "--mlflow-server", "--mlflow-auth", cwd=folder,
                         env={**env, "MLFLOW_TRACKING_USERNAME": "alice"}), "MLFLOW_TRACKING_PASSWORD is not set")
    assert not (tmp_path / "called").exists()


def test_submit_passes_the_server_options_to_the_script_and_never_the_password(scale_study, tmp_path):
    folder = scale_study.parent
    record = tmp_path / "sbatch-args"
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sbatch").write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {record}\n"
                                 f"env > {tmp_path}/sbatch-env\necho 4343\n")
    (fake / "sbatch").chmod(0o755)
    password = "pw-" + secrets.token_hex(12)
    env = _env(PATH=f"{fake}:{os.environ['PATH']}", MLFLOW_TRACKING_USERNAME="alice",
               MLFLOW_TRACKING_PASSWORD=password)
    for extra in (["--dry-run"], []):
        proc = _run("slurm", "submit", str(scale_study), "--cpus-per-task", "2", "--mlflow-server", "--mlflow-auth",
                    *extra, cwd=folder, env=env)
        assert proc.returncode == 0, proc.stderr
        assert password not in proc.stdout + proc.stderr
    args = record.read_text().splitlines()
    server = folder.resolve() / "mlflow-server"
    assert args[2:6] == ["--mlflow-server", str(server), "--mlflow-auth", str(scale_study.resolve())], args
    assert f"sqlite:///{server}/mlflow.db" in proc.stdout and "Submitted job 4343" in proc.stdout
    # The job gets the credentials the way it gets the rest of the environment (sbatch's --export=ALL) ...
    assert f"MLFLOW_TRACKING_PASSWORD={password}" in (tmp_path / "sbatch-env").read_text()
    # ... and the saved batch script does not hold them.
    assert not _files_containing(folder / "runs", password)


# --- the batch script's server section, run for real with stand-ins ---------------------------------


def _stub_job(folder: Path, study_uri: str | None = None) -> dict:
    """Stand-ins for everything sweep.sbatch calls but bash, python, ps and ditscale's own `slurm paths`,
    `slurm node allocation` and `slurm node mlflow-server start|stop` (a study in `folder`/study.yaml): a
    one-node job on `node1` whose Ray steps and sweep do nothing, an `mlflow` that records its arguments and environment and then waits
    to be stopped (as a server does), and a wait that says it is up (the stand-in answers nothing)."""
    study = tiny_study(folder / "no-data", "stub")
    if study_uri:
        study["tracking"] = {"uri": study_uri}
    write_study(folder / "study.yaml", study)
    rec = shlex.quote(str(folder / "record"))
    scripts = {
        "ditscale": ("#!/bin/bash\n"
                     'case "$1 $2 $3 $4" in\n'
                     f"  'slurm node mlflow-server wait') echo \"mlflow-server wait $*\" >> {rec}; echo http://10.9.8.7:5999 ;;\n"
                     "  'slurm paths '*|'slurm node allocation '*|'slurm node mlflow-server '*) "
                     "exec python -m harness.cli \"$@\" ;;\n"
                     "  'slurm node-ip '*) echo 10.9.8.7 ;;\n"
                     "  'slurm wait-ray '*|'slurm node '*) ;;\n"
                     f"  'sweep '*) echo \"sweep MLFLOW_TRACKING_URI=$MLFLOW_TRACKING_URI\" >> {rec} ;;\n"
                     "  *) exit 1 ;;\n"
                     "esac\n"),
        "srun": '#!/bin/sh\nwhile [ $# -gt 0 ]; do case $1 in --*) shift ;; *) break ;; esac; done\nexec "$@"\n',
        "mlflow": (f"#!/bin/bash\n{{ echo \"mlflow argv $*\"; env | grep '^MLFLOW_' | sed 's/^/mlflow env /'; "
                   f"echo \"mlflow pid $$\"; }} >> {rec}\nexec sleep 600\n"),
    }
    env = stub_batch_env(folder, scripts, "78", drop=("RAY_", "DITSCALE_", "SLURM_", "MLFLOW_"))
    return env | {"SLURMD_NODENAME": "node1", "DITSCALE_RAY_AUTH": "disabled", "DITSCALE_RAY_TMPDIR": str(folder),
                  "DITSCALE_MLFLOW_PORT": "5999"}


def test_the_job_starts_its_server_with_the_credentials_in_its_environment_only_and_stops_it(tmp_path):
    env = _stub_job(tmp_path)
    password = "pw-" + secrets.token_hex(12)
    server_dir = tmp_path / "mlflow-server"
    proc = subprocess.run(["bash", str(SBATCH), "--mlflow-server", str(server_dir), "--mlflow-auth",
                           str(tmp_path / "study.yaml")], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env=env | {"MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": password},
                          check=False)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    record = (tmp_path / "record").read_text()
    argv = next(line for line in record.splitlines() if line.startswith("mlflow argv"))
    for piece in ("--app-name basic-auth", "--host 10.9.8.7", "--port 5999", "--allowed-hosts 10.9.8.7:5999",
                  f"--backend-store-uri sqlite:///{server_dir}/mlflow.db", f"--artifacts-destination {server_dir}/artifacts"):
        assert piece in argv, (piece, argv)
    assert f"mlflow env MLFLOW_AUTH_ADMIN_PASSWORD={password}" in record  # the server's environment ...
    assert "mlflow env MLFLOW_AUTH_ADMIN_USERNAME=alice" in record
    assert f"mlflow env MLFLOW_AUTH_CONFIG_PATH={server_dir}/basic_auth.ini" in record
    assert password not in argv and password not in proc.stdout + proc.stderr  # ... only
    ini = (server_dir / "basic_auth.ini").read_text()
    assert password not in ini and f"database_uri = sqlite:///{server_dir}/auth.db" in ini
    assert oct((server_dir / "basic_auth.ini").stat().st_mode & 0o777) == "0o600"
    assert oct(server_dir.stat().st_mode & 0o777) == "0o700"
    leaks = [f for f in _files_containing(tmp_path, password) if f != str(tmp_path / "record")]  # the stand-in's
    assert not leaks, f"the password was written to {leaks}"
    wait = next(line for line in record.splitlines() if line.startswith("mlflow-server wait"))
    assert f"--mlflow-server {server_dir} --mlflow-auth" in wait, wait
    assert "sweep MLFLOW_TRACKING_URI=http://10.9.8.7:5999" in record  # the sweep logs through it
    pid = int(re.search(r"mlflow pid (\d+)", record).group(1))
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2], \
        "the server outlived the job"
    assert "MLflow server stopped" in proc.stdout


def test_the_job_refuses_auth_without_credentials_or_a_study_with_its_own_store(tmp_path):
    """`sbatch slurm/sweep.sbatch --mlflow-server ...` used directly gets the same refusals, in one line."""
    (tmp_path / "a").mkdir()
    env = _stub_job(tmp_path / "a")
    proc = subprocess.run(["bash", str(SBATCH), "--mlflow-server", "srv", "--mlflow-auth", "study.yaml"],
                          cwd=tmp_path / "a", capture_output=True, text=True, timeout=60, env=env, check=False)
    assert proc.returncode == 2 and "MLFLOW_TRACKING_PASSWORD" in proc.stderr, proc.stderr
    (tmp_path / "b").mkdir()
    env = _stub_job(tmp_path / "b", study_uri="http://bob:s3cret@tracker:5000")
    proc = subprocess.run(["bash", str(SBATCH), "--mlflow-server", "srv", "study.yaml"], cwd=tmp_path / "b",
                          capture_output=True, text=True, timeout=60, env=env, check=False)
    assert proc.returncode == 2 and "tracking.uri=http://***@tracker:5000" in proc.stderr, proc.stderr
    assert "s3cret" not in proc.stdout + proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    # Neither --mlflow-auth nor --mlflow-insecure: no open server (issue 26).
    (tmp_path / "c").mkdir()
    env = _stub_job(tmp_path / "c")
    proc = subprocess.run(["bash", str(SBATCH), "--mlflow-server", "srv", "study.yaml"], cwd=tmp_path / "c",
                          capture_output=True, text=True, timeout=60, env=env, check=False)
    assert proc.returncode == 2 and "--mlflow-insecure" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not any((tmp_path / x / "record").exists() for x in "abc")


def test_waiting_for_the_server_names_a_refused_password_without_showing_it(monkeypatch):
    """A user store left by an earlier job with another password: one line saying so (HTTP 401)."""

    from harness.errors import UserError
    from harness.launch.slurm import wait_for_mlflow

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 401)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "pw-never-shown")
    try:
        uri = f"http://127.0.0.1:{server.server_address[1]}"
        wait_for_mlflow(uri, timeout=10)  # no --auth: /health is enough
        with pytest.raises(UserError) as refused:
            wait_for_mlflow(uri, timeout=10, auth=True)
    finally:
        server.shutdown()
    assert "MLFLOW_TRACKING_USERNAME='alice'" in str(refused.value) and "auth.db" in str(refused.value)
    assert "pw-never-shown" not in str(refused.value)


def test_what_the_nodes_of_a_joined_cluster_are_asked(tmp_path):
    """The --address helpers without Ray: which addresses are a cluster's GCS, and what a node reports
    missing (a path it cannot see, a tracking server it cannot reach)."""

    from harness.launch.local_ray import _gcs_target, _local_node, _look

    assert _gcs_target("127.0.0.1:6379") == ("127.0.0.1", 6379)
    assert _gcs_target("auto") is None and _gcs_target("ray://head:10001") is None
    assert _local_node("192.0.2.250", 1) is None  # no raylet of that cluster runs here
    there = tmp_path / "shard.tar"
    there.write_bytes(b"x")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    answer = _look({"resources.storage": str(tmp_path / "missing" / ".sweep-1"), "data.shards": str(there)},
                   {"tracking.uri": ("127.0.0.1", closed)}, patience=0)
    assert set(answer["missing"]) == {"resources.storage", "tracking.uri"}, answer


# --- a real job across two hosts, logging through the job's server ------------------------------------


@pytest.mark.slow
def test_a_study_across_three_hosts_logs_through_the_jobs_mlflow_server_with_basic_auth(
        netns_cluster, digits_dir, tmp_path):
    """`ditscale slurm submit --nodes 3 --mlflow-server --mlflow-auth`: Ray's head (and the server) on
    host 1, workers on hosts 2 and 3, each joined by its own bridge address; two trials side by side, one
    of them with two workers on two hosts training with DeepSpeed over gloo between them. Every trial
    logs to the server with the submitter's credentials; afterwards the server is gone and its store
    holds one FINISHED run per trial; the report is built as on one node; the password is in no file of
    the submit folder and in no output; no Ray temp folder is left on any host."""
    from mlflow.tracking import MlflowClient

    from harness.config import expand_grid, load_study

    scale_study = _study(digits_dir, tmp_path, two_host_trial=True)
    folder = scale_study.parent
    password = "pw-" + secrets.token_hex(12)
    env = _env(SLURM_CONF=netns_cluster["conf"], MLFLOW_TRACKING_USERNAME="alice", MLFLOW_TRACKING_PASSWORD=password)
    t0 = time.monotonic()
    proc = _run("slurm", "submit", str(scale_study), "--nodes", "3", "--cpus-per-task", "1", "--mlflow-server",
                "--mlflow-auth", cwd=folder, env=env)
    assert proc.returncode == 0, proc.stderr
    job = submitted(netns_cluster, proc)
    run_to_completion(job, timeout=600)
    elapsed = time.monotonic() - t0
    log = job.text()
    net = netns_cluster["net"]
    assert f"Ray head on h1 at {net}.11:" in log, "the head is not on host 1's bridge address"
    assert "3 node(s)" in log and "ditscale sweep exited with 0" in log
    server = folder.resolve() / "mlflow-server"
    uri = re.search(r"MLflow server starting at (http://\S+)", log).group(1)
    assert uri.startswith(f"http://{net}.11:"), uri  # the head host's address
    assert "MLflow server stopped" in log
    assert not _processes_mentioning(str(server)), "an MLflow server process outlived the job"

    cwd = os.getcwd()
    os.chdir(folder)
    try:
        trials = expand_grid(load_study(scale_study))
    finally:
        os.chdir(cwd)
    client = MlflowClient(tracking_uri=f"sqlite:///{server / 'mlflow.db'}")
    exp = client.get_experiment_by_name("scaleout")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.trial_id != ''")
    assert sorted(r.data.tags["trial_id"] for r in runs) == sorted(t.trial_id for t in trials), "duplicates or missing"
    assert all(r.info.status == "FINISHED" and r.data.metrics.get("loss") is not None for r in runs)
    hosts = {r.data.tags["trial_id"]: r.data.tags["worker_hostnames"].split(",") for r in runs}
    two = next(t.trial_id for t in trials if t.resources.workers_per_trial == 2)
    assert len(hosts[two]) == 2 and len(set(hosts[two])) == 2, f"the 2-worker trial ran on {hosts[two]}"
    assert all(h.startswith(f"{netns_cluster['name']}-h") for names in hosts.values() for h in names), hosts
    assert not (folder / "mlflow.db").exists(), "something logged to the default SQLite store"
    assert (folder / "reports" / "scaleout" / "index.html").is_file(), "no report at the end of the job"
    assert not list(Path("/tmp").glob(f"ray-{job.id}-*")), "per-node Ray temp folders left behind"

    assert password not in proc.stdout + proc.stderr + log
    leaks = [p for p in _files_containing(folder, password) if not p.endswith("auth.db")]
    assert not leaks, f"the password was written to {leaks}"
    assert password.encode() not in (server / "auth.db").read_bytes()  # a hash, not the password
    print(f"job {job.id}: COMPLETED after {elapsed:.0f}s through {uri}; workers per trial: {hosts}", file=sys.stderr)


# --- joining a Ray cluster on the hosts from outside them ---------------------------------------------


@pytest.fixture(scope="module")
def hosts_ray(netns_cluster):
    """Ray on hosts 1 (head) and 2, token auth, one CPU each; yields (address, env for its clients)."""
    name, net = netns_cluster["name"], netns_cluster["net"]
    state = Path(tempfile.mkdtemp(prefix="dsr-"))  # short: Ray's socket paths have a length limit
    token = state / "token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = _env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
    ray_bin = str(Path(sys.executable).parent / "ray")
    address = f"{net}.11:6390"
    procs, t0 = [], time.monotonic()
    try:
        for i, extra in ((1, ["--head", "--port=6390", "--include-dashboard=false"]), (2, [f"--address={address}"])):
            host = f"{name}-h{i}"
            cmd = ["nsenter", f"--net=/run/netns/{host}", "unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"',
                   host, ray_bin, "start", "--block", f"--node-ip-address={net}.{10 + i}", "--num-cpus=1",
                   "--disable-usage-stats", f"--temp-dir={state}/h{i}", *extra]
            with open(state / f"h{i}.log", "wb") as log:
                procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                              start_new_session=True))
            deadline = time.monotonic() + 120
            while b"Ray runtime started" not in (state / f"h{i}.log").read_bytes():
                assert procs[-1].poll() is None and time.monotonic() < deadline, (state / f"h{i}.log").read_text()
                time.sleep(0.5)
        print(f"Ray on {name}-h1,h2 after {time.monotonic() - t0:.0f}s", file=sys.stderr)
        yield address, env
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # what `ray start` left (its agents)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)

        shutil.rmtree(state, ignore_errors=True)


@pytest.mark.slow
def test_a_sweep_joins_the_hosts_ray_cluster_from_outside_it(hosts_ray, digits_dir, tmp_path):
    """From the machine's own namespace (a login node: it reaches the hosts over the bridge but is not a
    Ray node): a storage the hosts do not see is refused in one line; then the study trains on the hosts,
    and the 0-CPU Ray node the sweep started for its driver is gone afterwards."""
    from mlflow.tracking import MlflowClient

    address, env = hosts_ray
    scale_study = _study(digits_dir, tmp_path)
    folder = scale_study.parent
    private = tmp_path / "private"
    private.mkdir()
    t0 = time.monotonic()
    # A tmpfs mounted only in the driver's mount namespace: the hosts see an empty folder there.
    proc = subprocess.run(
        ["unshare", "--mount", "sh", "-c", 'mount -t tmpfs none "$0" && exec "$@"', str(private), sys.executable,
         "-m", "harness.cli", "sweep", str(scale_study), "--address", address, "--no-report",
         "--set", "name=scaleout-private", "--set", f"resources.storage={private}/runs"],
        cwd=folder, env=env, text=True, capture_output=True, timeout=300, check=False)
    line = _one_error_line(proc, f"resources.storage {private}/runs is not visible on Ray node(s)",
                           f"{address.rsplit('.', 1)[0]}.12 (")
    t1 = time.monotonic()

    proc = _run("sweep", str(scale_study), "--address", address, "--no-report", "--set", "name=scaleout-joined",
                cwd=folder, env=env, timeout=400)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-5000:])
    m = re.search(r"joining the Ray cluster at \S+ from (\S+): .*\(temp folder (\S+)\)", proc.stdout)
    assert m and m.group(1) == f"{address.rsplit('.', 1)[0]}.1", proc.stdout[-3000:]
    assert not Path(m.group(2)).exists() and not _processes_mentioning(m.group(2)), "the joined Ray node was left"
    client = MlflowClient(tracking_uri=f"sqlite:///{folder.resolve() / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("scaleout-joined").experiment_id],
                              filter_string="tags.trial_id != ''")
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    hosts = {r.data.tags["worker_hostnames"] for r in runs}
    assert all(re.fullmatch(r".+-h[12]", h) for h in hosts), hosts
    print(f"refused in {t1 - t0:.0f}s ({line[:80]}...); joined and trained in {time.monotonic() - t1:.0f}s on {hosts}",
          file=sys.stderr)
