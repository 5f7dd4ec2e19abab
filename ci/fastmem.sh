#!/usr/bin/env bash
# fastmem checks that `cargo test --workspace` and the loom step do not cover:
#  1. the `critical-section` variant's tests on the host, and both variants' tests on 32-bit x86 (with
#     the pools' and the shared-memory backends' 32-bit tests);
#  2. cross builds of the #![no_std], no-alloc crate examples/no-std-fastmem for bare-metal ARM:
#     thumbv7em-none-eabihf (Cortex-M4F, lock-free and critical-section variants) and
#     thumbv6m-none-eabi (Cortex-M0, no compare-and-swap: critical-section variant only);
#  3. Miri over fastmem's unit tests, when nightly Miri is available.
# Cross builds use rustup's prebuilt `core` for those targets when `rustup target add` works, and
# otherwise Debian's rustc 1.85 with `-Zbuild-std=core` (ci/install-deps.sh installs it).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "fastmem: critical-section variant tests"
cargo test -q -p hetmem-core --features critical-section --lib fastmem
cargo test -q -p hetmem-no-std-fastmem --features critical-section

# 32-bit targets use another head-word layout (16-bit links in 8-byte units, 16-bit tags): run the
# tests on i686 Linux, which needs the 32-bit C runtime (gcc-multilib) to link.
if ! echo 'int main(void){return 0;}' | gcc -m32 -x c -o /dev/null - 2>/dev/null; then
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -q gcc-multilib
fi
if rustup target add i686-unknown-linux-gnu >/dev/null 2>&1; then
  for features in "" "--features critical-section"; do
    echo "fastmem: 32-bit tests on i686-unknown-linux-gnu $features"
    # shellcheck disable=SC2086
    CARGO_TARGET_DIR=target/i686 cargo test -q -p hetmem-core --target i686-unknown-linux-gnu $features --lib fastmem
  done
  # The pools' size index sizes its bins and bitmaps by the word size too.
  echo "fastmem: 32-bit pool tests on i686-unknown-linux-gnu"
  CARGO_TARGET_DIR=target/i686 cargo test -q -p hetmem-core --target i686-unknown-linux-gnu --lib pool
  # A 32-bit process shares segments with 64-bit ones: sizes and inode numbers past 32 bits.
  echo "fastmem: 32-bit shared-memory backend tests on i686-unknown-linux-gnu"
  CARGO_TARGET_DIR=target/i686 cargo test -q -p hetmem-backends --target i686-unknown-linux-gnu
else
  echo "fastmem: skipping the 32-bit tests: rustup could not add the i686-unknown-linux-gnu target here"
fi

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
# Miri runs fastmem's tests for undefined behaviour (Stacked Borrows, alignment, uninitialised
# reads) and its threads for data races, when a nightly toolchain with Miri can be had.
if rustup component add --toolchain nightly miri rust-src >/dev/null 2>&1; then
  echo "fastmem: Miri"
  PROPTEST_CASES=4 MIRIFLAGS="-Zmiri-disable-isolation" CARGO_TARGET_DIR=target/miri \
    cargo +nightly miri test -q -p hetmem-core --lib fastmem
else
  echo "fastmem: Miri skipped (no nightly toolchain with the miri component)"
fi
echo "fastmem: all checks passed"
