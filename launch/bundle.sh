#!/usr/bin/env bash
# A relocatable bundle for GPU hosts and cluster nodes that have PyTorch 2.11 and Open MPI
# 4.x but no Rust toolchain and no project venv: build once, copy everywhere.
#   launch/bundle.sh [--out DIR] [--trainer BIN] [--launcher BIN]
# writes DIR/bundle/ (default DIR: dist) and DIR/algpt2-ddp-bundle.tar.gz:
#   bin/algpt2-ddp        the launcher: finds the host's libtorch, then runs the trainer
#   libexec/algpt2-ddp    the trainer (release build, no RPATH to this machine's venv)
#   launch/, configs/     the launch scripts (single-node, multi-node, Slurm, gpu-checks, bench-gpu,
#                         gpu-prove: both in one call)
#   reference/algpt2.py   the PyTorch reference (bench-gpu.sh's PyTorch side)
#   README.md, BUNDLE     how to use it; what it was built from
# On the host: tar xf algpt2-ddp-bundle.tar.gz && bundle/launch/single-node.sh configs/quickstart.yaml
# --trainer/--launcher take already built binaries (the tests bundle a debug build).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"

out=dist
trainer=""
launcher=""
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="${2:?--out needs a directory}"; shift 2 ;;
    --trainer) trainer="${2:?--trainer needs a binary}"; shift 2 ;;
    --launcher) launcher="${2:?--launcher needs a binary}"; shift 2 ;;
    *) echo "bundle.sh: unknown argument $1 (expected --out DIR, --trainer BIN, --launcher BIN)" >&2; exit 2 ;;
  esac
done
if [ -z "$trainer" ] || [ -z "$launcher" ]; then
  ensure_release_build
  trainer="${trainer:-$ROOT/target/release/algpt2-ddp}"
  launcher="${launcher:-$ROOT/target/release/algpt2-ddp-launch}"
fi
for bin in "$trainer" "$launcher"; do
  [ -x "$bin" ] || { echo "bundle.sh: $bin is not an executable (build it first: launch/setup.sh --release)" >&2; exit 2; }
done
command -v patchelf >/dev/null || { echo "bundle.sh: patchelf is missing (run launch/setup.sh, or apt-get install patchelf)" >&2; exit 2; }

dir="$out/bundle"
tarball="$out/algpt2-ddp-bundle.tar.gz"
rm -rf "$dir" "$tarball"
mkdir -p "$dir/bin" "$dir/libexec" "$dir/launch"

install -m 0755 "$launcher" "$dir/bin/algpt2-ddp"
install -m 0755 "$trainer" "$dir/libexec/algpt2-ddp"
# Debug info is most of a binary's size; symbols stay for backtraces.
strip --strip-debug "$dir/bin/algpt2-ddp" "$dir/libexec/algpt2-ddp"
# The build machine's venv paths mean nothing elsewhere, and an RPATH would outrank the
# launcher's LD_LIBRARY_PATH where such a path happened to exist.
patchelf --remove-rpath "$dir/libexec/algpt2-ddp"

cp launch/env.sh launch/single-node.sh launch/multi-node.sh launch/slurm.sbatch launch/hostfile.example \
   launch/gpu-checks.sh launch/bench-gpu.sh launch/gpu-prove.sh "$dir/launch/"
# The PyTorch reference: bench-gpu.sh runs it beside ours on the host's PyTorch.
mkdir -p "$dir/reference"
cp reference/algpt2.py "$dir/reference/"
cp -r configs "$dir/configs"
cp launch/bundle/README.md "$dir/README.md"
revision=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
{
  echo "algpt2-ddp bundle"
  echo "revision: $revision"
  echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -m)"
  echo "needs: PyTorch 2.11.x (python3 on PATH or ALGPT2_TORCH), Open MPI 4.x (libmpi.so.40), glibc >= $(ldd --version | head -1 | grep -oE '[0-9]+\.[0-9]+$')"
} > "$dir/BUNDLE"

tar -C "$out" -czf "$tarball" bundle
size_mb=$(( $(stat -c %s "$tarball") / 1048576 ))
echo "bundle: $dir ($(du -sh "$dir" | cut -f1)), $tarball (${size_mb} MB)"
if [ "$size_mb" -gt 30 ]; then
  echo "bundle.sh: warning: the tarball is ${size_mb} MB, over the 30 MB target" >&2
fi
