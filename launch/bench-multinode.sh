#!/usr/bin/env bash
# Data-parallel training across two "hosts" on a shaped link: ours (MPI all-reduce, with and
# without overlapping the exchange with backward) beside PyTorch DDP over gloo, one rank
# per host, on each link setting in turn. Needs root.
#
#   launch/bench-multinode.sh [--rates "unshaped,10gbit,1gbit"] [--delay 0.1ms]
#                             [--steps N] [--variant gpt2|sharing|algpt2] [--out DIR]
#                             [--row-timeout S]
#
#   --rates        comma-separated link settings: `unshaped` (the bare veth pair, no qdisc)
#                  or a rate as tc writes it (1gbit, 10gbit, 2.5gbit, 500mbit)
#   --delay        one-way delay added on each veth end of a shaped link (RTT = 2 x delay;
#                  0 for none). Needs sch_netem: on a kernel without it the delay is left
#                  out with a warning (the table says so) and the rows run at the veth's own
#                  latency
#   --steps        timed steps per row (default 20); 3 warm-up steps more are run and left
#                  out of the timing, as launch/bench.sh does
#   --variant      the model's switches: gpt2 (the default: own blocks, no factorization),
#                  sharing (one shared block), algpt2 (sharing + factorized, E=128)
#   --out          where logs, the token cache, results.tsv and table.md go
#                  (default target/bench-multinode)
#   --row-timeout  seconds one row may take before it is killed (default 600 + 30 x steps)
#
# The hosts: the two network namespaces of launch/netns-hosts.sh joined by a veth pair,
# brought up here and ALWAYS removed on exit (also on Ctrl-C or a failed row), with their
# qdiscs; runs are serialized with launch/multinode-netns.sh's lock (ALGPT2_NETNS_LOCK,
# default /tmp/algpt2-netns.lock), as they share the namespace names.
#
# The link: a `tbf` qdisc on both veth ends (egress of each: each direction shaped alone, a
# full-duplex link). tc counts a frame as its IP packet + 14-byte Ethernet header, a wire
# also carries preamble, inter-frame gap and FCS (24 bytes more), so the tbf rate is the
# nominal rate x (MTU+14)/(MTU+38): TCP then gets what it gets on a real link (~941 Mbit/s on
# 1 GbE at MTU 1500). Bucket (burst): rate x 256 us, at least 128 KiB (veth hands tc GSO
# packets of up to 64 KiB; smaller buckets split them and cost throughput). Queue (latency):
# 5 ms (2 ms dropped ~0.8% of the packets of the training's bursts and cost TCP ~1.5%).
# With --delay and sch_netem: `netem delay D` at the root and the tbf as its child
# (tc-netem(8)'s example; not run here: this project's kernel has no sch_netem). Before the
# rows of each setting the link is measured: TCP goodput each way (Python sockets, 1.5 s
# each) and the idle round trip (1-byte ping-pong). A veth pair moves data with the CPU: on
# a 2-core machine it carries only ~6-10 Gbit/s, so `10gbit` there is no slower than
# `unshaped` (the table shows what was achieved).
#
# The model (the issue's shapes): GPT-2 (or --variant's), 8 layers, H=512, 8 heads,
# V=16,384, seq 256, micro-batch 8 per rank, fp32, dropout 0.1, 1 thread
# per rank (OMP_NUM_THREADS=1), ranks bound to the two halves of this machine's CPUs
# (ALGPT2_NETNS_BIND=none: unbound), on the synthetic corpus (its BPE stops at ~1,400
# tokens; the model's tables have V=16,384 rows all the same). `algpt2-ddp prepare` builds
# the token cache once under --out; every row reads it.
#
# Rows, for each link setting:
#   ours overlap=false  mpirun across the namespaces as launch/multinode-netns.sh does
#   ours overlap=true   (--set dist.overlap=BOOL; ALGPT2_BENCH_NO_OVERLAP_FLAG=1 leaves the
#                       flag out, for a binary that does not know the key yet: then the two
#                       rows are the same program)
#   PyTorch DDP         torchrun --nnodes 2 --nproc_per_node 1, one agent per namespace
#                       (static rendezvous at host 1), reference/algpt2.py bench, gloo,
#                       DDP's default buckets (25 MB, first 1 MB)
# Ours: `train` (not `bench`: the exchange's train/comm_ms and train/comm_exposed_ms are in
# metrics.jsonl rows; "n/a" where the binary writes none), every step logged, the first 3
# left out; tokens/s of all ranks. PyTorch: its bench JSON (rank 0, all ranks' tokens).
# Output: the markdown table on stdout and in OUT/table.md; OUT/results.tsv; one log per
# row (named in any failure). Exit status 1 when any row failed (the others still run).
#
# Time: on 2 cores a row is ~20 s of start-up plus (steps + 3) x 6-10 s (1 thread per rank),
# so the defaults (3 links x 3 rows, 20 steps) take ~35 min; --steps 5 on two links, ~8 min.
#
# Environment: ALGPT2_BIN (default target/release/algpt2-ddp), ALGPT2_BENCH_NO_OVERLAP_FLAG,
# ALGPT2_NETNS_LOCK, ALGPT2_NETNS_BIND, and launch/netns-hosts.sh's ALGPT2_NS1/NS2, IF1/IF2,
# IP1/IP2, SUBNET.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
source "$HERE/netns-hosts.sh"
BIN="${ALGPT2_BIN:-$ROOT/target/release/algpt2-ddp}"
PY="$ROOT/.venv/bin/python"
TORCHRUN="$ROOT/.venv/bin/torchrun"
WARMUP=3  # ours: metrics rows left out; PyTorch's bench leaves out as many (eager)

