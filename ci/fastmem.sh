#!/usr/bin/env bash
# fastmem checks that `cargo test --workspace` and the loom step do not cover:
#  1. the `critical-section` variant's tests on the host;
#  2. cross builds of the #![no_std], no-alloc crate examples/no-std-fastmem for bare-metal ARM:
#     thumbv7em-none-eabihf (Cortex-M4F, lock-free and critical-section variants) and
#     thumbv6m-none-eabi (Cortex-M0, no compare-and-swap: critical-section variant only).
# Cross builds use rustup's prebuilt `core` for those targets when `rustup target add` works, and
# otherwise Debian's rustc 1.85 with `-Zbuild-std=core` (ci/install-deps.sh installs it).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "fastmem: critical-section variant tests"
cargo test -q -p hetmem-core --features critical-section --lib fastmem
cargo test -q -p hetmem-no-std-fastmem --features critical-section

builds=(
  "thumbv7em-none-eabihf"
  "thumbv7em-none-eabihf --features critical-section"
  "thumbv6m-none-eabi --features critical-section"
)
if rustup target add thumbv7em-none-eabihf thumbv6m-none-eabi >/dev/null 2>&1; then
  for b in "${builds[@]}"; do
    echo "fastmem: no_std build for $b (rustup target)"
    # shellcheck disable=SC2086
    CARGO_TARGET_DIR=target/no-std cargo build -q -p hetmem-no-std-fastmem --target $b
  done
elif [ -x /usr/bin/rustc ] && [ -d /usr/lib/rustlib/src/rust/library ]; then
  for b in "${builds[@]}"; do
    echo "fastmem: no_std build for $b (Debian rustc, -Zbuild-std=core)"
    # shellcheck disable=SC2086
    RUSTC=/usr/bin/rustc RUSTC_BOOTSTRAP=1 CARGO_TARGET_DIR=target/no-std-debian \
      /usr/bin/cargo build -q -Zbuild-std=core -p hetmem-no-std-fastmem --target $b
  done
else
  echo "fastmem: no toolchain for bare-metal targets (rustup target add failed, no Debian rust-web-src)" >&2
  exit 1
fi
echo "fastmem: all checks passed"
