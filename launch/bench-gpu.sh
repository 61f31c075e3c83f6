#!/usr/bin/env bash
# Training throughput on one GPU, ours beside PyTorch, for the three 12-layer variants at
# two batch geometries, in one go (from a checkout, or from an unpacked bundle):
#   launch/bench-gpu.sh [OUT_DIR]        (default OUT_DIR: target/bench-gpu)
# Variants (n_layer 12, n_embd 768, n_head 12, vocab 50,257, n_positions 1024, dropout 0.1):
#   gpt2    GPT-2          share_layers false, embedding_size null
#   shared  sharing-only   share_layers true,  embedding_size null
#   algpt2  ALGPT2         share_layers true,  embedding_size 128
# Geometries SEQxMICRO_BATCH: 1024x16 and 256x60 (grad_accum_steps 1, one process).
# Trainers (MODES):
#   ours_bf16, ours_fp32   `algpt2-ddp bench --json --set device=cuda --set
#                          train.precision=P`: 3 untimed warm-up steps, then STEPS timed
#                          ones; the vocabulary padded inside the trainer to a multiple of
#                          train.pad_vocab_multiple (default 64: 50,304 rows). ours_auto too.
#   bf16_autocast, bf16_compile, fp32_eager, fp32_compile
#                          reference/algpt2.py bench on the same token file and shapes,
#                          V = 50,257; a _pad suffix (bf16_autocast_pad, ...) rounds its
#                          vocabulary up to a multiple of 64 (50,304), as nanoGPT does.
#                          3 untimed warm-up steps (5 for the compile modes), then STEPS.
# The data is the embedded synthetic corpus of configs/quickstart.yaml (no files; its
# 512-token BPE, which only fills the first rows of the 50,257-row table: the shapes, and
# so the speed, are those of a real 50,257 vocabulary). `prepare` builds its token cache
# once (under ./data_cache of ROOT, the default data.cache_dir); every PyTorch row reads
# that cache's train.bin.
# Columns: tokens/s and mean step ms over the timed steps (each trainer's own timing);
# peak GPU MB is the rise of the GPU's memory.used (nvidia-smi, sampled every SMI_MS ms)
# over its value before the run: CUDA context plus everything the allocator holds, the
# same measure for both trainers; PyTorch rows add "alloc N", its
# torch.cuda.max_memory_allocated. ours/best-PyTorch: a row of ours' tokens/s over the
# fastest PyTorch row of the same variant and geometry; PyTorch rows show theirs in
# parentheses. TF32: ours' fp32 uses TF32 tensor cores (train.tf32, default true); PyTorch's
# fp32 follows torch's default unless TORCH_ALLOW_TF32_CUBLAS_OVERRIDE is set (NVIDIA's
# containers set it to 1); the header line says which.
# Knobs (environment):
#   STEPS        timed steps per row (default 20)
#   VARIANTS     subset of "gpt2 shared algpt2"
#   GEOMETRIES   subset of "1024x16 256x60" (any SEQxMICRO_BATCH, SEQ <= 1024)
#   MODES        subset of "ours_bf16 ours_fp32 bf16_autocast bf16_autocast_pad
#                bf16_compile bf16_compile_pad fp32_eager" (the default; ours_auto,
#                fp32_compile, fp32_eager_pad, fp32_compile_pad are accepted too)
#   ROWS         the rows to run, in this order, as VARIANT:GEOMETRY:TRAINER words (e.g.
#                "gpt2:1024x16:ours_bf16 gpt2:1024x16:bf16_compile_pad"); when set,
#                VARIANTS, GEOMETRIES and MODES are not used. Unset: every variant,
#                geometry and trainer, in that nesting. A budget cuts the last rows, so
#                put first the ones that must run.
#   RUN_TIMEOUT  seconds each row may take, start-up and compilation included (default
#                240); a row past it is killed (with its children) and reads "failed"
#   BUDGET_S     when > 0: no row starts after BUDGET_S seconds of this script, and no row
#                runs past it (rows left read "skipped (budget)"); fit a device lease
#   EXTRA_SETS   space-separated KEY=VALUE overrides for ours (and the PyTorch spec), e.g.
#                "train.tf32=false"
#   TORCH_TF32   1 or 0 exports TORCH_ALLOW_TF32_CUBLAS_OVERRIDE for the PyTorch rows
#                (unset: the environment's value, if any)
#   SMI_MS       nvidia-smi sampling period (default 200)
#   PYTHON       the python with torch (default python3); ALGPT2_REFERENCE the path of
#                algpt2.py (default ROOT/reference/algpt2.py; a bundle may lack it, then
#                the PyTorch rows read "failed"); ALGPT2_BIN_UNDER_TEST the binary.
# Writes OUT_DIR/table.md (rewritten after every row, so a killed run leaves the rows
# done), OUT_DIR/rows.md (the same rows, and the goal's verdict, as rows of
# launch/gpu-prove.sh's summary table), OUT_DIR/results.tsv, OUT_DIR/logs/<variant>-<geometry>-<trainer>.{log,json,smi},
# OUT_DIR/specs/ (the PyTorch specs) and OUT_DIR/prepare.log. Prints the GPU name and the
# date first and the table last. Exit 1 when any row failed, 2 on a bad knob, else 0
# (rows skipped for BUDGET_S included: the table says which). Roughly 42 rows in all; the compile rows take a minute or more each (compilation
# is not timed but is run): pick a subset to fit a short lease.
set -euo pipefail
export LC_NUMERIC=C
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
bin="${ALGPT2_BIN_UNDER_TEST:-$BIN_RELEASE}"
python="${PYTHON:-python3}"
reference="${ALGPT2_REFERENCE:-$ROOT/reference/algpt2.py}"
work="${1:-target/bench-gpu}"
steps="${STEPS:-20}"
variants="${VARIANTS-gpt2 shared algpt2}"
geometries="${GEOMETRIES-1024x16 256x60}"
modes="${MODES-ours_bf16 ours_fp32 bf16_autocast bf16_autocast_pad bf16_compile bf16_compile_pad fp32_eager}"
run_timeout="${RUN_TIMEOUT:-240}"
budget="${BUDGET_S:-0}"
smi_ms="${SMI_MS:-200}"
read -r -a extra_kv <<< "${EXTRA_SETS-}"

