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
