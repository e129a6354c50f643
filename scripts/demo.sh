#!/usr/bin/env bash
# The main job: builds what it needs (installing the Debian wasm toolchain
# if missing), then runs `prismhook demo` on embedded simulators.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
ensure_rust
step "building xtask"
cargo build --locked --quiet -p xtask
# The host and the plugin build side by side: the plugin's build starts with
# apt-get, which waits on the network, and the host's ends with its own
# crates and the link, which use one core. Run one after the other, the
# first command of a fresh machine waited for both (BENCHMARKS.md, "First
# build"). xtask runs without cargo, which would wait for the host's build
# directory.
target="${CARGO_TARGET_DIR:-target}"
log="$target/demo-host-build.log"
mkdir -p "$target"
step "building the host (log: $log) and the Palo Alto plugin component"
cargo build --locked -p prismhook >"$log" 2>&1 &
host=$!
"$target/debug/xtask" plugins paloalto || { kill "$host" 2>/dev/null; exit 1; }
if ! wait "$host"; then
  tail -n 40 "$log" >&2
  echo "building the host failed: the whole log is $log" >&2
  exit 1
fi
step "running the demo"
exec "$target/debug/prismhook" demo "$@"
