"""Issue 18, the run side: what a sweep exposes and what it refuses, with real processes.

- the process group's store listens only where the group needs it (never on all interfaces; none for one process);
- the embedded local Ray takes a fresh token per sweep and refuses a client without it;
- MLflow credentials are used to connect, reach the workers of a cluster joined with --address, and are
  never written or printed (a real `mlflow server --app-name basic-auth`);
- a study name is capped up front, and a sweep that fails after its parent run opened marks it FAILED;
- a grid larger than --max-trials is refused before it is expanded;
- two sweeps of one study never run at once;
- betas, image_size and train.deepspeed are validated before Ray starts.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.support import ROOT, ditscale, tiny_study, write_study
from tests.support.procs import free_port as _free_port

_AUTH_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "RAY_AUTH_MODE",
             "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
             "MASTER_PORT", "GLOO_SOCKET_IFNAME", "DITSCALE_RAY_AUTH")


def _env(**extra: str) -> dict:
    """This environment without tracking, Ray-auth or torchrun variables, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in _AUTH_ENV}
    return {**env, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **extra}


def _error_lines(stderr: str) -> list[str]:
    """The CLI's error lines, without its `ditscale sweep: error: ` prefix."""

    lines = stderr.strip().splitlines()
    return [re.sub(r"^ditscale [\w-]+: error: ", "", line) for line in lines]


def _small(digits: Path, name: str, **sections) -> dict:
    study = tiny_study(digits, name, **sections)
    study["train"] = {**study["train"], "steps": 4, "log_every": 2, "checkpoint_every": 4,
                      **sections.get("train", {})}
    return study


# --- 1. the process group's store ------------------------------------------------------------------

_GROUP = """
import json, os, sys
from harness.common.process_group import setup_distributed
info = setup_distributed(False)
print(json.dumps({"pid": os.getpid(), "rank": info.rank, "world": info.world_size,
                  "port": int(os.environ["MASTER_PORT"])}), flush=True)
sys.stdin.read()
"""


def _listeners(pid: int) -> list[tuple[str, int]]:
    import psutil

    return [(c.laddr.ip, c.laddr.port) for c in psutil.Process(pid).net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN]


def _loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    return address.is_loopback or (address.version == 6 and address.ipv4_mapped is not None
                                   and address.ipv4_mapped.is_loopback)


@pytest.mark.slow
def test_process_group_store_listens_only_where_the_group_needs_it():
    """A lone process (world size 1) has no store socket at all and nothing off loopback; a two-rank
    group on one node serves its store on 127.0.0.1 only, never on 0.0.0.0/::."""
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-c", _GROUP], cwd=ROOT, env=_env(DS_ACCELERATOR="cpu"),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    for rank in (0, 1):
        procs.append(subprocess.Popen(
            [sys.executable, "-c", _GROUP], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
            env=_env(DS_ACCELERATOR="cpu", RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                     LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))))
    try:
        infos = []
        for proc in procs:
            line = proc.stdout.readline()
            assert line, f"setup_distributed failed:\n{proc.stderr.read()[-3000:] if proc.poll() is not None else ''}"
            infos.append(json.loads(line))
        lone, rank0 = infos[0], infos[1]
        assert lone["world"] == 1 and rank0["world"] == 2
        lone_listens = _listeners(lone["pid"])
        assert all(_loopback(ip) for ip, _ in lone_listens), f"world size 1 listens off loopback: {lone_listens}"
        assert lone["port"] not in [p for _, p in lone_listens], f"a store listens for one process: {lone_listens}"
        # What remains is gloo's own transport (it binds a device even for one rank), on loopback.
        assert len(lone_listens) <= 1, lone_listens
        group_listens = _listeners(rank0["pid"])
        assert all(ip not in ("0.0.0.0", "::") for ip, _ in group_listens), f"wildcard listener: {group_listens}"
        assert all(_loopback(ip) for ip, _ in group_listens), group_listens
        assert ("127.0.0.1", port) in group_listens, f"the store is not on 127.0.0.1:{port}: {group_listens}"
    finally:
        for proc in procs:
            proc.stdin.close()
        for proc in procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


