#!/usr/bin/env bash
# Stop the one-node test cluster started by start-local-cluster.sh (same STATE_DIR argument).
# Stops only the daemons whose pid files are in STATE_DIR; jobs still running are cancelled first.
set -uo pipefail
export PATH="$PATH:/usr/sbin:/sbin"

state=${1:-${DITSCALE_SLURM_DIR:-/tmp/ditscale-slurm}}
[ -d "$state" ] || exit 0
state=$(cd "$state" && pwd)
export SLURM_CONF="$state/slurm.conf"
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=slurm/testing/common.sh
. "$here/common.sh"

cancel_jobs
# The daemons whose pid files are in STATE_DIR: slurmd, slurmctld, munged.
for f in "$state/slurmd.pid" "$state/slurmctld.pid" "$state/munge/munged.pid"; do
    pid=$(pid_in "$f")
    if [ -n "$pid" ]; then stop_pids "$pid"; fi
    rm -f "$f"
done
exit 0
