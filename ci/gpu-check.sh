#!/usr/bin/env bash
# The GPU check for the `cuda` feature (issue 7), in two halves.
#
#   ci/gpu-check.sh               here (Rust, registry): builds the GPU test and bench binaries in
#                                 release mode, copies them and this script into .gpu/ (git-ignored),
#                                 and prints the command to run on the GPU machine.
#   .gpu/gpu-check.sh --on-device on the GPU machine (no Rust, no registry; CUDA driver and toolkit):
#                                 nvidia-smi, the GPU tests (cross-process ones included), the GPU
#                                 benches, then one table. Each step has its own time limit; a failed
#                                 step is reported and the rest still run; the table always prints.
#                                 Writes gpu-check.log and gpu-check-table.md to --out DIR (or $OUT).
set -u

here="$(cd "$(dirname "$0")" && pwd)"

# ---------------------------------------------------------------------------------------------
# Host half.
# ---------------------------------------------------------------------------------------------
host() {
  set -eo pipefail
  cd "$here/.."
  local dest=.gpu
  rm -rf "$dest" && mkdir -p "$dest/bin"
  # Test and bench executables of hetmem-gpu, by target name, from cargo's JSON messages.
  local list
  list="$(mktemp)"
  cargo test -p hetmem-gpu --features cuda --release --no-run --message-format=json-render-diagnostics >"$list"
  cargo bench -p hetmem-gpu --features cuda --no-run --message-format=json-render-diagnostics >>"$list"
  python3 - "$list" "$dest/bin" <<'PY'
import json, shutil, sys
src, dest = sys.argv[1], sys.argv[2]
wanted = {("lib", "hetmem_gpu"): "unit", ("test", "cuda_gpu"): "cuda_gpu", ("test", "cuda_no_driver"): "cuda_no_driver",
          ("test", "nvrtc"): "nvrtc", ("bench", "cuda"): "cuda_bench"}
found = {}
for line in open(src):
    try:
        msg = json.loads(line)
    except ValueError:
        continue
    if msg.get("reason") != "compiler-artifact" or not msg.get("executable"):
        continue
    kind = msg["target"]["kind"][0]
    key = (kind, msg["target"]["name"])
    if key in wanted:
        found[wanted[key]] = msg["executable"]
missing = sorted(set(wanted.values()) - set(found))
if missing:
    sys.exit(f"gpu-check: cargo built no executable for {missing}")
for name, path in found.items():
    shutil.copy(path, f"{dest}/{name}")
PY
  rm -f "$list"
  strip --strip-debug "$dest"/bin/*
  cp "$here/gpu-check.sh" "$dest/gpu-check.sh"
  chmod +x "$dest/gpu-check.sh" "$dest"/bin/*
  echo
  echo "gpu-check: $(du -sh "$dest" | cut -f1) in $dest/ ($(ls "$dest/bin" | tr '\n' ' '))"
  echo "gpu-check: on the GPU machine, carrying .gpu, run (allow 450 s):"
  echo
  echo "  bash .gpu/gpu-check.sh --on-device --out \"\$OUT\""
}

# ---------------------------------------------------------------------------------------------
# Device half.
# ---------------------------------------------------------------------------------------------
rows=()        # table rows: section<TAB>item<TAB>value<TAB>note
failures=0
log=/dev/null

add_row() { rows+=("$1"$'\t'"$2"$'\t'"$3"$'\t'"$4"); }

# step NAME SECONDS CMD...: runs CMD under a time limit, its output to the terminal and the log,
# and records how it went.
step() {
  local name=$1 limit=$2
  shift 2
  echo
  echo "==== $name (limit ${limit}s)"
  local started=$SECONDS rc
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log" "$work/$name.out"
  rc=${PIPESTATUS[0]}
  local took=$((SECONDS - started))
  case $rc in
    0) add_row step "$name" ok "${took}s" ;;
    124 | 137) add_row step "$name" TIMEOUT "killed after ${limit}s"; failures=$((failures + 1)) ;;
    *) add_row step "$name" "FAILED (exit $rc)" "${took}s; see the log"; failures=$((failures + 1)) ;;
  esac
}

# Makes NVRTC (12 or 13) and the driver findable: the binaries load them at run time.
find_cuda_libs() {
  if [ -z "${HETMEM_NVRTC:-}" ]; then
    local lib
    # The newest first, as cudarc looks it up: naming an older one while a newer one is on the
    # loader's path is refused (HETMEM_NVRTC gets the library it names or none).
    lib="$(ldconfig -p 2>/dev/null | awk '/libnvrtc\.so\.13 /{print $NF; exit}')"
    [ -n "$lib" ] || lib="$(ldconfig -p 2>/dev/null | awk '/libnvrtc\.so\.12 /{print $NF; exit}')"
    if [ -z "$lib" ]; then
      for dir in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/cuda-*/lib64 \
        /usr/local/cuda-*/targets/x86_64-linux/lib; do
        for cand in "$dir"/libnvrtc.so.13 "$dir"/libnvrtc.so.12; do
          [ -e "$cand" ] && lib=$cand && break 2
        done
      done
    fi
    if [ -z "$lib" ]; then # e.g. the nvidia-cuda-nvrtc wheel inside a Python environment
      lib="$(timeout 20 find / -xdev \( -name 'libnvrtc.so.13' -o -name 'libnvrtc.so.12' \) 2>/dev/null | head -n1)"
    fi
    if [ -n "$lib" ]; then
      export HETMEM_NVRTC=$lib
      export LD_LIBRARY_PATH="$(dirname "$lib")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    fi
  fi
  if [ -z "${HETMEM_CUDA_DRIVER:-}" ] && ! ldconfig -p 2>/dev/null | grep -q 'libcuda\.so\.1 '; then
    for cand in /usr/local/nvidia/lib64/libcuda.so.1 /usr/lib/x86_64-linux-gnu/libcuda.so.1 /usr/lib64/libcuda.so.1; do
      [ -e "$cand" ] && export HETMEM_CUDA_DRIVER=$cand && break
    done
  fi
  add_row env NVRTC "${HETMEM_NVRTC:-(loader default)}" ""
  add_row env "CUDA driver" "${HETMEM_CUDA_DRIVER:-(loader default)}" ""
}

