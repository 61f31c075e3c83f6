#!/usr/bin/env bash
# Two simulated "hosts" on one machine, for testing multi-node launches without a cluster:
# two network namespaces joined by a veth pair, each with its loopback up.
#
#   launch/netns-hosts.sh up       create them (idempotent: repairs a half-made setup)
#   launch/netns-hosts.sh down     remove them (idempotent; deleting a namespace deletes its veth end)
#   launch/netns-hosts.sh status   show what exists
#
#   host 1: namespace $ALGPT2_NS1 (algpt2-n1), $ALGPT2_IF1 (algpt2-v1) = $ALGPT2_IP1/$ALGPT2_PREFIXLEN (10.77.0.1/24)
#   host 2: namespace $ALGPT2_NS2 (algpt2-n2), $ALGPT2_IF2 (algpt2-v2) = $ALGPT2_IP2/$ALGPT2_PREFIXLEN (10.77.0.2/24)
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

down() {
    local ns
    for ns in "$ALGPT2_NS1" "$ALGPT2_NS2"; do
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
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