# --- 2. the embedded Ray's token -----------------------------------------------------------------

_DRIVER = """
import json, os, sys
import ray
from harness.launch import sweep
sweep.start_ray(None)
print(json.dumps({"gcs": ray.get_runtime_context().gcs_address,
                  "token_path": os.environ.get("RAY_AUTH_TOKEN_PATH")}), flush=True)
sys.stdin.read()
getattr(sweep, "stop_ray", ray.shutdown)()
"""

_CLIENT = """
import os, sys
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
import ray
import ray._private.ray_constants as ray_constants
ray_constants.ENABLE_RAY_CLUSTER = False
try:
    ray.init(address=sys.argv[1], _node_ip_address="127.0.0.1", log_to_driver=False)
    print("CONNECTED", ray.cluster_resources().get("CPU"), flush=True)
except Exception as err:
    print("REFUSED", type(err).__name__, flush=True)
"""


@pytest.mark.slow
def test_embedded_ray_refuses_clients_without_the_sweeps_token(tmp_path):
    """The local Ray a sweep starts wants this sweep's own token: a client with none, or with the user's
    default Ray token (~/.ray/auth_token), is refused; the token file is private and goes with the Ray."""
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    default_token = secrets.token_hex(32)
    (home / ".ray" / "auth_token").write_text(default_token)
    os.chmod(home / ".ray" / "auth_token", 0o600)
    driver = subprocess.Popen([sys.executable, "-c", _DRIVER], cwd=tmp_path, env=_env(HOME=str(home)),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = driver.stdout.readline()
        assert line, driver.stderr.read()[-3000:] if driver.poll() is not None else "no output"
        info = json.loads(line)
        assert info["token_path"], "the embedded Ray has no token of its own (RAY_AUTH_TOKEN_PATH unset)"
        token_file = Path(info["token_path"])
        assert token_file.stat().st_mode & 0o777 == 0o600 and token_file.parent.stat().st_mode & 0o777 == 0o700
        token = token_file.read_text().strip()
        assert len(token) >= 32 and token != default_token

        def client(**extra):
            return subprocess.Popen([sys.executable, "-c", _CLIENT, info["gcs"]], cwd=tmp_path, text=True,
                                    env=_env(HOME=str(home), **extra), stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT)

        clients = {"none": client(RAY_AUTH_MODE="disabled"),
                   "default": client(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=default_token),
                   "sweep": client(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file))}
        out = {name: proc.communicate(timeout=180)[0] for name, proc in clients.items()}
        assert "CONNECTED" in out["sweep"], out["sweep"][-3000:]
        for name in ("none", "default"):
            assert "CONNECTED" not in out[name] and "REFUSED" in out[name], (name, out[name][-3000:])
            assert "Unauthenticated" in out[name] or "InvalidAuthToken" in out[name], (name, out[name][-3000:])
    finally:
        try:
            _, err = driver.communicate(input="", timeout=120)  # closing its stdin stops the Ray
        except subprocess.TimeoutExpired:
            driver.kill()
            err = ""
    assert token not in (line + err), "the token was printed"
    assert not token_file.exists(), "the token outlived its Ray"


# --- 3. tracking-URI credentials ---------------------------------------------------------------------


def _start_mlflow_auth_server(folder: Path, password: str) -> tuple[subprocess.Popen, int]:
    port = _free_port()
    ini = folder / "basic_auth.ini"
    ini.write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{folder / 'auth.db'}\n"
                   f"admin_username = admin\nadmin_password = {password}\n"
                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    with (folder / "server.log").open("w") as log:  # the server keeps its own copy of the descriptor
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--host", "127.0.0.1",
             "--port", str(port), "--workers", "1", "--backend-store-uri", f"sqlite:///{folder / 'store.db'}",
             "--artifacts-destination", str(folder / "artifacts")],
            cwd=folder, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env=_env(MLFLOW_AUTH_CONFIG_PATH=str(ini), MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(16)))
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                if resp.status == 200:
                    return server, port
        except OSError:
            pass
        assert server.poll() is None, (folder / "server.log").read_text()[-3000:]
        time.sleep(1)
    raise AssertionError(f"mlflow server did not start:\n{(folder / 'server.log').read_text()[-3000:]}")


