#!/usr/bin/env bash
# Coverage-guided fuzzing (cargo-fuzz, libFuzzer) of every target under
# core/fuzz and plugins/*/fuzz, each for FUZZ_SECONDS (60 by default) or FUZZ_RUNS
# executions, whichever comes first, seeded from the fixtures. Prints
# executions and crashes per target; exits 1 on a crash (the input is kept
# under <crate>/fuzz/artifacts/<target>/).
#   scripts/fuzz.sh                      every target, 60 s each
#   scripts/fuzz.sh uid_message          only the targets named
#   FUZZ_SECONDS=3600 FUZZ_RUNS=10000000 scripts/fuzz.sh
#                                        the long run BENCHMARKS.md records
# scripts/test.sh runs every target for 10 s as a smoke test; the long runs
# are not part of CI's time budget. libFuzzer needs rustc's -Z flags, which the
# stable toolchain allows with RUSTC_BOOTSTRAP=1 (nothing else can be had).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
ensure_rust
build_xtask
# libFuzzer is C++.
ensure_debian_packages g++
CARGO_FUZZ_VERSION=0.13.1
seconds=${FUZZ_SECONDS:-60}
runs=${FUZZ_RUNS:--1}
only=" $* "
if ! cargo fuzz --version 2>/dev/null | grep -qF "$CARGO_FUZZ_VERSION"; then
  step "installing cargo-fuzz $CARGO_FUZZ_VERSION"
  cargo install cargo-fuzz --locked --version "$CARGO_FUZZ_VERSION"
fi
export RUSTC_BOOTSTRAP=1
root=$PWD
# One target directory for every fuzz crate: they build the same libFuzzer,
# serde and friends with the same flags, once.
target_dir=$root/target/fuzz
summary=()
crashed=0

# Seeds: real answers, requests and configurations, in each target's input
# layout (NUL separates the parts of one input).
seed() {
  local target=$1 dir=$2
  mkdir -p "$dir"
  case "$target" in
    panos_response)
      # (status: u16 little-endian 200, body)
      for f in tests/fixtures/panos/*.xml; do
        { printf '\xc8\x00'; cat "$f"; } >"$dir/$(basename "$f")"
      done
      ;;
    notification)
      cp tests/fixtures/nutanix/*.json "$dir/"
      ;;
    prism_answers)
      # (page size, list answers..., error body)
      for f in tests/fixtures/nutanix/api/*.json; do
        { printf '\x64'; cat "$f"; printf '\0'; cat tests/fixtures/nutanix/api/error_response_404.json; } \
          >"$dir/$(basename "$f")"
      done
      ;;
    config)
      # (configuration, plugin settings file, plugin name, environment)
      for f in examples/*.toml tests/config/*.toml; do
        { cat "$f"; printf '\0allow = ["https://fw.example.com"]\n[[inject]]\norigin = "https://fw.example.com"\nheader = "x-api-key"\ngrant = "key"\n\0paloalto\0PRISMHOOK_LISTEN=127.0.0.1:1\n'; } \
          >"$dir/$(basename "$f")"
      done
      ;;
    origin_policy)
      local i=0 pair
      for pair in 'https://fw.example.com|https://fw.example.com/api/?type=user-id' \
        'https://*.example.com|https://a.b.example.com:443/' 'http://10.0.0.0/8:*|http://10.1.2.3:8080/' \
        'https://[fd00::/8]|https://[fd00::1]/' 'http://127.0.0.1:9000|http://127.0.0.1:9000/x' \
        'https://FW.Example.COM/|https://fw.example.com./'; do
        i=$((i + 1))
        printf '%s\0%s' "${pair%%|*}" "${pair#*|}" >"$dir/pair-$i"
      done
      ;;
  esac
}

for fuzz in core/fuzz plugins/*/fuzz; do
  crate=${fuzz%/fuzz}
  targets=()
  # On a line of its own: a failure inside a `for` list would not stop the
  # script, and the crate would be skipped without a word.
  listed=$(cd "$crate" && cargo fuzz list)
  [ -n "$listed" ] || { echo "fuzz.sh: $crate lists no fuzz targets" >&2; exit 1; }
  for target in $listed; do
    if [ "$only" = "  " ] || [[ "$only" == *" $target "* ]]; then
      targets+=("$target")
    fi
  done
  if [ "${#targets[@]}" -eq 0 ]; then continue; fi
  step "building the fuzz targets of $crate"
  # cargo fuzz has no --locked: a lock file that needs changing fails here.
  cargo fetch --locked --manifest-path "$fuzz/Cargo.toml"
  (cd "$crate" && cargo fuzz build -O --target-dir "$target_dir")
  for target in "${targets[@]}"; do
    step "fuzzing $crate: $target for ${seconds}s"
    corpus=$root/$fuzz/corpus/$target
    seeds=$root/target/fuzz-seeds/$target
    mkdir -p "$corpus"
    rm -rf "$seeds"
    seed "$target" "$seeds"
    log=$root/target/fuzz-$target.log
    status=0
    started=$SECONDS
    (cd "$crate" && cargo fuzz run -O --target-dir "$target_dir" "$target" "$corpus" "$seeds" -- \
      -max_total_time="$seconds" -runs="$runs" -print_final_stats=1) >"$log" 2>&1 || status=$?
    elapsed=$((SECONDS - started))
    executed=$(grep -o 'stat::number_of_executed_units: [0-9]*' "$log" | grep -o '[0-9]*$' || echo "?")
    mkdir -p "$root/$fuzz/artifacts/$target"
    crashes=$(find "$root/$fuzz/artifacts/$target" -type f | wc -l)
    if [ "$status" -ne 0 ] || [ "$crashes" -ne 0 ]; then
      crashed=1
      tail -30 "$log"
      # cargo-fuzz's own hint above omits the target directory, so following
      # it would build every target again in the crate's own one.
      echo "fuzz.sh: to replay an input: (cd $crate && RUSTC_BOOTSTRAP=1 cargo fuzz run -O --target-dir $target_dir $target $root/$fuzz/artifacts/$target/<file>)"
    fi
    summary+=("$crate $target: $executed executions in ${elapsed}s, $crashes crash input(s), exit $status")
  done
done
step "summary"
printf '%s\n' "${summary[@]}"
exit "$crashed"
