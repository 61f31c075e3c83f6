#!/usr/bin/env bash
# The long chaos run (not run in CI): a tiny model trains under `algpt2-ddp supervise --
# mpirun -n 2 …` with W&B on (a loopback fake server) while seeded faults are injected for
# M minutes: SIGKILL to a rank or to mpirun, SIGSTOP of a rank past the watchdog, a W&B
# server that hangs, answers 500 or drops connections, a full checkpoint disk (where a
# tmpfs can be mounted). It must end byte-identical to an uninterrupted run, every step
# logged once, one finished W&B run; it prints a table of faults, restarts, steps
# recomputed and wall-time overhead (tests/chaos.rs, long_chaos_run).
#   launch/chaos.sh [--minutes M] [--seed S]     defaults: 5 minutes, seed 32
# Exit status: the test's (0 when the run survived).
set -euo pipefail
minutes=5
seed=32
while [ $# -gt 0 ]; do
  case "$1" in
    --minutes) minutes="${2:?--minutes needs a value}"; shift 2 ;;
    --seed) seed="${2:?--seed needs a value}"; shift 2 ;;
    -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "chaos.sh: unknown argument '$1' (--minutes M, --seed S)" >&2; exit 2 ;;
  esac
done
[[ "$minutes" =~ ^[0-9]+([.][0-9]+)?$ ]] || { echo "chaos.sh: --minutes must be a number, got '$minutes'" >&2; exit 2; }
[[ "$seed" =~ ^[0-9]+$ ]] || { echo "chaos.sh: --seed must be a whole number, got '$seed'" >&2; exit 2; }
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
bash "$ROOT/launch/setup.sh"
cd "$ROOT"
CHAOS_MINUTES="$minutes" CHAOS_SEED="$seed" cargo test --locked --test chaos long_chaos_run -- --ignored --nocapture
