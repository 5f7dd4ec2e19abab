#!/usr/bin/env bash
# Type-checks the libraries for targets CI cannot run: macOS on Apple silicon, and 64-bit ARM
# Linux (Grace Hopper nodes) with the CUDA host side. Warnings fail. Uses rustup's prebuilt std
# for each target (a check links nothing, so no cross C toolchain is needed); prints
# `skipped: <reason>` when rustup cannot add a target here.
set -euo pipefail
cd "$(dirname "$0")/.."
check() {
  local target=$1
  shift
  if ! rustup target add "$target" >/dev/null 2>&1; then
    echo "cross-check: skipped $target: rustup could not add the target here"
    return
  fi
  echo "cross-check: $target $*"
  RUSTFLAGS="-D warnings" CARGO_TARGET_DIR=target/cross cargo check -q --target "$target" "$@"
}
libs=(-p hetmem -p hetmem-core -p hetmem-backends -p hetmem-thread-models)
check aarch64-apple-darwin "${libs[@]}"
check aarch64-unknown-linux-gnu "${libs[@]}" -p hetmem-gpu --features hetmem/cuda
