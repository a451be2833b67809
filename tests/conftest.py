"""Shared fixtures: real WebDataset shards of the built-in digits, the one-node Slurm cluster, the
three-host network-namespace cluster; the environment each test leaves behind; the xdist groups.

Plain helpers live in tests/support/ (no test module imports another test module or this file:
tests/repo/test_test_layout.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.netns import HOSTS, SBIN, START, STOP, free_net, missing_piece
from tests.support.shared import shared_folder
from tests.support.slurm import FINAL_STATES, SLURM_START, SLURM_STOP, cluster_exports, job_info, submitted_job
from tests.support.study import ditscale


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """digits at 16x16, 1 channel, 10 classes, captions; 4 train shards + 1 val shard. Packed once per
    run, shared by the xdist workers, with what evaluation caches beside it (tests/support/shared.py)."""
    from harness.data import pack_dataset

    return shared_folder(tmp_path_factory, "digits",
                         lambda out: pack_dataset("digits", str(out), image_size=16, shard_size=500, progress=False))


# --- the one-node Slurm cluster (tests/slurm/test_slurm*.py, tests/launch/test_credentials.py) ------------------------------
# One session fixture here, not imported into test modules: an imported session fixture is a separate
# instance per module, and two clusters on the test cluster's fixed ports cannot both start. Under
# pytest-xdist every test that uses it runs on one worker (the "slurm" group, below).


@pytest.fixture(scope="session")
def slurm_cluster():
    """SLURM_CONF of a running one-node cluster (started here, stopped at the end of the session)."""
    path = f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin"  # the daemons live in sbin
    missing = [c for c in ("slurmctld", "slurmd", "munged", "sbatch") if shutil.which(c, path=path) is None]
    problem = None
    if missing:
        problem = f"Slurm is not installed ({', '.join(missing)} missing; apt-get install slurm-wlm munge)"
    elif os.geteuid() != 0:
        problem = "the test cluster's slurmd must run as root"
    if problem:
        if os.environ.get("DITSCALE_REQUIRE_SLURM") == "1":
            pytest.fail(f"DITSCALE_REQUIRE_SLURM=1 but {problem}")
        pytest.skip(problem)
    # DITSCALE_SLURM_STATE: a cluster the start script made earlier (its folder), reused and left running.
    state = os.environ.get("DITSCALE_SLURM_STATE", "")
    conf = Path(state) / "slurm.conf"
    already = bool(state) and conf.is_file() and subprocess.run(
        ["scontrol", "ping"], env={**os.environ, "SLURM_CONF": str(conf)}, capture_output=True).returncode == 0
    t0 = time.monotonic()
    proc = subprocess.run([str(SLURM_START), *([state] if state else [])], capture_output=True, text=True, timeout=180)
    exported = cluster_exports(proc.stdout)
    state = exported.get("DITSCALE_SLURM_STATE", state)
    try:
        assert proc.returncode == 0, f"the test cluster did not start:\n{proc.stdout}\n{proc.stderr}"
        print(f"slurm test cluster in {state}: up after {time.monotonic() - t0:.1f}s", file=sys.stderr)
        yield exported["SLURM_CONF"]
    finally:
        if not already and state:
            subprocess.run([str(SLURM_STOP), state], capture_output=True, timeout=120)
            shutil.rmtree(state, ignore_errors=True)


@pytest.fixture
def submit(slurm_cluster):
    """submit(study_path, *options) -> Job, through `ditscale slurm submit`; cancels leftovers."""
    jobs = []

    def run(study: Path, *options: str):
        proc = ditscale("slurm", "submit", str(study), "--nodes", "1", *options, cwd=study.parent,
                        env={"SLURM_CONF": slurm_cluster})
        jobs.append(submitted_job(slurm_cluster, proc.stdout))
        return jobs[-1]

    yield run
    for job in jobs:
        if job_info(job.conf, job.id).get("JobState") not in FINAL_STATES:
            job.cancel()


# --- the three-host cluster of network namespaces (tests/slurm/test_netns_*.py) -----------------------------------
# One per module (test_netns_hostloss.py loses hosts of its cluster on purpose).


@pytest.fixture(scope="module")
def netns_cluster():
    """{"conf", "name", "net", "state"} of a running three-host cluster, stopped (and checked gone) at the end."""
    problem = missing_piece()
    if problem:
        if os.environ.get("DITSCALE_REQUIRE_SLURM") == "1":
            pytest.fail(f"DITSCALE_REQUIRE_SLURM=1 but {problem}")
        pytest.skip(problem)
    name = f"dsn{os.getpid() % 1000000}"  # namespaces, hostnames, bridge: dsnPID-h1.., dsnPID-br
    net = free_net()
    env = {**{k: v for k, v in os.environ.items() if k != "DITSCALE_NETNS_STATE"}, "PATH": SBIN,
           "DITSCALE_NETNS_HOSTS": str(HOSTS), "DITSCALE_NETNS_NAME": name, "DITSCALE_NETNS_NET": net}
    t0 = time.monotonic()
    state = None  # the private folder the start script makes and prints first
    try:
        try:
            proc = subprocess.run([str(START)], capture_output=True, text=True, timeout=180, env=env)
            out, err, rc = proc.stdout, proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as timeout:
            out, err, rc = timeout.stdout or "", timeout.stderr or "", "timeout"
            out, err = (x.decode(errors="replace") if isinstance(x, bytes) else x for x in (out, err))
        exported = cluster_exports(out)
        state = Path(exported["DITSCALE_NETNS_STATE"]) if "DITSCALE_NETNS_STATE" in exported else None
        assert rc == 0, f"the namespace cluster did not start ({rc}):\n{out}\n{err}"
        print(f"netns cluster {name} on {net}.0/24: up after {time.monotonic() - t0:.1f}s", file=sys.stderr)
        yield {"conf": exported["SLURM_CONF"], "name": name, "net": net, "state": state}
    finally:  # also when the start failed half-way: it recorded what it created
        if state is not None:
            subprocess.run([str(STOP), str(state)], capture_output=True, timeout=180, env=env)
        left = [ns for ns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                                            env=env).stdout.split() if ns.startswith(f"{name}-")]
        bridge = subprocess.run(["ip", "link", "show", "dev", f"{name}-br"], capture_output=True, env=env)
        assert not left and bridge.returncode != 0, f"stop-netns-cluster.sh left {left} / bridge {name}-br behind"
        if state is not None:
            shutil.rmtree(state, ignore_errors=True)


# --- what a test leaves behind --------------------------------------------------------------------------
# Code the tests call in-process sets process-wide state on purpose where it runs in a worker (MASTER_PORT,
# RAY_AUTH_TOKEN_PATH, GLOO_SOCKET_IFNAME, ...: harness/common/process_group.py, launch/local_ray.py); a
# later test would inherit it, and so would every `ditscale` it starts. Each test gets the environment and
# working directory it started with back; the tests that changed them are listed at the end of the run.

LEAK = "environment changed"  # a user property of the test's report (xdist sends it to the controller)


@pytest.fixture(autouse=True)
def _restore_environment(request):
    before, cwd = dict(os.environ), os.getcwd()
    yield
    after = dict(os.environ)
    changed = sorted(k for k in before.keys() | after.keys()
                     if before.get(k) != after.get(k) and k != "PYTEST_CURRENT_TEST")  # pytest's own
    for key in changed:
        if key in before:
            os.environ[key] = before[key]
        else:
            del os.environ[key]
    moved = os.getcwd() != cwd
    if moved:
        os.chdir(cwd)
    if changed or moved:
        request.node.user_properties.append((LEAK, ", ".join(changed + (["cwd"] if moved else []))))


def pytest_terminal_summary(terminalreporter):
    leaks = sorted({(report.nodeid, value) for reports in terminalreporter.stats.values() for report in reports
                    if getattr(report, "when", None) == "teardown"
                    for name, value in getattr(report, "user_properties", ()) if name == LEAK})
    if leaks:
        terminalreporter.write_sep("-", "tests that changed os.environ or the cwd (restored after each)")
        for nodeid, value in leaks:
            terminalreporter.write_line(f"{nodeid}: {value}")


# --- pytest-xdist: which tests must share one worker ---------------------------------------------------------
# `-n 2 --dist loadgroup` (scripts/test): tests in one xdist_group run on one worker, one after another.
# The one-node Slurm cluster binds fixed ports (one per session, so one worker), and the Slurm and
# network-namespace tests start munge, slurmctld and Ray nodes machine-wide: they run together on one
# worker, and the CPU-bound Ray/DeepSpeed tests on the other.

SERIAL_FIXTURES = {"slurm_cluster": "slurm", "submit": "slurm", "netns_cluster": "slurm"}


def pytest_configure(config):
    config.addinivalue_line("markers", "xdist_group(name): tests that pytest-xdist runs on one worker")


@pytest.hookimpl(tryfirst=True)  # before xdist reads the marks (its loadgroup suffix)
def pytest_collection_modifyitems(config, items):
    for item in items:
        groups = {SERIAL_FIXTURES[f] for f in item.fixturenames if f in SERIAL_FIXTURES}
        if groups and not item.get_closest_marker("xdist_group"):
            item.add_marker(pytest.mark.xdist_group(groups.pop()))
        if getattr(config.option, "loadgroup", False):
            _group_suffix(item)


def _group_suffix(item) -> None:
    """xdist's loadgroup schedules by a suffix of the node id (`nodeid@group`), which pytest-xdist 3.8 sets
    as `item._nodeid`; pytest 9.2 derives `Item.nodeid` from `item._id`, so that suffix is lost and each
    group's tests are spread over both workers (measured: two Slurm tests on gw0 and gw1). Set it where
    pytest 9.2 reads it; older pytest (no `_id`) takes xdist's own."""
    marks = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                    for m in item.iter_markers("xdist_group")})
    if marks and hasattr(item, "_id") and "@" not in item.nodeid:
        from _pytest.nodeid import coerce_node_id

        item._id = coerce_node_id(f"{item.nodeid}@{'_'.join(marks)}")
