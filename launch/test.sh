#!/usr/bin/env bash
# The whole test suite on a fresh machine: set up what is missing, then run every test
# (unit, integration, real `mpirun -n 2` runs) in the debug profile, which builds faster.
# Extra arguments go to `cargo test` (e.g. a test name filter).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
bash "$ROOT/launch/setup.sh"
cd "$ROOT"
# The bundle's launcher binary (tests/bundle.rs packs it; `cargo test` builds only the
# binaries of the package whose integration tests run).
cargo build --locked -p algpt2-launch
cargo test --locked "$@"