die() { echo "bench-multinode: $*" >&2; exit 2; }
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2; exit 2; }

rates="unshaped,10gbit,1gbit"
delay="0.1ms"
steps=20
variant=gpt2
out="$ROOT/target/bench-multinode"
row_timeout=
while [ $# -gt 0 ]; do
    case "$1" in
        --rates) [ $# -ge 2 ] || usage; rates="$2"; shift 2 ;;
        --delay) [ $# -ge 2 ] || usage; delay="$2"; shift 2 ;;
        --steps) [ $# -ge 2 ] || usage; steps="$2"; shift 2 ;;
        --variant) [ $# -ge 2 ] || usage; variant="$2"; shift 2 ;;
        --out) [ $# -ge 2 ] || usage; out="$2"; shift 2 ;;
        --row-timeout) [ $# -ge 2 ] || usage; row_timeout="$2"; shift 2 ;;
        -h | --help) usage ;;
        *) echo "bench-multinode: unknown argument '$1'" >&2; usage ;;
    esac
done
[[ "$steps" =~ ^[1-9][0-9]*$ ]] || die "--steps must be a positive integer, not '$steps'"
case "$variant" in
    gpt2) switches=(--set model.share_layers=false --set model.embedding_size=null) ;;
    sharing) switches=(--set model.share_layers=true --set model.embedding_size=null) ;;
    algpt2) switches=(--set model.share_layers=true --set model.embedding_size=128) ;;
    *) die "--variant must be gpt2, sharing or algpt2, not '$variant'" ;;
esac
row_timeout="${row_timeout:-$((600 + 30 * steps))}"
[[ "$row_timeout" =~ ^[1-9][0-9]*$ ]] || die "--row-timeout must be a positive integer (seconds)"
[[ "$delay" =~ ^(0|[0-9]+(\.[0-9]+)?(s|ms|us))$ ]] || die "--delay must look like 0, 0.1ms, 100us or 1s, not '$delay'"
IFS=',' read -r -a links <<<"${rates// /}"
[ "${#links[@]}" -gt 0 ] || die "--rates is empty"
for link in "${links[@]}"; do
    [[ "$link" == unshaped || "$link" =~ ^[0-9]+(\.[0-9]+)?(k|m|g)bit$ ]] \
        || die "unknown link '$link' in --rates (unshaped, or a rate such as 1gbit, 10gbit, 500mbit)"
done

[ "$(id -u)" = 0 ] || die "needs root (network namespaces and tc)"
for tool in ip tc mpirun flock timeout taskset; do
    command -v "$tool" >/dev/null || die "$tool not found"
done
[ -x "$BIN" ] || die "no binary at $BIN (build it, or set ALGPT2_BIN)"
[ -x "$PY" ] && [ -x "$TORCHRUN" ] || die "no venv at $ROOT/.venv with torchrun (launch/setup.sh makes it)"
mkdir -p "$out"
out="$(cd "$out" && pwd)"

