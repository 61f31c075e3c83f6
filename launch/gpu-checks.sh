#!/usr/bin/env bash
# The GPU checks no CI machine can run, for a GPU host without cargo (ships in the bundle):
#   launch/gpu-checks.sh [WORK_DIR]
#  1. `algpt2-ddp doctor` (one rank per GPU under mpirun): versions, GPUs, kernels against
#     libtorch, NCCL and MPI all-reduce, one training step;
#  2. a run killed (SIGKILL) and resumed on the GPU against an uninterrupted GPU run, next
#     to two uninterrupted runs against each other (byte-identical, or the difference);
#  3. a checkpoint written on the GPU resumed on the CPU, and one written on the CPU
#     resumed on the GPU;
#  4. more ranks than GPUs with device: cuda gives the clear error (exit 2);
#  5. bf16 (train.precision: bf16) on the GPU: a training whose summary.json says
#     "precision": "bf16"; a bf16 run killed (SIGKILL) at step 6 and resumed, whose
#     model.safetensors and optimizer.safetensors must be byte-identical to an
#     uninterrupted bf16 run's (when two uninterrupted bf16 runs are not byte-identical
#     themselves, the differences are compared as in 2); and train.precision: auto
#     resolving to bf16 on a GPU of compute capability >= 8.0 (fp32 below);
#  6. the W&B system metrics of the GPU (wandb.mode: offline, a sample a second): the
#     system.gpu.0.* values of wandb-events.jsonl next to nvidia-smi's, sampled alike;
#  7. the NCCL exchange overlapped with backward (dist.backend: nccl in a world of one,
#     the GPT-2 variant, buckets of 10 kB): fp32 and bf16 compute, fp32 and bf16 on the
#     wire, each against dist.overlap: false (byte-identical weights, or no further apart
#     than two runs without overlap), the log naming the overlapped exchange, and
#     train/comm_ms and train/comm_exposed_ms numbers in every row of metrics.jsonl.
#  8. the overlapped NCCL exchange across two GPUs (`mpirun -n 2`, dist.backend: nccl, the
#     GPT-2 variant): byte-identical weights to dist.overlap: false on both wires, or no
#     further apart than two runs without overlap; "skipped: needs 2 GPUs" elsewhere.
#  9. a rank that never joins NCCL (ALGPT2_FAULT=nccl_never_join@0:1, `mpirun -n 2`,
#     dist.backend: nccl, dist.timeout_s: NEVER_JOIN_TIMEOUT_S, default 10): rank 0 must
#     give up within dist.timeout_s, abort its init (ncclCommAbort) and name the phase
#     ("start-up: NCCL init: rank 0 of 2 (GPU 0) did not join ..."). Rank 1 makes no CUDA
#     or NCCL call, so one GPU suffices: it runs with no GPU visible (CUDA_VISIBLE_DEVICES
#     empty, so device: auto gives it the CPU; the ranks' settings are not compared, as
#     they differ in that) and waits twice as long as rank 0, so that rank 0's deadline
#     is what ends the job.
# Checks 2 and 3 run with train.precision: fp32 (auto would pick bf16 on most GPUs).
# GPU_CHECKS (default "1 2 3 4 5 6 7 8 9") picks the checks by number; the others print
# "skipped: not in GPU_CHECKS". OVERLAP_CASES (default "fp32 fp32,fp32 bf16,bf16 fp32,bf16
# bf16": compute and wire precision) picks check 7's cases. launch/gpu-prove.sh runs a
# subset of both, then bench-gpu.sh, in one call.
# Each prints PASS, FAIL or "skipped: ..." (no GPU: only the CPU parts of 1 run); exit 1
# when anything failed. Results and logs go to WORK_DIR (default: a temporary directory).
# DOCTOR_SIZES_MB (default 1,16,64,256) sets the all-reduce sizes doctor times.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
bin="${ALGPT2_BIN_UNDER_TEST:-$BIN_RELEASE}"
work="${1:-$(mktemp -d)}"
mkdir -p "$work"
failures=0
pass() { echo "PASS  $*"; }
fail() { echo "FAIL  $*"; failures=$((failures + 1)); }
skip() { echo "SKIP  $1: skipped: $2"; }
checks=" ${GPU_CHECKS:-1 2 3 4 5 6 7 8 9} "
want() { [[ "$checks" == *" $1 "* ]]; }
# "skipped" for a check left out, where it has a GPU to run on.
left_out() { skip "$1" "not in GPU_CHECKS"; }

gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
gpus=${gpus:-0}
echo "gpu-checks: $gpus GPU(s), binary $bin, work dir $work"

# --- 1. doctor -----------------------------------------------------------------------
ranks=$(( gpus > 0 ? gpus : 2 ))
sizes=(--sizes-mb "${DOCTOR_SIZES_MB:-1,16,64,256}")
if command -v mpirun >/dev/null; then
  doctor=("${MPIRUN[@]}" -n "$ranks" --bind-to none "$bin" doctor "${sizes[@]}")
else
  doctor=("$bin" doctor "${sizes[@]}")
fi
if ! want 1; then
  left_out "doctor"
elif timeout 600 "${doctor[@]}" > "$work/doctor.txt" 2>&1; then
  pass "doctor (${doctor[*]:0:3} ...): $(tail -1 "$work/doctor.txt")"
else
  fail "doctor: $(tail -1 "$work/doctor.txt") (see $work/doctor.txt)"
fi

# The quickstart model, small and quick; checkpoints at steps 4, 8, 12.
tiny=(--config configs/quickstart.yaml --set "out_dir=$work/runs" --set train.max_steps=12 --set train.save_interval=4
      --set train.eval_interval=1000 --set train.log_interval=1 --set optim.warmup_steps=2 --set wandb.mode=disabled
      --set checkpoint.keep_last=5)
weights() { echo "$work/runs/$1/checkpoints/step_$(printf %08d "$2")/model.safetensors"; }
# Largest |a - b| over all tensors of two safetensors files, with the host's torch.
max_diff() {
  python3 - "$1" "$2" <<'PY'
import json, struct, sys, torch
def load(path):
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n]); body = raw[8 + n:]
    dtypes = {"F32": torch.float32, "F64": torch.float64, "BF16": torch.bfloat16, "F16": torch.float16,
              "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8}
    return {k: torch.frombuffer(bytearray(body[v["data_offsets"][0]:v["data_offsets"][1]]), dtype=dtypes[v["dtype"]])
            for k, v in header.items() if k != "__metadata__"}
a, b = load(sys.argv[1]), load(sys.argv[2])
print(max((a[k].double() - b[k].double()).abs().max().item() for k in a))
PY
}
optimizer() { echo "$work/runs/$1/checkpoints/step_$(printf %08d "$2")/optimizer.safetensors"; }
train() { # NAME DEVICE STEPS [env...]: in fp32
  train_in fp32 "$@"
}
train_in() { # PRECISION NAME DEVICE STEPS [env...]
  local precision=$1 name=$2 device=$3 steps=$4; shift 4
  env "$@" "$bin" "${tiny[@]}" --set "run_name=$name" --set "device=$device" --set "train.max_steps=$steps" \
    --set "train.precision=$precision" >> "$work/$name.log" 2>&1
}
# What train.precision resolved to in a finished run: summary.json's "precision".
precision_of() {
  python3 -c 'import json, sys; print(json.load(open(sys.argv[1])).get("precision", "absent"))' \
    "$work/runs/$1/summary.json" 2>/dev/null || echo "unreadable (no summary.json?)"
}
# The log's "precision: ... (why)" line, for the PASS messages.
precision_line() { grep -m1 -oE 'precision: (bf16|fp32) \(.*\)' "$work/$1.log" || echo "no precision line in $work/$1.log"; }

