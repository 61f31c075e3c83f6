#!/usr/bin/env bash
# The main job on a fresh machine: set up what is missing, build, and train the
# quickstart model on 2 ranks with the embedded default data:
#   mpirun -n 2 algpt2-ddp --config configs/quickstart.yaml
# Extra arguments go to algpt2-ddp (e.g. --set train.max_steps=50).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
ensure_release_build
cd "$ROOT"
run_job "${MPIRUN[@]}" -n 2 "$BIN_RELEASE" --config configs/quickstart.yaml "$@"
