#!/usr/bin/env bash
# The GPU features' CI checks, on a machine without a GPU: installs what they need (ci/gpu-deps.sh),
# then lints and tests hetmem-gpu with `--features cuda` and `--features rocm`. The tests that need a
# GPU print why they skip; the no-driver / no-device paths and NVRTC compilation are checked for real.
# On a GPU machine, ci/gpu-check.sh runs the rest.
set -euo pipefail
cd "$(dirname "$0")/.."

HETMEM_NVRTC="$(bash ci/gpu-deps.sh)"
export HETMEM_NVRTC
export HIP_PATH=${HIP_PATH:-/usr}

cargo clippy -p hetmem-gpu --all-targets --features cuda -- -D warnings
cargo clippy -p hetmem-gpu --all-targets --features rocm -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc -p hetmem-gpu --no-deps --features cuda,rocm
cargo test -p hetmem-gpu --features cuda,rocm

# The device-side headers (gpu/include) compile for AMD GPUs as they do for NVIDIA ones (NVRTC, in
# the tests above): device code only, for gfx90a (MI200), no GPU needed.
hip_out="$(mktemp -d)"
hipcc --offload-arch=gfx90a --cuda-device-only -c -I gpu/include gpu/tests/hip/headers.hip -o "$hip_out/headers.o"
rm -rf "$hip_out"
echo "gpu-ci: the device-side headers compile for gfx90a (hipcc)"