if [ "$gpus" -eq 0 ]; then
  # Three lines, as tests/bundle.rs expects: the bf16 checks (5) ride on two of them.
  skip "kill and resume on the GPU (fp32 and bf16)" "no GPU"
  skip "checkpoint GPU -> CPU and CPU -> GPU" "no GPU"
  skip "more ranks than GPUs, bf16 training, train.precision: auto on the GPU, W&B system.gpu.* against nvidia-smi, the overlapped NCCL exchange, a rank that never joins NCCL" "no GPU"
fi
if [ "$gpus" -gt 0 ] && ! want 2; then left_out "kill and resume on the GPU (fp32)"; fi
if [ "$gpus" -gt 0 ] && want 2; then
  # --- 2. kill and resume on the GPU -------------------------------------------------
  train gpu_a cuda 12; train gpu_b cuda 12
  train gpu_k cuda 12 ALGPT2_FAULT=kill@6; killed=$?
  train gpu_k cuda 12; resumed=$?
  if [ "$killed" -ne 137 ] || [ "$resumed" -ne 0 ] || [ ! -f "$(weights gpu_k 12)" ]; then
    fail "kill and resume on the GPU: killed run exit $killed (want 137), resume exit $resumed (see $work/gpu_k.log)"
  else
    ab=$(max_diff "$(weights gpu_a 12)" "$(weights gpu_b 12)")
    ak=$(max_diff "$(weights gpu_a 12)" "$(weights gpu_k 12)")
    if cmp -s "$(weights gpu_a 12)" "$(weights gpu_k 12)"; then
      pass "kill and resume on the GPU: weights byte-identical to the uninterrupted run (two uninterrupted runs differ by $ab)"
    elif awk -v k="$ak" -v b="$ab" 'BEGIN { exit !(k <= 10 * b + 1e-6) }'; then
      pass "kill and resume on the GPU: max |difference| $ak against the uninterrupted run; two uninterrupted runs differ by $ab"
    else
      fail "kill and resume on the GPU: max |difference| $ak, but two uninterrupted runs differ by only $ab"
    fi
  fi
fi
if [ "$gpus" -gt 0 ] && ! want 3; then left_out "checkpoint GPU -> CPU and CPU -> GPU"; fi
if [ "$gpus" -gt 0 ] && want 3; then
  # --- 3. checkpoints across devices ----------------------------------------------------
  [ -f "$(weights gpu_a 12)" ] || train gpu_a cuda 12
  train gpu_to_cpu cuda 8 && train gpu_to_cpu cpu 12
  if [ $? -eq 0 ] && grep -q "resumed from .*step_00000008 at step 8" "$work/gpu_to_cpu.log" && [ -f "$(weights gpu_to_cpu 12)" ]; then
    pass "checkpoint GPU -> CPU: resumed at step 8, finished step 12 (max |difference| to the GPU run $(max_diff "$(weights gpu_a 12)" "$(weights gpu_to_cpu 12)"))"
  else
    fail "checkpoint GPU -> CPU (see $work/gpu_to_cpu.log)"
  fi
  train cpu_to_gpu cpu 8 && train cpu_to_gpu cuda 12
  if [ $? -eq 0 ] && grep -q "resumed from .*step_00000008 at step 8" "$work/cpu_to_gpu.log" && [ -f "$(weights cpu_to_gpu 12)" ]; then
    pass "checkpoint CPU -> GPU: resumed at step 8, finished step 12 (max |difference| to the GPU run $(max_diff "$(weights gpu_a 12)" "$(weights cpu_to_gpu 12)"))"
  else
    fail "checkpoint CPU -> GPU (see $work/cpu_to_gpu.log)"
  fi
