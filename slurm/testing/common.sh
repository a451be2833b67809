# shellcheck shell=bash disable=SC2154  # state (and SLURM_CONF): set by the sourcing script
# What the test clusters' scripts share (sourced; slurm/testing/*-cluster.sh, netns-host.sh): their
# private state folder, processes known by their recorded identity, munged with this cluster's own key
# and socket, cancelling the cluster's jobs, the stop scripts' common start. The caller sets `state` (the
# checked state folder; stop_recorded sets it) and, for cancel_jobs, SLURM_CONF.
#
# These scripts run as root, so nothing in the state folder may come from anyone else: a folder in
# /tmp that another local user made first (or one left over from an earlier run, whose pids have been
# reused since) would otherwise name the processes root kills and the links root deletes. Hence:
#   - the folder is made by state_new (mktemp -d: a fresh name, mode 0700, owned by the caller) with a
#     marker file, and state_open refuses any folder that is not exactly that;
#   - a process is signalled only while its start time (field 22 of /proc/PID/stat, proc(5)) is the one
#     recorded when it was started: a pid reused since then belongs to another process;
#   - state files are read as data with a whitelist of keys and value patterns, never sourced.

STATE_MARKER=.ditscale-state

# state_new KIND: make a new state folder for KIND (slurm or netns) under $TMPDIR (default /tmp) and
# print its path. mktemp -d picks a name nobody else holds and creates it atomically, mode 0700.
state_new() {
    local kind=$1 dir
    dir=$(mktemp -d "${TMPDIR:-/tmp}/ditscale-$kind.XXXXXXXXXX") || return 1
    dir=$(cd -P "$dir" && pwd -P) && chmod 700 "$dir" || return 1
    printf 'ditscale-%s uid=%s dir=%s\n' "$kind" "$(id -u)" "$dir" > "$dir/$STATE_MARKER" || return 1
    echo "$dir"
}

