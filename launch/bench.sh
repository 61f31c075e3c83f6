#!/usr/bin/env bash
# Training throughput, ours beside PyTorch, in one run: the same config, the same token
# file, the same micro-batch, accumulation and thread count, one process (group) per row.
#   launch/bench.sh [CONFIG] [STEPS] [--set key=value ...]
#   (defaults: configs/quickstart.yaml, 30 steps; the overrides apply to every row)
# Rows: ours at each precision in OURS (default "fp32 bf16": --set train.precision=P),
# then PyTorch in each mode in MODES (default "fp32_eager bf16_autocast bf16_compile
# fp32_compile": reference/algpt2.py bench, one process per mode). Set either to a
# shorter list for a quick run (an empty string skips that side). PAD_VOCAB=1 pads the
# PyTorch model's vocabulary to a multiple of 64, as nanoGPT does (ours pads internally).
# NPROC=2 runs every row data-parallel: ours under mpirun -n 2 (MPI all-reduce), PyTorch
# under torchrun --nproc_per_node 2 (DDP over gloo); each process gets cores / NPROC
# threads and its own micro-batch, so the global batch is NPROC times larger.
# REPEATS=N (default 3) runs N rounds, each round every row once in the order above
# (A B C A B C ...), so that rows compared ran minutes apart, not one side's rows all
# before the other's: on a shared host whose speed moves (by up to 45% within an hour on
# one we measured) a ratio from rows run in sequence once is good to about ±15% only. A
# row that fails is not run again in later rounds.
# Ours: tokens/s and mean step ms from metrics.jsonl (training time only, first 3 steps
# left out); peak RSS from GNU time (/usr/bin/time %M: the largest single process).
# PyTorch: reference/algpt2.py bench (torch.optim.AdamW, clip_grad_norm_, same shapes;
# 3 untimed warm-up steps, 5 for the compile modes so compilation is left out); peak RSS
# is rank 0's ru_maxrss. The table gives each row's median tokens/s over the rounds, its
# spread (min-max, and ± half that range as % of the median), median step ms and the
# largest peak RSS; its last column is the median over the fastest PyTorch mode's median.
# The line below it names that mode and gives ours-best / fastest-PyTorch from the
# medians, and the same two rows' ratio within each round (min-max across rounds).
# Logs and JSON: target/bench-train/ (one log per row and round, rounds.tsv with every
# round's figures, results.tsv with the medians).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
bash "$ROOT/launch/setup.sh" --release
cd "$ROOT"
config="${1:-configs/quickstart.yaml}"
steps="${2:-30}"
shift $(( $# < 2 ? $# : 2 ))
nproc_ranks="${NPROC:-1}"
threads=$(( $(nproc) / nproc_ranks > 0 ? $(nproc) / nproc_ranks : 1 ))
modes="${MODES-fp32_eager bf16_autocast bf16_compile fp32_compile}"
ours_precisions="${OURS-fp32 bf16}"
pad_vocab="${PAD_VOCAB:-0}"
repeats="${REPEATS:-3}"
if ! [[ "$repeats" =~ ^[1-9][0-9]*$ ]]; then
  echo "bench.sh: REPEATS must be a whole number >= 1, not '$repeats'" >&2
  exit 2
fi
for mode in $modes; do
  case "$mode" in
    fp32_eager|bf16_autocast|bf16_compile|fp32_compile) ;;
    *) echo "bench.sh: unknown PyTorch mode '$mode' in MODES (fp32_eager bf16_autocast bf16_compile fp32_compile)" >&2; exit 2 ;;
  esac
done
for p in $ours_precisions; do
  case "$p" in
    fp32|bf16|auto) ;;
    *) echo "bench.sh: unknown precision '$p' in OURS (fp32 bf16 auto)" >&2; exit 2 ;;
  esac
done
work="$ROOT/target/bench-train"
rm -rf "$work/runs"
mkdir -p "$work"
rm -f "$work"/ours-*.log "$work"/ours-*.time "$work"/torch-*.log "$work"/torch-*.json "$work"/spec-*.json
rounds="$work/rounds.tsv"    # round, kind, name, tokens/s, step ms, peak RSS MB (or "failed")
results="$work/results.tsv"  # kind, name, median tokens/s, median step ms, largest peak RSS MB (or "failed")
: > "$rounds"
: > "$results"
failed=0
sets=(--set device=cpu --set "out_dir=$work/runs" --set run_name=bench --set wandb.mode=disabled
      --set "train.max_steps=$((steps + 3))" --set train.log_interval=1 --set train.eval_interval=0
      --set train.save_interval=0 --set optim.warmup_steps=0 --set data.valid=null --set data.test=null "$@")
"$BIN_RELEASE" prepare --config "$config" "${sets[@]}" > "$work/prepare.log" 2>&1
cache=$(grep -oE 'token cache: [^ ]+' "$work/prepare.log" | head -1 | cut -d' ' -f3 || true)
if [ -z "$cache" ]; then
  echo "bench.sh: no 'token cache:' line in $work/prepare.log" >&2
  exit 1