fi
if [ "$gpus" -gt 0 ] && ! want 4; then left_out "more ranks than GPUs"; fi
if [ "$gpus" -gt 0 ] && want 4; then
  # --- 4. more ranks than GPUs ------------------------------------------------------------
  "${MPIRUN[@]}" -n $((gpus + 1)) --bind-to none "$bin" "${tiny[@]}" --set run_name=too_many --set device=cuda > "$work/too_many.log" 2>&1
  code=$?
  if [ "$code" -eq 2 ] && grep -q "has no GPU of its own" "$work/too_many.log"; then
    pass "more ranks than GPUs: exit 2, \"$(grep -m1 -o 'local rank [0-9]* has no GPU of its own[^"]*' "$work/too_many.log")\""
  else
    fail "more ranks than GPUs: exit $code (want 2 and the no-GPU message; see $work/too_many.log)"
  fi
fi
if [ "$gpus" -gt 0 ] && ! want 5; then left_out "bf16 training, kill and resume, train.precision: auto on the GPU"; fi
if [ "$gpus" -gt 0 ] && want 5; then
  # --- 5. bf16 on the GPU ------------------------------------------------------------------
  train_in bf16 bf16_a cuda 12; trained=$?
  got=$(precision_of bf16_a)
  if [ "$trained" -eq 0 ] && [ "$got" = bf16 ] && [ -f "$(weights bf16_a 12)" ]; then
    pass "bf16 training on the GPU: 12 steps, summary.json says \"precision\": \"bf16\" ($(precision_line bf16_a))"
  else
    fail "bf16 training on the GPU: exit $trained, summary.json precision $got (want exit 0 and bf16; see $work/bf16_a.log)"
  fi
  train_in bf16 bf16_b cuda 12
  train_in bf16 bf16_k cuda 12 ALGPT2_FAULT=kill@6; killed=$?
  train_in bf16 bf16_k cuda 12; resumed=$?
  got=$(precision_of bf16_k)
  if [ "$killed" -ne 137 ] || [ "$resumed" -ne 0 ] || [ ! -f "$(weights bf16_k 12)" ] || [ ! -f "$(optimizer bf16_k 12)" ] \
     || [ ! -f "$(weights bf16_a 12)" ] || [ ! -f "$(weights bf16_b 12)" ]; then
    fail "bf16 kill and resume on the GPU: killed run exit $killed (want 137), resume exit $resumed (see $work/bf16_k.log, $work/bf16_a.log, $work/bf16_b.log)"
  elif ! grep -q "resumed from .*step_00000004 at step 4" "$work/bf16_k.log"; then
    fail "bf16 kill and resume on the GPU: the second run did not resume from step 4 (see $work/bf16_k.log)"
  elif [ "$got" != bf16 ]; then
    fail "bf16 kill and resume on the GPU: the resumed run's summary.json precision is $got (want bf16)"
  elif cmp -s "$(weights bf16_a 12)" "$(weights bf16_k 12)" && cmp -s "$(optimizer bf16_a 12)" "$(optimizer bf16_k 12)"; then
    if cmp -s "$(weights bf16_a 12)" "$(weights bf16_b 12)" && cmp -s "$(optimizer bf16_a 12)" "$(optimizer bf16_b 12)"; then
      ab="byte-identical too"
    else
      ab="differ by $(max_diff "$(weights bf16_a 12)" "$(weights bf16_b 12)") (weights)"
    fi
    pass "bf16 kill and resume on the GPU: model.safetensors and optimizer.safetensors byte-identical to the uninterrupted bf16 run (two uninterrupted bf16 runs $ab)"
  else
    ak_w=$(max_diff "$(weights bf16_a 12)" "$(weights bf16_k 12)")
    ak_o=$(max_diff "$(optimizer bf16_a 12)" "$(optimizer bf16_k 12)")
    if cmp -s "$(weights bf16_a 12)" "$(weights bf16_b 12)" && cmp -s "$(optimizer bf16_a 12)" "$(optimizer bf16_b 12)"; then
      fail "bf16 kill and resume on the GPU: not byte-identical (max |difference| weights $ak_w, optimizer $ak_o), though two uninterrupted bf16 runs are"
    else
      ab_w=$(max_diff "$(weights bf16_a 12)" "$(weights bf16_b 12)")
      ab_o=$(max_diff "$(optimizer bf16_a 12)" "$(optimizer bf16_b 12)")
      number='^[0-9.eE+-]+$'
      if ! [[ "$ak_w" =~ $number && "$ak_o" =~ $number && "$ab_w" =~ $number && "$ab_o" =~ $number ]]; then
        fail "bf16 kill and resume on the GPU: not byte-identical, and the differences could not be computed (python3 with torch needed): '$ak_w' '$ak_o' '$ab_w' '$ab_o'"
      elif awk -v kw="$ak_w" -v bw="$ab_w" -v ko="$ak_o" -v bo="$ab_o" \
           'BEGIN { exit !(kw <= 10 * bw + 1e-6 && ko <= 10 * bo + 1e-6) }'; then
        pass "bf16 kill and resume on the GPU: not byte-identical, but neither are two uninterrupted bf16 runs: max |difference| weights $ak_w (uninterrupted pair $ab_w), optimizer $ak_o (pair $ab_o)"
      else
        fail "bf16 kill and resume on the GPU: max |difference| weights $ak_w, optimizer $ak_o, but two uninterrupted bf16 runs differ by only $ab_w, $ab_o"
      fi
    fi
  fi
  # auto: bf16 on compute capability >= 8.0 (bf16 tensor cores), fp32 below. The
  # capability of the GPU the run uses (CUDA device 0), from the host's torch or nvidia-smi.
  cc=$(python3 -c 'import torch; assert torch.cuda.is_available(); print("%d.%d" % torch.cuda.get_device_capability(0))' 2>/dev/null \
       || nvidia-smi --query-gpu=compute_cap --format=csv,noheader -i 0 2>/dev/null | head -1 | tr -d ' ')
  train_in auto auto_a cuda 4; trained=$?
  got=$(precision_of auto_a)
  if [ "$trained" -ne 0 ]; then
    fail "train.precision: auto on the GPU: exit $trained (see $work/auto_a.log)"
  elif ! [[ "$cc" =~ ^[0-9]+\.[0-9]+$ ]]; then
    skip "train.precision: auto on the GPU" "the compute capability is unknown (neither torch nor nvidia-smi gave it); auto resolved to $got ($(precision_line auto_a))"
  else
    want=fp32
    if [ "${cc%%.*}" -ge 8 ]; then want=bf16; fi
    if [ "$got" = "$want" ]; then
      pass "train.precision: auto on the GPU: compute capability $cc, summary.json says \"precision\": \"$got\" ($(precision_line auto_a))"
    else
      fail "train.precision: auto on the GPU: compute capability $cc wants $want, summary.json says $got (see $work/auto_a.log)"
    fi
  fi