# One run at a time: the namespaces and their addresses are fixed (multinode-netns.sh's lock).
exec 9>"${ALGPT2_NETNS_LOCK:-/tmp/algpt2-netns.lock}"
if ! flock -n 9; then
    echo "bench-multinode: waiting for the lock ${ALGPT2_NETNS_LOCK:-/tmp/algpt2-netns.lock} (another netns run)" >&2
    flock -w 600 9 || die "another run held the lock for 600 s"
fi

# --- processes and clean-up ---------------------------------------------------------
# Every run is `timeout ... CMD` in the background: timeout makes itself a process group
# leader, so one kill of the group reaches mpirun, torchrun and their children.
live=()
stop_live() {
    local p i
    [ "${#live[@]}" -gt 0 ] || return 0
    for p in "${live[@]}"; do kill -TERM -- "-$p" 2>/dev/null || true; done
    for i in $(seq 30); do
        local alive=0
        for p in "${live[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
        [ "$alive" = 0 ] && break
        sleep 0.5
    done
    for p in "${live[@]}"; do kill -KILL -- "-$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
    live=()
}
# Anything still running inside our namespaces (e.g. a remote daemon or rank that left the
# row's process group: Open MPI's rsh launcher gives its agent a group of its own). Between
# rows nothing of ours runs there; we hold the lock, so nothing of anyone else's either.
kill_ns_pids() {
    local ns pids
    for ns in "$ALGPT2_NS1" "$ALGPT2_NS2"; do
        ip netns list | awk '{print $1}' | grep -qx -- "$ns" || continue
        pids="$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ' || true)"
        [ -n "${pids// }" ] || continue
        echo "bench-multinode: processes left in $ns: $pids- ending them" >&2
        # shellcheck disable=SC2086
        kill -TERM $pids 2>/dev/null || true
        sleep 1
        pids="$(ip netns pids "$ns" 2>/dev/null || true)"
        # shellcheck disable=SC2086
        [ -z "$pids" ] || kill -KILL $pids 2>/dev/null || true
    done
}
unshape() {
    ip -n "$ALGPT2_NS1" link show "$ALGPT2_IF1" >/dev/null 2>&1 \
        && ip netns exec "$ALGPT2_NS1" tc qdisc del dev "$ALGPT2_IF1" root 2>/dev/null || true
    ip -n "$ALGPT2_NS2" link show "$ALGPT2_IF2" >/dev/null 2>&1 \
        && ip netns exec "$ALGPT2_NS2" tc qdisc del dev "$ALGPT2_IF2" root 2>/dev/null || true
}
cleanup() {
    local status=$?
    trap - EXIT INT TERM
    stop_live
    kill_ns_pids
    unshape
    bash "$HERE/netns-hosts.sh" down || true
    exit "$status"
}
trap cleanup EXIT
trap 'echo "bench-multinode: interrupted" >&2; exit 130' INT
trap 'echo "bench-multinode: terminated" >&2; exit 143' TERM

# Runs the given command lines (one per argument, each a bash array name) under timeout,
# in the background; returns the first non-zero status (124: timed out), killing the
# others when one fails (a DDP peer would otherwise wait for its partner until timeout).
run_group() {
    local logs=() names=("$@") pids=() name
    live=()
    for name in "${names[@]}"; do
        local -n cmd="$name"
        local -n logf="${name}_log"
        timeout --kill-after=20 "$row_timeout" "${cmd[@]}" </dev/null >"$logf" 2>&1 &
        live+=($!)
        pids+=($!)
        logs+=("$logf")
        unset -n cmd logf
    done
    local status=0 left="${#pids[@]}" i
    local done_=()
    while [ "$left" -gt 0 ]; do
        for i in "${!pids[@]}"; do
            [ -z "${done_[$i]:-}" ] || continue
            if ! kill -0 "${pids[$i]}" 2>/dev/null; then
                local s=0
                wait "${pids[$i]}" || s=$?
                done_[i]=1
                left=$((left - 1))
                if [ "$s" -ne 0 ] && [ "$status" = 0 ]; then
                    status=$s
                    failed_log="${logs[$i]}"
                    stop_live  # the peers of a failed process have nothing left to do
                fi
            fi
        done
        [ "$left" -gt 0 ] && sleep 0.5
    done
    live=()
    kill_ns_pids
    return "$status"
}