fi
# Which machine: the CPU, its bf16 features and what `auto` picks on it.
host=$("$BIN_RELEASE" info --config "$config" "${sets[@]}" --set train.precision=auto | grep -E '^(cpu|precision on this CPU):' || true)

# GNU time measures ours' peak RSS; without it the column reads n/a.
have_gnu_time=0
if [ -x /usr/bin/time ] && /usr/bin/time -f '%M' -o /dev/null true >/dev/null 2>&1; then have_gnu_time=1; fi

if [ -n "${modes// }" ]; then
  "$BIN_RELEASE" info --config "$config" "${sets[@]}" --json | python -c '
import json, sys
info = json.load(sys.stdin)
t, o = info["config"]["train"], info["config"]["optim"]
spec = {"model": info["model"], "seq_len": t["seq_len"], "micro_batch_size": t["micro_batch_size"],
        "grad_accum_steps": t["grad_accum_steps"], "steps": int(sys.argv[1]), "lr": o["lr"],
        "weight_decay": o["weight_decay"], "grad_clip": o["grad_clip"], "threads": int(sys.argv[2]),
        "tokens": sys.argv[3], "device": "cpu", "pad_vocab": sys.argv[4] == "1"}
json.dump(spec, open(sys.argv[5], "w"))
' "$steps" "$threads" "$cache/train.bin" "$pad_vocab" "$work/spec.json"
fi
torch_version=$(python -c 'import torch; print(torch.__version__)')

# Ours at precision $1 in round $2: one row of rounds.tsv.
run_ours() {
  local p=$1 round=$2 status=0
  local name="bench-$p-r$round" log="$work/ours-$p.round$round.log" timefile="$work/ours-$p.round$round.time"
  local run_sets=("${sets[@]}" --set "run_name=$name" --set "train.precision=$p")
  local timer=()
  if [ "$have_gnu_time" = 1 ]; then timer=(/usr/bin/time -o "$timefile" -f 'peak_rss_kb=%M'); fi
  if [ "$nproc_ranks" -gt 1 ]; then
    "${timer[@]}" "${MPIRUN[@]}" -n "$nproc_ranks" --bind-to none "$BIN_RELEASE" --config "$config" "${run_sets[@]}" > "$log" 2>&1 || status=$?
  else
    "${timer[@]}" "$BIN_RELEASE" --config "$config" "${run_sets[@]}" > "$log" 2>&1 || status=$?
  fi
  if [ "$status" -ne 0 ]; then
    echo "bench.sh: ours at precision $p failed in round $round (exit $status); the log's end ($log):" >&2
    tail -n 15 "$log" >&2
    printf '%s\tours\talgpt2-ddp %s\tfailed\t\t\n' "$round" "$p" >> "$rounds"
    return 1
  fi
  python - "$work/runs/$name/metrics.jsonl" "$timefile" "algpt2-ddp $p" "$round" >> "$rounds" <<'PY'
import json, os, re, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
rows = [r for r in rows if "train/step_ms" in r][3:]
tokens = sum(r["train/tokens_per_sec"] * r["train/step_ms"] / 1000 for r in rows)
seconds = sum(r["train/step_ms"] / 1000 for r in rows)
step_ms = sum(r["train/step_ms"] for r in rows) / len(rows)
rss = "n/a"
if os.path.exists(sys.argv[2]):
    found = re.findall(r"peak_rss_kb=(\d+)", open(sys.argv[2]).read())
    if found:
        rss = str(round(int(found[-1]) / 1024))
print(f"{sys.argv[4]}\tours\t{sys.argv[3]}\t{round(tokens / seconds)}\t{step_ms:.1f}\t{rss}")
PY
}

# PyTorch in mode $1 in round $2: one row of rounds.tsv.
run_torch() {
  local mode=$1 round=$2 status=0
  local spec="$work/spec-$mode.json" log="$work/torch-$mode.round$round.log"
  python -c 'import json, sys; s = json.load(open(sys.argv[1])); s["mode"] = sys.argv[2]; json.dump(s, open(sys.argv[3], "w"))' \
    "$work/spec.json" "$mode" "$spec"
  if [ "$nproc_ranks" -gt 1 ]; then
    torchrun --standalone --nproc_per_node "$nproc_ranks" "$ROOT/reference/algpt2.py" bench "$spec" > "$log" 2>&1 || status=$?
  else
    python "$ROOT/reference/algpt2.py" bench "$spec" > "$log" 2>&1 || status=$?
  fi
  local json_line
  json_line=$(grep '^{' "$log" | tail -n 1 || true)
  if [ "$status" -ne 0 ] || [ -z "$json_line" ]; then
    echo "bench.sh: PyTorch $mode failed in round $round (exit $status); the log's end ($log):" >&2
    tail -n 15 "$log" >&2
    printf '%s\ttorch\tPyTorch %s %s\tfailed\t\t\n' "$round" "$torch_version" "$mode" >> "$rounds"
    return 1
  fi
  printf '%s\n' "$json_line" > "$work/torch-$mode.round$round.json"
  python -c '
import json, sys
r = json.loads(sys.argv[1])
row = [sys.argv[3], "torch", "PyTorch " + sys.argv[2] + " " + r["mode"], str(round(r["tokens_per_sec"])),
       "%.1f" % r["step_ms"], str(round(r["peak_rss_mb"]))]
print("\t".join(row))
' "$json_line" "$torch_version" "$round" >> "$rounds"
}

