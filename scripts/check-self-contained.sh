#!/usr/bin/env bash
# Fails when a tracked file names a path outside the checkout: the shared
# directory beside it, or a machine's home, work or scratch directories.
# Such a path works on one machine and breaks a fresh clone; what a test
# reads belongs in tests/fixtures, found from CARGO_MANIFEST_DIR.
# The patterns are spelled so that this file does not match itself.
set -euo pipefail
cd "$(dirname "$0")/.."

outside='\.\./shared|shared/fixture[s]|(^|[^[:alnum:]_.~-])/(work|root|home|tmp)/'
# Reading a file by absolute path in Rust; the kernel's /proc and /sys are
# the same on every Linux machine, so they may be read.
absolute_read='(include_str!|include_bytes!|fs::read[a-z_]*)\([[:space:]]*r?"/'
kernel='\([[:space:]]*r?"/(proc|sys)/'

# Prose that must name such a path, as "file|text on the line". Keep it
# short: rewording is better.
allowed=()

is_allowed() {
  local file=$1 text=$2 entry
  for entry in "${allowed[@]}"; do
    [ "$file" = "${entry%%|*}" ] && [[ "$text" == *"${entry#*|}"* ]] && return 0
  done
  return 1
}

failures=0
# Prints "file:line: what: text" for a `git grep -n` hit, unless allowed.
report() {
  local what=$1 hit=$2 file rest text
  file=${hit%%:*}
  rest=${hit#*:}
  text=${rest#*:}
  is_allowed "$file" "$text" && return 0
  echo "$file:${rest%%:*}: $what: ${text#"${text%%[![:space:]]*}"}" >&2
  failures=$((failures + 1))
}

# `git grep` exits 1 when nothing matches, which is the good outcome; any
# other failure (a bad pattern) must not read as a clean tree.
grep_tracked() {
  local status=0
  git grep "$@" || status=$?
  [ "$status" -le 1 ] || { echo "check-self-contained: git grep $* failed ($status)" >&2; exit 2; }
}

hits=$(grep_tracked -nIE -e "$outside")
while IFS= read -r hit; do
  [ -n "$hit" ] && report "names a path outside the checkout" "$hit"
done <<<"$hits"

hits=$(grep_tracked -nE -e "$absolute_read" -- '*.rs')
while IFS= read -r hit; do
  [ -n "$hit" ] && report "reads a file by absolute path" "$hit"
done < <(grep -vE "$kernel" <<<"$hits" || true)

if [ "$failures" -gt 0 ]; then
  echo "check-self-contained: $failures line(s) above depend on files outside the checkout;" \
    "put what a test reads in tests/fixtures and find it from CARGO_MANIFEST_DIR" >&2
  exit 1
fi
echo "check-self-contained: no tracked file names a path outside the checkout"