# --- the link ---------------------------------------------------------------------------
bash "$HERE/netns-hosts.sh" up
unshape
mtu="$(ip netns exec "$ALGPT2_NS1" cat "/sys/class/net/$ALGPT2_IF1/mtu")"

netem=0
if [ "$delay" != 0 ]; then
    if ip netns exec "$ALGPT2_NS1" tc qdisc add dev "$ALGPT2_IF1" root netem delay "$delay" 2>/dev/null; then
        netem=1
    else
        echo "bench-multinode: WARNING: --delay $delay is not applied: this kernel has no sch_netem" \
            "(CONFIG_NET_SCH_NETEM); shaped links get the rate only, at the veth's own latency" >&2
    fi
    unshape
fi

# tbf parameters for a nominal rate: prints "RATE_BIT BURST_BYTES".
tbf_params() {
    "$PY" - "$1" "$mtu" <<'PY'
import re, sys
m = re.fullmatch(r"([0-9.]+)([kmg])bit", sys.argv[1])
bits = float(m.group(1)) * {"k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)]
mtu = int(sys.argv[2])
rate = bits * (mtu + 14) / (mtu + 38)   # tc counts frames without preamble, gap and FCS
burst = max(128 * 1024, int(bits / 8 * 256e-6))
print(int(rate), burst)
PY
}

# Applies link setting $1 on both veth ends; sets qdisc_desc.
shape() {
    unshape
    qdisc_desc="none (bare veth)"
    [ "$1" = unshaped ] && return 0
    local rate burst pair ns dev
    read -r rate burst < <(tbf_params "$1")
    local tbf=(tbf rate "${rate}bit" burst "$burst" latency 5ms)
    for pair in "$ALGPT2_NS1 $ALGPT2_IF1" "$ALGPT2_NS2 $ALGPT2_IF2"; do
        read -r ns dev <<<"$pair"
        if [ "$netem" = 1 ]; then
            ip netns exec "$ns" tc qdisc add dev "$dev" root handle 1: netem delay "$delay" limit 100000
            ip netns exec "$ns" tc qdisc add dev "$dev" parent 1:1 handle 10: "${tbf[@]}"
        else
            ip netns exec "$ns" tc qdisc add dev "$dev" root "${tbf[@]}"
        fi
    done
    qdisc_desc="${tbf[*]}"
    [ "$netem" = 1 ] && qdisc_desc="netem delay $delay, then $qdisc_desc"
    return 0
}

cat >"$out/linkprobe.py" <<'PY'
# Link probe: `server HOST PORT` receives (once a ping-pong, then a bulk stream) and prints
# the goodput; `client HOST PORT SECONDS` pings 200 times, then streams for SECONDS.
import json, socket, sys, time
mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
if mode == "server":
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port))
    s.listen(4)
    print("ready", flush=True)
    c, _ = s.accept()
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        b = c.recv(1)
        if not b:
            break
        c.sendall(b)
    c.close()
    c, _ = s.accept()
    buf = bytearray(1 << 20)
    n, first, last = 0, None, None
    while True:
        k = c.recv_into(buf)
        if not k:
            break
        now = time.perf_counter()
        if first is None:
            first = now          # timing starts at the first byte: its bytes are not counted
        else:
            n += k
        last = now
    print(json.dumps({"bytes": n, "seconds": last - first, "gbit_s": 8 * n / (last - first) / 1e9}), flush=True)
