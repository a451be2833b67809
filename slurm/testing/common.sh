# shellcheck shell=bash
# What the test clusters' start and stop scripts share (sourced; slurm/testing/*-cluster.sh):
# munged with this cluster's own key and socket, cancelling the cluster's jobs, stopping processes
# by pid. The caller sets `state` (its STATE_DIR) and, for cancel_jobs, SLURM_CONF.

# start_munged: munged on STATE_DIR/munge/munge.socket with its own key (made once, kept), so that a
# system munged is left alone. Returns non-zero when it does not start.
start_munged() {
    mkdir -p "$state/munge"
    chmod 700 "$state/munge"
    if [ ! -s "$state/munge/munge.key" ]; then
        (umask 077 && dd if=/dev/urandom of="$state/munge/munge.key" bs=1024 count=1 status=none)
    fi
    chmod 400 "$state/munge/munge.key"
    munged --force --socket="$state/munge/munge.socket" --key-file="$state/munge/munge.key" \
        --pid-file="$state/munge/munged.pid" --log-file="$state/munge/munged.log" \
        --seed-file="$state/munge/munged.seed"
}

# cancel_jobs: scancel every job of the cluster (when its slurmctld answers), then up to 30 s for
# them to leave the queue.
cancel_jobs() {
    [ -f "$SLURM_CONF" ] && scontrol ping >/dev/null 2>&1 || return 0
    local jobs
    jobs=$(squeue -h -o '%i' 2>/dev/null || true)
    [ -n "$jobs" ] || return 0
    # shellcheck disable=SC2086
    scancel $jobs 2>/dev/null || true
    for _ in $(seq 1 30); do
        [ -z "$(squeue -h -o '%i' 2>/dev/null)" ] && return 0
        sleep 1
    done
}

# stop_pids PID...: SIGTERM, up to 10 s to exit, then SIGKILL.
stop_pids() {
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

# pid_in FILE: the live process whose pid FILE holds (nothing when the file or the process is gone).
pid_in() {
    local pid
    [ -f "$1" ] || return 0
    pid=$(cat "$1")
    case $pid in ''|*[!0-9]*) return 0 ;; esac
    if kill -0 "$pid" 2>/dev/null; then echo "$pid"; fi
}