def _files_containing(folder: Path, secret: str, skip: set[Path]) -> list[str]:
    needle = secret.encode()
    return [str(p) for p in folder.rglob("*") if p.is_file() and not p.is_symlink() and p not in skip
            and needle in p.read_bytes()]


def _ray_head(temp_dir: Path, env: dict) -> tuple[subprocess.Popen, str]:
    """`ray start --head --block` in `env` (a cluster started elsewhere, as --address joins one), in its
    own session; stop it with _stop_ray_head. Returns it and its address. On this machine's routable
    address (a Ray started by `ray start` on Linux replaces 127.0.0.1 with it), so `env` should hold a
    Ray auth token."""
    from harness.launch.local_ray import _local_node
    from harness.launch.slurm import node_ip

    ip, port = node_ip(), _free_port()
    log_path = temp_dir / "head.log"
    with log_path.open("wb") as log:
        head = subprocess.Popen(
            [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--node-ip-address={ip}",
             f"--port={port}", "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats",
             f"--temp-dir={temp_dir}"], stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.time() + 180
    while _local_node(ip, port) != ip:  # the sweep's driver finds the head's raylet the same way
        assert head.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
        time.sleep(0.5)
    return head, f"{ip}:{port}"


def _stop_ray_head(head: subprocess.Popen) -> None:
    head.terminate()
    try:
        head.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(head.pid, signal.SIGKILL)  # what `ray start` left (its agents): this session is ours alone
    except ProcessLookupError:
        pass
    head.wait(timeout=10)


@pytest.mark.slow
def test_tracking_credentials_connect_but_are_never_written_or_printed(tmp_path, digits_dir):
    """A real `mlflow server --app-name basic-auth`: a request without credentials is refused (401). A
    sweep with MLflow's MLFLOW_TRACKING_USERNAME/PASSWORD in its environment joins (`--address`) a Ray
    cluster started without them (issue 26: its trials got 401): the sweep hands them to the cluster's
    workers, its trial finishes, and the password is in no param, tag, artifact, file, Ray log
    (Ray's runtime-env agent logs a job's env_vars) or output line. A tracking URI with the credentials
    in it (`http://user:pw@host`) reads the study back for `ditscale report`, again without a trace.
    (URI credentials in a sweep become these variables first: test_credentials.py.)"""

    assert importlib.util.find_spec("flask_wtf"), "MLflow's basic-auth app needs mlflow[auth] (Flask-WTF)"
    password = "pw-" + secrets.token_hex(12)
    server_dir = Path(tempfile.mkdtemp(prefix="mlf-"))
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt-"))  # short: Ray's socket paths have a length limit
    server, port = _start_mlflow_auth_server(server_dir, password)
    head = None
    try:
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=1",
                                   timeout=10)
        assert refused.value.code == 401

        token = ray_tmp / "token"  # the cluster's Ray token (a private folder, 0700)
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        ray_auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
        head, address = _ray_head(ray_tmp, _env(**ray_auth))  # no MLflow credentials there
        study = write_study(tmp_path / "uri.yaml", _small(digits_dir, "authuri",
                                                          tracking={"uri": f"http://127.0.0.1:{port}"}))
        proc = subprocess.run([sys.executable, "-m", "harness.cli", "sweep", str(study), "--address", address],
                              cwd=tmp_path, text=True, capture_output=True, timeout=900, check=False,
                              env=_env(RAY_TMPDIR=str(ray_tmp), **ray_auth,
                                       MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=password))
        assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        assert password not in proc.stdout and password not in proc.stderr, "the password was printed"

        import mlflow

        uri = f"http://admin:{password}@127.0.0.1:{port}"
        client = mlflow.MlflowClient(uri)
        runs = client.search_runs([client.get_experiment_by_name("authuri").experiment_id])
        trials = [r for r in runs if r.data.tags.get("trial_id")]
        assert len(trials) == 1 and trials[0].data.tags["ditscale.status"] == "finished", \
            [r.data.tags.get("ditscale.status") for r in trials]
        assert trials[0].data.metrics.get("loss") is not None
        assert trials[0].data.params["tracking.uri"] == f"http://127.0.0.1:{port}"
        assert all(password not in v for r in runs for v in [*r.data.params.values(), *r.data.tags.values()])
        downloads = Path(tempfile.mkdtemp(prefix="dl-"))
        for run in runs:
            client.download_artifacts(run.info.run_id, "", str(downloads / run.info.run_id))
        assert list(downloads.rglob("config.yaml")) and list(downloads.rglob("study.yaml"))
        leaks = _files_containing(downloads, password, set())
        shutil.rmtree(downloads, ignore_errors=True)

        report = subprocess.run([sys.executable, "-m", "harness.cli", "report", "--experiment", "authuri",
                                 "--tracking-uri", uri, "--out", str(tmp_path / "uri-report")], cwd=tmp_path,
                                text=True, capture_output=True, timeout=300, check=False, env=_env())
        assert report.returncode == 0, report.stderr[-3000:]
        assert password not in report.stdout + report.stderr, "the password was printed"
        assert list((tmp_path / "reports").rglob("trials.csv")) and (tmp_path / "uri-report" / "trials.csv").is_file()
        skip = {tmp_path / "uri.yaml"}  # the study file itself, written by this test
        leaks += (_files_containing(tmp_path, password, skip) + _files_containing(ray_tmp, password, set())
                  + _files_containing(server_dir / "artifacts", password, set()))
        # The server's store holds what MLflow was given (params, tags, texts) in plain text.
        leaks += [str(p) for p in server_dir.glob("store.db*") if password.encode() in p.read_bytes()]
        assert not leaks, f"the password was written to {leaks}"
    finally:
        if head is not None:
            _stop_ray_head(head)
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
        shutil.rmtree(server_dir, ignore_errors=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)


