#!/usr/bin/env bash
# The main job: builds what it needs (installing the Debian wasm toolchain
# if missing), then runs `prismhook demo` on embedded simulators.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
ensure_rust
build_xtask
# The host's build waits for nothing the plugin's does (lib.sh,
# start_background).
start_background demo-host-build cargo build --locked -p prismhook
step "building the Palo Alto plugin component"
xtask plugins paloalto
wait_background
step "running the demo"
exec "$TARGET_DIR/debug/prismhook" demo "$@"
