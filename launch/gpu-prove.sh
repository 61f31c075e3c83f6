#!/usr/bin/env bash
# The GPU path proven in one call, for a short device lease (from a checkout or an
# unpacked bundle, no cargo needed):
#   launch/gpu-prove.sh [OUT_DIR]          (default OUT_DIR: a temporary directory)
# 1. launch/gpu-checks.sh with the checks a lease must see: doctor (kernels against
#    libtorch, fused AdamW against the CPU's, fused attention with dropout against the math
#    path, NCCL), bf16 training killed and resumed byte-identical, the overlapped NCCL
#    exchange against the exchange after backward in a world of one (the GPT-2 variant,
#    whose backward is staged) and on 2 GPUs where there are 2, and a rank that never
#    joins NCCL (a world of two on one GPU: rank 0 must time out, abort and say where);
# 2. launch/bench-gpu.sh in the time left: ours against PyTorch bf16 eager and bf16 +
#    torch.compile, vocabulary 50,257 and padded, GPT-2 and ALGPT2, seq 1024 x 16 and
#    256 x 60. The rows that must be measured run first: the goal's (GPT-2 at 1024 x 16,
#    ours against bf16 + torch.compile with the padded vocabulary), then GPT-2's and
#    ALGPT2's at 256 x 60 against eager bf16 (padded, then V 50,257); the others follow
#    while the budget lasts and read "skipped (budget)" after it;
# then one summary table: every check's verdict, the goal's, and the benchmark's rows.
# TOTAL_S (default 480) bounds the whole; CHECKS_S (default 210) the checks. GPU_CHECKS,
# OVERLAP_CASES, VARIANTS, GEOMETRIES, MODES, ROWS and STEPS override the subsets below
# (ROWS, as bench-gpu.sh takes it, replaces the order made from the other three).
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
# A previous run's benchmark rows must not stand in for this one's.
rm -f "$out/bench/rows.md" "$out/bench/header.md" "$out/bench/table.md"
echo "gpu-prove: $(date -u +%Y-%m-%dT%H:%MZ), $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || echo 'no GPU'), out $out"

GPU_CHECKS="${GPU_CHECKS:-1 5 7 8 9}" OVERLAP_CASES="${OVERLAP_CASES:-bf16 fp32,bf16 bf16}" DOCTOR_SIZES_MB="${DOCTOR_SIZES_MB:-16,256}" \
  timeout --kill-after=10 "$checks_s" bash "$here/gpu-checks.sh" "$out/checks" > "$out/checks.txt" 2>&1
checks_rc=$?
[ "$checks_rc" -eq 124 ] && echo "FAIL  gpu-checks.sh: still running after CHECKS_S=$checks_s s (killed)" >> "$out/checks.txt"

left=$(( total - (SECONDS - started) ))
bench_rc=0
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
if [ "${gpus:-0}" -eq 0 ]; then
  echo "skipped: no GPU" > "$out/bench.txt"
elif [ "$left" -gt 30 ]; then
  variants="${VARIANTS-gpt2 algpt2}" geometries="${GEOMETRIES-1024x16 256x60}"
  modes="${MODES-ours_bf16 bf16_compile_pad bf16_compile bf16_autocast_pad bf16_autocast}"
  first="gpt2:1024x16:ours_bf16 gpt2:1024x16:bf16_compile_pad
         gpt2:256x60:ours_bf16 gpt2:256x60:bf16_autocast_pad gpt2:256x60:bf16_autocast
         algpt2:256x60:ours_bf16 algpt2:256x60:bf16_autocast_pad algpt2:256x60:bf16_autocast"
  among() { [[ " $(echo $2) " == *" $1 "* ]]; } # WORD LIST
  rows=()
  for r in $first; do
    IFS=: read -r v g m <<< "$r"
    if among "$v" "$variants" && among "$g" "$geometries" && among "$m" "$modes"; then rows+=("$r"); fi
  done
  for v in $variants; do for g in $geometries; do for m in $modes; do
    among "$v:$g:$m" "${rows[*]-}" || rows+=("$v:$g:$m")
  done; done; done
  rows="${ROWS-${rows[*]-}}"
  if [ -z "${rows// /}" ]; then
    echo "skipped: no rows (VARIANTS, GEOMETRIES, MODES or ROWS chose none)" > "$out/bench.txt"
  else
    ROWS="$rows" STEPS="${STEPS:-10}" BUDGET_S="$left" RUN_TIMEOUT="${RUN_TIMEOUT:-150}" \
      bash "$here/bench-gpu.sh" "$out/bench" > "$out/bench.txt" 2>&1
    bench_rc=$?
  fi
else
  echo "skipped: $left s left of TOTAL_S=$total after the checks" > "$out/bench.txt"
fi

echo
if [ -f "$out/bench/header.md" ]; then cat "$out/bench/header.md"; echo; fi
echo "## Summary ($(( SECONDS - started )) s)"
echo
# One table: the checks, the goal's verdict, the benchmark's rows (bench-gpu.sh's
# rows.md; its full table is in $out/bench/table.md).
echo "| check or benchmark row | verdict | figures |"
echo "|---|---|---|"
# A message's own bars ("max |difference|") escaped, so that they stay in its cell.
grep -E '^(PASS|FAIL|SKIP)  ' "$out/checks.txt" | cut -c1-400 | sed -E 's/\|/\\|/g' \
  | sed -E 's/^(PASS|FAIL|SKIP)  (.*)$/| \2 | \1 | |/'
# Benchmark rows say ok, failed or skipped, as bench-gpu.sh's rows do.
if [ -s "$out/bench/rows.md" ]; then
  cat "$out/bench/rows.md"
elif [ "$bench_rc" -eq 0 ]; then
  echo "| benchmark: $(tail -1 "$out/bench.txt") | skipped | |"
else
  echo "| benchmark: $(tail -1 "$out/bench.txt" | cut -c1-300) | failed | see $out/bench.txt |"
fi
echo
echo "gpu-prove: checks exit $checks_rc, benchmark exit $bench_rc (logs: $out/checks.txt, $out/bench.txt)"
[ "$checks_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