bad() { echo "bench-gpu.sh: $*" >&2; exit 2; }
for n in "$steps" "$run_timeout" "$budget" "$smi_ms"; do
  [[ "$n" =~ ^[0-9]+$ ]] || bad "STEPS, RUN_TIMEOUT, BUDGET_S and SMI_MS must be whole numbers (got '$n')"
done
[ "$steps" -ge 1 ] || bad "STEPS must be at least 1"
[ "$run_timeout" -ge 1 ] || bad "RUN_TIMEOUT must be at least 1"
[ "$smi_ms" -ge 1 ] || bad "SMI_MS must be at least 1"
check_variant() { # VARIANT WHERE
  case "$1" in gpt2|shared|algpt2) ;; *) bad "unknown variant '$1' in $2 (gpt2 shared algpt2)" ;; esac
}
check_geometry() { # GEOMETRY WHERE
  [[ "$1" =~ ^([0-9]+)x([0-9]+)$ ]] || bad "geometry '$1' in $2 is not SEQxMICRO_BATCH (e.g. 1024x16)"
  [ "${BASH_REMATCH[1]}" -ge 1 ] && [ "${BASH_REMATCH[1]}" -le 1024 ] && [ "${BASH_REMATCH[2]}" -ge 1 ] \
    || bad "geometry '$1': SEQ must be 1..1024 (n_positions) and MICRO_BATCH at least 1"
}
check_mode() { # TRAINER WHERE
  case "$1" in
    ours_bf16|ours_fp32|ours_auto) ;;
    fp32_eager|bf16_autocast|bf16_compile|fp32_compile) ;;
    fp32_eager_pad|bf16_autocast_pad|bf16_compile_pad|fp32_compile_pad) ;;
    *) bad "unknown trainer '$1' in $2 (ours_bf16 ours_fp32 ours_auto, or fp32_eager bf16_autocast bf16_compile fp32_compile, each optionally with _pad)" ;;
  esac
}
# The rows, in the order they run: VARIANT:GEOMETRY:TRAINER.
rows=()
if [ -n "${ROWS-}" ]; then
  for r in $ROWS; do
    [[ "$r" =~ ^[^:]+:[^:]+:[^:]+$ ]] || bad "row '$r' in ROWS is not VARIANT:GEOMETRY:TRAINER (e.g. gpt2:1024x16:ours_bf16)"
    IFS=: read -r v g m <<< "$r"
    check_variant "$v" ROWS; check_geometry "$g" ROWS; check_mode "$m" ROWS
    rows+=("$r")
  done
