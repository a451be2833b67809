#!/usr/bin/env bash
# Lose one host of the namespace cluster (slurm/testing/start-netns-cluster.sh), or bring it back:
# for tests of what a study does when a machine dies under it.
#
#   slurm/testing/netns-host.sh lose STATE I     SIGKILL to every process of host I at once: its
#       slurmd, the job steps on it and everything they started (Ray's raylet and workers, trials).
#       As a machine losing power: nothing is told, nothing cleans up. The host's namespace and
#       address stay (nothing answers there any more); Slurm declares the node DOWN after SlurmdTimeout.
#   slurm/testing/netns-host.sh return STATE I   start host I's slurmd again (a repaired or replaced
#       machine): it registers with slurmctld and, with ReturnToService=2, the node is usable again.
#
# Which processes are the host's: those in its network namespace (`ip netns pids`), which every job
# step started there inherits. STATE is the folder start-netns-cluster.sh printed (DITSCALE_NETNS_STATE);
# only one it made is used (common.sh: state_open), its netns.env is read as data (never sourced), and
# the host's namespace must still be the one recorded in netns.record when the cluster started.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=slurm/testing/common.sh
. "$here/common.sh"

die() { echo "netns-host: $*" >&2; exit 1; }
[ $# = 3 ] || die "usage: netns-host.sh lose|return STATE HOST_NUMBER"
action=$1
state=$(state_arg netns-host netns "$2") || exit 1
[ -n "$state" ] || die "usage: netns-host.sh lose|return STATE HOST_NUMBER (STATE: the folder start-netns-cluster.sh printed)"
i=$3
read_netns_env "$state/netns.env" || die "$why: not a running cluster of start-netns-cluster.sh"
case $i in ''|*[!0-9]*) die "host $i: a number from 1 to $HOSTS" ;; esac
[ "$i" -ge 1 ] && [ "$i" -le "$HOSTS" ] || die "host $i: a number from 1 to $HOSTS"
ns=$NAME-h$i
inode=$(recorded_objects | awk -v ns="$ns" '$1 == "netns" && $2 == ns {print $3}' | tail -n 1)
[ -n "$inode" ] && netns_is "$ns" "$inode" \
    || die "host $i's namespace $ns is not the one this cluster created (is the cluster running?)"

case $action in
    lose)
        # A process may fork while we list; go again until nothing is left (at most 50 rounds).
        for _ in $(seq 1 50); do
            mapfile -t pids < <(ip netns pids "$ns" 2>/dev/null)
            [ ${#pids[@]} -gt 0 ] || break
            kill -KILL "${pids[@]}" 2>/dev/null || true
            sleep 0.1
        done
        left=$(ip netns pids "$ns" 2>/dev/null | wc -l)
        [ "$left" = 0 ] || die "$left processes of $ns survived SIGKILL"
        rm -f "$state/slurmd-h$i.pid"   # its recorded start time keeps a reused pid from being signalled
        echo "netns-host: host $i ($ns) lost: every process in it killed" >&2
        ;;
    return)
        [ -z "$(ip netns pids "$ns" 2>/dev/null)" ] || die "host $i ($ns) still has processes: lose it first"
        # shellcheck disable=SC2016  # $0 hostname, $1 slurm.conf (as start-netns-cluster.sh starts it)
        rm -f "$state/slurmd-h$i.pid"
        nsenter --net="/run/netns/$ns" unshare --uts sh -c 'hostname "$0" && slurmd -f "$1"' "$ns" "$state/slurm.conf" \
            && record_daemon "slurmd-h$i" "$state/slurmd-h$i.pid" || die "slurmd did not start on $ns; see $state/slurmd-h$i.log"
        echo "netns-host: host $i ($ns) back: slurmd started" >&2
        ;;
    *) die "$action: lose or return" ;;
esac
