#!/usr/bin/env bash
# Several nodes from a hostfile (see launch/hostfile.example), one rank per slot:
#   launch/multi-node.sh HOSTFILE CONFIG [--set key=value ...]
#   e.g. SUBNET=10.0.0.0/16 IFACE=eth0 launch/multi-node.sh launch/hostfile.example configs/wikitext103.yaml
#
# Set SUBNET (CIDR of the cluster network) and IFACE (its interface name) so that MPI and
# NCCL use that network only; without them Open MPI and NCCL try every interface and can
# hang on one a peer cannot reach (docker0, virbr0, ...). Tested for real on one machine
# with two network namespaces as hosts: launch/multinode-netns.sh (tests/multinode.rs).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
hostfile="${1:?usage: launch/multi-node.sh HOSTFILE CONFIG [--set key=value ...]}"
config="${2:?usage: launch/multi-node.sh HOSTFILE CONFIG [--set key=value ...]}"
shift 2
# A config path given relative to where the user stands still works after the cd below.
if [ -f "$config" ]; then config="$(cd "$(dirname "$config")" && pwd)/$(basename "$config")"; fi
ranks=$(awk '!/^#/ && NF { for (i = 1; i <= NF; i++) if ($i ~ /^slots=/) { split($i, s, "="); n += s[2] } } END { print n }' "$hostfile")
net=()
if [ -n "${SUBNET:-}" ]; then
  net+=(--mca btl_tcp_if_include "$SUBNET" --mca oob_tcp_if_include "$SUBNET")
fi
if [ -n "${IFACE:-}" ]; then
  export NCCL_SOCKET_IFNAME="$IFACE"   # NCCL bootstrap and socket transport
fi
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"  # INFO prints the transports NCCL picked
cd "$ROOT"
run_job "${MPIRUN[@]}" -n "$ranks" --hostfile "$hostfile" --map-by ppr:"$(awk '!/^#/ && NF { for (i = 1; i <= NF; i++) if ($i ~ /^slots=/) { split($i, s, "="); print s[2]; exit } }' "$hostfile")":node \
  --bind-to none --mca btl tcp,vader,self "${net[@]}" \
  -x NCCL_SOCKET_IFNAME -x NCCL_IB_DISABLE -x NCCL_DEBUG \
  "$BIN_RELEASE" --config "$config" "$@"
