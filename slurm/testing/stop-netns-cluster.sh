#!/usr/bin/env bash
# Stop the multi-host cluster started by start-netns-cluster.sh and remove what it created, and only that:
#
#   slurm/testing/stop-netns-cluster.sh [STATE]     (default: $DITSCALE_NETNS_STATE; the folder the start
#                                                   script printed)
#
# Only a state folder that start-netns-cluster.sh made is used (common.sh: state_open; anything else is
# refused in one line and nothing is touched). Jobs are cancelled; the daemons recorded in STATE/pids
# are stopped, each while it is still the process recorded (pid and start time); any process still
# inside one of the cluster's namespaces (what a job left behind) is ended; and the namespaces and links
# listed in STATE/netns.record are deleted, each only if its name is one of the cluster's (NAME-br,
# NAME-ctl, NAME-hI; NAME from STATE/netns.env, read as data) and it still has the identity recorded
# when it was created (namespace inode, interface index). The folder stays, with the daemons' logs; a
# folder that no longer exists is nothing to stop.
set -uo pipefail
export PATH="$PATH:/usr/sbin:/sbin"
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=slurm/testing/common.sh
. "$here/common.sh"

stop_recorded stop-netns-cluster netns "${1:-}"   # the daemons: slurmd's, slurmctld, munged

[ -f "$state/netns.record" ] || exit 0
read_netns_env "$state/netns.env" \
    || { echo "stop-netns-cluster: $why; the namespaces and links in $state/netns.record are left alone" >&2; exit 1; }
namespaces=() links=()
while read -r kind obj id; do
    if [ "$kind" = netns ]; then namespaces+=("$obj $id"); else links+=("$obj $id"); fi
done < <(recorded_objects)

# Processes still in our namespaces (a job step's leftovers, e.g. Ray's) were started by our
# daemons: end them before the namespaces go, or they would keep running without a network.
for entry in "${namespaces[@]}"; do
    read -r ns inode <<< "$entry"
    netns_is "$ns" "$inode" || continue
    mapfile -t pids < <(ip netns pids "$ns" 2>/dev/null | while read -r p; do pid_token "$p"; done)
    stop_pids "${pids[@]}"
done
# Links first, newest first (deleting a veth end deletes its pair at once; the kernel tears a
# namespace down in the background, so its veth could outlive `ip netns delete` for a moment), then
# the namespaces.
for ((k = ${#links[@]} - 1; k >= 0; k--)); do
    read -r link index <<< "${links[k]}"
    link_is "$link" "$index" || continue
    ip link delete "$link" 2>/dev/null || ! link_is "$link" "$index" \
        || echo "stop-netns-cluster: cannot delete link $link" >&2
done
for entry in "${namespaces[@]}"; do
    read -r ns inode <<< "$entry"
    netns_is "$ns" "$inode" || continue
    ip netns delete "$ns" || echo "stop-netns-cluster: cannot delete namespace $ns" >&2
done
rm -f "$state/netns.record" "$state/netns.env"
exit 0
