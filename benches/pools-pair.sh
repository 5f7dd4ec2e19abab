#!/usr/bin/env bash
# Two builds of the pools runner, timed side by side: for comparing a change against the build
# before it on a noisy two-core machine.
#
#   benches/pools-pair.sh OLD NEW [PAIRS] [WORKLOAD] [POOL]    # defaults: 7 P4 quick
#
# OLD and NEW are two builds of `target/release/examples/pools`. In each pair of runs the two run at
# the same time, one per core, and then again with the cores swapped (the two cores of these
# machines differ by up to 25%); the pair's ratio is the geometric mean of its two NEW/OLD ratios.
# Prints each build's median time and the median ratio over the pairs. Ratios of single pairs
# still scatter by +-20% on these machines; for P4 on the quick pool, benches/pools-ab.sh
# (calibrated cycles, one build after the other on one core) resolves changes of a few percent.
set -euo pipefail

old=$1 new=$2 pairs=${3:-7} workload=${4:-P4} pool=${5:-quick}
command -v taskset >/dev/null || { echo "pools-pair: taskset is not installed (util-linux)" >&2; exit 1; }
run() { # CORE BINARY
  taskset -c "$1" "$2" --only "$workload" --pools "$pool" --rounds 3 | awk -v p="$pool" '$2 == p {print $3}'
}
median() { tr ' ' '\n' | grep . | sort -g | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}'; }
ratios="" olds="" news=""
for _ in $(seq "$pairs"); do
  product=1
  for core in 0 1; do
    run "$core" "$old" >/tmp/pools-pair-old.$$ &
    run "$((1 - core))" "$new" >/tmp/pools-pair-new.$$ &
    wait
    o=$(cat /tmp/pools-pair-old.$$) n=$(cat /tmp/pools-pair-new.$$)
    olds+="$o " news+="$n "
    product=$(awk -v p="$product" -v o="$o" -v n="$n" 'BEGIN {printf "%.6f", p * n / o}')
  done
  ratios+="$(awk -v p="$product" 'BEGIN {printf "%.3f", sqrt(p)}') "
done
rm -f /tmp/pools-pair-old.$$ /tmp/pools-pair-new.$$
echo "$workload $pool: old $(echo "$olds" | median) ns, new $(echo "$news" | median) ns per pair (medians);" \
  "new/old $(echo "$ratios" | median) (median of $pairs pairs: $ratios)"
