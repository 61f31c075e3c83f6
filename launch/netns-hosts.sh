#!/usr/bin/env bash
# Two simulated "hosts" on one machine, for testing multi-node launches without a cluster:
# two network namespaces joined by a veth pair, each with its loopback up.
#
#   launch/netns-hosts.sh up       create them (idempotent: repairs a half-made setup)
#   launch/netns-hosts.sh up 3     three hosts instead, each joined by a veth pair to a
#                                  bridge in a fourth namespace (for losing one of them)
#   launch/netns-hosts.sh down     remove them (idempotent; deleting a namespace deletes its veth end)
#   launch/netns-hosts.sh status   show what exists
#
#   host 1: namespace $ALGPT2_NS1 (algpt2-n1), $ALGPT2_IF1 (algpt2-v1) = $ALGPT2_IP1/$ALGPT2_PREFIXLEN (10.77.0.1/24)
#   host 2: namespace $ALGPT2_NS2 (algpt2-n2), $ALGPT2_IF2 (algpt2-v2) = $ALGPT2_IP2/$ALGPT2_PREFIXLEN (10.77.0.2/24)
#   host 3 (up 3 only): namespace $ALGPT2_NS3 (algpt2-n3), $ALGPT2_IF3 (algpt2-v3) = $ALGPT2_IP3 (10.77.0.3/24);
#          the bridge algpt2-br in namespace $ALGPT2_NSB (algpt2-nb), its ports algpt2-b1..3
#
# A host is cut off by taking its link down (`ip -n algpt2-n3 link set algpt2-v3 down`):
# launch/netns-rsh.sh then refuses it as ssh refuses an unreachable host.
#
# The namespaces share the machine's filesystem, processes and hostname: only the network
# is separate. Nothing is routed out of them: the veth pair is their only link.
# Needs root (or CAP_SYS_ADMIN + CAP_NET_ADMIN) and iproute2.
# The variables can be overridden from the environment; launch/netns-rsh.sh and
# launch/multinode-netns.sh read the same ones (this file defines them when sourced).
ALGPT2_NS1="${ALGPT2_NS1:-algpt2-n1}"
ALGPT2_NS2="${ALGPT2_NS2:-algpt2-n2}"
ALGPT2_IF1="${ALGPT2_IF1:-algpt2-v1}"
ALGPT2_IF2="${ALGPT2_IF2:-algpt2-v2}"
ALGPT2_IP1="${ALGPT2_IP1:-10.77.0.1}"
ALGPT2_IP2="${ALGPT2_IP2:-10.77.0.2}"
ALGPT2_NS3="${ALGPT2_NS3:-algpt2-n3}"
ALGPT2_IF3="${ALGPT2_IF3:-algpt2-v3}"
ALGPT2_IP3="${ALGPT2_IP3:-10.77.0.3}"
ALGPT2_NSB="${ALGPT2_NSB:-algpt2-nb}"
ALGPT2_PREFIXLEN="${ALGPT2_PREFIXLEN:-24}"
ALGPT2_SUBNET="${ALGPT2_SUBNET:-10.77.0.0/24}"

# Sourced: only the variables above.
if [ "${BASH_SOURCE[0]}" != "$0" ]; then return 0; fi

set -euo pipefail

ns_exists() { ip netns list | awk '{print $1}' | grep -qx -- "$1"; }

up() {
    local ns
    for ns in "$ALGPT2_NS1" "$ALGPT2_NS2"; do
        ns_exists "$ns" || ip netns add "$ns"
        ip -n "$ns" link set lo up
    done
    # The pair is made inside host 1 with its peer placed straight into host 2: no
    # interface ever appears in the machine's own namespace.
    if ! ip -n "$ALGPT2_NS1" link show "$ALGPT2_IF1" >/dev/null 2>&1 \
        || ! ip -n "$ALGPT2_NS2" link show "$ALGPT2_IF2" >/dev/null 2>&1; then
        ip -n "$ALGPT2_NS1" link del "$ALGPT2_IF1" 2>/dev/null || true
        ip -n "$ALGPT2_NS2" link del "$ALGPT2_IF2" 2>/dev/null || true
        ip -n "$ALGPT2_NS1" link add "$ALGPT2_IF1" type veth peer name "$ALGPT2_IF2" netns "$ALGPT2_NS2"
    fi
    ip -n "$ALGPT2_NS1" addr replace "$ALGPT2_IP1/$ALGPT2_PREFIXLEN" dev "$ALGPT2_IF1"
    ip -n "$ALGPT2_NS2" addr replace "$ALGPT2_IP2/$ALGPT2_PREFIXLEN" dev "$ALGPT2_IF2"
    ip -n "$ALGPT2_NS1" link set "$ALGPT2_IF1" up
    ip -n "$ALGPT2_NS2" link set "$ALGPT2_IF2" up
    # A veth end reports carrier only once both ends are up: wait for it (a few ms).
    local i
    for i in $(seq 50); do
        if ip -n "$ALGPT2_NS1" link show "$ALGPT2_IF1" | grep -q LOWER_UP \
            && ip -n "$ALGPT2_NS2" link show "$ALGPT2_IF2" | grep -q LOWER_UP; then
            echo "netns-hosts: up: $ALGPT2_NS1 ($ALGPT2_IP1) <-> $ALGPT2_NS2 ($ALGPT2_IP2)" >&2
            return 0
        fi
        sleep 0.1
    done
    echo "netns-hosts: the veth pair $ALGPT2_IF1/$ALGPT2_IF2 did not come up" >&2
    return 1
}

