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

stop_recorded stop-local-cluster slurm "${1:-}"   # the daemons recorded in the state folder: slurmd, slurmctld, munged
exit 0
