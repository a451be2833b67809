#!/usr/bin/env bash
# Start a multi-host Slurm cluster on one machine: N "hosts", each a Linux network namespace with its
# own hostname (a UTS namespace), address and slurmd, on a bridge inside the machine.
#
#   eval "$(slurm/testing/start-netns-cluster.sh)"      prints (and so exports) DITSCALE_NETNS_STATE, the
#                                                       new state folder, and SLURM_CONF=STATE/slurm.conf
#   srun -N3 hostname                                   (ditscale-h1, ditscale-h2, ditscale-h3)
#   slurm/testing/stop-netns-cluster.sh [STATE]         (default: $DITSCALE_NETNS_STATE)
#
# The layout (defaults; the variables change them, e.g. to run two such clusters side by side):
#   bridge $NAME-br at $NET.1/24 in the machine's own namespace (the "login node": srun and sbatch
#   run there); host i = namespace $NAME-hi, hostname $NAME-hi, address $NET.(10+i) on its eth0,
#   a veth whose other end ($NAME-hi) is on the bridge; Slurm node hi (NodeAddr=$NET.(10+i)).
#   The controller is a machine of its own, as on a real cluster: namespace and hostname $NAME-ctl at
#   $NET.10, running slurmctld only, so that losing any compute host (netns-host.sh) leaves Slurm up.
#   DITSCALE_NETNS_HOSTS=3  DITSCALE_NETNS_NAME=ditscale  DITSCALE_NETNS_NET=198.18.0 (RFC 2544's
#   benchmarking range: no real network uses it)  DITSCALE_NETNS_SLURMCTLD_PORT=16827
#   DITSCALE_NETNS_SLURMD_PORT=16828  DITSCALE_SLURM_START_TIMEOUT=60
# One munged (own key and socket in STATE_DIR) in the machine's namespace serves every host. The machine's filesystem is every host's filesystem (the "shared filesystem").
# Traffic stays on the bridge: no route leaves it (no default route, no NAT, no forwarding).
#
# Needs root, Debian's slurm-wlm and munge, iproute2 (ip) and util-linux (nsenter, unshare). The state
# folder is made fresh (mktemp -d under $TMPDIR or /tmp: mode 0700, owned by the caller, with a marker
# file; common.sh). Everything the script creates is recorded there with its identity, and
# stop-netns-cluster.sh removes exactly that: namespaces and links in netns.record (each with its
# namespace inode or interface index, taken right after it was created), daemons in pids (pid and start
# time). Given a state folder (start-netns-cluster.sh STATE, or DITSCALE_NETNS_STATE), the script uses
# it only if it made it, and is then idempotent: if that cluster already answers, it prints the two
# lines and exits; a half-started one is stopped and started afresh.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
hosts=${DITSCALE_NETNS_HOSTS:-3}
name=${DITSCALE_NETNS_NAME:-ditscale}
net=${DITSCALE_NETNS_NET:-198.18.0}
ctld_port=${DITSCALE_NETNS_SLURMCTLD_PORT:-16827}
slurmd_port=${DITSCALE_NETNS_SLURMD_PORT:-16828}
timeout=${DITSCALE_SLURM_START_TIMEOUT:-60}

die() { echo "start-netns-cluster: $*" >&2; exit 1; }
export PATH="$PATH:/usr/sbin:/sbin"   # munged, slurmctld, slurmd, ip

for cmd in munged slurmctld slurmd sinfo scontrol ip nsenter unshare; do
    command -v "$cmd" >/dev/null || die "$cmd not found; install Debian's slurm-wlm, munge, iproute2 and util-linux"
