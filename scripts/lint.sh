#!/usr/bin/env bash
# The house rules cargo can check (DEVELOPERS.md, Standards): rustfmt, and
# clippy with warnings as errors, for the workspace and every Rust guest;
# rustdoc's warnings (broken links in doc comments) for the workspace;
# gofmt for the Go guests.
#   scripts/lint.sh fmt      needs no build: run it first, it fails fast
#   scripts/lint.sh clippy   reuses the builds of scripts/test.sh: run it after
#   scripts/lint.sh          both
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
ensure_rust

# Each Rust guest and each fuzz crate is a crate of its own, outside the
# host's workspace.
guests=()
for manifest in plugins/*/Cargo.toml core/fuzz/Cargo.toml plugins/*/fuzz/Cargo.toml tests/guests/*/Cargo.toml; do
  if [ -f "$manifest" ]; then guests+=("$manifest"); fi
done

check_fmt() {
  step "rustfmt: the workspace"
  cargo fmt --all --check
  for manifest in "${guests[@]}"; do
    step "rustfmt: ${manifest%/Cargo.toml}"
    cargo fmt --check --manifest-path "$manifest"
  done
  # The `plugin new` template's Cargo.toml has placeholders, so cargo cannot
  # read it as a crate: its source is checked on its own.
  step "rustfmt: host/templates/rust/lib.rs"
  rustfmt --edition 2021 --check host/templates/rust/lib.rs
}

check_clippy() {
  step "clippy: the workspace"
  cargo clippy --locked --workspace --all-targets -- -D warnings
  # The production build, without the simulators: fails if anything outside
  # the demo and `sim` glue (main.rs, demo.rs) names them.
  step "clippy: prismhook without the simulators (--no-default-features)"
  cargo clippy --locked -p prismhook --no-default-features --lib --bins -- -D warnings
  # Documents the workspace's own crates only, on the dependencies' check
  # builds that clippy just made.
  step "rustdoc: the workspace, warnings as errors"
  RUSTDOCFLAGS="-D warnings" cargo doc --locked --workspace --no-deps
  # Go guests: gofmt (their vet runs in scripts/test.sh with their tests).
  # Here rather than in `fmt`, as it needs xtask built and Go installed.
  build_xtask
  step "gofmt: the Go guests (xtask go-fmt)"
  xtask go-fmt
  # Natively, in the target directory scripts/test.sh builds the guests'
  # unit tests in.
  for manifest in "${guests[@]}"; do
    step "clippy: ${manifest%/Cargo.toml} (native)"
    cargo clippy --locked --manifest-path "$manifest" --all-targets \
      --target-dir target/guests-native -- -D warnings
  done
}

case "${1:-all}" in
  fmt) check_fmt ;;
  clippy) check_clippy ;;
  all)
    check_fmt
    check_clippy
    ;;
  *)
    echo "usage: scripts/lint.sh [fmt|clippy]" >&2
    exit 2
    ;;
esac