fi
if [ "$gpus" -gt 0 ] && ! want 6; then left_out "W&B system.gpu.* against nvidia-smi"; fi
if [ "$gpus" -gt 0 ] && want 6; then
  # --- 6. W&B system metrics of the GPU against nvidia-smi ------------------------------
  smi="$work/nvidia-smi.csv"
  ( for _ in $(seq 1 60); do
      nvidia-smi -i 0 --query-gpu=utilization.gpu,memory.used,temperature.gpu,power.draw,clocks.sm --format=csv,noheader,nounits >> "$smi" 2>/dev/null
      sleep 1
    done ) & smi_pid=$!
  "$bin" "${tiny[@]}" --set run_name=gpu_stats --set device=cuda --set train.max_steps=400 --set train.grad_accum_steps=8 \
    --set wandb.mode=offline --set wandb.stats_interval_s=1 --set train.log_interval=50 > "$work/gpu_stats.log" 2>&1
  trained=$?
  kill "$smi_pid" 2>/dev/null; wait "$smi_pid" 2>/dev/null
  compared=$(python3 - "$work/runs/gpu_stats" "$smi" <<'PY'
import glob, json, statistics, sys
events = [json.loads(l) for f in glob.glob(sys.argv[1] + "/wandb/run-*/events.jsonl") for l in open(f)]
rows = [l.strip().split(", ") for l in open(sys.argv[2]) if l.strip()]
keys = [("gpu", 0, 1), ("memoryAllocatedBytes", 1, 1024 * 1024), ("temp", 2, 1), ("powerWatts", 3, 1), ("smClock", 4, 1)]
out, missing = [], []
for key, col, scale in keys:
    ours = [e["system.gpu.0." + key] for e in events if "system.gpu.0." + key in e]
    theirs = [float(r[col]) * scale for r in rows if len(r) == 5 and r[col] not in ("[N/A]", "N/A")]
    if not ours:
        missing.append(key)
        continue
    med = lambda v: statistics.median(v) if v else float("nan")
    out.append(f"{key} ours {med(ours):.4g} nvidia-smi {med(theirs):.4g}")
print(("MISSING " + ",".join(missing) + "; " if missing else "") + f"{len(events)} samples: " + "; ".join(out))
PY
)
  if [ "$trained" -eq 0 ] && [[ "$compared" != MISSING* ]] && [[ "$compared" != "0 samples"* ]]; then
    pass "W&B system.gpu.0.* against nvidia-smi (medians over the run): $compared"
  else
    fail "W&B system.gpu.0.*: exit $trained, $compared (see $work/gpu_stats.log)"
  fi
