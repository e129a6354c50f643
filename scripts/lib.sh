# Shared by the scripts: progress lines and the one prerequisite they cannot
# install themselves.
step() { printf '\n==> %s\n' "$*"; }

ensure_rust() {
  if ! command -v cargo >/dev/null; then
    echo "cargo not found: install Rust (1.95 or newer) first" >&2
    exit 1
  fi
}
