"""Slurm across several hosts on one machine: each host a network namespace on a bridge.

slurm/testing/start-netns-cluster.sh starts three hosts (own network stack, address and hostname;
slurmctld on a controller namespace of its own, a slurmd on each) and stop-netns-cluster.sh removes all of it. The fast tests
here check that a job step reaches three distinct hosts, each with its own address for Ray. The studies
that run on the cluster are in test_netns_scaleout.py (`ditscale slurm submit --nodes 3` with the job's
MLflow server: Ray's head on host 1, workers on hosts 2 and 3, a two-worker trial whose Ray Train workers
run on two hosts and train with DeepSpeed over gloo between them; a sweep joining from outside) and
test_netns_hostloss.py (a worker host, then the head's host, lost mid-study).

Needs root, Slurm (Debian: slurm-wlm munge), iproute2 and network namespaces; without them the tests
are skipped, unless DITSCALE_REQUIRE_SLURM=1 (CI sets it), which turns a missing piece into a failure.
Each session uses its own namespace names and /24, so that two sessions on one machine never meet.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.test_slurm import FINAL_STATES, Job, cluster_exports, job_info, slurm, submitted_job

START = ROOT / "slurm" / "testing" / "start-netns-cluster.sh"
STOP = ROOT / "slurm" / "testing" / "stop-netns-cluster.sh"
HOSTS = 3
SBIN = f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin"  # the daemons and ip live in sbin


def _missing_piece() -> str | None:
    missing = [c for c in ("slurmctld", "slurmd", "munged", "sbatch", "srun", "ip", "nsenter", "unshare")
               if shutil.which(c, path=SBIN) is None]
    if missing:
        return (f"{', '.join(missing)} not found (Debian: apt-get install slurm-wlm munge iproute2 util-linux)")
    if os.geteuid() != 0:
        return "network namespaces and slurmd need root"
    probe = subprocess.run(["unshare", "--net", "--uts", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot create network namespaces here: {probe.stderr.strip()}"
    return None


def _free_net() -> str:
    """A /24 of 198.18.0.0/15 that no interface of this machine uses (x.y.z: the script's DITSCALE_NETNS_NET)."""
    out = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, env={"PATH": SBIN}).stdout
    used = {ipaddress.ip_interface(f).network for f in re.findall(r"inet (\S+)", out)}
    start = os.getpid() % 256
    for k in range(256):
        net = ipaddress.ip_network(f"198.18.{(start + k) % 256}.0/24")
        if not any(net.overlaps(u) for u in used):
            return str(net.network_address).rsplit(".", 1)[0]
    pytest.fail("no free /24 in 198.18.0.0/16 for the test hosts")


@pytest.fixture(scope="module")
def netns_cluster():
    """{"conf", "name", "net", "state"} of a running three-host cluster, stopped (and checked gone) at the end."""
    problem = _missing_piece()
    if problem:
        if os.environ.get("DITSCALE_REQUIRE_SLURM") == "1":
            pytest.fail(f"DITSCALE_REQUIRE_SLURM=1 but {problem}")
        pytest.skip(problem)
    name = f"dsn{os.getpid() % 1000000}"  # namespaces, hostnames, bridge: dsnPID-h1.., dsnPID-br
    net = _free_net()
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


def submitted(cluster: dict, proc) -> Job:
    """The Job that `ditscale slurm submit` (its finished process) says it submitted to `cluster`."""
    return submitted_job(cluster["conf"], proc.stdout)


def run_to_completion(job: Job, timeout: float) -> dict:
    """Wait for the job's end (cancelling it if the wait fails); fails the test unless it COMPLETED."""
    try:
        info = job.wait_done(timeout=timeout)
    finally:
        if job_info(job.conf, job.id).get("JobState") not in FINAL_STATES:
            job.cancel()
    if info["JobState"] != "COMPLETED":
        job.fail("did not complete")
    return info


def test_srun_reaches_three_hosts_with_their_own_hostnames(netns_cluster):
    names = slurm(netns_cluster["conf"], "srun", f"-N{HOSTS}", "--ntasks-per-node=1", "hostname").stdout.split()
    assert sorted(names) == [f"{netns_cluster['name']}-h{i}" for i in range(1, HOSTS + 1)], names
    # Each host's only route is its bridge subnet: nothing leaves the machine.
    for i in range(1, HOSTS + 1):
        routes = subprocess.run(["ip", "-n", f"{netns_cluster['name']}-h{i}", "route", "show"], capture_output=True,
                                text=True, env={"PATH": SBIN}).stdout
        assert "default" not in routes and f"{netns_cluster['net']}.0/24" in routes, routes


def test_each_host_finds_its_own_bridge_address_for_ray(netns_cluster):
    """The hosts have no default route: the address Ray binds (the head's, which the others join) comes
    from Slurm's NodeAddr for the host, not loopback."""
    out = slurm(netns_cluster["conf"], "srun", f"-N{HOSTS}", "--ntasks-per-node=1", "bash", "-c",
                f'echo "$(hostname) $({shlex.quote(sys.executable)} -m harness.cli slurm node-ip)"').stdout
    found = dict(line.split() for line in out.splitlines())
    assert found == {f"{netns_cluster['name']}-h{i}": f"{netns_cluster['net']}.{10 + i}" for i in range(1, HOSTS + 1)}
