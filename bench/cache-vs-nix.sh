#!/usr/bin/env bash
# firn vs Nix 2.8, side by side in one run: copy a closure to a file:// binary cache
# (`firn copy --to` vs `nix copy --to`) and back into an empty store (`firn copy --from`
# vs `nix copy --from`), with xz (Nix's default) and with zstd. The closure is N store
# paths of SIZE KiB each (incompressible halves, so compressors do real work) held by
# one root path. Each run alternates who goes first; both write to their own cache and
# read from the other tool's cache, so each reads what the other wrote.
# Then both fetch the closure over HTTP from one `firn serve-cache`.
# Usage: bench/cache-vs-nix.sh [N] [SIZE_KIB] [RUNS]
set -euo pipefail
# Both tools measured offline: Nix gets `--option substituters ''`, and firn (whose
# default cache is Nix's too) reads this.
export NIX_CONFIG="substituters ="
cd "$(dirname "$0")/.."
N=${1:-200}; SIZE=${2:-64}; RUNS=${3:-5}
cargo build --release -q -p firn-cli
FIRN=$PWD/target/release/firn
WORK=$(mktemp -d /tmp/firn-cbench.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
NIX=(--option substituters '' --extra-experimental-features nix-command)

# One source store holding the closure; both tools copy out of the same store (firn
# and Nix share the store format).
SRC=$WORK/src
mkdir -p "$WORK/files"
for i in $(seq 1 "$N"); do
  python3 -c 'import os,sys; n=int(sys.argv[1])*512; sys.stdout.buffer.write(os.urandom(n) + (b"line %s\n" % sys.argv[2].encode()) * (n // 10))' "$SIZE" "$i" > "$WORK/files/f$i"
done
nix-store --store "$SRC" --add "$WORK"/files/* > "$WORK/paths"
mapfile -t PATHS < "$WORK/paths"

ms() { echo $(( ($2 - $1) / 1000000 )); }
declare -A T
for comp in xz zstd; do
  for run in $(seq 1 "$RUNS"); do
    NC=$WORK/nixcache-$comp-$run; FC=$WORK/firncache-$comp-$run
    NS=$WORK/nixdst-$comp-$run; FS=$WORK/firndst-$comp-$run
    nix_to() { local a b; a=$(date +%s%N); nix copy "${NIX[@]}" --store "$SRC" --to "file://$NC?compression=$comp" "${PATHS[@]}" 2>"$WORK/err" || { cat "$WORK/err"; exit 1; }; b=$(date +%s%N); T[nix_to_$comp]+="$(ms "$a" "$b") "; }
    firn_to() { local a b; a=$(date +%s%N); "$FIRN" --quiet --store "$SRC" copy --to "file://$FC?compression=$comp" "${PATHS[@]}" >/dev/null 2>"$WORK/err" || { cat "$WORK/err"; exit 1; }; b=$(date +%s%N); T[firn_to_$comp]+="$(ms "$a" "$b") "; }
    nix_from() { local a b; a=$(date +%s%N); nix copy "${NIX[@]}" --store "$NS" --no-check-sigs --from "file://$FC" "${PATHS[@]}" 2>"$WORK/err" || { cat "$WORK/err"; exit 1; }; b=$(date +%s%N); T[nix_from_$comp]+="$(ms "$a" "$b") "; }
    firn_from() { local a b; a=$(date +%s%N); "$FIRN" --quiet --store "$FS" copy --no-check-sigs --from "file://$NC" "${PATHS[@]}" >/dev/null 2>"$WORK/err" || { cat "$WORK/err"; exit 1; }; b=$(date +%s%N); T[firn_from_$comp]+="$(ms "$a" "$b") "; }
    if [ $((run % 2)) = 1 ]; then nix_to; firn_to; nix_from; firn_from; else firn_to; nix_to; firn_from; nix_from; fi
    # Each reads what the other wrote, and gets the same paths with the same hashes.
    for p in "${PATHS[0]}" "${PATHS[$((N - 1))]}"; do
      h=$(nix-store --store "$SRC" -q --hash "$p")
      [ "$(nix-store --store "$NS" -q --hash "$p")" = "$h" ] || { echo "nix copy --from lost $p" >&2; exit 1; }
      [ "$(nix-store --store "$FS" -q --hash "$p")" = "$h" ] || { echo "firn copy --from lost $p" >&2; exit 1; }
    done
    [ "$(ls "$NC"/*.narinfo | wc -l)" = "$N" ] && [ "$(ls "$FC"/*.narinfo | wc -l)" = "$N" ] || { echo "narinfo count differs" >&2; exit 1; }
    rm -rf "$NC" "$FC" "$NS" "$FS"
  done
done

# Over HTTP: both clients fetch the closure from one `firn serve-cache` of the source
# store (uncompressed NARs, as nix-serve).
"$FIRN" --quiet --store "$SRC" serve-cache --listen 127.0.0.1:0 > "$WORK/url" 2>"$WORK/serve.err" &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; rm -rf "$WORK"' EXIT
for _ in $(seq 1 100); do [ -s "$WORK/url" ] && break; sleep 0.05; done
URL=$(head -1 "$WORK/url")
for run in $(seq 1 "$RUNS"); do
  NS=$WORK/nixhttp-$run; FS=$WORK/firnhttp-$run
  nix_http() { local a b; a=$(date +%s%N); nix copy "${NIX[@]}" --store "$NS" --no-check-sigs --from "$URL" "${PATHS[@]}" 2>"$WORK/err" || { cat "$WORK/err"; exit 1; }; b=$(date +%s%N); T[nix_from_http]+="$(ms "$a" "$b") "; }
  firn_http() { local a b; a=$(date +%s%N); "$FIRN" --quiet --store "$FS" copy --no-check-sigs --from "$URL" "${PATHS[@]}" >/dev/null 2>"$WORK/err" || { cat "$WORK/err"; exit 1; }; b=$(date +%s%N); T[firn_from_http]+="$(ms "$a" "$b") "; }
  if [ $((run % 2)) = 1 ]; then nix_http; firn_http; else firn_http; nix_http; fi
  p=${PATHS[$((N - 1))]}
  [ "$(nix-store --store "$NS" -q --hash "$p")" = "$(nix-store --store "$FS" -q --hash "$p")" ] || { echo "http copies differ" >&2; exit 1; }
  rm -rf "$NS" "$FS"
done

median() { tr ' ' '\n' | grep . | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
row() { python3 -c 'import sys; op, comp, n, f = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]); print(f"| copy --{op} | {comp} | {n} ms | {f} ms | {n / max(f, 1):.2f}x |")' "$@"; }
echo "N=$N paths of ${SIZE} KiB, $RUNS runs, medians"
printf '| operation | compression | nix | firn | ratio (nix/firn) |\n| --- | --- | --- | --- | --- |\n'
for comp in xz zstd; do
  for op in to from; do
    n=$(echo "${T[nix_${op}_$comp]}" | median); f=$(echo "${T[firn_${op}_$comp]}" | median)
    row "$op" "$comp" "$n" "$f"
  done
done
n=$(echo "${T[nix_from_http]}" | median); f=$(echo "${T[firn_from_http]}" | median)
row "from http" "none" "$n" "$f"
echo "http runs (ms): nix ${T[nix_from_http]}; firn ${T[firn_from_http]}"
