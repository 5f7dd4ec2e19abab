#!/usr/bin/env bash
# Installs what the test command needs, when it is missing. Idempotent; safe to run every time.
set -euo pipefail

need_apt=()
# The Windows type-check: Debian's rustc with its std sources, and the mingw linker tools.
[ -x /usr/bin/rustc ] || need_apt+=(rustc-web)
[ -x /usr/bin/cargo ] || need_apt+=(cargo-web)
[ -d /usr/lib/rustlib/src/rust/library ] || need_apt+=(rust-web-src)
command -v x86_64-w64-mingw32-dlltool >/dev/null || need_apt+=(binutils-mingw-w64-x86-64)

if [ ${#need_apt[@]} -gt 0 ]; then
  echo "ci: installing ${need_apt[*]}"
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -q "${need_apt[@]}"
fi

for component in rustfmt clippy; do
  rustup component list --installed 2>/dev/null | grep -q "^$component" || rustup component add "$component"
done
