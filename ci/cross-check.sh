#!/usr/bin/env bash
# Type-checks the libraries for targets CI cannot run: macOS on Apple silicon, and 64-bit ARM
# Linux (Grace Hopper nodes) with the CUDA host side. Warnings fail. Uses rustup's prebuilt std
# for each target (a check links nothing, so no cross C toolchain is needed); prints
# `skipped: <reason>` when rustup cannot add a target here. Then checks that the libraries
# without `cuda` build with the workspace's rust-version (1.85), with Debian's rustc.
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

if [ -x /usr/bin/rustc ] && [ -x /usr/bin/cargo ]; then
  echo "cross-check: the libraries with $(/usr/bin/rustc --version) (the workspace's rust-version)"
  RUSTC=/usr/bin/rustc CARGO_TARGET_DIR=target/msrv /usr/bin/cargo check -q "${libs[@]}" -p hetmem-gpu
else
  echo "cross-check: skipped the rust-version check: Debian's rustc-web is not installed"
fi
