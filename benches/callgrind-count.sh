# Sourced (not run) by benches/fastmem-instructions.sh and benches/frames-instructions.sh after
# `set -euo pipefail`: their `[--csv]` command line, their valgrind check and one callgrind count.
# Messages name the script that sourced this file.

name="$(basename "$0" .sh)"
root="$(cd "$(dirname "$0")/.." && pwd)"

# csv_option "$@": sets csv to 1 for `--csv`, 0 for no argument; `-h`/`--help` prints the
# script's header comment, anything else its usage.
csv_option() {
  csv=0
  case "${1:-}" in
    --csv) csv=1 ;;
    "") ;;
    -h|--help) awk 'NR > 1 && /^#/ {print; next} NR > 1 {exit}' "$0"; exit 0 ;;
    *) echo "usage: $0 [--csv]" >&2; exit 2 ;;
  esac
}

need_valgrind() {
  command -v valgrind >/dev/null || { echo "$name: valgrind is not installed (apt-get install valgrind)" >&2; exit 1; }
}

# callgrind_count FILE WHAT [VALGRIND OPTION...] PROGRAM [ARG...]: runs PROGRAM under callgrind,
# writing its profile to FILE, and prints the instructions counted. A run that fails or counts
# nothing ends the script with a message naming WHAT.
callgrind_count() {
  local file=$1 what=$2
  shift 2
  valgrind --tool=callgrind --callgrind-out-file="$file" "$@" >/dev/null 2>"$file.log" \
    || { cat "$file.log" >&2; echo "$name: run of $what failed" >&2; exit 1; }
  local n
  n="$(awk '/^(summary|totals):/ {print $2; exit}' "$file")"
  [[ -n "$n" && "$n" -gt 0 ]] || { echo "$name: no count for $what" >&2; exit 1; }
  echo "$n"
}
