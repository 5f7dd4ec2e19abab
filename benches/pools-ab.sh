#!/usr/bin/env bash
# Two builds of the P4 cycles runner (examples/p4_cycles.rs), run one after the other on the same
# core, many times: for telling a change of a few percent in the quick pool from the noise of a
# shared machine.
#
#   benches/pools-ab.sh OLD NEW [PAIRS]    # default 15 pairs; CORE=1 pins every run to core 1
#
# OLD and NEW are two builds of `target/release/examples/p4_cycles` (build one, copy it away,
# change the code, build the other). Each pair runs OLD then NEW on one core (the cores
# alternate between pairs), and its ratio is NEW/OLD in calibrated cycles per step; the script
# prints each state's median ratio over the pairs. Neighbouring runs share the machine's current
# speed, which calibration alone does not fully remove.
#
# Code placement alone moves P4 by a few percent: a change that took 8 instructions off each pair
# (and lengthened no dependency chain) measured 1.05-1.06 against its parent in plain builds, and
# 1.000 when both were built with every block that is reached only by a jump aligned to 64 bytes:
#   RUSTFLAGS="-C llvm-args=-align-all-nofallthru-blocks=6" CARGO_TARGET_DIR=/tmp/aligned \
#     cargo build --release --example p4_cycles
# Compare such builds to judge the change itself; compare plain builds for what users get.
set -euo pipefail

old=$1 new=$2 pairs=${3:-15}
command -v taskset >/dev/null || { echo "pools-ab: taskset is not installed (util-linux)" >&2; exit 1; }
fresh="" coalesced=""
for i in $(seq "$pairs"); do
  core=${CORE:-$((i % 2))}
  o=$(taskset -c "$core" "$old") || { echo "pools-ab: $old failed" >&2; exit 1; }
  n=$(taskset -c "$core" "$new") || { echo "pools-ab: $new failed" >&2; exit 1; }
  read -r _ of _ oc <<<"$o"
  read -r _ nf _ nc <<<"$n"
  fresh+="$(awk -v o="$of" -v n="$nf" 'BEGIN {printf "%.3f", n / o}') "
  coalesced+="$(awk -v o="$oc" -v n="$nc" 'BEGIN {printf "%.3f", n / o}') "
done
median() { tr ' ' '\n' | grep . | sort -g | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}'; }
echo "P4 quick, new/old cycles per step (median of $pairs pairs):" \
  "fresh $(echo "$fresh" | median), coalesced $(echo "$coalesced" | median)"
echo "  fresh:     $fresh"
echo "  coalesced: $coalesced"
