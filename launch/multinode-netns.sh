#!/usr/bin/env bash
# A real 2-node MPI launch on one machine: two network namespaces stand in for two hosts
# (launch/netns-hosts.sh), Open MPI's rsh launcher starts the second host's daemon
# through launch/netns-rsh.sh instead of ssh, and the ranks exchange gradients over TCP
# on the veth pair between them. Used by tests/multinode.rs; needs root.
#
#   launch/multinode-netns.sh [algpt2-ddp args...]    (default: --config configs/quickstart.yaml)
#
# ALGPT2_BIN picks the binary (default target/release/algpt2-ddp). The namespaces are
# brought up first and removed on exit (ALGPT2_NETNS_KEEP=1 leaves them up). Runs are
# serialized with a lock: the namespace names are fixed.
#
# ---- On a real cluster --------------------------------------------------------------
# The same mpirun line works across machines with ssh as the agent (passwordless ssh
# between nodes, the same binary path and the same run/cache directory on a shared
# filesystem: rank 0 builds the token cache while the others wait at a barrier):
#
#   mpirun -n 16 --hostfile hosts --map-by ppr:8:node \
#       --mca btl tcp,vader,self \
#       --mca btl_tcp_if_include 10.0.0.0/16 --mca oob_tcp_if_include 10.0.0.0/16 \
#       -x NCCL_SOCKET_IFNAME -x NCCL_IB_DISABLE -x NCCL_DEBUG \
#       target/release/algpt2-ddp --config configs/wikitext103.yaml
#
# The network variables that matter (an interface name or a CIDR subnet, the same on
# every node):
#   OMPI_MCA_btl_tcp_if_include=SUBNET|IFACE  MPI traffic (the gradient all-reduce on CPU)
#                                             only on the cluster network; otherwise Open
#                                             MPI tries every interface (docker0, virbr0,
#                                             ...) and can hang on one the peer cannot reach.
#   OMPI_MCA_oob_tcp_if_include=SUBNET|IFACE  the same for the launch/control channel
#                                             between mpirun and the remote daemons.
#   OMPI_MCA_btl=tcp,vader,self               TCP between nodes, shared memory (vader)
#                                             within a node, self for a rank to itself.
#   OMPI_MCA_plm_rsh_agent=ssh                how remote daemons are started (this script
#                                             substitutes launch/netns-rsh.sh).
#   NCCL_SOCKET_IFNAME=IFACE                  NCCL's bootstrap and socket transport
#                                             interface (GPU runs, dist.backend nccl/auto;
#                                             e.g. eth0, or ^docker0,lo to exclude).
#   NCCL_IB_DISABLE=1                         no InfiniBand/RoCE: NCCL uses TCP sockets
#                                             (set when the nodes have no working IB).
#   NCCL_DEBUG=INFO                           NCCL prints the transport and interfaces it chose.
#   GLOO_SOCKET_IFNAME, MASTER_ADDR/PORT      not used: ranks come from MPI, not torchrun.
# Environment reaches remote ranks only through `-x VAR` (mpirun) or the remote login
# shell: OMPI_MCA_* variables of mpirun are forwarded to the remote daemons by Open MPI
# itself.
# ---------------------------------------------------------------------------------------
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
source "$HERE/netns-hosts.sh"
BIN="${ALGPT2_BIN:-$ROOT/target/release/algpt2-ddp}"

if [ "$(id -u)" != 0 ]; then
    echo "multinode-netns: needs root (network namespaces)" >&2
    exit 1
fi
command -v mpirun >/dev/null || { echo "multinode-netns: mpirun not found" >&2; exit 1; }
[ -x "$BIN" ] || { echo "multinode-netns: no binary at $BIN (build it, or set ALGPT2_BIN)" >&2; exit 1; }
if [ $# -eq 0 ]; then set -- --config configs/quickstart.yaml; fi

# One run at a time: the namespaces and their addresses are fixed.
exec 9>"${ALGPT2_NETNS_LOCK:-/tmp/algpt2-netns.lock}"
flock -w 600 9 || { echo "multinode-netns: another run holds the lock" >&2; exit 1; }

work="$(mktemp -d /tmp/algpt2-multinode.XXXXXX)"
mpirun_pid=
cleanup() {
    # Interrupted: stop the job first (mpirun takes its ranks and the remote daemon down).
    if [ -n "$mpirun_pid" ] && kill -0 "$mpirun_pid" 2>/dev/null; then
        kill -TERM "$mpirun_pid" 2>/dev/null || true
        wait "$mpirun_pid" 2>/dev/null || true
    fi
    if [ "${ALGPT2_NETNS_KEEP:-0}" != 1 ]; then bash "$HERE/netns-hosts.sh" down || true; fi
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

bash "$HERE/netns-hosts.sh" up

cat >"$work/hostfile" <<HOSTS
$ALGPT2_IP1 slots=1
$ALGPT2_IP2 slots=1
HOSTS

# The two "hosts" share this machine's CPUs, but each daemon believes it has all of them
# and would bind its rank to core 0: both ranks on one core. A rankfile gives each host
# its own half of the CPUs instead, as two real machines would have (the trainer sizes
# its thread pool from its affinity). ALGPT2_NETNS_BIND=none leaves the ranks unbound.
cpus="$(nproc)"
bind=(--bind-to none)
if [ "${ALGPT2_NETNS_BIND:-split}" = split ] && [ "$cpus" -ge 2 ]; then
    half=$((cpus / 2))
    cat >"$work/rankfile" <<RANKS
rank 0=$ALGPT2_IP1 slot=0-$((half - 1))
rank 1=$ALGPT2_IP2 slot=$half-$((2 * half - 1))
RANKS
    bind=(--use-hwthread-cpus --rankfile "$work/rankfile")
fi

cd "$ROOT"
# mpirun runs inside host 1: it recognizes $ALGPT2_IP1 as its own address (rank 0 runs
# there, under mpirun itself), and its daemon on host 2 (started through the agent)
# connects back to it over the veth pair.
#   plm_rsh_agent          the ssh stand-in that enters host 2's namespace
#   plm_rsh_no_tree_spawn  mpirun starts every daemon itself (no daemon-to-daemon ssh)
#   btl tcp,self           ranks on different hosts talk TCP (vader, shared memory, would
#                          only serve ranks on the same host; there are none here)
#   *_tcp_if_include       only the veth subnet, for both MPI traffic and the control channel
#   --hostfile, -n 2       one rank per host (slots=1 each)
# In the background, so that INT/TERM reach the traps above at once.
ip netns exec "$ALGPT2_NS1" mpirun --allow-run-as-root \
    -n 2 --hostfile "$work/hostfile" "${bind[@]}" \
    --mca plm_rsh_agent "$HERE/netns-rsh.sh" \
    --mca plm_rsh_no_tree_spawn 1 \
    --mca btl tcp,self \
    --mca btl_tcp_if_include "$ALGPT2_SUBNET" \
    --mca oob_tcp_if_include "$ALGPT2_SUBNET" \
    "$BIN" "$@" &
mpirun_pid=$!
status=0
wait "$mpirun_pid" || status=$?
mpirun_pid=

# What crossed the veth pair: the gradient all-reduce and the launch traffic.
bytes() { ip netns exec "$1" cat "/sys/class/net/$2/statistics/tx_bytes"; }
echo "multinode-netns: veth traffic: $ALGPT2_IP1 sent $(bytes "$ALGPT2_NS1" "$ALGPT2_IF1") bytes," \
    "$ALGPT2_IP2 sent $(bytes "$ALGPT2_NS2" "$ALGPT2_IF2") bytes" >&2
exit "$status"