fi
# --- 7 and 8. the NCCL exchange overlapped with backward ----------------------------------
gpt2=(--set model.share_layers=false --set model.embedding_size=null --set dist.backend=nccl --set dist.bucket_mb=0.01)
comm_numbers() { # RUN: "ok N" when every row has numeric train/comm_ms and train/comm_exposed_ms
  python3 - "$work/runs/$1/metrics.jsonl" <<'PY'
import json, math, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"train/loss"' in l]
bad = [r.get("step") for r in rows
       if not all(isinstance(r.get(k), (int, float)) and math.isfinite(r[k]) and r[k] >= 0 for k in ("train/comm_ms", "train/comm_exposed_ms"))]
print(f"ok {len(rows)} rows, comm_ms mean {sum(r['train/comm_ms'] for r in rows) / max(len(rows), 1):.3f}" if rows and not bad else f"bad rows {bad[:5]} of {len(rows)}")
PY
}
# RANKS PRECISION WIRE: the GPT-2 variant (a staged backward) trained 8 steps with
# dist.overlap true, and twice with false; one rank per GPU under mpirun for RANKS > 1.
overlap_case() {
  local ranks=$1 precision=$2 wire=$3 launch=() label
  local name="overlap${ranks}_${precision}_${wire}"
  label="overlapped NCCL exchange on $ranks GPU(s) ($precision compute, $wire wire)"
  if [ "$ranks" -gt 1 ]; then launch=("${MPIRUN[@]}" -n "$ranks" --bind-to none); fi
  for variant in after after2 during; do
    overlap=false; [ "$variant" = during ] && overlap=true
    timeout 180 "${launch[@]}" "$bin" "${tiny[@]}" "${gpt2[@]}" --set "run_name=${name}_$variant" --set device=cuda \
      --set train.max_steps=8 --set "train.precision=$precision" --set "dist.grad_dtype=$wire" --set "dist.overlap=$overlap" \
      >> "$work/${name}_$variant.log" 2>&1
  done
  said=$(grep -m1 -o 'gradient exchange: .*' "$work/${name}_during.log" || echo "no exchange line")
  during=$(weights "${name}_during" 8); after=$(weights "${name}_after" 8); after2=$(weights "${name}_after2" 8)
  if [ ! -f "$during" ] || [ ! -f "$after" ] || [ ! -f "$after2" ]; then
    fail "$label: a run failed (see $work/${name}_*.log)"
  elif [[ "$said" != *"nccl, $wire gradients, overlapped with backward"* ]]; then
    fail "$label: the log says \"$said\""
  elif [[ "$(comm_numbers "${name}_during")" != ok* ]]; then
    fail "$label: metrics.jsonl: $(comm_numbers "${name}_during")"
  elif cmp -s "$during" "$after"; then
    pass "$label: weights byte-identical to dist.overlap: false; $(comm_numbers "${name}_during")"
  else
    d=$(max_diff "$during" "$after"); a=$(max_diff "$after" "$after2")
    if awk -v d="$d" -v a="$a" 'BEGIN { exit !(d <= 10 * a + 1e-6) }'; then
      pass "$label: max |difference| $d to dist.overlap: false, two runs without overlap $a; $(comm_numbers "${name}_during")"
    else
      fail "$label: max |difference| $d to dist.overlap: false, but two runs without overlap differ by only $a"
    fi
  fi
}
IFS=, read -r -a overlap_cases <<< "${OVERLAP_CASES:-fp32 fp32,fp32 bf16,bf16 fp32,bf16 bf16}"
if [ "$gpus" -gt 0 ] && ! want 7; then left_out "the overlapped NCCL exchange"; fi
if [ "$gpus" -gt 0 ] && want 7; then
  for case in "${overlap_cases[@]}"; do
    overlap_case 1 $case
  done
