#!/usr/bin/env bash
# Builds the Windows test binaries (x86_64-pc-windows-gnu, Debian's rustc with -Zbuild-std and the
# mingw-w64 linker) and runs them under wine: hetmem-thread-models (the contract test runs the
# `Windows` model for real), hetmem-core and hetmem-backends; then clippy on them for that target.
#
# Installs what is missing with apt; idempotent. Prints "skipped: <reason>" and exits 0 when a
# tool cannot be installed or wine cannot start; exits non-zero when a test fails.
# Artifacts and the wine prefix live in ${CARGO_TARGET_DIR:-target}/windows-wine.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
say() { printf 'windows-wine: %s (%ds)\n' "$*" $((SECONDS - start)); }
skip() {
  say "skipped: $*"
  exit 0
}

target=x86_64-pc-windows-gnu
base=${CARGO_TARGET_DIR:-target}/windows-wine
mkdir -p "$base"
base=$(cd "$base" && pwd)

find_wine() {
  for w in /usr/lib/wine/wine64 "$(command -v wine64 || true)" "$(command -v wine || true)"; do
    if [ -n "$w" ] && [ -x "$w" ]; then
      echo "$w"
      return
    fi
  done
}

# --- tools -------------------------------------------------------------------------------------
# Debian's Rust packages come from one source package; companions of an installed rustc-web are
# pinned to its version, so installing one never upgrades the toolchain other steps use.
rust_version=$(dpkg-query -W -f='${Version}' rustc-web 2>/dev/null || true)
rust_pkg() { echo "$1${rust_version:+=$rust_version}"; }
need_apt=()
[ -x /usr/bin/rustc ] || need_apt+=(rustc-web)
[ -x /usr/bin/cargo ] || need_apt+=("$(rust_pkg cargo-web)")
[ -d /usr/lib/rustlib/src/rust/library ] || need_apt+=("$(rust_pkg rust-web-src)")
command -v x86_64-w64-mingw32-gcc >/dev/null || need_apt+=(gcc-mingw-w64-x86-64)
[ -n "$(find_wine)" ] || need_apt+=(wine64)
need_clippy=()
[ -x /usr/bin/cargo-clippy ] || need_clippy+=("$(rust_pkg rust-web-clippy)")
sudo_cmd=()
if [ ${#need_apt[@]} -gt 0 ] || [ ${#need_clippy[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || skip "not root and no sudo to install ${need_apt[*]} ${need_clippy[*]}"
    sudo_cmd=(sudo -n)
  fi
  "${sudo_cmd[@]}" apt-get update -q >/dev/null || skip "apt-get update failed"
fi
apt_install() {
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -q --no-install-recommends "$@" >/dev/null
}
if [ ${#need_apt[@]} -gt 0 ]; then
  say "installing ${need_apt[*]}"
  apt_install "${need_apt[@]}" || skip "apt-get install ${need_apt[*]} failed"
fi
if [ ${#need_clippy[@]} -gt 0 ]; then
  say "installing ${need_clippy[*]}"
  apt_install "${need_clippy[@]}" || say "apt-get install ${need_clippy[*]} failed; the clippy step will be skipped"
fi
wine=$(find_wine)
[ -n "$wine" ] || skip "no wine64 binary after installing wine64"

export RUSTC=/usr/bin/rustc RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR=$base/target
export WINEPREFIX=$base/prefix WINEARCH=win64 WINEDLLOVERRIDES="mscoree,mshtml=" WINEDEBUG=-all,err+module
unset DISPLAY WAYLAND_DISPLAY

# --- runtime startup objects -------------------------------------------------------------------
# The windows-gnu linker line names rsbegin.o / rsend.o, which a rustup target ships but
# -Zbuild-std does not build; compile them from the std sources. rustc finds them on `-L native`.
rt=$base/rtstartup
mkdir -p "$rt"
for obj in rsbegin rsend; do
  src=/usr/lib/rustlib/src/rust/library/rtstartup/$obj.rs
  if [ ! -s "$rt/$obj.o" ] || [ "$src" -nt "$rt/$obj.o" ]; then
    /usr/bin/rustc --target $target --emit=obj -C panic=abort -O -o "$rt/$obj.o" "$src"
  fi
done

# --- wine prefix -------------------------------------------------------------------------------
# std (since Rust 1.78) imports ProcessPrng from bcryptprimitives.dll, which wine 8 lacks; a
# one-function DLL over BCryptGenRandom stands in for it in the prefix's system32.
if [ ! -f "$WINEPREFIX/.hetmem-ready" ]; then
  say "creating the wine prefix"
  timeout 300 "$wine" wineboot --init >/dev/null 2>&1 || skip "wine cannot start (wineboot --init failed)"
  "$(dirname "$wine")/wineserver" -w 2>/dev/null || true
  [ -d "$WINEPREFIX/drive_c/windows/system32" ] || skip "wine made no prefix at $WINEPREFIX"
fi
dll=$WINEPREFIX/drive_c/windows/system32/bcryptprimitives.dll
if [ ! -f "$WINEPREFIX/.hetmem-ready" ] || [ ! -s "$dll" ]; then
  cat >"$rt/bcryptprimitives.c" <<'EOF'
#include <windows.h>
#include <bcrypt.h>

/* Fills the buffer from the system RNG; Windows' own ProcessPrng always returns TRUE. */
BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T len) {
  while (len > 0) {
    ULONG chunk = len > 0x10000000 ? 0x10000000 : (ULONG)len;
    if (BCryptGenRandom(NULL, data, chunk, BCRYPT_USE_SYSTEM_PREFERRED_RNG) != 0) return FALSE;
    data += chunk;
    len -= chunk;
  }
  return TRUE;
}
EOF
  x86_64-w64-mingw32-gcc -O2 -shared -o "$dll" "$rt/bcryptprimitives.c" -lbcrypt \
    -Wl,--export-all-symbols -Wl,--kill-at
  touch "$WINEPREFIX/.hetmem-ready"
fi

# --- lockfile ----------------------------------------------------------------------------------
# Debian's rustc is older than some locked dev-dependencies want (proptest, heapless); resolve a
# copy of Cargo.lock to versions that support the workspace's rust-version, redone when
# Cargo.lock changes. The workspace's own lockfile is left alone.
lock=$base/lock/Cargo.lock
mkdir -p "$base/lock"
# Cargo 1.85 takes --lockfile-path; later ones the resolver.lockfile-path setting.
if /usr/bin/cargo -Z help 2>/dev/null | grep -q -- '-Z lockfile-path'; then
  lock_args=(-Zlockfile-path --config "resolver.lockfile-path=\"$lock\"")
else
  lock_args=(-Zunstable-options --lockfile-path "$lock")
fi
if ! cmp -s Cargo.lock "$base/lock/Cargo.lock.main"; then
  say "resolving dependencies for $(/usr/bin/rustc --version | cut -d' ' -f1-2)"
  cp Cargo.lock "$lock"
  CARGO_RESOLVER_INCOMPATIBLE_RUST_VERSIONS=fallback /usr/bin/cargo update -q "${lock_args[@]}" ||
    skip "cargo update could not resolve versions for Debian's rustc"
  cp Cargo.lock "$base/lock/Cargo.lock.main"
fi

# --- build and run -----------------------------------------------------------------------------
export CARGO_TARGET_X86_64_PC_WINDOWS_GNU_RUNNER=$wine
# hetmem_no_heapless: core's heapless dev-dependency (an example's peer) needs rustc 1.87.
export CARGO_TARGET_X86_64_PC_WINDOWS_GNU_RUSTFLAGS="-L native=$rt --cfg hetmem_no_heapless"
# Keep one wineserver up for all test binaries; stop it on the way out.
"$(dirname "$wine")/wineserver" -p 60 2>/dev/null || true
trap '"$(dirname "$wine")/wineserver" -k 2>/dev/null || true' EXIT

status=0
for crate in hetmem-thread-models hetmem-core hetmem-backends; do
  say "test $crate under wine"
  /usr/bin/cargo test -q --no-fail-fast -Zbuild-std "${lock_args[@]}" --target $target -p "$crate" --lib --tests ||
    status=1
done
# The cfg(windows) code is linted nowhere else. Debian's clippy is not the workspace's: its style
# and complexity lints drift between versions (and ignore the workspace's MSRV), so this pass
# denies compiler warnings and clippy's correctness and suspicious groups; the workspace clippy
# run on Linux stays the authority on the rest.
if [ -x /usr/bin/cargo-clippy ]; then
  say "clippy (Windows target)"
  PATH=/usr/bin:$PATH /usr/bin/cargo clippy -q -Zbuild-std "${lock_args[@]}" --target $target -p hetmem-thread-models \
    -p hetmem-core -p hetmem-backends --lib --tests -- -A clippy::all -D clippy::correctness -D clippy::suspicious \
    -D warnings || status=1
else
  say "clippy (Windows target) skipped: no /usr/bin/cargo-clippy (rust-web-clippy)"
fi

if [ $status -ne 0 ]; then
  say "FAILED: a Windows test (under wine) or clippy failed"
  exit 1
fi
say "all Windows tests passed under wine"
