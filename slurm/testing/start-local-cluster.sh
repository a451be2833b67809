#!/usr/bin/env bash
# Start a one-node Slurm cluster on localhost (munged + slurmctld + slurmd) for ditscale's tests.
#
#   eval "$(slurm/testing/start-local-cluster.sh)"      prints (and so exports) DITSCALE_SLURM_STATE, the
#                                                       new state folder, and SLURM_CONF=STATE/slurm.conf
#                                                       (sbatch/squeue/scontrol need it)
#   slurm/testing/stop-local-cluster.sh [STATE]         (default: $DITSCALE_SLURM_STATE)
#
# Needs root and Debian's packages: apt-get install -y slurm-wlm munge. Everything lives in the state
# folder: its own munge key and socket, its own ports ($DITSCALE_SLURMCTLD_PORT, default 16817;
# $DITSCALE_SLURMD_PORT, default 16818), state and spool folders and logs, so a system Slurm or
# munged is left alone. The folder is made fresh (mktemp -d under $TMPDIR or /tmp: mode 0700, owned by
# the caller, with a marker file); given one (start-local-cluster.sh STATE, or DITSCALE_SLURM_STATE),
# the script uses it only if it made it (common.sh: state_open), and then is idempotent: if that cluster
# already answers, it prints the two lines and exits; a half-started one is stopped and started afresh.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=slurm/testing/common.sh
. "$here/common.sh"
ctld_port=${DITSCALE_SLURMCTLD_PORT:-16817}
slurmd_port=${DITSCALE_SLURMD_PORT:-16818}
timeout=${DITSCALE_SLURM_START_TIMEOUT:-60}

die() { echo "start-local-cluster: $*" >&2; exit 1; }
export PATH="$PATH:/usr/sbin:/sbin"   # munged, slurmctld, slurmd

for cmd in munged slurmctld slurmd sinfo scontrol; do
    command -v "$cmd" >/dev/null || die "$cmd not found; install Debian's slurm-wlm and munge (apt-get install -y slurm-wlm munge)"
done
[ "$(id -u)" = 0 ] || die "slurmd must run as root (it starts jobs as their users); run this as root"

state=$(state_arg start-local-cluster slurm "${1:-}") || exit 1
conf="$state/slurm.conf"
if [ -n "$state" ]; then
    export SLURM_CONF="$conf"
    if running slurmctld && running slurmd && scontrol ping >/dev/null 2>&1; then
        printf 'export DITSCALE_SLURM_STATE=%q\nexport SLURM_CONF=%q\n' "$state" "$conf"
        exit 0
    fi
    # A half-started cluster from an earlier run: stop what is left, start afresh.
    "$here/stop-local-cluster.sh" "$state" >/dev/null 2>&1 || true
else
    state=$(state_new slurm) || die "cannot create a state folder in ${TMPDIR:-/tmp}"
    conf="$state/slurm.conf"
    export SLURM_CONF="$conf"
fi
# The folder first (quoted for the shell), so that a caller can stop what was started even when the
# start fails half-way; SLURM_CONF once the cluster is up.
printf 'export DITSCALE_SLURM_STATE=%q\n' "$state"

t0=$(date +%s)
mkdir -p "$state/ctld" "$state/slurmd"

# --- munge: our own key and socket --------------------------------------------------------------
start_munged || die "munged did not start; see $state/munge/munged.log"

# --- slurm.conf from the template ----------------------------------------------------------------
host=$(hostname -s)
# The hardware line as slurmd itself sees it (CPUs, sockets, cores, threads), without RealMemory:
# memory is not a consumable resource here (CR_CPU), and a reading that drifts would drain the node.
node_line=$(slurmd -C | head -n 1 | sed -E 's/ RealMemory=[0-9]+//')
case "$node_line" in NodeName=*) ;; *) die "unexpected 'slurmd -C' output: $node_line" ;; esac
sed -e "s|@HOST@|$host|g" -e "s|@STATE@|$state|g" -e "s|@CTLD_PORT@|$ctld_port|g" \
    -e "s|@SLURMD_PORT@|$slurmd_port|g" -e "s|@USER@|$(id -un)|g" -e "s|@NODE_LINE@|$node_line|g" \
    -e "s|@FIRST_JOB_ID@|$(( $(date +%s) % 50000000 + 1000 ))|g" \
    "$here/slurm.conf.in" > "$conf"

# --- daemons -------------------------------------------------------------------------------------
# -c: forget the jobs and node states of an earlier cluster in this folder (FirstJobId, from the
# clock, keeps job ids, and so per-job file names, from repeating across restarts).
# Each daemon's pid (and start time) is recorded as soon as it writes its pid file: the stop script
# signals only those processes.
rm -f "$state/slurmctld.pid" "$state/slurmd.pid"
slurmctld -f "$conf" -c && record_daemon slurmctld "$state/slurmctld.pid" \
    || die "slurmctld did not start; see $state/slurmctld.log"
slurmd -f "$conf" && record_daemon slurmd "$state/slurmd.pid" || die "slurmd did not start; see $state/slurmd.log"

# Wait until the node is idle (slurmd registered with slurmctld).
deadline=$((t0 + timeout))
until sinfo -h -N -o '%T' 2>/dev/null | grep -qx 'idle'; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
        echo "start-local-cluster: the node did not become idle within ${timeout}s:" >&2
        sinfo -N -l >&2 || true
        tail -n 20 "$state/slurmctld.log" "$state/slurmd.log" >&2 || true
        exit 1
    fi
    # A node left DOWN by an earlier run in the same folder comes back with RESUME.
    if sinfo -h -N -o '%T' 2>/dev/null | grep -qE '^(down|drain)'; then
        scontrol update NodeName="$host" State=RESUME >/dev/null 2>&1 || true
    fi
    sleep 1
done
echo "start-local-cluster: node $host idle after $(( $(date +%s) - t0 ))s (state in $state)" >&2
printf 'export SLURM_CONF=%q\n' "$conf"