# Three hosts on a bridge: each host's veth end keeps its two-host name and address, its
# peer is a port of the bridge in a namespace of its own (so, again, nothing appears in
# the machine's namespace). Rebuilt from scratch unless every piece is there.
up3() {
    local i ns ifname complete=1
    local nss=("$ALGPT2_NS1" "$ALGPT2_NS2" "$ALGPT2_NS3") ifs=("$ALGPT2_IF1" "$ALGPT2_IF2" "$ALGPT2_IF3")
    local ips=("$ALGPT2_IP1" "$ALGPT2_IP2" "$ALGPT2_IP3")
    ip -n "$ALGPT2_NSB" link show algpt2-br >/dev/null 2>&1 || complete=0
    for i in 0 1 2; do
        ip -n "${nss[$i]}" link show "${ifs[$i]}" >/dev/null 2>&1 || complete=0
        ip -n "$ALGPT2_NSB" link show "algpt2-b$((i + 1))" >/dev/null 2>&1 || complete=0
    done
    if [ "$complete" = 0 ]; then
        down 2>/dev/null
        for ns in "${nss[@]}" "$ALGPT2_NSB"; do ip netns add "$ns"; done
        ip -n "$ALGPT2_NSB" link add algpt2-br type bridge
        for i in 0 1 2; do
            ip -n "${nss[$i]}" link add "${ifs[$i]}" type veth peer name "algpt2-b$((i + 1))" netns "$ALGPT2_NSB"
            ip -n "$ALGPT2_NSB" link set "algpt2-b$((i + 1))" master algpt2-br
        done
    fi
    for ns in "${nss[@]}" "$ALGPT2_NSB"; do ip -n "$ns" link set lo up; done
    ip -n "$ALGPT2_NSB" link set algpt2-br up
    for i in 0 1 2; do
        ip -n "$ALGPT2_NSB" link set "algpt2-b$((i + 1))" up
        ip -n "${nss[$i]}" addr replace "${ips[$i]}/$ALGPT2_PREFIXLEN" dev "${ifs[$i]}"
        ip -n "${nss[$i]}" link set "${ifs[$i]}" up
    done
    for _ in $(seq 50); do
        complete=1
        for i in 0 1 2; do
            ip -n "${nss[$i]}" link show "${ifs[$i]}" | grep -q LOWER_UP || complete=0
        done
        if [ "$complete" = 1 ]; then
            echo "netns-hosts: up: $ALGPT2_NS1 ($ALGPT2_IP1), $ALGPT2_NS2 ($ALGPT2_IP2), $ALGPT2_NS3 ($ALGPT2_IP3) on a bridge in $ALGPT2_NSB" >&2
            return 0
        fi
        sleep 0.1
    done
    echo "netns-hosts: the three hosts' links did not come up" >&2
    return 1
}

down() {
    local ns
    # The third host and the bridge exist only after `up 3`.
    for ns in "$ALGPT2_NS1" "$ALGPT2_NS2" "$ALGPT2_NS3" "$ALGPT2_NSB"; do
        if ns_exists "$ns"; then ip netns del "$ns"; fi
    done
    echo "netns-hosts: down" >&2
}

status() {
    local ns
    for ns in "$ALGPT2_NS1" "$ALGPT2_NS2"; do
        if ns_exists "$ns"; then
            echo "$ns:"
            ip -n "$ns" -brief addr show
        else
            echo "$ns: absent"
        fi
    done
    for ns in "$ALGPT2_NS3" "$ALGPT2_NSB"; do
        if ns_exists "$ns"; then
            echo "$ns:"
            ip -n "$ns" -brief addr show
        fi
    done
}

case "${1:-}" in
    up)
        case "${2:-2}" in
            2) up ;;
            3) up3 ;;
            *) echo "usage: $0 up [2|3]" >&2; exit 2 ;;
        esac
        ;;
    down) down ;;
    status) status ;;
    *) echo "usage: $0 up [2|3]|down|status" >&2; exit 2 ;;
esac
