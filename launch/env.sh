# Sourced by the launch scripts: the environment that builds and runs algpt2-ddp.
# ROOT is the repository; the venv inside it provides libtorch (PyPI torch 2.13.0).
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
export PATH="$VENV/bin:$HOME/.cargo/bin:$PATH"
# tch's build finds libtorch through the venv's python.
export LIBTORCH_USE_PYTORCH=1
BIN_RELEASE="$ROOT/target/release/algpt2-ddp"

# mpirun refuses root unless told; more ranks than cores needs --oversubscribe.
MPIRUN=(mpirun --oversubscribe)
if [ "$(id -u)" = 0 ]; then MPIRUN+=(--allow-run-as-root); fi
