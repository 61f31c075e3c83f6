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
# Ours: tokens/s and mean step ms from metrics.jsonl (training time only, first 3 steps
# left out); peak RSS from GNU time (/usr/bin/time %M: the largest single process).
# PyTorch: reference/algpt2.py bench (torch.optim.AdamW, clip_grad_norm_, same shapes;
# 3 untimed warm-up steps, 5 for the compile modes so compilation is left out); peak RSS
# is rank 0's ru_maxrss. The table's last column is tokens/s over the fastest PyTorch
# mode's; the line below it names that mode and gives ours-best / fastest-PyTorch.
# Logs and JSON: target/bench-train/.
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
results="$work/results.tsv"  # kind, name, tokens/s, step ms, peak RSS MB (or "failed")
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

# GNU time measures ours' peak RSS; without it the column reads n/a.
have_gnu_time=0
if [ -x /usr/bin/time ] && /usr/bin/time -f '%M' -o /dev/null true >/dev/null 2>&1; then have_gnu_time=1; fi

# --- ours, one run per precision ---------------------------------------------------
for p in $ours_precisions; do
  run_sets=("${sets[@]}" --set "run_name=bench-$p" --set "train.precision=$p")
  log="$work/ours-$p.log"
  timefile="$work/ours-$p.time"
  rm -f "$timefile"
  timer=()
  if [ "$have_gnu_time" = 1 ]; then timer=(/usr/bin/time -o "$timefile" -f 'peak_rss_kb=%M'); fi
  status=0
  if [ "$nproc_ranks" -gt 1 ]; then
    "${timer[@]}" "${MPIRUN[@]}" -n "$nproc_ranks" --bind-to none "$BIN_RELEASE" --config "$config" "${run_sets[@]}" > "$log" 2>&1 || status=$?
  else
    "${timer[@]}" "$BIN_RELEASE" --config "$config" "${run_sets[@]}" > "$log" 2>&1 || status=$?
  fi
  if [ "$status" -ne 0 ]; then
    echo "bench.sh: ours at precision $p failed (exit $status); the log's end ($log):" >&2
    tail -n 15 "$log" >&2
    printf 'ours\talgpt2-ddp %s\tfailed\t\t\n' "$p" >> "$results"
    failed=1
    continue
  fi
  python - "$work/runs/bench-$p/metrics.jsonl" "$timefile" "algpt2-ddp $p" >> "$results" <<'PY'
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
print(f"ours\t{sys.argv[3]}\t{round(tokens / seconds)}\t{step_ms:.1f}\t{rss}")
PY
done

# --- PyTorch, one process (group) per mode -------------------------------------------
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
for mode in $modes; do
  spec="$work/spec-$mode.json"
  python -c 'import json, sys; s = json.load(open(sys.argv[1])); s["mode"] = sys.argv[2]; json.dump(s, open(sys.argv[3], "w"))' \
    "$work/spec.json" "$mode" "$spec"
  log="$work/torch-$mode.log"
  status=0
  if [ "$nproc_ranks" -gt 1 ]; then
    torchrun --standalone --nproc_per_node "$nproc_ranks" "$ROOT/reference/algpt2.py" bench "$spec" > "$log" 2>&1 || status=$?
  else
    python "$ROOT/reference/algpt2.py" bench "$spec" > "$log" 2>&1 || status=$?
  fi
  json_line=$(grep '^{' "$log" | tail -n 1 || true)
  if [ "$status" -ne 0 ] || [ -z "$json_line" ]; then
    echo "bench.sh: PyTorch $mode failed (exit $status); the log's end ($log):" >&2
    tail -n 15 "$log" >&2
    printf 'torch\tPyTorch %s %s\tfailed\t\t\n' "$torch_version" "$mode" >> "$results"
    failed=1
    continue
  fi
  printf '%s\n' "$json_line" > "$work/torch-$mode.json"
  python -c '
import json, sys
r = json.loads(sys.argv[1])
row = ["torch", "PyTorch " + sys.argv[2] + " " + r["mode"], str(round(r["tokens_per_sec"])),
       "%.1f" % r["step_ms"], str(round(r["peak_rss_mb"]))]
print("\t".join(row))
' "$json_line" "$torch_version" >> "$results"
done

# --- the table -----------------------------------------------------------------------------
printf '\nconfig %s %s, %s steps, %s process(es) x %s thread(s) each\n\n' "$config" "$*" "$steps" "$nproc_ranks" "$threads"
python - "$results" <<'PY'
import sys
rows = [line.rstrip("\n").split("\t") for line in open(sys.argv[1]) if line.strip()]
ok = [r for r in rows if r[2] != "failed"]
torch_rows = [r for r in ok if r[0] == "torch"]
ours_rows = [r for r in ok if r[0] == "ours"]
fastest = max(torch_rows, key=lambda r: float(r[2]), default=None)
print("| trainer | tokens/s | step ms | peak RSS MB | vs fastest PyTorch |")
print("|---|---|---|---|---|")
for kind, name, tps, step_ms, rss in rows:
    if tps == "failed":
        print(f"| {name} | failed | | | |")
        continue
    ratio = f"{float(tps) / float(fastest[2]):.2f}" if fastest else "n/a"
    print(f"| {name} | {tps} | {step_ms} | {rss} | {ratio} |")
print()
if fastest and ours_rows:
    best = max(ours_rows, key=lambda r: float(r[2]))
    print(f"fastest PyTorch: {fastest[1].split()[-1]} ({fastest[2]} tokens/s); "
          f"ratio ours-best ({best[1].split()[-1]}) / fastest PyTorch: {float(best[2]) / float(fastest[2]):.2f}")
elif fastest:
    print(f"fastest PyTorch: {fastest[1].split()[-1]} ({fastest[2]} tokens/s); no row of ours to compare")
else:
    print("no PyTorch row: no ratio")
PY
exit "$failed"
