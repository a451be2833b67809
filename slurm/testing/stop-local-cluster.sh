#!/usr/bin/env bash
# Stop the one-node test cluster started by start-local-cluster.sh (same STATE_DIR argument).
# Stops only the daemons whose pid files are in STATE_DIR; jobs still running are cancelled first.
set -uo pipefail
export PATH="$PATH:/usr/sbin:/sbin"

state=${1:-${DITSCALE_SLURM_DIR:-/tmp/ditscale-slurm}}
[ -d "$state" ] || exit 0
state=$(cd "$state" && pwd)
export SLURM_CONF="$state/slurm.conf"

if [ -f "$SLURM_CONF" ] && scontrol ping >/dev/null 2>&1; then
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

stop_pid() {  # pid file, name
    [ -f "$1" ] || return 0
    local pid
    pid=$(cat "$1")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 20); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.5
        done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
    fi
    rm -f "$1"
}
stop_pid "$state/slurmd.pid" slurmd
stop_pid "$state/slurmctld.pid" slurmctld
stop_pid "$state/munge/munged.pid" munged
exit 0
