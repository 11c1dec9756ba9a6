#!/usr/bin/env bash
# firn vs Nix 2.8, side by side in one run: `firn query --requisites` vs `nix-store -qR`
# on a store of N registered paths (default 20,000: each path references up to 3
# earlier ones, so the closure of the last one is nearly the whole store). The rows are
# written straight into a database made by Nix (content is not needed for queries).
# Usage: bench/query-vs-nix.sh [N] [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-20000}; RUNS=${2:-5}
cargo build --release -q -p firn-cli
FIRN=$PWD/target/release/firn
ROOT=$(mktemp -d /tmp/firn-qbench.XXXXXX)
trap 'rm -rf "$ROOT"' EXIT
S=(--store "$ROOT" --option substituters '')

nix-store "${S[@]}" --add bench/many.nix > /dev/null   # creates the store and its db
top=$(python3 bench/query-db.py "$ROOT/nix/var/nix/db/db.sqlite" "$N" | sed -n 1p)

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
time_ms() { for _ in $(seq "$RUNS"); do local t0 t1; t0=$(date +%s%N); "$@" > /dev/null; t1=$(date +%s%N); echo $(( (t1 - t0) / 1000000 )); done | median; }

cmp <(nix-store "${S[@]}" -qR "$top") <("$FIRN" --store "$ROOT" query --requisites "$top") \
  || { echo "outputs differ!" >&2; exit 1; }
count=$(nix-store "${S[@]}" -qR "$top" | wc -l)
nix_ms=$(time_ms nix-store "${S[@]}" -qR "$top")
firn_ms=$(time_ms "$FIRN" --store "$ROOT" query --requisites "$top")
echo "query --requisites over $N paths (closure $count): nix ${nix_ms} ms, firn ${firn_ms} ms, ratio $(awk "BEGIN{printf \"%.1f\", $nix_ms/($firn_ms>0?$firn_ms:1)}")x"
