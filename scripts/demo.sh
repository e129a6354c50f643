#!/usr/bin/env bash
# The main job: builds what it needs (installing the Debian wasm toolchain
# if missing), then runs `prismhook demo` on embedded simulators.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
ensure_rust
step "building the Palo Alto plugin component"
cargo xtask plugins paloalto
step "building the host"
cargo build --locked -p prismhook
step "running the demo"
exec target/debug/prismhook demo "$@"
