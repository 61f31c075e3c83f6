# Sourced by the launch scripts: the environment that builds and runs algpt2-ddp.
# ROOT is the repository, or an unpacked bundle (launch/bundle.sh), which holds a BUNDLE
# file. In a checkout the venv inside it provides libtorch (PyPI torch 2.11.0); in a
# bundle bin/algpt2-ddp finds the host's own PyTorch (python3 on PATH, or ALGPT2_TORCH).
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
export PATH="$VENV/bin:$HOME/.cargo/bin:$PATH"
# tch's build finds libtorch through the venv's python.
export LIBTORCH_USE_PYTORCH=1
if [ -f "$ROOT/BUNDLE" ]; then
  BIN_RELEASE="$ROOT/bin/algpt2-ddp"
else
  BIN_RELEASE="$ROOT/target/release/algpt2-ddp"
fi

# The release binary, built when missing or stale (a bundle has it already).
ensure_release_build() {
  if [ ! -f "$ROOT/BUNDLE" ]; then
    bash "$ROOT/launch/setup.sh" --release
  fi
}

# mpirun refuses root unless told; more ranks than cores needs --oversubscribe.
MPIRUN=(mpirun --oversubscribe)
if [ "$(id -u)" = 0 ]; then MPIRUN+=(--allow-run-as-root); fi
