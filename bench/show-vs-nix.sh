#!/usr/bin/env bash
# firn vs Nix 2.8, side by side in one run: read N stdenv-like .drv files and print them
# as JSON (`firn derivation show` vs `nix show-derivation`), and print one drv back.
# Needs: nix 2.8 (root, chroot store in a temp dir), a release build of firn.
# Usage: bench/show-vs-nix.sh [N] [RUNS]      (default 1000 derivations, 5 runs)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-1000}; RUNS=${2:-5}
cargo build --release -q -p firn-cli
FIRN=$PWD/target/release/firn
ROOT=$(mktemp -d /tmp/firn-bench.XXXXXX)
trap 'rm -rf "$ROOT"' EXIT
S=(--store "$ROOT" --option substituters '')

echo "instantiating $N derivations with nix-instantiate..." >&2
mapfile -t drvs < <(nix-instantiate "${S[@]}" bench/many.nix --arg n "$N" 2>/dev/null | sed 's/!.*//')
bytes=$(cd "$ROOT" && cat "${drvs[@]/#\//}" | wc -c)

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
time_ms() { # command...; prints the median wall time in ms over RUNS runs
  for _ in $(seq "$RUNS"); do
    local t0 t1; t0=$(date +%s%N); "$@" > /dev/null; t1=$(date +%s%N)
    echo $(( (t1 - t0) / 1000000 ))
  done | median
}

nix_ms=$(time_ms nix --extra-experimental-features nix-command show-derivation "${S[@]}" "${drvs[@]}")
firn_ms=$(time_ms "$FIRN" --store "$ROOT" derivation show "${drvs[@]}")
# Sanity: both print the same JSON.
cmp <(nix --extra-experimental-features nix-command show-derivation "${S[@]}" "${drvs[@]}") \
    <("$FIRN" --store "$ROOT" derivation show "${drvs[@]}") || { echo "outputs differ!" >&2; exit 1; }

echo "show $N drvs ($((bytes / 1024)) KiB of .drv): nix ${nix_ms} ms, firn ${firn_ms} ms, ratio $(awk "BEGIN{printf \"%.1f\", $nix_ms/($firn_ms>0?$firn_ms:1)}")x"
