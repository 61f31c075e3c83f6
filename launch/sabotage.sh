#!/usr/bin/env bash
# Shows that tests fail for the defects they are meant to catch (not run in CI): each
# patch in tests/sabotage/ breaks bf16 or the lean step in one way; with it applied, the
# tests named for it must fail. The patch is reverted on every exit, Ctrl-C included.
#   launch/sabotage.sh            every patch
#   launch/sabotage.sh NAME       tests/sabotage/NAME.patch only
# Patches and the tests that must catch them:
#   bf16-master-weights  updates applied to the bf16 copy (no fp32 master weights)
#                        -> lean_step::bf16_trains_as_well_as_fp32_over_three_seeds
#   bf16-gradient-sum    micro-steps' gradients summed in bf16
#                        -> distributed::accumulated_micro_steps_are_the_ranks_average
#   pageable-batch-copy  micro-batches copied with a plain to_device (pageable memory)
#   counted-pageable-batch-copy  the same through host_waits::upload_pageable
#                        -> lean_step::unlogged_steps_read_nothing_from_the_device
# Exit status: 0 when every sabotage was caught, 1 otherwise.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
bash "$ROOT/launch/setup.sh"
cd "$ROOT"
declare -A catcher=(
  [bf16-master-weights]="--test lean_step bf16_trains_as_well_as_fp32_over_three_seeds"
  [bf16-gradient-sum]="--test distributed accumulated_micro_steps_are_the_ranks_average"
  [pageable-batch-copy]="--test lean_step unlogged_steps_read_nothing_from_the_device"
  [counted-pageable-batch-copy]="--test lean_step unlogged_steps_read_nothing_from_the_device"
)
if [ $# -eq 0 ]; then set -- "${!catcher[@]}"; fi
applied=""
revert() { if [ -n "$applied" ]; then git apply -R "$applied"; applied=""; fi; }
trap revert EXIT
trap 'revert; exit 130' INT TERM
uncaught=0
for name in "$@"; do
  patch="tests/sabotage/$name.patch"
  [ -f "$patch" ] && [ -n "${catcher[$name]:-}" ] || { echo "sabotage.sh: no sabotage '$name' (${!catcher[*]})" >&2; exit 2; }
  git apply "$patch"
  applied="$patch"
  echo "[sabotage] $name applied; running: cargo test ${catcher[$name]}" >&2
  # shellcheck disable=SC2086
  if cargo test --locked ${catcher[$name]} -- --nocapture > "target/sabotage-$name.log" 2>&1; then
    echo "[sabotage] $name: NOT caught (the tests passed; target/sabotage-$name.log)" >&2
    uncaught=1
  else
    echo "[sabotage] $name: caught:" >&2
    grep -E "panicked at|differ|beyond|must|made the host wait" "target/sabotage-$name.log" | grep -v "^stack" | head -4 >&2 || true
  fi
  revert
done
exit "$uncaught"