else:
    for _ in range(200):
        try:
            c = socket.create_connection((host, port))
            break
        except OSError:
            time.sleep(0.05)
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    rtts = []
    for _ in range(200):
        t = time.perf_counter()
        c.sendall(b"x")
        c.recv(1)
        rtts.append(time.perf_counter() - t)
    c.close()
    rtts.sort()
    c = socket.create_connection((host, port))
    data, t = b"\0" * (4 << 20), time.perf_counter()
    while time.perf_counter() - t < float(sys.argv[4]):
        c.sendall(data)
    c.close()
    print(json.dumps({"rtt_ms": 1000 * rtts[len(rtts) // 2]}), flush=True)
PY

# Goodput from namespace $1 to $2 (at address $3) on the link now: sets probe_gbit and
# probe_rtt ("n/a" when the probe failed). Not in a subshell: the server is in $live.
probe_one() {
    local from="$1" to="$2" addr="$3" port="$4" tag="$5"
    local slog="$out/logs/probe-$tag-server.log" clog="$out/logs/probe-$tag-client.log"
    timeout 30 ip netns exec "$to" "$PY" "$out/linkprobe.py" server "$addr" "$port" </dev/null >"$slog" 2>&1 &
    local spid=$!
    live=("$spid")
    local i
    for i in $(seq 50); do grep -q ready "$slog" 2>/dev/null && break; sleep 0.1; done
    local ok=1
    timeout 30 ip netns exec "$from" "$PY" "$out/linkprobe.py" client "$addr" "$port" 1.5 </dev/null >"$clog" 2>&1 || ok=0
    wait "$spid" 2>/dev/null || ok=0
    live=()
    kill_ns_pids
    if [ "$ok" = 0 ]; then
        echo "bench-multinode: link probe $tag failed; logs: $slog $clog" >&2
        probe_gbit=n/a probe_rtt=n/a
        return 0
    fi
    read -r probe_gbit probe_rtt < <("$PY" -c 'import json, sys
last = lambda p: json.loads([l for l in open(p) if l.startswith("{")][-1])
print("%.3f %.3f" % (last(sys.argv[1])["gbit_s"], last(sys.argv[2])["rtt_ms"]))' "$slog" "$clog" 2>/dev/null || echo "n/a n/a")
}

# --- data and config ---------------------------------------------------------------------
mkdir -p "$out/logs" "$out/runs"
cd "$ROOT"
# nproc honours OMP_NUM_THREADS: count the CPUs before it is set.
cpus="$(env -u OMP_NUM_THREADS nproc)"
export OMP_NUM_THREADS=1
overlap_flag() { [ "${ALGPT2_BENCH_NO_OVERLAP_FLAG:-0}" = 1 ] || printf '%s\n' --set "dist.overlap=$1"; }
sets=(--config configs/quickstart.yaml
      --set model.n_layer=8 --set model.n_embd=512 --set model.n_head=8
      --set model.vocab_size=16384 --set tokenizer.vocab_size=16384 --set model.n_positions=256
      "${switches[@]}" --set model.dropout=0.1
      --set train.seq_len=256 --set train.micro_batch_size=8 --set train.grad_accum_steps=1
      --set train.precision=fp32 --set device=cpu --set wandb.mode=disabled
      --set "data.cache_dir=$out/cache" --set data.valid=null --set data.test=null
      --set "out_dir=$out/runs" --set "train.max_steps=$((steps + WARMUP))"
      --set train.log_interval=1 --set train.eval_interval=0 --set train.eval_steps=1
      --set train.save_interval=0 --set optim.warmup_steps=0 --set checkpoint.resume=none
      --set checkpoint.keep_last=1)

echo "bench-multinode: preparing the token cache under $out/cache" >&2
prep_started=$(date +%s.%N)
if ! timeout 900 "$BIN" prepare "${sets[@]}" </dev/null >"$out/logs/prepare.log" 2>&1; then
    echo "bench-multinode: prepare failed; the log's end ($out/logs/prepare.log):" >&2
    tail -n 15 "$out/logs/prepare.log" >&2
    exit 1
fi
prep_s=$("$PY" -c "import sys; print('%.1f' % (float(sys.argv[2]) - float(sys.argv[1])))" "$prep_started" "$(date +%s.%N)")
cache=$(grep -oE 'token cache: [^ ]+' "$out/logs/prepare.log" | head -1 | cut -d' ' -f3 || true)
[ -n "$cache" ] && [ -f "$cache/train.bin" ] || { echo "bench-multinode: no token cache in $out/logs/prepare.log" >&2; exit 1; }
echo "bench-multinode: token cache $cache (prepare took $prep_s s)" >&2

"$BIN" info "${sets[@]}" --json >"$out/info.json" 2>"$out/logs/info.log" \
    || { echo "bench-multinode: algpt2-ddp info failed ($out/logs/info.log)" >&2; exit 1; }
"$PY" - "$out/info.json" "$steps" "$cache/train.bin" "$out/spec.json" <<'PY'
import json, sys
info = json.load(open(sys.argv[1]))
t, o = info["config"]["train"], info["config"]["optim"]
spec = {"model": info["model"], "seq_len": t["seq_len"], "micro_batch_size": t["micro_batch_size"],
        "grad_accum_steps": t["grad_accum_steps"], "steps": int(sys.argv[2]), "lr": o["lr"],
        "weight_decay": o["weight_decay"], "grad_clip": o["grad_clip"], "threads": 1,
        "tokens": sys.argv[3], "device": "cpu", "mode": "fp32_eager", "pad_vocab": False}
json.dump(spec, open(sys.argv[4], "w"))
PY
params=$("$PY" -c 'import json,sys; print(format(json.load(open(sys.argv[1]))["parameters"], ","))' "$out/info.json" 2>/dev/null || true)

# Hosts' CPUs: each namespace gets its half, as two machines would (multinode-netns.sh's way).
half=$((cpus / 2))
bind=(--bind-to none)
set1=(); set2=()
bind_desc="ranks unbound"
if [ "${ALGPT2_NETNS_BIND:-split}" = split ] && [ "$cpus" -ge 2 ]; then
    cat >"$out/rankfile" <<RANKS
rank 0=$ALGPT2_IP1 slot=0-$((half - 1))
rank 1=$ALGPT2_IP2 slot=$half-$((2 * half - 1))
RANKS
    bind=(--use-hwthread-cpus --rankfile "$out/rankfile")
    set1=(taskset -c "0-$((half - 1))"); set2=(taskset -c "$half-$((2 * half - 1))")
    bind_desc="host 1 bound to CPUs 0-$((half - 1)), host 2 to CPUs $half-$((2 * half - 1))"
    [ "$half" = 1 ] && bind_desc="host 1 bound to CPU 0, host 2 to CPU 1"
fi
cat >"$out/hostfile" <<HOSTS
$ALGPT2_IP1 slots=1
$ALGPT2_IP2 slots=1
HOSTS

results="$out/results.tsv"   # link, trainer, tokens/s, step ms, comm ms, comm exposed ms, log, load
links_tsv="$out/links.tsv"   # link, qdisc, gbit 1->2, gbit 2->1, rtt ms
: >"$results"
: >"$links_tsv"
failed=0
row=0

ours_row() {  # $1 link, $2 overlap (true|false)
    local link="$1" ov="$2" name="ours-$1-overlap-$2"
    local run="$out/runs/$name"
    rm -rf "$run"
    local -a ours flag
    mapfile -t flag < <(overlap_flag "$ov")
    ours=(ip netns exec "$ALGPT2_NS1" mpirun --allow-run-as-root
          -n 2 --hostfile "$out/hostfile" "${bind[@]}"
          --mca plm_rsh_agent "$HERE/netns-rsh.sh" --mca plm_rsh_no_tree_spawn 1
          --mca btl tcp,self --mca btl_tcp_if_include "$ALGPT2_SUBNET"
          --mca oob_tcp_if_include "$ALGPT2_SUBNET" -x OMP_NUM_THREADS
          "$BIN" "${sets[@]}" --set "run_name=$name" "${flag[@]}")
    local ours_log="$out/logs/$name.log"
    local label="algpt2-ddp overlap=$ov"
    [ "${#flag[@]}" = 0 ] && label="$label (flag omitted)"
    echo "bench-multinode: [$link] $label ..." >&2
    local status=0
    failed_log="$ours_log"
    run_group ours || status=$?
    if [ "$status" -ne 0 ]; then
        report_failure "$link" "$label" "$status" "$ours_log"
        printf '%s\t%s\tfailed\t\t\t\t%s\n' "$link" "$label" "$ours_log" >>"$results"
        return 0
    fi
    if ! "$PY" - "$run/metrics.jsonl" "$WARMUP" "$link" "$label" "$ours_log" >>"$results" <<'PY'
import json, sys
path, warmup, link, label, log = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
rows = [json.loads(l) for l in open(path) if l.strip()]
rows = [r for r in rows if "train/step_ms" in r][warmup:]
if not rows:
    sys.exit("no timed rows in " + path)
seconds = sum(r["train/step_ms"] / 1000 for r in rows)
tokens = sum(r["train/tokens_per_sec"] * r["train/step_ms"] / 1000 for r in rows)
def mean(key):
    v = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return "%.1f" % (sum(v) / len(v)) if v else "n/a"
print("\t".join([link, label, str(round(tokens / seconds)), "%.1f" % (1000 * seconds / len(rows)),
                 mean("train/comm_ms"), mean("train/comm_exposed_ms"), log]))
PY
    then
        report_failure "$link" "$label" parse "$ours_log"
        printf '%s\t%s\tfailed\t\t\t\t%s\n' "$link" "$label" "$ours_log" >>"$results"
    fi
    rm -rf "$run/checkpoints"  # ~0.4 GB each; metrics.jsonl and the rest stay
}

torch_row() {  # $1 link
    local link="$1" name="torch-$1"
    local port=$((29500 + row))
    row=$((row + 1))
    local common=(--nnodes 2 --nproc_per_node 1 --master_addr "$ALGPT2_IP1" --master_port "$port"
                  "$ROOT/reference/algpt2.py" bench "$out/spec.json")
    local -a t1 t2
    t1=(ip netns exec "$ALGPT2_NS1" env GLOO_SOCKET_IFNAME="$ALGPT2_IF1" OMP_NUM_THREADS=1
        "${set1[@]}" "$TORCHRUN" --node_rank 0 "${common[@]}")
    t2=(ip netns exec "$ALGPT2_NS2" env GLOO_SOCKET_IFNAME="$ALGPT2_IF2" OMP_NUM_THREADS=1
        "${set2[@]}" "$TORCHRUN" --node_rank 1 "${common[@]}")
    local t1_log="$out/logs/$name-host1.log" t2_log="$out/logs/$name-host2.log"
    local label="PyTorch DDP gloo"
    echo "bench-multinode: [$link] $label ..." >&2
    local status=0
    failed_log="$t1_log"
    run_group t1 t2 || status=$?
    local json_line
    json_line=$(grep '^{' "$t1_log" | tail -n 1 || true)
    if [ "$status" -ne 0 ] || [ -z "$json_line" ]; then
        report_failure "$link" "$label" "$status" "$failed_log" "$t1_log $t2_log"
        printf '%s\t%s\tfailed\t\t\t\t%s\n' "$link" "$label" "$t1_log" >>"$results"
        return 0
    fi
    "$PY" -c '
import json, sys
r = json.loads(sys.argv[1])
print("\t".join([sys.argv[2], sys.argv[3] + " (torch " + r["torch"] + ")", str(round(r["tokens_per_sec"])),
                 "%.1f" % r["step_ms"], "", "", sys.argv[4]]))' "$json_line" "$link" "$label" "$t1_log" >>"$results"
}

report_failure() {  # link, label, status, log[, all logs]
    local why="exit $3"
    [ "$3" = 124 ] && why="timed out after ${row_timeout} s"
    [ "$3" = 137 ] && why="killed after timing out"
    [ "$3" = parse ] && why="no timed metrics rows"
    echo "bench-multinode: row [$1] $2 FAILED ($why); log: $4${5:+ (all: $5)}; its end:" >&2
    tail -n 15 "$4" >&2 || true
    failed=1
}

for link in "${links[@]}"; do
    shape "$link"
    ip netns exec "$ALGPT2_NS1" tc qdisc show dev "$ALGPT2_IF1" >"$out/logs/qdisc-$link.txt" 2>&1 || true
    probe_one "$ALGPT2_NS1" "$ALGPT2_NS2" "$ALGPT2_IP2" 29400 "$link-1to2"
    g12="$probe_gbit" rtt="$probe_rtt"
    probe_one "$ALGPT2_NS2" "$ALGPT2_NS1" "$ALGPT2_IP1" 29401 "$link-2to1"
    g21="$probe_gbit"
    echo "bench-multinode: [$link] qdisc: $qdisc_desc; measured TCP goodput $g12 Gbit/s (1->2)," \
        "$g21 Gbit/s (2->1), idle RTT $rtt ms" >&2
    printf '%s\t%s\t%s\t%s\t%s\n' "$link" "$qdisc_desc" "$g12" "$g21" "$rtt" >>"$links_tsv"
    # The machine's 1-minute load average at each row's end, beside its result: the two
    # ranks make ~2 of it; more means something else (a build, CI) took CPU from the row.
    for r in "ours_row $link false" "ours_row $link true" "torch_row $link"; do
        $r
        sed -i "\$ s/\$/\t$(cut -d' ' -f1 /proc/loadavg)/" "$results"
    done
    # What each link setting sent, from the qdisc's counters (before they go).
    ip netns exec "$ALGPT2_NS1" tc -s qdisc show dev "$ALGPT2_IF1" >>"$out/logs/qdisc-$link.txt" 2>&1 || true
done
unshape

# --- the table ------------------------------------------------------------------------------
cpu_model=$(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1)
cpu_flags=$(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -xE 'avx2|avx512f|avx512_bf16|amx_bf16' | tr '\n' ' ' || true)
"$PY" - "$results" "$links_tsv" "$out/table.md" <<PY
import sys
results = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
links = [l.rstrip("\n").split("\t") for l in open(sys.argv[2]) if l.strip()]
out = []
out.append("## ours vs PyTorch DDP across two hosts (network namespaces on one machine)")
out.append("")
out.append("- date: $(date -u '+%Y-%m-%d %H:%M UTC')")
out.append("- CPU: ${cpu_model:-unknown} (${cpu_flags% }), ${cpus} logical CPUs on this machine, ${bind_desc}; kernel $(uname -r)")
out.append("- model: ${variant} (${switches[*]}), 8 layers, H 512, 8 heads, V 16,384, seq 256, micro-batch 8 per rank, fp32${params:+, ${params} parameters}")
out.append("- 2 ranks (one per host), 1 thread each; ${steps} timed steps after ${WARMUP} warm-up steps; tokens/s of both ranks together")
out.append("- ours: $("$BIN" --version 2>/dev/null) (repo $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo '?')), Open MPI $(mpirun --version 2>/dev/null | head -1 | awk '{print $NF}'), btl tcp; overlap flag: $([ "${ALGPT2_BENCH_NO_OVERLAP_FLAG:-0}" = 1 ] && echo 'omitted (ALGPT2_BENCH_NO_OVERLAP_FLAG=1: both rows are the binary default)' || echo 'dist.overlap=false/true')")
out.append("- PyTorch: torch $("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null), DDP over gloo, default buckets, reference/algpt2.py bench fp32_eager")
out.append("- link: veth pair, tbf on both ends (rate = nominal x (MTU+14)/(MTU+38), MTU ${mtu}); delay: $([ "$delay" = 0 ] && echo none || { [ "$netem" = 1 ] && echo "netem ${delay} each way" || echo "${delay} asked, NOT applied (no sch_netem in this kernel)"; })")
out.append("- token cache: prepare took ${prep_s} s")
out.append("")
out.append("| link | qdisc on each veth end | TCP goodput 1→2 Gbit/s | 2→1 Gbit/s | idle RTT ms |")
out.append("|---|---|---|---|---|")
for l in links:
    out.append("| " + " | ".join(l) + " |")
out.append("")
out.append("| link | trainer | tokens/s | step ms | comm ms | comm exposed ms | vs DDP | load |")
out.append("|---|---|---|---|---|---|---|---|")
for r in results:
    link, name, tps, step_ms, comm, exposed, log, load = r
    ddp = [x for x in results if x[0] == link and x[1].startswith("PyTorch") and x[2] != "failed"]
    if tps == "failed":
        out.append(f"| {link} | {name} | failed | | | | | {load} |")
        continue
    ratio = "%.2f" % (float(tps) / float(ddp[0][2])) if ddp else "n/a"
    if name.startswith("PyTorch"):
        comm = exposed = "n/a"
        ratio = "1.00" if ddp else "n/a"
    out.append(f"| {link} | {name} | {int(tps):,} | {step_ms} | {comm} | {exposed} | {ratio} | {load} |")
out.append("")
out.append("comm ms: train/comm_ms, mean over the timed steps (n/a: not in metrics.jsonl); comm exposed ms: "
           "train/comm_exposed_ms; vs DDP: tokens/s over the PyTorch DDP row of the same link; load: this "
           "machine's 1-minute load average at the row's end (the two ranks make ~2 of it)")
text = "\n".join(out) + "\n"
open(sys.argv[3], "w").write(text)
print()
print(text, end="")
PY
echo "bench-multinode: table in $out/table.md; logs in $out/logs" >&2
exit "$failed"
