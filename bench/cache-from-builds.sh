#!/usr/bin/env bash
# Several firn builds against Nix 2.8 reading the same file:// caches: N paths of SIZE
# KiB (as bench/cache-vs-nix.sh makes them), written once by `nix copy --to` with xz and
# zstd; then ROUNDS rounds, each running, for every build given, `firn copy --from`
# and `nix copy --from` of each cache into fresh stores, back to back. Prints one line
# per build, cache and round: wall ms of firn and of Nix, and the load average.
# Usage: bench/cache-from-builds.sh N SIZE_KIB ROUNDS LABEL=FIRN_BINARY...
set -euo pipefail
# Both tools measured offline: Nix gets `--option substituters ''`, and firn (whose
# default cache is Nix's too) reads this.
export NIX_CONFIG="substituters ="
N=$1; SIZE=$2; ROUNDS=$3; shift 3
WORK=$(mktemp -d /tmp/firn-cfb.XXXXXX)
trap 'chmod -R u+w "$WORK"; rm -rf "$WORK"' EXIT
NIX=(--option substituters '' --extra-experimental-features nix-command)
mkdir -p "$WORK/files"
for i in $(seq 1 "$N"); do
  python3 -c 'import os,sys; n=int(sys.argv[1])*512; sys.stdout.buffer.write(os.urandom(n) + (b"line %s\n" % sys.argv[2].encode()) * (n // 10))' "$SIZE" "$i" > "$WORK/files/f$i"
done
nix-store --store "$WORK/src" --option substituters '' --add "$WORK"/files/* > "$WORK/paths"
mapfile -t P < "$WORK/paths"
for comp in xz zstd; do
  nix copy "${NIX[@]}" --store "$WORK/src" --to "file://$WORK/$comp?compression=$comp" "${P[@]}" 2>/dev/null
done
ms() { echo $(( ($2 - $1) / 1000000 )); }
for round in $(seq 1 "$ROUNDS"); do
  for build in "$@"; do
    label=${build%%=*}; firn=${build#*=}
    for comp in xz zstd; do
      chmod -R u+w "$WORK/f" "$WORK/n" 2>/dev/null || true; rm -rf "$WORK/f" "$WORK/n"
      a=$(date +%s%N)
      "$firn" --quiet --store "$WORK/f" copy --no-check-sigs --from "file://$WORK/$comp" "${P[@]}" >/dev/null
      b=$(date +%s%N)
      nix copy "${NIX[@]}" --store "$WORK/n" --no-check-sigs --from "file://$WORK/$comp" "${P[@]}" 2>/dev/null
      c=$(date +%s%N)
      echo "round $round $label $comp firn $(ms "$a" "$b") nix $(ms "$b" "$c") load $(cut -d' ' -f1 /proc/loadavg)"
    done
  done
done
