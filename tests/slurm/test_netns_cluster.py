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

import shlex
import subprocess
import sys

from tests.support.netns import HOSTS, SBIN
from tests.support.slurm import slurm

# the three-host cluster is the module fixture netns_cluster in conftest.py


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
