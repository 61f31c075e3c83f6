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

# Runs an mpirun job so that Ctrl-C (SIGINT) or SIGTERM stops it cleanly: mpirun itself
# answers those by killing the ranks about a second later (and then exits 1), so it runs
# in its own session, away from the terminal's Ctrl-C, and the first signal is passed on
# as SIGUSR1, which mpirun forwards to every rank: each saves a checkpoint at the next
# step boundary and exits 0, and so does mpirun. A second signal sends SIGTERM: mpirun
# ends the ranks at once. Returns mpirun's exit status.
# A shell started with SIGINT ignored (a `cmd &` or `nohup cmd &` job of a script or of a
# shell without job control) cannot trap it: then Ctrl-C cannot stop the job, and it
# says so at the start; SIGTERM still does.
run_job() {
  if [ "$(trap -p INT)" = "trap -- '' SIGINT" ]; then
    echo "[launch] SIGINT is ignored in this shell (started in the background?): Ctrl-C cannot stop this job; kill -TERM $BASHPID will (it stops cleanly, as Ctrl-C would)" >&2
  fi
  setsid "$@" &
  local job=$! signals=0 status=0
  trap 'signals=$((signals + 1))
        if [ "$signals" -eq 1 ]; then
          echo "[launch] stopping: every rank saves a checkpoint at the next step boundary (signal again to end now)" >&2
          kill -USR1 "$job" 2>/dev/null
        else
          kill -TERM "$job" 2>/dev/null
        fi' INT TERM
  # wait returns early when a trapped signal arrives: wait again until mpirun is gone.
  while kill -0 "$job" 2>/dev/null; do
    wait "$job" || true
  done
  wait "$job" || status=$?
  trap - INT TERM
  return "$status"
}

# mpirun refuses root unless told; more ranks than cores needs --oversubscribe.
MPIRUN=(mpirun --oversubscribe)
if [ "$(id -u)" = 0 ]; then MPIRUN+=(--allow-run-as-root); fi