else
  for v in $variants; do check_variant "$v" VARIANTS; done
  for g in $geometries; do check_geometry "$g" GEOMETRIES; done
  for m in $modes; do check_mode "$m" MODES; done
  for v in $variants; do for g in $geometries; do for m in $modes; do rows+=("$v:$g:$m"); done; done; done
fi
for kv in ${extra_kv[@]+"${extra_kv[@]}"}; do
  [[ "$kv" == *=* ]] || bad "EXTRA_SETS entry '$kv' is not KEY=VALUE"
done
case "${TORCH_TF32-}" in
  "") ;;
  0|1) export TORCH_ALLOW_TF32_CUBLAS_OVERRIDE="$TORCH_TF32" ;;
  *) bad "TORCH_TF32 must be 0 or 1 (or unset)" ;;
esac
command -v "$python" >/dev/null || bad "no $python on PATH (set PYTHON): it parses the JSON and draws the table"

# A previous run's rows and specs would mix with this one's: start both afresh.
rm -rf "$work/logs" "$work/specs"
mkdir -p "$work/logs" "$work/specs"
work="$(cd "$work" && pwd)"
results="$work/results.tsv"
: > "$results"
table="$work/table.md"
rm -f "$work/rows.md" "$table"

# --- the header: GPU, date, software ---------------------------------------------------
gpu_name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 || true)
gpu_id="${CUDA_VISIBLE_DEVICES:-0}"
gpu_id="${gpu_id%%,*}"
if [ -f "$ROOT/BUNDLE" ]; then
  revision=$(grep -m1 '^revision:' "$ROOT/BUNDLE" | cut -d' ' -f2 || true)
else
  revision=$(git -C "$ROOT" rev-parse --short=12 HEAD 2>/dev/null || true)
fi
torch_version=$("$python" -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda)' 2>/dev/null || echo "not importable")
{
  echo "# bench-gpu: ours vs PyTorch on one GPU"
  echo
  echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "- GPU: ${gpu_name:-unknown (no nvidia-smi)} (CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset}, memory sampled on GPU $gpu_id)"
  echo "- algpt2-ddp: $bin (revision ${revision:-unknown})"
  echo "- PyTorch: $torch_version via $python; TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=${TORCH_ALLOW_TF32_CUBLAS_OVERRIDE-unset}"
  echo "- $steps timed steps a row, each row limited to ${run_timeout} s$([ "$budget" -gt 0 ] && echo ", ${budget} s in all")"
  echo "- EXTRA_SETS: ${EXTRA_SETS:-none}"
} > "$work/header.md"
cat "$work/header.md"
echo

# --- the configs ------------------------------------------------------------------------
base=(--config configs/quickstart.yaml --set wandb.mode=disabled
      --set model.vocab_size=50257 --set model.n_positions=1024 --set model.n_embd=768 --set model.n_layer=12
      --set model.n_head=12 --set model.dropout=0.1 --set model.embedding_dropout=after_projection
      --set train.grad_accum_steps=1 --set optim.warmup_steps=0 --set data.valid=null --set data.test=null)
for kv in ${extra_kv[@]+"${extra_kv[@]}"}; do base+=(--set "$kv"); done
variant_sets() { # VARIANT
  case "$1" in
    gpt2) echo "model.share_layers=false model.embedding_size=null" ;;
    shared) echo "model.share_layers=true model.embedding_size=null" ;;
    algpt2) echo "model.share_layers=true model.embedding_size=128" ;;
  esac
}
row_sets() { # VARIANT GEOMETRY: the --set arguments of one row, one a line
  local kv
  for kv in $(variant_sets "$1"); do printf -- '--set\n%s\n' "$kv"; done
  printf -- '--set\ntrain.seq_len=%s\n--set\ntrain.micro_batch_size=%s\n' "${2%x*}" "${2#*x}"
}

