#!/usr/bin/env bash
# The GPU path proven in one call, for a short device lease (from a checkout or an
# unpacked bundle, no cargo needed):
#   launch/gpu-prove.sh [OUT_DIR]          (default OUT_DIR: a temporary directory)
# 1. launch/gpu-checks.sh with the checks a lease must see: doctor (kernels against
#    libtorch, fused AdamW against the CPU's, fused attention with dropout against the math
#    path, NCCL), bf16 training killed and resumed byte-identical, the overlapped NCCL
#    exchange against the exchange after backward in a world of one (the GPT-2 variant,
#    whose backward is staged) and on 2 GPUs where there are 2;
# 2. launch/bench-gpu.sh in the time left: ours against PyTorch bf16 eager and bf16 +
#    torch.compile, vocabulary 50,257 and padded, GPT-2 and ALGPT2, seq 1024 x 16 and
#    256 x 60, the goal's row (GPT-2 at 1024 x 16) first;
# then one summary table: every check's verdict and the benchmark's rows.
# TOTAL_S (default 480) bounds the whole; CHECKS_S (default 210) the checks. GPU_CHECKS,
# OVERLAP_CASES, VARIANTS, GEOMETRIES, MODES and STEPS override the subsets below.
# Exit 1 when a check or a row failed, else 0.
set -uo pipefail
export LC_NUMERIC=C
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:-$(mktemp -d)}"
mkdir -p "$out"
total="${TOTAL_S:-480}"
checks_s="${CHECKS_S:-210}"
for n in "$total" "$checks_s"; do
  [[ "$n" =~ ^[0-9]+$ ]] || { echo "gpu-prove.sh: TOTAL_S and CHECKS_S must be whole numbers (got '$n')" >&2; exit 2; }
done
started=$SECONDS
echo "gpu-prove: $(date -u +%Y-%m-%dT%H:%MZ), $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || echo 'no GPU'), out $out"

GPU_CHECKS="${GPU_CHECKS:-1 5 7 8}" OVERLAP_CASES="${OVERLAP_CASES:-bf16 fp32,bf16 bf16}" DOCTOR_SIZES_MB="${DOCTOR_SIZES_MB:-16,256}" \
  timeout --kill-after=10 "$checks_s" bash "$here/gpu-checks.sh" "$out/checks" > "$out/checks.txt" 2>&1
checks_rc=$?
[ "$checks_rc" -eq 124 ] && echo "FAIL  gpu-checks.sh: still running after CHECKS_S=$checks_s s (killed)" >> "$out/checks.txt"

left=$(( total - (SECONDS - started) ))
bench_rc=0
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
if [ "${gpus:-0}" -eq 0 ]; then
  echo "skipped: no GPU" > "$out/bench.txt"
elif [ "$left" -gt 30 ]; then
  VARIANTS="${VARIANTS-gpt2 algpt2}" GEOMETRIES="${GEOMETRIES-1024x16 256x60}" STEPS="${STEPS:-10}" \
    MODES="${MODES-ours_bf16 bf16_compile_pad bf16_compile bf16_autocast_pad bf16_autocast}" \
    BUDGET_S="$left" RUN_TIMEOUT="${RUN_TIMEOUT:-150}" bash "$here/bench-gpu.sh" "$out/bench" > "$out/bench.txt" 2>&1
  bench_rc=$?
else
  echo "skipped: $left s left of TOTAL_S=$total after the checks" > "$out/bench.txt"
fi

echo
echo "## Summary ($(( SECONDS - started )) s)"
echo
echo "| check | verdict |"
echo "|---|---|"
grep -E '^(PASS|FAIL|SKIP)  ' "$out/checks.txt" | sed -E 's/^(PASS|FAIL|SKIP)  (.*)$/| \2 | \1 |/' | cut -c1-400
echo
if [ -f "$out/bench/table.md" ]; then
  cat "$out/bench/table.md"
else
  echo "benchmark: $(tail -1 "$out/bench.txt")"
fi
echo
echo "gpu-prove: checks exit $checks_rc, benchmark exit $bench_rc (logs: $out/checks.txt, $out/bench.txt)"
[ "$checks_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
