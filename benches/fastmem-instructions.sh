#!/usr/bin/env bash
# Instruction counts of fastmem's first allocation, re-allocation and drop, side by side with
# heapless::pool and Box (system allocator), counted by valgrind's callgrind.
#
#   benches/fastmem-instructions.sh          # a table for people, with ratios and the targets
#   benches/fastmem-instructions.sh --csv    # op,type,allocator,instructions
#
# Each count is one run of core/examples/fastmem_ops.rs with `--toggle-collect=*measure*`: it
# covers exactly one call of the operation (the value's initialisation included), not the setup.
# Counts are deterministic for a given binary; they change with the compiler and the CPU target.
# The example is built in release mode with `+cmpxchg16b`, which heapless::pool needs on x86-64
# for its 128-bit tagged pointers (through portable-atomic); fastmem does not use it.
set -euo pipefail

source "$(dirname "$0")/callgrind-count.sh"
csv_option "$@"
need_valgrind

target_dir="${CARGO_TARGET_DIR:-$root/target}/fastmem-instructions"
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+cmpxchg16b" \
  cargo build --quiet --release --manifest-path "$root/Cargo.toml" -p hetmem-core --example fastmem_ops \
  --target-dir "$target_dir" >&2
bin="$target_dir/release/examples/fastmem_ops"

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

ops=(first realloc drop)
types=(u8 u32 u64 struct100)
allocators=(fastmem heapless-pool box)

count() { # op type allocator -> instructions
  callgrind_count "$out/$1-$2-$3.cg" "$1 $2 $3" --toggle-collect='*measure*' "$bin" "$1" "$2" "$3"
}

declare -A n
for op in "${ops[@]}"; do
  for ty in "${types[@]}"; do
    for alloc in "${allocators[@]}"; do
      n[$op,$ty,$alloc]="$(count "$op" "$ty" "$alloc")"
    done
  done
done

if (( csv )); then
  echo "op,type,allocator,instructions"
  for op in "${ops[@]}"; do
    for ty in "${types[@]}"; do
      for alloc in "${allocators[@]}"; do
        echo "$op,$ty,$alloc,${n[$op,$ty,$alloc]}"
      done
    done
  done
  exit 0
fi

declare -A target=([first]=30 [realloc]=20 [drop]=10)
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1fx", a / b }'; }
echo "Instructions per operation (callgrind, $(uname -m), release; lower is better)"
echo
echo "| op | type | fastmem | heapless::pool | Box (system) | pool / fastmem | Box / fastmem | fastmem target |"
echo "|---|---|---:|---:|---:|---:|---:|---|"
for op in "${ops[@]}"; do
  for ty in "${types[@]}"; do
    f="${n[$op,$ty,fastmem]}"; h="${n[$op,$ty,heapless-pool]}"; b="${n[$op,$ty,box]}"
    if [[ "$ty" == struct100 && "$op" != drop ]]; then
      verdict="n/a (copies 100 bytes)"
    elif (( f <= ${target[$op]} )); then
      verdict="<= ${target[$op]}: met"
    else
      verdict="<= ${target[$op]}: MISSED"
    fi
    echo "| $op | $ty | $f | $h | $b | $(ratio "$h" "$f") | $(ratio "$b" "$f") | $verdict |"
  done
done
echo
echo "heapless::pool has no bump: its 'first' allocation pops a block managed up front."
