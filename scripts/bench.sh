#!/usr/bin/env bash
# Runs one benchmark of BENCHMARKS.md with what it needs installed first: the
# guest components, wrk (Debian) for the listener, durability and cluster
# benches, and the pinned nats-server for the cluster bench.
#
#   ./scripts/bench.sh durability
#   ./scripts/bench.sh lifecycle reload memory
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

bench="${1:?usage: scripts/bench.sh wasm|listener|durability|lifecycle|cluster|reconcile|payload [sections…]}"
shift
ensure_rust
# Reading notifications is prismhook-core's alone: no guests, no wasmtime.
if [ "$bench" = payload ]; then
  step "cargo bench -p prismhook-core --bench payload"
  exec cargo bench --locked -p prismhook-core --bench payload
fi
build_xtask
packages=(guests)
case "$bench" in
  listener | durability | cluster) packages+=(wrk) ;;
esac
ensure_debian_packages "${packages[@]}"
build_guests
[ "$bench" = cluster ] && export_nats_server
step "cargo bench --bench $bench $*"
exec cargo bench --locked -p prismhook --bench "$bench" -- "$@"
