#!/usr/bin/env bash
# The long chaos run of issue 13: three prismhook hosts (the real binary) on
# a three-node NATS JetStream cluster, Prism's simulator posting to every
# host's webhook, the Palo Alto plugin feeding the PAN-OS simulator, and
# CHAOS_KILLS (20 by default) SIGKILLs of a random host or NATS node, one at
# a time, each restarted. It passes when every notification a host answered
# 202 was delivered in per-VM order and the firewall's registrations equal
# the VMs' truth (tests/all/cluster.rs; CI runs the same test with 4 kills).
#   scripts/chaos.sh                       20 kills, the test's own seed
#   CHAOS_KILLS=40 CHAOS_SEED=7 scripts/chaos.sh
# Installs what it needs (wasm toolchain, guests, nats-server), as
# scripts/test.sh does. BENCHMARKS.md records a run.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
ensure_rust
build_xtask
build_guests
export_nats_server
export PRISMHOOK_CHAOS_KILLS="${CHAOS_KILLS:-20}"
if [ -n "${CHAOS_SEED:-}" ]; then
  export PRISMHOOK_CRASH_SEED="$CHAOS_SEED"
fi
step "chaos: $PRISMHOOK_CHAOS_KILLS SIGKILLs of hosts and NATS nodes"
cargo test --locked -p prismhook --test all -- --exact --nocapture \
  cluster::three_hosts_with_a_webhook_each_keep_the_firewall_true_while_hosts_and_nats_nodes_die
