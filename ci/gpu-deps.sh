#!/usr/bin/env bash
# Installs what CI needs for the GPU features, when it is missing. Idempotent; safe to run every time.
#   - libamdhip64-dev (Debian): headers and library that hip-sys builds and links against
#     (`--features rocm`, built with HIP_PATH=/usr).
#   - NVRTC 12 from the nvidia-cuda-nvrtc-cu12 wheel (PyPI), unpacked into the cache folder: NVRTC
#     needs no GPU, so CI compiles the GPU tests' kernels with it (`--features cuda`, test `nvrtc`,
#     with HETMEM_NVRTC pointing at it). Only its two libraries are kept (about 115 MB).
#   - hipcc (Debian): compiles the device-side headers for an AMD GPU (no GPU needed).
# Prints the NVRTC path last, for HETMEM_NVRTC.
set -euo pipefail

cache=${HETMEM_GPU_DEPS:-${XDG_CACHE_HOME:-$HOME/.cache}/hetmem-gpu}
nvrtc_version=12.9.86
nvrtc_dir=$cache/nvrtc-$nvrtc_version

if [ ! -f /usr/include/hip/hip_runtime_api.h ] || ! ldconfig -p | grep -q 'libamdhip64\.so\.'; then
  echo "gpu-deps: installing libamdhip64-dev" >&2
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -q >&2
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -q libamdhip64-dev >&2
fi

# hipcc (Debian's, with its clang and the ROCm device libraries): the device-side headers are
# compiled for an AMD GPU in ci/gpu-ci.sh.
if ! command -v hipcc >/dev/null; then
  echo "gpu-deps: installing hipcc" >&2
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -q >&2
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -q hipcc >&2
fi

if [ ! -f "$nvrtc_dir/libnvrtc.so.12" ]; then
  echo "gpu-deps: fetching nvidia-cuda-nvrtc-cu12==$nvrtc_version" >&2
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download -q --no-deps --only-binary=:all: --platform manylinux_2_12_x86_64 \
    --python-version 3.12 -d "$tmp" "nvidia-cuda-nvrtc-cu12==$nvrtc_version" >&2
  mkdir -p "$tmp/lib"
  # Python's zipfile rather than unzip, which a fresh machine may lack.
  python3 - "$tmp" <<'PY'
import fnmatch, glob, os, sys, zipfile
tmp = sys.argv[1]
wheel = glob.glob(os.path.join(tmp, "nvidia_cuda_nvrtc_cu12-*.whl"))[0]
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name == "nvidia/cuda_nvrtc/lib/libnvrtc.so.12" or fnmatch.fnmatch(name, "nvidia/cuda_nvrtc/lib/libnvrtc-builtins.so.*"):
            with open(os.path.join(tmp, "lib", os.path.basename(name)), "wb") as out:
                out.write(z.read(name))
PY
  rm -f "$tmp"/lib/*.alt.*
  mkdir -p "$(dirname "$nvrtc_dir")"
  rm -rf "$nvrtc_dir" && mv "$tmp/lib" "$nvrtc_dir"
fi
echo "$nvrtc_dir/libnvrtc.so.12"
