#!/usr/bin/env bash
# Instructions per W1 pair (one 64-byte allocation, its two byte writes and its free), counted by
# valgrind's callgrind on the workloads runner, for each allocator named (default: mimalloc and
# thread-local).
#
#   benches/w1-instructions.sh [ALLOCATORS]     # e.g. mimalloc,thread-local,scalable-page
#
# Each allocator runs W1 twice, with 200,000 and 400,000 steps; the difference of the two totals
# divided by 200,000 is the steady-state cost of one pair, without setup and the first spans.
# Counts are deterministic for a given binary.
set -euo pipefail

allocators="${1:-mimalloc,thread-local}"
command -v valgrind >/dev/null || { echo "w1-instructions: valgrind is not installed (apt-get install valgrind)" >&2; exit 1; }

root="$(cd "$(dirname "$0")/.." && pwd)"
cargo build --quiet --release --manifest-path "$root/Cargo.toml" --example workloads >&2
bin="${CARGO_TARGET_DIR:-$root/target}/release/examples/workloads"

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

total() { # allocator steps -> instructions of the whole run
  local file="$out/$1-$2.cg"
  valgrind --tool=callgrind --callgrind-out-file="$file" \
    "$bin" --workloads W1 --allocators "$1" --steps "$2" --reps 1 >/dev/null 2>"$out/valgrind.log" \
    || { cat "$out/valgrind.log" >&2; echo "w1-instructions: run of $1 failed" >&2; exit 1; }
  awk '/^(summary|totals):/ {print $2; exit}' "$file"
}

printf '%-16s %s\n' allocator instructions/pair
IFS=, read -ra names <<<"$allocators"
for a in "${names[@]}"; do
  lo="$(total "$a" 200000)"
  hi="$(total "$a" 400000)"
  awk -v a="$a" -v lo="$lo" -v hi="$hi" 'BEGIN { printf "%-16s %.1f\n", a, (hi - lo) / 200000 }'
done