# --- 4. study names; a sweep that fails marks its parent run FAILED -------------------------------


def test_long_study_name_is_refused_up_front_and_a_failed_sweep_fails_its_parent_run(tmp_path, digits_dir):
    study = write_study(tmp_path / "long.yaml", _small(digits_dir, "n" * 300))
    proc = ditscale("sweep", str(study), cwd=tmp_path, check=False, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = _error_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("name:") and "100" in lines[0], lines
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()

    # A failure after the parent run opened: joining a Ray cluster at a head that cannot exist (.invalid,
    # RFC 2606). Not `--address auto`: Ray's "auto" falls back to any raylet on the machine, found by its
    # command line (ray._private.services.find_gcs_addresses, whatever the temp folder), so any other Ray
    # running then (a concurrent test, another session's sweep) was joined and this test failed.
    study = write_study(tmp_path / "s.yaml", _small(digits_dir, "failing"))
    proc = ditscale("sweep", str(study), "--no-report", "--address", "no-ray-head.invalid:6379", cwd=tmp_path,
                    check=False, timeout=300)
    assert proc.returncode != 0 and "cannot resolve 'no-ray-head.invalid'" in proc.stderr, proc.stderr[-3000:]
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("failing")
    parents = client.search_runs([exp.experiment_id], filter_string="tags.`ditscale.sweep` = 'true'")
    assert len(parents) == 1
    assert parents[0].info.status == "FAILED", parents[0].info.status
    assert parents[0].data.tags.get("ditscale.status", "").startswith("failed: "), parents[0].data.tags


# --- 5. grid size -------------------------------------------------------------------------------


def test_grid_above_max_trials_is_refused_from_the_axis_lengths(tmp_path, digits_dir):
    study = _small(digits_dir, "huge")
    study["grid"] = {"train.lr": [1e-4 * (i + 1) for i in range(20)], "train.seed": list(range(20)),
                     "train.weight_decay": [0.01 * i for i in range(20)], "model.patch": [1, 2, 4, 8, 16] * 2}
    path = write_study(tmp_path / "huge.yaml", study)
    t0 = time.time()
    proc = ditscale("sweep", str(path), "--dry-run", cwd=tmp_path, check=False, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = _error_lines(proc.stderr)
    assert len(lines) == 1 and "80,000" in lines[0] and "--max-trials" in lines[0] and "10,000" in lines[0], lines
    assert time.time() - t0 < 30
    small = write_study(tmp_path / "small.yaml", {**_small(digits_dir, "small"), "grid": {"model.patch": [2, 4]}})
    proc = ditscale("sweep", str(small), "--dry-run", "--max-trials", "1", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "2 trials" in proc.stderr and "--max-trials 1" in proc.stderr, proc.stderr
    assert ditscale("sweep", str(small), "--dry-run", "--max-trials", "2", cwd=tmp_path).returncode == 0


# --- 6. one sweep of a study at a time -------------------------------------------------------------


@pytest.mark.slow
def test_second_sweep_of_a_running_study_exits_naming_the_first(tmp_path, digits_dir):
    study = write_study(tmp_path / "s.yaml", _small(digits_dir, "locked", train={"steps": 100000,
                                                                                  "checkpoint_every": 50}))
    first = subprocess.Popen([sys.executable, "-m", "harness.cli", "sweep", str(study), "--no-report"], cwd=tmp_path,
                             env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    try:
        deadline = time.time() + 240
        while not list((tmp_path / "runs" / "locked").glob(".sweep-*")):  # its parent run is open
            assert first.poll() is None and time.time() < deadline, first.stdout.read()[-3000:]
            time.sleep(0.5)
        t0 = time.time()
        second = ditscale("sweep", str(study), "--no-report", cwd=tmp_path, check=False, timeout=120)
        assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-3000:]
        lines = _error_lines(second.stderr)
        assert len(lines) == 1 and "another sweep" in lines[0], lines
        assert f"pid {first.pid}" in lines[0] and socket.gethostname() in lines[0], lines
        assert time.time() - t0 < 60
    finally:
        (tmp_path / "runs" / "locked" / "STOP").parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "runs" / "locked" / "STOP").touch()
        try:
            first.wait(timeout=180)
        except subprocess.TimeoutExpired:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()


# --- 7. validated before Ray starts -----------------------------------------------------------------


def test_betas_image_size_and_deepspeed_values_are_refused_before_ray(tmp_path, digits_dir):
    bad = _small(digits_dir, "bad", train={"betas": [2, -1], "deepspeed": {
        "zero_optimization": {"stage": 7}, "fp16": "yes", "gradient_clipping": "a lot",
        "optimizer": {"type": "Adam"}, "train_batch_size": 64}})
    bad["data"]["image_size"] = 10**20  # an int pydantic takes; 1e20 as a float it refuses already
    path = write_study(tmp_path / "bad.yaml", bad)
    proc = ditscale("sweep", str(path), "--dry-run", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = _error_lines(proc.stderr)
    for key in ("train.betas", "data.image_size", "train.deepspeed.zero_optimization.stage", "train.deepspeed.fp16",
                "train.deepspeed.gradient_clipping", "train.deepspeed.optimizer", "train.deepspeed.train_batch_size"):
        assert any(line.startswith(key + ":") for line in lines), (key, lines)
    assert sum(line.startswith("train.betas:") for line in lines) == 2

    # What only DeepSpeed's own config class knows (a key its ZeRO config does not have), still before Ray.
    odd = write_study(tmp_path / "odd.yaml", _small(digits_dir, "odd", train={"deepspeed": {
        "zero_optimization": {"no_such_option": 1}}}))
    proc = ditscale("sweep", str(odd), cwd=tmp_path, check=False, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert _error_lines(proc.stderr)[-1].startswith("train.deepspeed.zero_optimization.no_such_option:")
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()