# state_open KIND DIR: print DIR's real path when it is a state folder state_new made for KIND and
# this user: a folder (not a symlink), owned by this user, mode 0700, with the marker naming KIND, this
# user and the folder itself, in a parent that nobody else can rename it in (not writable by others,
# or sticky like /tmp). Otherwise print one line saying why and return 1.
state_open() {
    local kind=$1 given=${2%/} dir uid owner mode parent pmode powner want
    uid=$(id -u)
    [ -n "$given" ] || { echo "no state folder given"; return 1; }
    [ ! -L "$given" ] || { echo "$given is a symbolic link: refusing it as a state folder"; return 1; }
    [ -d "$given" ] || { echo "$given: no such state folder"; return 1; }
    dir=$(cd -P "$given" && pwd -P) || { echo "$given: cannot enter it"; return 1; }
    read -r owner mode < <(stat -c '%u %a' "$dir")
    if [ "$owner" != "$uid" ]; then
        echo "refusing state folder $dir: owned by uid $owner, not by you (uid $uid), so this script did not create it"
        return 1
    fi
    if [ "$mode" != 700 ]; then
        echo "refusing state folder $dir: mode $mode, not 700 (others could have written to it)"
        return 1
    fi
    want="ditscale-$kind uid=$uid dir=$dir"
    if [ -L "$dir/$STATE_MARKER" ] || [ ! -f "$dir/$STATE_MARKER" ] \
        || [ "$(stat -c %u "$dir/$STATE_MARKER")" != "$uid" ] \
        || [ "$(head -c 4096 "$dir/$STATE_MARKER")" != "$want" ]; then
        echo "refusing state folder $dir: no marker of start-$kind-cluster.sh in it (it did not create this folder)"
        return 1
    fi
    parent=$(dirname "$dir")
    read -r powner pmode < <(stat -c '%u %a' "$parent")
    if [ $((8#$pmode & 8#1000)) = 0 ] && { [ $((8#$pmode & 8#022)) != 0 ] || { [ "$powner" != 0 ] && [ "$powner" != "$uid" ]; }; }; then
        echo "refusing state folder $dir: its parent $parent is writable by others and not sticky (the folder could be swapped)"
        return 1
    fi
    echo "$dir"
}

# proc_start PID: the process's start time, in clock ticks after boot (field 22 of /proc/PID/stat,
# proc(5)); fails when there is no such process, or only its zombie (it has exited: nothing to signal).
# With the pid it names one process for the machine's uptime: a reused pid comes with a later start
# time. The command name (field 2) may hold spaces and parentheses, so the fields are counted from
# after its last ')'.
proc_start() {
    local stat f
    case $1 in ''|*[!0-9]*) return 1 ;; esac
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    read -r -a f <<< "${stat##*) }"   # f[0] is field 3 (the state), f[19] field 22
    [ -n "${f[19]:-}" ] && [ "${f[0]}" != Z ] || return 1
    echo "${f[19]}"
}

# pid_token PID: "PID:START" while PID is alive (nothing when it is gone).
pid_token() {
    local start
    start=$(proc_start "$1") && echo "$1:$start"
}

# same_process PID:START: the process is still the one whose start time was recorded.
same_process() {
    local pid=${1%%:*} start=${1#*:}
    [ -n "$start" ] && [ "$(proc_start "$pid")" = "$start" ]
}

# record_pid NAME PID: add "NAME PID START" to STATE/pids (the identities stop scripts signal by).
record_pid() {
    local start
    start=$(proc_start "$2") || return 1
    echo "$1 $2 $start" >> "$state/pids"
}

# record_daemon NAME PIDFILE: wait up to 10 s for the daemon to write its pid file (it forks into the
# background first), then record that process. Fails when no live pid appears.
record_daemon() {
    local pid
    for _ in $(seq 1 100); do
        if [ -f "$2" ]; then
            pid=$(head -c 32 "$2" | tr -d '[:space:]')
            if record_pid "$1" "$pid" 2>/dev/null; then return 0; fi
        fi
        sleep 0.1
    done
    return 1
}

# recorded [NAME]: PID:START of every process recorded (under NAME only, when given) that is still that
# process. STATE/pids is read as data: a line that is not "NAME PID START" is skipped.
recorded() {
    local name pid start extra
    [ -f "$state/pids" ] || return 0
    while read -r name pid start extra; do
        [[ $name =~ ^[a-z][a-z0-9-]{0,31}$ && $pid =~ ^[1-9][0-9]{0,9}$ && $start =~ ^[0-9]{1,20}$ && -z $extra ]] \
            || continue
        [ -z "${1:-}" ] || [ "$name" = "$1" ] || continue
        if same_process "$pid:$start"; then echo "$pid:$start"; fi
    done < "$state/pids"
}

# running NAME: a process recorded under NAME is alive.
running() { [ -n "$(recorded "$1")" ]; }

# signal_same SIG PID:START...: SIG to each process that is still the recorded one.
signal_same() {
    local sig=$1 t
    shift
    for t in "$@"; do
        if same_process "$t"; then kill "-$sig" "${t%%:*}" 2>/dev/null || true; fi
    done
}

# stop_pids PID:START...: SIGTERM, up to 10 s to exit, then SIGKILL, each time only to a process that
# is still the recorded one.
stop_pids() {
    [ $# -gt 0 ] || return 0
    local t remaining
    signal_same TERM "$@"
    for _ in $(seq 1 20); do
        remaining=()
        for t in "$@"; do if same_process "$t"; then remaining+=("$t"); fi; done
        [ ${#remaining[@]} -gt 0 ] || return 0
        sleep 0.5
    done
    signal_same KILL "${remaining[@]}"
}

# start_munged: munged on STATE/munge/munge.socket with its own key (made once, kept), so that a
# system munged is left alone; its pid recorded as "munged". Returns non-zero when it does not start.
start_munged() {
    mkdir -p "$state/munge"
    chmod 700 "$state/munge"
    if [ ! -s "$state/munge/munge.key" ]; then
        (umask 077 && dd if=/dev/urandom of="$state/munge/munge.key" bs=1024 count=1 status=none)
    fi
    chmod 400 "$state/munge/munge.key"
    rm -f "$state/munge/munged.pid"
    munged --force --socket="$state/munge/munge.socket" --key-file="$state/munge/munge.key" \
        --pid-file="$state/munge/munged.pid" --log-file="$state/munge/munged.log" \
        --seed-file="$state/munge/munged.seed" && record_daemon munged "$state/munge/munged.pid"
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

# state_arg SCRIPT KIND [DIR]: the state folder to use (DIR, else $DITSCALE_<KIND>_STATE), checked by
# state_open; exits with one line naming SCRIPT when it is refused. Prints nothing when neither is set.
state_arg() {
    local script=$1 kind=$2 given=${3:-} var why
    var=DITSCALE_${kind^^}_STATE
    given=${given:-${!var:-}}
    [ -n "$given" ] || return 0
    why=$(state_open "$kind" "$given") || { echo "$script: $why" >&2; exit 1; }
    echo "$why"
}

# stop_recorded SCRIPT KIND [DIR]: what both stop scripts do first. The state folder is DIR, else
# $DITSCALE_<KIND>_STATE (neither: usage, exit 2; one that no longer exists: nothing to stop, exit 0),
# checked by state_arg and set as `state`; then the cluster's jobs are cancelled, every daemon recorded
# in STATE/pids is stopped (all at once: each takes a second or two to exit) and their pid files go.
stop_recorded() {
    local script=$1 kind=$2 var="DITSCALE_${2^^}_STATE" given daemons
    given=${3:-${!var:-}}
    [ -n "$given" ] || { echo "$script: usage: $script.sh STATE (the folder ${script/stop/start}.sh printed), or set $var" >&2; exit 2; }
    [ -e "$given" ] || [ -L "$given" ] || exit 0
    state=$(state_arg "$script" "$kind" "$given") || exit 1
    export SLURM_CONF="$state/slurm.conf"
    if running slurmctld; then cancel_jobs; fi
    mapfile -t daemons < <(recorded)   # slurmd (one per host), slurmctld, munged
    stop_pids "${daemons[@]}"
    rm -f "$state/pids" "$state"/slurmd*.pid "$state/slurmctld.pid" "$state/munge/munged.pid"
}

# read_netns_env FILE: set NAME and HOSTS from start-netns-cluster.sh's netns.env, read as data (never
# sourced): exactly the keys NAME (lower-case letters, digits, '-'; at most 13 characters, as interface
# names allow) and HOSTS (1 to 200), one KEY=VALUE a line. Fails on anything else, with the reason in `why`.
read_netns_env() {
    local line n=0
    NAME="" HOSTS="" why=""
    [ -f "$1" ] && [ ! -L "$1" ] || { why="$1: missing"; return 1; }
    while IFS= read -r line || [ -n "$line" ]; do
        n=$((n + 1))
        if [[ $line =~ ^NAME=([a-z][a-z0-9-]{0,12})$ ]]; then NAME=${BASH_REMATCH[1]}
        elif [[ $line =~ ^HOSTS=([1-9][0-9]{0,2})$ ]] && [ "${BASH_REMATCH[1]}" -le 200 ]; then HOSTS=${BASH_REMATCH[1]}
        else why="$1, line $n: not NAME=<name> or HOSTS=<1-200>"; return 1
        fi
    done < "$1"
    [ -n "$NAME" ] && [ -n "$HOSTS" ] || { why="$1: no NAME or no HOSTS"; return 1; }
}

# cluster_object NAME: NAME is one of this cluster's namespaces or links (NAME-br, NAME-ctl, NAME-hI
# with I up to HOSTS; NAME and HOSTS from read_netns_env), so never e.g. eth0 or docker0.
cluster_object() {
    [[ $1 =~ ^$NAME-(br|ctl|h([1-9][0-9]{0,2}))$ ]] || return 1
    [ -z "${BASH_REMATCH[2]}" ] || [ "${BASH_REMATCH[2]}" -le "$HOSTS" ]
}

# netns_is NAME INODE / link_is NAME IFINDEX: the namespace or link (in this, the machine's, namespace)
# is still the one recorded when start-netns-cluster.sh created it.
netns_is() { [ -e "/run/netns/$1" ] && [ "$(stat -L -c %i "/run/netns/$1" 2>/dev/null)" = "$2" ]; }
link_is() { [ "$(cat "/sys/class/net/$1/ifindex" 2>/dev/null)" = "$2" ]; }

# recorded_objects: "KIND NAME ID" of each line of STATE/netns.record that is "netns NAME INODE" or
# "link NAME IFINDEX" with NAME one of this cluster's; any other line is reported on stderr and skipped.
recorded_objects() {
    local kind name id extra
    [ -f "$state/netns.record" ] || return 0
    while read -r kind name id extra; do
        if [[ $kind =~ ^(netns|link)$ && $id =~ ^[0-9]{1,20}$ && -z $extra ]] && cluster_object "$name"; then
            echo "$kind $name $id"
        else
            echo "netns.record: skipping '$kind $name $id${extra:+ $extra}' (not one of $NAME's objects)" >&2
        fi
    done < "$state/netns.record"
}