fi
if ! want 8; then
  [ "$gpus" -lt 2 ] || left_out "the overlapped NCCL exchange on 2 GPUs"
elif [ "$gpus" -lt 2 ]; then
  skip "the overlapped NCCL exchange on 2 GPUs (mpirun -n 2)" "needs 2 GPUs (this machine has $gpus)"
elif ! command -v mpirun >/dev/null; then
  fail "the overlapped NCCL exchange on 2 GPUs: mpirun is not on PATH"
else
  for case in "${overlap_cases[@]}"; do
    overlap_case 2 $case
  done
fi
# --- 9. a rank that never joins NCCL -------------------------------------------------------
if [ "$gpus" -gt 0 ] && ! want 9; then left_out "a rank that never joins NCCL"; fi
if [ "$gpus" -gt 0 ] && want 9; then
  limit="${NEVER_JOIN_TIMEOUT_S:-10}"
  label="a rank that never joins NCCL (mpirun -n 2 on one GPU, dist.timeout_s $limit)"
  if ! command -v mpirun >/dev/null; then
    fail "$label: mpirun is not on PATH"
  else
    never=("$bin" "${tiny[@]}" --set run_name=never_join --set device=auto --set dist.backend=nccl
           --set "dist.timeout_s=$limit" --set train.precision=fp32)
    fault=ALGPT2_FAULT=nccl_never_join@0:1,unchecked_ranks@0
    log="$work/never_join.log"
    began=$SECONDS
    timeout 300 "${MPIRUN[@]}" --bind-to none -n 1 env "$fault" "${never[@]}" \
      : -n 1 env "$fault" CUDA_VISIBLE_DEVICES= "${never[@]}" > "$log" 2>&1
    code=$? took=$((SECONDS - began))
    said=$(grep -m1 -o -F "start-up: NCCL init: rank 0 of 2 (GPU 0) did not join the NCCL communicator within $limit s (dist.timeout_s)" "$log" || true)
    if [ "$code" -eq 0 ] || [ "$code" -eq 124 ]; then
      fail "$label: exit $code after $took s (want a failure within about $limit s; see $log)"
    elif [ -z "$said" ]; then
      fail "$label: exit $code after $took s, but rank 0 did not name the NCCL init's deadline (see $log)"
    elif ! grep -q "ncclCommAbort" "$log"; then
      fail "$label: rank 0 timed out, but its init was not aborted (no ncclCommAbort in $log)"
    else
      pass "$label: exit $code after $took s in all, rank 0: \"$said\", aborted (ncclCommAbort)"
    fi
  fi
fi
echo "gpu-checks: $failures failure(s)"
[ "$failures" -eq 0 ]