print_table() {
  local out=$1
  {
    echo
    echo "==== hetmem GPU check ($(date -u +%Y-%m-%dT%H:%M:%SZ), $((SECONDS - t0)) s, $failures failed step(s))"
    echo
    echo "| section | item | value | note |"
    echo "|---|---|---|---|"
    local r
    for r in "${rows[@]}"; do
      IFS=$'\t' read -r sec item value note <<<"$r"
      echo "| $sec | $item | $value | $note |"
    done
  } | tee "${out:-/dev/null}"
}

device() {
  local outdir=${OUT:-}
  while [ $# -gt 0 ]; do
    case $1 in
      --out) outdir=$2; shift 2 ;;
      *) echo "gpu-check: unknown argument $1" >&2; return 2 ;;
    esac
  done
  t0=$SECONDS
  work="$(mktemp -d)"
  [ -n "$outdir" ] && mkdir -p "$outdir" && log="$outdir/gpu-check.log" && : >"$log"
  local bin="$here/bin"
  cd "$work" || return 1

  step nvidia-smi 20 nvidia-smi
  add_row gpu device "$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -n1)" ""
  find_cuda_libs
  step unit-tests 60 "$bin/unit" --test-threads=2
  step no-driver-tests 60 "$bin/cuda_no_driver"
  step nvrtc-tests 60 "$bin/nvrtc" --nocapture
  step gpu-tests 150 "$bin/cuda_gpu"
  step gpu-benches 90 "$bin/cuda_bench"

  # The suites' summaries and the benches' figures.
  local line
  while IFS=$'\t' read -r _ suite summary; do
    add_row tests "$suite" "$summary" ""
  done < <(grep -h '^SUMMARY' "$work"/*.out 2>/dev/null)
  local suite
  for suite in unit-tests no-driver-tests nvrtc-tests; do
    line="$(grep -h '^test result:' "$work/$suite.out" 2>/dev/null | head -n1)"
    add_row tests "$suite" "${line:-no result line}" "$(grep -h '^skipped' "$work/$suite.out" 2>/dev/null | head -n1)"
  done
  while IFS= read -r line; do
    IFS=$'\t' read -r _ section name value unit note <<<"$line"
    add_row "$section" "$name" "$value $unit" "$note"
  done < <(grep -h '^ROW' "$work"/gpu-benches.out 2>/dev/null)
  local failed_tests
  failed_tests="$(grep -h -E '^test .*(FAILED|panicked)' "$work"/*.out 2>/dev/null | head -n 20)"
  while IFS= read -r line; do
    [ -n "$line" ] && add_row failed "${line%% ...*}" "" "${line#* ... }"
  done <<<"$failed_tests"

  print_table "${outdir:+$outdir/gpu-check-table.md}"
  rm -rf "$work"
  [ "$failures" -eq 0 ]
}

if [ "${1:-}" = "--on-device" ]; then
  shift
  device "$@"
else
  host "$@"
fi