done
[ "$(id -u)" = 0 ] || die "network namespaces and slurmd need root; run this as root"
case $hosts in ''|*[!0-9]*) die "DITSCALE_NETNS_HOSTS=$hosts: a number of hosts, 1 to 200" ;; esac
[ "$hosts" -ge 1 ] && [ "$hosts" -le 200 ] || die "DITSCALE_NETNS_HOSTS=$hosts: a number of hosts, 1 to 200"
[[ $net =~ ^[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}$ ]] || die "DITSCALE_NETNS_NET=$net: the first three numbers of a /24, e.g. 198.18.0"
[[ $name =~ ^[a-z][a-z0-9-]*$ ]] || die "DITSCALE_NETNS_NAME=$name: lower-case letters, digits and '-'"
# Interface names have at most 15 characters; the longest is a veth end on the bridge, $name-hN or $name-ctl.
longest=$(( 2 + ${#hosts} > 4 ? 2 + ${#hosts} : 4 ))
[ $(( ${#name} + longest )) -le 15 ] || die "DITSCALE_NETNS_NAME=$name is too long for interface names (at most $(( 15 - longest )) characters)"

# shellcheck source=slurm/testing/common.sh
. "$here/common.sh"
state=$(state_arg start-netns-cluster netns "${1:-}") || exit 1
bridge="$name-br"
host_ns() { echo "$name-h$1"; }        # namespace, hostname and bridge-side veth of host $1
host_ip() { echo "$net.$((10 + $1))"; }
ctl_ns=$name-ctl                       # the controller's namespace, hostname and veth (address $net.10)
ctl_ip=$net.10

up() {
    running munged && running slurmctld && [ -e "/run/netns/$ctl_ns" ] || return 1
    local i
    for i in $(seq 1 "$hosts"); do
        running "slurmd-h$i" && [ -e "/run/netns/$(host_ns "$i")" ] || return 1
    done
    [ "$(sinfo -h -N -o '%N %T' 2>/dev/null | grep -c ' idle$\| mixed$\| allocated$')" = "$hosts" ]
}
if [ -n "$state" ]; then
    export SLURM_CONF="$state/slurm.conf"
    if [ -f "$SLURM_CONF" ] && up; then
        printf 'export DITSCALE_NETNS_STATE=%q\nexport SLURM_CONF=%q\n' "$state" "$SLURM_CONF"
        exit 0
    fi
    # A half-started cluster from an earlier run: remove what it recorded, start afresh.
    "$here/stop-netns-cluster.sh" "$state" >/dev/null 2>&1 || true
else
    state=$(state_new netns) || die "cannot create a state folder in ${TMPDIR:-/tmp}"
fi
conf="$state/slurm.conf"
record="$state/netns.record"
export SLURM_CONF="$conf"
# The folder first (quoted for the shell), so that a caller can remove what was made even when the
# start fails half-way; SLURM_CONF once the cluster is up.
printf 'export DITSCALE_NETNS_STATE=%q\n' "$state"

# --- nothing of someone else's in the way (this cluster's own leftovers are gone by now) ---------
for ns in "$ctl_ns" $(for i in $(seq 1 "$hosts"); do host_ns "$i"; done); do
    [ ! -e "/run/netns/$ns" ] || die "network namespace $ns exists but $state did not create it: stop the cluster that did (stop-netns-cluster.sh ITS_STATE_DIR) or set DITSCALE_NETNS_NAME"
    ! ip link show dev "$ns" >/dev/null 2>&1 || die "network interface $ns exists but $state did not create it; set DITSCALE_NETNS_NAME"
done
! ip link show dev "$bridge" >/dev/null 2>&1 || die "network interface $bridge exists but $state did not create it; set DITSCALE_NETNS_NAME"
taken=$(ip -4 -o addr show | awk -v p="$net." 'index($4, p) == 1 {print $2 " " $4}')
[ -z "$taken" ] || die "addresses in $net.0/24 are in use on this machine ($taken); set DITSCALE_NETNS_NET to a free /24 (e.g. 198.18.1)"

t0=$(date +%s)
mkdir -p "$state/ctld"
# The names every object of this cluster has (NAME-br, NAME-ctl, NAME-hI), which stop-netns-cluster.sh
# and netns-host.sh read back as data (common.sh: read_netns_env) and check every recorded name against.
printf 'NAME=%s\nHOSTS=%s\n' "$name" "$hosts" > "$state/netns.env"
# Each object is recorded with its identity right after it is created (the names were free, above):
# a namespace by the inode of its nsfs file, a link by its interface index. stop-netns-cluster.sh
# deletes an object only while it still has that identity, so never one made by anyone else since.
rec_netns() { echo "netns $1 $(stat -L -c %i "/run/netns/$1")" >> "$record"; }
rec_link() { echo "link $1 $(cat "/sys/class/net/$1/ifindex")" >> "$record"; }

# --- the network: a bridge in the machine's namespace, one veth per host --------------------------
net_do() {
    "$@" || die "'$*' failed (needs a kernel with bridge and veth support, and root in the machine's own namespace); stop-netns-cluster.sh $state removes what was made"
}
net_do ip link add "$bridge" type bridge
rec_link "$bridge"
net_do ip addr add "$net.1/24" dev "$bridge"
net_do ip link set "$bridge" up
add_host() {  # namespace, address
    net_do ip netns add "$1"
    rec_netns "$1"
    net_do ip link add "$1" type veth peer name eth0 netns "$1"
    rec_link "$1"   # the veth's end on the bridge (its peer is eth0 in the namespace, which goes with it)
    net_do ip link set "$1" master "$bridge"
    net_do ip link set "$1" up
    net_do ip -n "$1" link set lo up
    net_do ip -n "$1" addr add "$2/24" dev eth0
    net_do ip -n "$1" link set eth0 up
}
add_host "$ctl_ns" "$ctl_ip"
for i in $(seq 1 "$hosts"); do add_host "$(host_ns "$i")" "$(host_ip "$i")"; done

# --- munge: our own key and socket, in the machine's namespace (the socket is a file) ------------
start_munged || die "munged did not start; see $state/munge/munged.log"

# --- slurm.conf from the template ----------------------------------------------------------------
# The hardware line as slurmd sees it (every namespace sees the machine's CPUs), without NodeName
# and RealMemory (memory is not a consumable resource here: CR_CPU).
hw=$(slurmd -C | head -n 1 | sed -E -e 's/^NodeName=[^ ]+ //' -e 's/ RealMemory=[0-9]+//')
case "$hw" in CPUs=*) ;; *) die "unexpected 'slurmd -C' output: $hw" ;; esac
sed -e "s|@CTLD_HOST@|$ctl_ns|g" -e "s|@CTLD_ADDR@|$ctl_ip|g" -e "s|@STATE@|$state|g" \
    -e "s|@CTLD_PORT@|$ctld_port|g" -e "s|@SLURMD_PORT@|$slurmd_port|g" -e "s|@USER@|$(id -un)|g" \
    -e "s|@NODE_NAMES@|h[1-$hosts]|g" -e "s|@NODE_HOSTNAMES@|$name-h[1-$hosts]|g" \
    -e "s|@NODE_ADDRS@|$net.[11-$((10 + hosts))]|g" -e "s|@NODE_HW@|$hw|g" \
    -e "s|@FIRST_JOB_ID@|$(( $(date +%s) % 50000000 + 1000 ))|g" \
    "$here/slurm-netns.conf.in" > "$conf"

# --- daemons, each host's in its namespace with its own hostname -----------------------------------
# `nsenter --net` joins the host's network namespace and nothing else (`ip netns exec` would also
# remount /sys, hiding /sys/fs/cgroup, without which slurmd does not start); `unshare --uts` gives
# the host its own hostname (slurmd finds its node by it, slurmctld checks it against SlurmctldHost).
# The daemons fork into the background and keep both namespaces, and so does every job step they
# start. -c: forget the jobs and node states of an earlier cluster in this folder. Each daemon's pid
# and start time are recorded once it has written its pid file: the stop script signals only those.
rm -f "$state/slurmctld.pid" "$state"/slurmd-h*.pid
# shellcheck disable=SC2016  # expanded by the controller's sh: $0 hostname, $1 slurm.conf
nsenter --net="/run/netns/$ctl_ns" unshare --uts sh -c 'hostname "$0" && slurmctld -f "$1" -c' "$ctl_ns" "$conf" \
    && record_daemon slurmctld "$state/slurmctld.pid" || die "slurmctld did not start; see $state/slurmctld.log"
for i in $(seq 1 "$hosts"); do
    ns=$(host_ns "$i")
    mkdir -p "$state/slurmd-h$i"
    # shellcheck disable=SC2016  # $0 hostname, $1 slurm.conf (netns-host.sh return starts it the same way)
    nsenter --net="/run/netns/$ns" unshare --uts sh -c 'hostname "$0" && slurmd -f "$1"' "$ns" "$conf" \
        && record_daemon "slurmd-h$i" "$state/slurmd-h$i.pid" || die "slurmd did not start on $ns; see $state/slurmd-h$i.log"
done

# Wait until every node is idle (its slurmd registered with slurmctld over the bridge).
deadline=$((t0 + timeout))
until [ "$(sinfo -h -N -o '%T' 2>/dev/null | grep -cx 'idle')" = "$hosts" ]; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
        echo "start-netns-cluster: not all $hosts nodes became idle within ${timeout}s:" >&2
        sinfo -N -l >&2 || true
        tail -n 20 "$state/slurmctld.log" "$state"/slurmd-h*.log >&2 || true
        exit 1
    fi
    sleep 0.5
done
echo "start-netns-cluster: $hosts hosts idle after $(( $(date +%s) - t0 ))s on bridge $bridge ($net.0/24; state in $state)" >&2
printf 'export SLURM_CONF=%q\n' "$conf"
