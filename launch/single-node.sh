#!/usr/bin/env bash
# One node, NPROC ranks (default: one per GPU, or 2 on a CPU-only machine):
#   launch/single-node.sh CONFIG [NPROC] [--set key=value ...]
#   e.g. launch/single-node.sh configs/wikitext103.yaml 2
#
# Arithmetic for configs/wikitext103.yaml on 2 GPUs: micro_batch_size 30 x 2 ranks =
# global batch 60 windows x 256 tokens = 15,360 tokens per step; 90,000 steps = 1.38 B
# tokens, about 12 epochs of WikiText-103's ~115 M training tokens (GPT-2 BPE). ALGPT2
# (13.85 M parameters) costs 0.58 GFLOP per token to train (`algpt2-ddp info`), so the
# run is ~8e17 FLOPs: on 2 GPUs at 100 TFLOP/s of real throughput each, about 1.1 hours.
#
# Each rank binds to GPU local_rank; on CPU each rank gets cores / NPROC threads.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
config="${1:?usage: launch/single-node.sh CONFIG [NPROC] [--set key=value ...]}"
shift
# A config path given relative to where the user stands still works after the cd below.
if [ -f "$config" ]; then config="$(cd "$(dirname "$config")" && pwd)/$(basename "$config")"; fi
gpus=$(nvidia-smi -L 2>/dev/null | wc -l || true)
nproc=$([ "${gpus:-0}" -gt 0 ] && echo "$gpus" || echo 2)
if [ $# -gt 0 ] && [[ "$1" =~ ^[0-9]+$ ]]; then nproc="$1"; shift; fi
ensure_release_build
cd "$ROOT"
# --bind-to none: libtorch sizes its own thread pool per rank (cores / ranks on the node).
run_job "${MPIRUN[@]}" -n "$nproc" --bind-to none "$BIN_RELEASE" --config "$config" "$@"
