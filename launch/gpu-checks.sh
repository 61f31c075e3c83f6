#!/usr/bin/env bash
# The GPU checks no CI machine can run, for a GPU host without cargo (ships in the bundle):
#   launch/gpu-checks.sh [WORK_DIR]
#  1. `algpt2-ddp doctor` (one rank per GPU under mpirun): versions, GPUs, kernels against
#     libtorch, NCCL and MPI all-reduce, one training step;
#  2. a run killed (SIGKILL) and resumed on the GPU against an uninterrupted GPU run, next
#     to two uninterrupted runs against each other (byte-identical, or the difference);
#  3. a checkpoint written on the GPU resumed on the CPU, and one written on the CPU
#     resumed on the GPU;
#  4. more ranks than GPUs with device: cuda gives the clear error (exit 2).
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
if timeout 600 "${doctor[@]}" > "$work/doctor.txt" 2>&1; then
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
    return {k: torch.frombuffer(bytearray(body[v["data_offsets"][0]:v["data_offsets"][1]]), dtype=torch.float32)
            for k, v in header.items() if k != "__metadata__"}
a, b = load(sys.argv[1]), load(sys.argv[2])
print(max((a[k].double() - b[k].double()).abs().max().item() for k in a))
PY
}
train() { # NAME DEVICE STEPS [env...]
  local name=$1 device=$2 steps=$3; shift 3
  env "$@" "$bin" "${tiny[@]}" --set "run_name=$name" --set "device=$device" --set "train.max_steps=$steps" >> "$work/$name.log" 2>&1
}

if [ "$gpus" -eq 0 ]; then
  skip "kill and resume on the GPU" "no GPU"
  skip "checkpoint GPU -> CPU and CPU -> GPU" "no GPU"
  skip "more ranks than GPUs" "no GPU"
else
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
  # --- 3. checkpoints across devices ----------------------------------------------------
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
  # --- 4. more ranks than GPUs ------------------------------------------------------------
  "${MPIRUN[@]}" -n $((gpus + 1)) --bind-to none "$bin" "${tiny[@]}" --set run_name=too_many --set device=cuda > "$work/too_many.log" 2>&1
  code=$?
  if [ "$code" -eq 2 ] && grep -q "has no GPU of its own" "$work/too_many.log"; then
    pass "more ranks than GPUs: exit 2, \"$(grep -m1 -o 'local rank [0-9]* has no GPU of its own[^"]*' "$work/too_many.log")\""
  else
    fail "more ranks than GPUs: exit $code (want 2 and the no-GPU message; see $work/too_many.log)"
  fi
fi
echo "gpu-checks: $failures failure(s)"
[ "$failures" -eq 0 ]