# The token cache (data and tokenizer only: one for every row).
first_variant=gpt2 first_geometry=1024x16
if [ "${#rows[@]}" -gt 0 ]; then IFS=: read -r first_variant first_geometry _ <<< "${rows[0]}"; fi
mapfile -t first_sets < <(row_sets "$first_variant" "$first_geometry")
tokens=""
if "$bin" prepare "${base[@]}" "${first_sets[@]}" --set device=cpu > "$work/prepare.log" 2>&1; then
  cache=$(grep -oE 'token cache: [^ ]+' "$work/prepare.log" | head -n 1 | cut -d' ' -f3 || true)
  if [ -n "$cache" ]; then
    case "$cache" in /*) ;; *) cache="$ROOT/$cache" ;; esac
    tokens="$cache/train.bin"
  fi
fi
if [ -z "$tokens" ] || [ ! -f "$tokens" ]; then
  echo "bench-gpu.sh: prepare failed or printed no 'token cache:' line; its end ($work/prepare.log):" >&2
  tail -n 15 "$work/prepare.log" >&2
  exit 1
fi
echo "token file: $tokens"

# The PyTorch spec of a variant and geometry, from `info --json` (the model as ours
# resolves it); prints train.pad_vocab_multiple.
make_spec() { # VARIANT GEOMETRY SPEC
  local sets
  mapfile -t sets < <(row_sets "$1" "$2")
  "$bin" info "${base[@]}" "${sets[@]}" --set device=cpu --json 2> "$3.err" | "$python" -c '
import json, os, sys
info = json.load(sys.stdin)
t, o = info["config"]["train"], info["config"]["optim"]
spec = {"model": info["model"], "seq_len": t["seq_len"], "micro_batch_size": t["micro_batch_size"],
        "grad_accum_steps": t["grad_accum_steps"], "steps": int(sys.argv[1]), "lr": o["lr"],
        "weight_decay": o["weight_decay"], "grad_clip": o["grad_clip"], "threads": os.cpu_count() or 1,
        "tokens": sys.argv[2], "device": "cuda"}
json.dump(spec, open(sys.argv[3], "w"))
print(t["pad_vocab_multiple"])
' "$steps" "$tokens" "$3"
}

# --- GPU memory: nvidia-smi sampled in the background during a row ---------------------
have_smi=0
if command -v nvidia-smi >/dev/null \
   && nvidia-smi -i "$gpu_id" --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | grep -qE '^ *[0-9]+'; then
  have_smi=1
fi
smi_pid=""
gpu_used_mb() { nvidia-smi -i "$gpu_id" --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | head -n 1 | tr -d ' '; }
start_sampler() { # FILE
  : > "$1"
  if [ "$have_smi" = 1 ]; then
    nvidia-smi -i "$gpu_id" --query-gpu=memory.used --format=csv,noheader,nounits -lms "$smi_ms" > "$1" 2>/dev/null &
    smi_pid=$!
  fi
}
stop_sampler() {
  if [ -n "$smi_pid" ]; then
    kill "$smi_pid" 2>/dev/null || true
    wait "$smi_pid" 2>/dev/null || true
    smi_pid=""
  fi
}
trap stop_sampler EXIT

# --- the table (rewritten after every row) ----------------------------------------------
draw_table() {
  "$python" - "$results" "$work/header.md" "$work/rows.md" > "$table" <<'PY'
import sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
variants = {"gpt2": "GPT-2", "shared": "sharing-only", "algpt2": "ALGPT2 (E=128)"}
print(open(sys.argv[2]).read())
print("| variant | geometry | trainer | tokens/s | step ms | peak GPU MB | ours/best-PyTorch |")
print("|---|---|---|---|---|---|---|")
best = {}
for r in rows:
    variant, geometry, kind, label, status, tps = r[:6]
    if kind == "torch" and status == "ok":
        best[(variant, geometry)] = max(best.get((variant, geometry), 0.0), float(tps))
# launch/gpu-prove.sh's rows: the goal's verdict, then every row as | row | status | figures |.
summary = []
for r in rows:
    variant, geometry, kind, label, status, tps, step_ms, smi_mb, alloc_mb = r[:9]
    seq, mb = geometry.split("x")
    geo = f"{seq} x {mb}"
    name = variants.get(variant, variant)
    if status != "ok":
        print(f"| {name} | {geo} | {label} | {status} | | | |")
        summary.append(f"| bench: {name} {geo}, {label} | {status} | |")
        continue
    mem = smi_mb
    if alloc_mb != "n/a":
        mem = f"{smi_mb} (alloc {alloc_mb})"
    b = best.get((variant, geometry))
    ratio = "n/a"
    if b:
        ratio = f"{float(tps) / b:.2f}" if kind == "ours" else f"({float(tps) / b:.2f})"
    print(f"| {name} | {geo} | {label} | {round(float(tps)):,} | {float(step_ms):.1f} | {mem} | {ratio} |")
    alloc = f" (alloc {alloc_mb} MB)" if alloc_mb != "n/a" else ""
    summary.append(f"| bench: {name} {geo}, {label} | ok | {round(float(tps)):,} tokens/s, {float(step_ms):.1f} ms/step, "
                   f"peak GPU +{smi_mb} MB{alloc}, ours/best-PyTorch {ratio} |")
# The goal: ours (bf16) at least 1.10 times PyTorch bf16 + torch.compile with the padded
# vocabulary, GPT-2 at 1024 x 16.
def row(trainer):
    return next((r for r in rows if r[:2] == ["gpt2", "1024x16"] and len(r) > 9 and r[9] == trainer), None)
ours, theirs = row("ours_bf16"), row("bf16_compile_pad")
goal = "goal: GPT-2 1024 x 16, ours bf16 / PyTorch bf16 + torch.compile (V 50304) >= 1.10"
if ours and theirs and ours[4] == "ok" and theirs[4] == "ok":
    x = float(ours[5]) / float(theirs[5])
    summary.insert(0, f"| {goal} | {'MET' if x >= 1.10 else 'NOT MET'} | {x:.2f}x |")
else:
    why = "; ".join(f"{n}: {r[4] if r else 'not run'}" for n, r in (("ours bf16", ours), ("PyTorch bf16 + compile, padded", theirs)))
    summary.insert(0, f"| {goal} | UNMEASURED | {why} |")
open(sys.argv[3], "w").write("\n".join(summary) + "\n")
print()
print("tokens/s and step ms: mean over the timed steps. peak GPU MB: rise of nvidia-smi memory.used "
      "during the row (context + allocator), PyTorch's torch.cuda.max_memory_allocated as alloc. "
      "ours/best-PyTorch: over the fastest PyTorch row of that variant and geometry (PyTorch rows: "
      "their own, in parentheses).")
PY
}

# --- one row --------------------------------------------------------------------------------
failed=0
total=0
total=${#rows[@]}
done_rows=0
# One line of results.tsv, from run_row's variant, geometry, kind, label and trainer.
record() { # STATUS TPS STEP_MS SMI_MB ALLOC_MB
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$variant" "$geometry" "$kind" "$label" "$@" "$trainer" >> "$results"
  draw_table || echo "bench-gpu.sh: could not draw $table" >&2
}
run_row() { # VARIANT GEOMETRY TRAINER
  local variant=$1 geometry=$2 trainer=$3
  local tag="$variant-$geometry-$trainer"
  local log="$work/logs/$tag.log" out="$work/logs/$tag.json" smi="$work/logs/$tag.smi"
  local kind label spec="" pad_multiple limit left status before peak line
  done_rows=$((done_rows + 1))
  if [ "${trainer#ours_}" != "$trainer" ]; then kind=ours; else kind=torch; fi
  local spec_base="$work/specs/$variant-$geometry.json"
  if [ ! -f "$spec_base" ]; then
    make_spec "$variant" "$geometry" "$spec_base" > "$spec_base.pad" || rm -f "$spec_base"
  fi
  pad_multiple=$(cat "$spec_base.pad" 2>/dev/null || true)
  pad_multiple=${pad_multiple:-64}
  local padded=$(( (50257 + pad_multiple - 1) / pad_multiple * pad_multiple ))
  case "$trainer" in
    ours_*) label="ours ${trainer#ours_}, V $padded" ;;
    *_pad) label="PyTorch ${trainer%_pad}, V 50304 (padded)" ;;
    *) label="PyTorch $trainer, V 50257" ;;
  esac
  limit=$run_timeout
  if [ "$budget" -gt 0 ]; then
    left=$((budget - SECONDS))
    if [ "$left" -lt 20 ]; then
      echo "[$done_rows/$total] $tag: skipped (budget of ${budget} s spent)"
      record "skipped (budget)" "" "" "" ""
      return 0
    fi
    if [ "$left" -lt "$limit" ]; then limit=$left; fi
  fi
  local cmd sets
  mapfile -t sets < <(row_sets "$variant" "$geometry")
  if [ "$kind" = ours ]; then
    cmd=("$bin" bench "${base[@]}" "${sets[@]}" --set device=cuda --set "train.precision=${trainer#ours_}"
         --steps "$steps" --json)
  else
    if [ ! -f "$reference" ]; then
      echo "no $reference (set ALGPT2_REFERENCE)" > "$log"
      echo "[$done_rows/$total] $tag: failed (no reference/algpt2.py)"
      record "failed (no algpt2.py)" "" "" "" ""
      failed=1
      return 0
    fi
    if [ ! -f "$spec_base" ]; then
      cp "$spec_base.err" "$log" 2>/dev/null || true
      echo "[$done_rows/$total] $tag: failed (info --json gave no spec; see $spec_base.err)"
      record "failed (no spec)" "" "" "" ""
      failed=1
      return 0
    fi
    spec="$work/specs/$tag.json"
    local mode=${trainer%_pad} pad=0
    if [ "$mode" != "$trainer" ]; then pad=1; fi
    "$python" -c 'import json, sys; s = json.load(open(sys.argv[1])); s["mode"] = sys.argv[2]; s["pad_vocab"] = sys.argv[3] == "1"; json.dump(s, open(sys.argv[4], "w"))' \
      "$spec_base" "$mode" "$pad" "$spec"
    cmd=("$python" "$reference" bench "$spec")
  fi
  before=$(gpu_used_mb || true)
  start_sampler "$smi"
  status=0
  local started=$SECONDS
  timeout -k 15 "$limit" "${cmd[@]}" > "$out" 2> "$log" || status=$?
  stop_sampler
  peak="n/a"
  if [ -s "$smi" ] && [[ "$before" =~ ^[0-9]+$ ]]; then
    peak=$(awk -v b="$before" 'BEGIN { m = b } $1 + 0 > m { m = $1 + 0 } END { print m - b }' "$smi")
  fi
  line=$(grep '^{' "$out" | tail -n 1 || true)
  if [ "$status" -ne 0 ] || [ -z "$line" ]; then
    local why="exit $status"
    if [ "$status" -eq 124 ] || { [ "$status" -eq 137 ] && [ $((SECONDS - started)) -ge "$limit" ]; }; then
      why="timeout ${limit} s"
    fi
    echo "[$done_rows/$total] $tag: failed ($why, $((SECONDS - started)) s); the log's end ($log):"
    tail -n 8 "$log" | sed 's/^/    /'
    record "failed ($why)" "" "" "" ""
    failed=1
    return 0
  fi
  local parsed
  parsed=$("$python" -c '
import json, sys
r = json.loads(sys.argv[1])
if sys.argv[2] == "ours":
    tps, ms, alloc = r["tokens_per_sec"], r["step_ms_mean"], "n/a"
    note = r.get("precision", "?")
else:
    tps, ms = r["tokens_per_sec"], r["step_ms"]
    alloc = str(round(r["peak_gpu_mb"])) if "peak_gpu_mb" in r else "n/a"
    note = r.get("mode", "?")
print(f"{tps}\t{ms}\t{alloc}\t{note}")
' "$line" "$kind") || parsed=""
  if [ -z "$parsed" ]; then
    echo "[$done_rows/$total] $tag: failed (unreadable JSON in $out)"
    record "failed (bad JSON)" "" "" "" ""
    failed=1
    return 0
  fi
  local tps ms alloc note
  IFS=$'\t' read -r tps ms alloc note <<< "$parsed"
  # ours reports the precision it resolved; say so when it is not the one asked for.
  if [ "$kind" = ours ] && [ "$trainer" != ours_auto ] && [ "$note" != "${trainer#ours_}" ]; then
    label="$label (ran $note!)"
  elif [ "$trainer" = ours_auto ]; then
    label="$label (auto: $note)"
  fi
  echo "[$done_rows/$total] $tag: $(printf '%.0f' "$tps") tokens/s, $(printf '%.1f' "$ms") ms/step, peak GPU +$peak MB ($((SECONDS - started)) s)"
  record ok "$tps" "$ms" "$peak" "$alloc"
}

for r in ${rows[@]+"${rows[@]}"}; do
  IFS=: read -r v g m <<< "$r"
  run_row "$v" "$g" "$m"
done
draw_table || echo "bench-gpu.sh: could not draw $table" >&2
echo
cat "$table"
exit "$failed"
