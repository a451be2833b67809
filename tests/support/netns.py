"""The three-host Slurm cluster of network namespaces (slurm/testing/start-netns-cluster.sh).

The cluster is the module fixture `netns_cluster` in tests/conftest.py (tests/slurm/test_netns_*.py); these
are the plain helpers around it."""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import subprocess

import pytest

from tests.support.slurm import FINAL_STATES, Job, job_info, submitted_job
from tests.support.study import ROOT

START = ROOT / "slurm" / "testing" / "start-netns-cluster.sh"
STOP = ROOT / "slurm" / "testing" / "stop-netns-cluster.sh"
HOSTS = 3
SBIN = f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin"  # the daemons and ip live in sbin


def missing_piece() -> str | None:
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


def free_net() -> str:
    """A /24 of 198.18.0.0/15 that no interface of this machine uses (x.y.z: the script's DITSCALE_NETNS_NET)."""
    out = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, env={"PATH": SBIN}).stdout
    used = {ipaddress.ip_interface(f).network for f in re.findall(r"inet (\S+)", out)}
    start = os.getpid() % 256
    for k in range(256):
        net = ipaddress.ip_network(f"198.18.{(start + k) % 256}.0/24")
        if not any(net.overlaps(u) for u in used):
            return str(net.network_address).rsplit(".", 1)[0]
    pytest.fail("no free /24 in 198.18.0.0/16 for the test hosts")


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
