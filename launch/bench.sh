#!/usr/bin/env bash
# Training throughput, ours beside PyTorch eager, in one run: the same config, the same
# token file, the same micro-batch, accumulation and thread count, one process each.
#   launch/bench.sh [CONFIG] [STEPS] [--set key=value ...]
#   (defaults: configs/quickstart.yaml, 30 steps; the overrides apply to both trainers)
# NPROC=2 runs both data-parallel: ours under mpirun -n 2 (MPI all-reduce), PyTorch under
# torchrun --nproc_per_node 2 (DDP over gloo); each process gets cores / NPROC threads
# and its own micro-batch, so the global batch is NPROC times larger.
# Ours: tokens/s from metrics.jsonl (training time only, first 3 steps left out).
# PyTorch: reference/algpt2.py bench (torch.optim.AdamW, clip_grad_norm_, same shapes).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
bash "$ROOT/launch/setup.sh" --release
cd "$ROOT"
config="${1:-configs/quickstart.yaml}"
steps="${2:-30}"
shift $(( $# < 2 ? $# : 2 ))
nproc_ranks="${NPROC:-1}"
threads=$(( $(nproc) / nproc_ranks > 0 ? $(nproc) / nproc_ranks : 1 ))
work="$ROOT/target/bench-train"
rm -rf "$work/runs"
mkdir -p "$work"
sets=(--set device=cpu --set "out_dir=$work/runs" --set run_name=bench --set wandb.mode=disabled
      --set "train.max_steps=$((steps + 3))" --set train.log_interval=1 --set train.eval_interval=0
      --set train.save_interval=0 --set optim.warmup_steps=0 --set data.valid=null --set data.test=null "$@")
"$BIN_RELEASE" prepare --config "$config" "${sets[@]}" >/dev/null 2>&1
if [ "$nproc_ranks" -gt 1 ]; then
  "${MPIRUN[@]}" -n "$nproc_ranks" --bind-to none "$BIN_RELEASE" --config "$config" "${sets[@]}" > "$work/ours.log" 2>&1
else
  "$BIN_RELEASE" --config "$config" "${sets[@]}" > "$work/ours.log" 2>&1
fi
ours=$(python - "$work/runs/bench/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])][3:]
tokens = sum(r["train/tokens_per_sec"] * r["train/step_ms"] / 1000 for r in rows)
seconds = sum(r["train/step_ms"] / 1000 for r in rows)
print(round(tokens / seconds))
PY
)
cache=$(grep -oE 'token cache: [^ ]+' "$work/ours.log" | head -1 | cut -d' ' -f3)
"$BIN_RELEASE" info --config "$config" "${sets[@]}" --json | python -c '
import json, sys
info = json.load(sys.stdin)
t, o = info["config"]["train"], info["config"]["optim"]
spec = {"model": info["model"], "seq_len": t["seq_len"], "micro_batch_size": t["micro_batch_size"],
        "grad_accum_steps": t["grad_accum_steps"], "steps": int(sys.argv[1]), "lr": o["lr"],
        "weight_decay": o["weight_decay"], "grad_clip": o["grad_clip"], "threads": int(sys.argv[2]),
        "tokens": sys.argv[3]}
json.dump(spec, open(sys.argv[4], "w"))
' "$steps" "$threads" "$cache/train.bin" "$work/spec.json"
if [ "$nproc_ranks" -gt 1 ]; then
  theirs_json=$(torchrun --standalone --nproc_per_node "$nproc_ranks" "$ROOT/reference/algpt2.py" bench "$work/spec.json" 2>/dev/null | grep '^{')
else
  theirs_json=$(python "$ROOT/reference/algpt2.py" bench "$work/spec.json")
fi
theirs=$(python -c "import json,sys; print(round(json.loads(sys.argv[1])['tokens_per_sec']))" "$theirs_json")
printf '\nconfig %s %s, %s steps, %s process(es) x %s thread(s) each\n\n' "$config" "$*" "$steps" "$nproc_ranks" "$threads"
printf '| trainer | tokens/s |\n|---|---|\n| algpt2-ddp (Rust, tch) | %s |\n| PyTorch %s eager | %s |\n' \
  "$ours" "$(python -c 'import torch; print(torch.__version__)')" "$theirs"
printf '\nratio (ours / PyTorch): %s\n' "$(python -c "print(round($ours / $theirs, 2))")"
