#!/usr/bin/env bash
# Instructions per task of the frames example's four strategies, counted by valgrind's
# callgrind: the same work as `cargo run --release --example frames`, repeatable on a noisy
# machine where the CPU-time ratios move from run to run.
#
#   benches/frames-instructions.sh          # a table with ratios
#   benches/frames-instructions.sh --csv    # strategy,instructions_per_task
#
# Each strategy runs alone (`--only`) twice, with 100,000 and 300,000 tasks; the difference of
# the two counts over the 200,000 extra tasks is the cost of one task, without the program's
# start and the executor's setup. Counts are deterministic for a given binary; they change with
# the compiler and the CPU target. On the machines measured so far, CPU time per task follows
# these counts closely (about 15 instructions per ns for every strategy).
set -euo pipefail

source "$(dirname "$0")/callgrind-count.sh"
csv_option "$@"
need_valgrind

target_dir="${CARGO_TARGET_DIR:-$root/target}"
cargo build --quiet --release --manifest-path "$root/Cargo.toml" --example frames --target-dir "$target_dir" >&2
bin="$target_dir/release/examples/frames"

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

strategies=(recycled recycled-scope box-system box-mimalloc)
small=100000
large=300000

count() { # strategy tasks -> instructions
  callgrind_count "$out/$1-$2.cg" "$1 with $2 tasks" "$bin" --only "$1" --tasks "$2"
}

declare -A per_task
for s in "${strategies[@]}"; do
  a="$(count "$s" "$small")"
  b="$(count "$s" "$large")"
  per_task[$s]="$(awk -v a="$a" -v b="$b" -v n=$((large - small)) 'BEGIN { printf "%.1f", (b - a) / n }')"
done

if (( csv )); then
  echo "strategy,instructions_per_task"
  for s in "${strategies[@]}"; do echo "$s,${per_task[$s]}"; done
  exit 0
fi

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2fx", a / b }'; }
echo "Instructions per task (callgrind, $(uname -m), release; 256 in flight, 2 frames per task)"
echo
echo "| strategy | instructions/task | / box-system | / box-mimalloc |"
echo "|---|---:|---:|---:|"
for s in "${strategies[@]}"; do
  echo "| $s | ${per_task[$s]} | $(ratio "${per_task[$s]}" "${per_task[box-system]}") | $(ratio "${per_task[$s]}" "${per_task[box-mimalloc]}") |"
done
echo
echo "box-system / recycled: $(ratio "${per_task[box-system]}" "${per_task[recycled]}") (target: at least 2x, in time)"