# --- the rounds: every row once per round, in the same order ----------------------------
rows=()
for p in $ours_precisions; do rows+=("ours:$p"); done
for mode in $modes; do rows+=("torch:$mode"); done
declare -A dead=()
for round in $(seq 1 "$repeats"); do
  echo "bench.sh: round $round of $repeats" >&2
  for row in "${rows[@]}"; do
    [ -z "${dead[$row]:-}" ] || continue
    case "$row" in
      ours:*) run_ours "${row#ours:}" "$round" || { dead[$row]=1; failed=1; } ;;
      torch:*) run_torch "${row#torch:}" "$round" || { dead[$row]=1; failed=1; } ;;
    esac
  done
done

# --- the table -----------------------------------------------------------------------------
printf '\nconfig %s%s, %s steps, %s process(es) x %s thread(s) each, %s round(s)\n' \
  "$config" "${*:+ $*}" "$steps" "$nproc_ranks" "$threads" "$repeats"
if [ -n "$host" ]; then printf '%s\n' "$host"; fi
printf '\n'
python - "$rounds" "$results" <<'PY'
import statistics, sys
lines = [line.rstrip("\n").split("\t") for line in open(sys.argv[1]) if line.strip()]
names, runs = [], {}
for rnd, kind, name, tps, step_ms, rss in lines:
    if name not in runs:
        names.append(name)
        runs[name] = {"kind": kind, "rounds": {}, "failed": False}
    if tps == "failed":
        runs[name]["failed"] = True
    else:
        runs[name]["rounds"][int(rnd)] = (float(tps), float(step_ms), rss)
def med(name):
    return statistics.median(t for t, _, _ in runs[name]["rounds"].values())
ok = [n for n in names if runs[n]["rounds"]]
torch_rows = [n for n in ok if runs[n]["kind"] == "torch"]
ours_rows = [n for n in ok if runs[n]["kind"] == "ours"]
fastest = max(torch_rows, key=med, default=None)
fmt = lambda x: f"{round(x):,}"
with open(sys.argv[2], "w") as out:
    print("| trainer | tokens/s (median) | spread: min-max | ± % of median | rounds | step ms (median) | peak RSS MB (max) | vs fastest PyTorch |")
    print("|---|---|---|---|---|---|---|---|")
    for name in names:
        r = runs[name]
        if not r["rounds"]:
            print(f"| {name} | failed | | | 0 | | | |")
            out.write(f"{r['kind']}\t{name}\tfailed\t\t\n")
            continue
        tps = [t for t, _, _ in r["rounds"].values()]
        m = med(name)
        step = statistics.median(s for _, s, _ in r["rounds"].values())
        rss = [int(x) for _, _, x in r["rounds"].values() if x.isdigit()]
        rss = str(max(rss)) if rss else "n/a"
        half = (max(tps) - min(tps)) / 2 / m * 100
        ratio = f"{m / med(fastest):.2f}" if fastest else "n/a"
        count = f"{len(tps)}" + (" (then failed)" if r["failed"] else "")
        print(f"| {name} | {fmt(m)} | {fmt(min(tps))}-{fmt(max(tps))} | ±{half:.1f} | {count} | {step:.1f} | {rss} | {ratio} |")
        out.write(f"{r['kind']}\t{name}\t{round(m)}\t{step:.1f}\t{rss}\n")
print()
if fastest and ours_rows:
    best = max(ours_rows, key=med)
    print(f"fastest PyTorch (median): {fastest.split()[-1]} ({fmt(med(fastest))} tokens/s); "
          f"ratio ours-best ({best.split()[-1]}) / fastest PyTorch from the medians: {med(best) / med(fastest):.2f}")
    both = sorted(set(runs[best]["rounds"]) & set(runs[fastest]["rounds"]))
    per_round = [runs[best]["rounds"][k][0] / runs[fastest]["rounds"][k][0] for k in both]
    if per_round:
        listed = ", ".join(f"{x:.2f}" for x in per_round)
        print(f"the same ratio within each round: {min(per_round):.2f}-{max(per_round):.2f} ({listed})")
elif fastest:
    print(f"fastest PyTorch (median): {fastest.split()[-1]} ({fmt(med(fastest))} tokens/s); no row of ours to compare")
else:
    print("no PyTorch row: no ratio")
PY
exit "$failed"
