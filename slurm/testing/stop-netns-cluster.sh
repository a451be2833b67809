#!/usr/bin/env bash
# Stop the multi-host cluster started by start-netns-cluster.sh (same STATE_DIR argument) and remove
# what it created, and only that: jobs are cancelled, the daemons whose pid files are in STATE_DIR
# are stopped, any process still inside one of its namespaces (what a job left behind) is ended by
# pid, and the namespaces and links listed in STATE_DIR/netns.record are deleted.
set -uo pipefail
export PATH="$PATH:/usr/sbin:/sbin"

state=${1:-${DITSCALE_NETNS_DIR:-/tmp/ditscale-netns}}
[ -d "$state" ] || exit 0
state=$(cd "$state" && pwd)
export SLURM_CONF="$state/slurm.conf"
record="$state/netns.record"

if [ -f "$SLURM_CONF" ] && [ -f "$state/slurmctld.pid" ] && kill -0 "$(cat "$state/slurmctld.pid")" 2>/dev/null \
        && scontrol ping >/dev/null 2>&1; then
    jobs=$(squeue -h -o '%i' 2>/dev/null || true)
    if [ -n "$jobs" ]; then
        # shellcheck disable=SC2086
        scancel $jobs 2>/dev/null || true
        for _ in $(seq 1 30); do
            [ -z "$(squeue -h -o '%i' 2>/dev/null)" ] && break
            sleep 1
        done
    fi
fi

stop_pids() {  # pids...: SIGTERM, up to 10 s to exit, then SIGKILL
    [ $# -gt 0 ] || return 0
    kill -TERM "$@" 2>/dev/null || true
    local pid left
    for _ in $(seq 1 20); do
        left=0
        for pid in "$@"; do kill -0 "$pid" 2>/dev/null && left=1; done
        [ "$left" = 0 ] && return 0
        sleep 0.5
    done
    kill -KILL "$@" 2>/dev/null || true
}
# The daemons, all at once (each takes a second or two to exit): slurmd's, slurmctld, munged.
daemons=()
for f in "$state"/slurmd-*.pid "$state/slurmctld.pid" "$state/munge/munged.pid"; do
    [ -f "$f" ] || continue
    pid=$(cat "$f")
    case $pid in ''|*[!0-9]*) ;; *) kill -0 "$pid" 2>/dev/null && daemons+=("$pid") ;; esac
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
rm -f "$record"
exit 0
