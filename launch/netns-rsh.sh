#!/usr/bin/env bash
# An ssh stand-in for Open MPI's rsh launcher (--mca plm_rsh_agent THIS_FILE) that starts
# the remote daemon inside a network namespace made by launch/netns-hosts.sh instead of
# on another machine.
#
# Open MPI calls its agent the way it calls ssh:
#   AGENT [ssh options] HOST WORD...
# where the WORDs, joined with spaces, are one command line for the remote shell (it
# holds `;`, `export`, quoted MCA values). So, like ssh: skip the options, map HOST (an
# address from the hostfile, or a namespace name) to the namespace that owns it, and run
# the joined words there with `sh -c`. stdin, stdout, stderr and the environment pass
# through, as they do for ssh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/netns-hosts.sh"

# ssh options: those that take a value consume the next word too.
while [ $# -gt 0 ]; do
    case "$1" in
        --) shift; break ;;
        -[BbcDEeFIiJLlmOopQRSWw]) shift 2 ;;
        -?*) shift ;;
        *) break ;;
    esac
done
if [ $# -lt 2 ]; then
    echo "netns-rsh: usage: $0 [ssh options] HOST COMMAND..." >&2
    exit 255
fi
host="$1"
shift

case "$host" in
    "$ALGPT2_IP1" | "$ALGPT2_NS1") ns="$ALGPT2_NS1" link="$ALGPT2_IF1" ;;
    "$ALGPT2_IP2" | "$ALGPT2_NS2") ns="$ALGPT2_NS2" link="$ALGPT2_IF2" ;;
    "$ALGPT2_IP3" | "$ALGPT2_NS3") ns="$ALGPT2_NS3" link="$ALGPT2_IF3" ;;
    *)
        echo "netns-rsh: unknown host '$host' (known: $ALGPT2_IP1, $ALGPT2_IP2, $ALGPT2_IP3)" >&2
        exit 255
        ;;
esac
# Entering a namespace needs no network, but ssh to a host whose link is down does: a
# host cut off (its link taken down) fails here as ssh would.
if ! ip -n "$ns" link show "$link" 2>/dev/null | grep -q LOWER_UP; then
    echo "netns-rsh: ssh: connect to host $host port 22: Network is unreachable (its link $link is down)" >&2
    exit 255
fi
echo "netns-rsh: starting on $host in namespace $ns" >&2
# ssh's exit status is the remote command's, 255 for its own failures.
exec ip netns exec "$ns" sh -c "$*"
