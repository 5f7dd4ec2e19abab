#!/usr/bin/env bash
# Instructions per P4 pair of the quick pool (a free and an allocation, random sizes 1 KiB..4 MiB,
# 1000 live slots), counted by valgrind's callgrind on the pools runner.
#
#   benches/p4-instructions.sh [BINARY]    # default: builds target/release/examples/pools
#
# The runner is counted with one round of P4 and with three; the difference of the two, over the
# 600,000 pairs of rounds two and three, is the steady state (the first round also takes the
# upstream blocks). Counts are inclusive of `QuickPool::allocate` and `QuickPool::deallocate`, and
# deterministic for a given binary.
set -euo pipefail

command -v valgrind >/dev/null || { echo "p4-instructions: valgrind is not installed (apt-get install valgrind)" >&2; exit 1; }
cd "$(dirname "$0")/.."
binary=${1:-}
if [ -z "$binary" ]; then
  cargo build --quiet --release --example pools
  binary=target/release/examples/pools
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for rounds in 1 3; do
  valgrind --tool=callgrind --callgrind-out-file="$work/$rounds.cg" "$binary" --only P4 --pools quick --rounds "$rounds" \
    >/dev/null 2>&1
  callgrind_annotate --inclusive=yes "$work/$rounds.cg" 2>/dev/null \
    | grep -E '^ *[0-9,]+ \([ 0-9.%]+\)  [^ ]*pool/quick\.rs:hetmem_core::pool::quick::QuickPool<R>::(allocate|deallocate)( \[.*\])?$' \
    | awk '{gsub(",", "", $1); f = $0; sub(/ \[.*\]$/, "", f); sub(/.*::/, "", f); if (!seen[f]++) print f, $1}' \
    | sort >"$work/$rounds.txt"
done
join "$work/1.txt" "$work/3.txt" | awk '{d = ($3 - $2) / 600000; total += d; printf "%-11s %7.1f\n", $1, d} END {printf "%-11s %7.1f instructions per P4 pair\n", "pair", total}'
