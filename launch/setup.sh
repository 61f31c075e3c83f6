#!/usr/bin/env bash
# Idempotent set-up on a fresh Debian machine with a Rust toolchain:
#   1. Debian packages: Open MPI and libclang (for the `mpi` crate), python3-venv,
#      patchelf (launch/bundle.sh);
#   2. the project venv .venv with launch/requirements.txt (libtorch comes from PyPI torch);
#   3. with --release, the release binary target/release/algpt2-ddp.
# Each step is skipped when already done, so a second run takes seconds.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"

build_release=0
for arg in "$@"; do
  case "$arg" in
    --release) build_release=1 ;;
    *) echo "setup.sh: unknown argument $arg (expected --release)" >&2; exit 2 ;;
  esac
done

say() { printf '[setup] %s\n' "$*" >&2; }

# --- 1. Debian packages -------------------------------------------------------------
apt_packages=(libopenmpi-dev openmpi-bin libclang-dev clang python3-venv patchelf)
missing=()
for pkg in "${apt_packages[@]}"; do
  # python3-venv is only needed when the python3 on PATH cannot make a venv by itself.
  if [ "$pkg" = python3-venv ] && python3 -c 'import ensurepip, venv' 2>/dev/null; then continue; fi
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  sudo_cmd=()
  if [ "$(id -u)" != 0 ]; then sudo_cmd=(sudo); fi
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
else
  say "Debian packages present"
fi

# --- 2. Python venv with PyPI torch ---------------------------------------------------
stamp="$VENV/.requirements.sha256"
want=$(sha256sum launch/requirements.txt | cut -d' ' -f1)
if [ -x "$VENV/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  say "venv up to date ($VENV)"
else
  if [ -x "$VENV/bin/python" ]; then
    say "updating venv $VENV to launch/requirements.txt"
  else
    say "creating venv $VENV with launch/requirements.txt (torch is a ~2.7 GB download the first time)"
    python3 -m venv "$VENV"
  fi
  "$VENV/bin/pip" install -q --disable-pip-version-check -r launch/requirements.txt
  echo "$want" > "$stamp"
fi

# cudarc loads NCCL as libnccl.so; the wheel ships only libnccl.so.2 (the binary's RPATH
# covers this directory).
nccl_dir=$("$VENV/bin/python" -c 'import sys, os; print(os.path.join(sys.prefix, "lib", f"python{sys.version_info.major}.{sys.version_info.minor}", "site-packages", "nvidia", "nccl", "lib"))')
if [ -e "$nccl_dir/libnccl.so.2" ] && [ ! -e "$nccl_dir/libnccl.so" ]; then
  ln -s libnccl.so.2 "$nccl_dir/libnccl.so"
fi

# --- 3. Build ----------------------------------------------------------------------------
if [ "$build_release" = 1 ]; then
  say "building target/release/algpt2-ddp (a clean build takes ~8 minutes on 2 cores)"
  cargo build --release --locked --quiet
fi
