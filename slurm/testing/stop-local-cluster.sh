#!/usr/bin/env bash
# Stop the one-node test cluster started by start-local-cluster.sh:
#
#   slurm/testing/stop-local-cluster.sh [STATE]     (default: $DITSCALE_SLURM_STATE; the folder the start
#                                                   script printed)
#
# Only a state folder that start-local-cluster.sh made is used (common.sh: state_open; anything else is
# refused in one line and nothing is touched), and only the daemons it recorded there are stopped, each
# while it is still the process recorded (pid and start time); jobs still running are cancelled first.
# The folder stays, with the daemons' logs; a folder that no longer exists is nothing to stop.
set -uo pipefail
export PATH="$PATH:/usr/sbin:/sbin"
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=slurm/testing/common.sh
. "$here/common.sh"

given=${1:-${DITSCALE_SLURM_STATE:-}}
[ -n "$given" ] || { echo "stop-local-cluster: usage: stop-local-cluster.sh STATE (the folder start-local-cluster.sh printed), or set DITSCALE_SLURM_STATE" >&2; exit 2; }
[ -e "$given" ] || [ -L "$given" ] || exit 0
state=$(state_arg stop-local-cluster slurm "$given") || exit 1
export SLURM_CONF="$state/slurm.conf"

if running slurmctld; then cancel_jobs; fi
# The daemons recorded in the state folder: slurmd, slurmctld, munged.
mapfile -t daemons < <(recorded slurmd; recorded slurmctld; recorded munged)
stop_pids "${daemons[@]}"
rm -f "$state/pids" "$state/slurmd.pid" "$state/slurmctld.pid" "$state/munge/munged.pid"
exit 0
