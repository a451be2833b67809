#!/usr/bin/env bash
# Stop the multi-host cluster started by start-netns-cluster.sh (same STATE_DIR argument) and remove
# what it created, and only that: jobs are cancelled, the daemons whose pid files are in STATE_DIR
# are stopped, any process still inside one of its namespaces (what a job left behind) is ended by
# pid, and the namespaces and links listed in STATE_DIR/netns.record are deleted.
set -uo pipefail
export PATH="$PATH:/usr/sbin:/sbin"
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=slurm/testing/common.sh
. "$here/common.sh"

state=${1:-${DITSCALE_NETNS_DIR:-/tmp/ditscale-netns}}
[ -d "$state" ] || exit 0
state=$(cd "$state" && pwd)
export SLURM_CONF="$state/slurm.conf"
record="$state/netns.record"

if [ -n "$(pid_in "$state/slurmctld.pid")" ]; then cancel_jobs; fi

# The daemons, all at once (each takes a second or two to exit): slurmd's, slurmctld, munged.
daemons=()
for f in "$state"/slurmd-*.pid "$state/slurmctld.pid" "$state/munge/munged.pid"; do
    pid=$(pid_in "$f")
    if [ -n "$pid" ]; then daemons+=("$pid"); fi
done
stop_pids "${daemons[@]}"
rm -f "$state"/slurmd-*.pid "$state/slurmctld.pid" "$state/munge/munged.pid"

[ -f "$record" ] || exit 0
# Processes still in our namespaces (a job step's leftovers, e.g. Ray's) were started by our
# daemons: end them by pid before the namespaces go, or they would keep running without a network.
mapfile -t namespaces < <(awk '$1 == "netns" {print $2}' "$record")
for ns in "${namespaces[@]}"; do
    [ -e "/run/netns/$ns" ] || continue
    mapfile -t pids < <(ip netns pids "$ns" 2>/dev/null)
    stop_pids "${pids[@]}"
done
# Links first (deleting a veth end deletes its pair at once; the kernel tears a namespace down in
# the background, so its veth could outlive `ip netns delete` for a moment), then the namespaces.
for link in $(awk '$1 == "link" {print $2}' "$record" | tac); do
    ip link show dev "$link" >/dev/null 2>&1 || continue
    ip link delete "$link" 2>/dev/null || ! ip link show dev "$link" >/dev/null 2>&1 \
        || echo "stop-netns-cluster: cannot delete link $link" >&2
done
for ns in "${namespaces[@]}"; do
    [ -e "/run/netns/$ns" ] || continue
    ip netns delete "$ns" || echo "stop-netns-cluster: cannot delete namespace $ns" >&2
done
rm -f "$record" "$state/netns.env"
exit 0
