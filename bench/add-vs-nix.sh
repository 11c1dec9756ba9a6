#!/usr/bin/env bash
# firn vs Nix 2.8, side by side in one run: `firn add` vs `nix-store --add` of a copy of
# a real tree (default /usr/lib/x86_64-linux-gnu, the 664 MB tree of issue 16) into a
# fresh store each time, page cache warm; alternating order, medians, ratio (Nix time /
# firn time: above 1 means firn is faster). Checks both register the same path and NAR
# hash, and that firn's store verifies.
# Usage: bench/add-vs-nix.sh [TREE] [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=${1:-/usr/lib/x86_64-linux-gnu}; RUNS=${2:-3}
cargo build --release -q -p firn-cli
FIRN=$PWD/target/release/firn
WORK=$(mktemp -d /tmp/firn-addbench.XXXXXX)
trap 'chmod -R u+w "$WORK" 2>/dev/null; rm -rf "$WORK"' EXIT
cp -a "$SRC" "$WORK/tree" 2>/dev/null || true
cat $(find "$WORK/tree" -type f) > /dev/null 2>&1 || true
echo "tree: $(du -sh "$WORK/tree" | cut -f1), $(find "$WORK/tree" | wc -l) entries"
ms() { local a; a=$(date +%s%N); "$@" > "$WORK/out"; echo $(( ($(date +%s%N) - a) / 1000000 )); }
# A new pair of stores per run, all deleted at the end: creating inodes right after
# deleting thousands costs both tools far more than a fresh store does (ext4 without a
# journal, as here, skips inodes deleted less than 60 s ago, one buffer lookup each:
# `recently_deleted` was a fifth of firn's CPU time when each run deleted the last).
# For the same reason, the runs start once earlier deletions (a previous bench's
# clean-up, say) are a minute old.
sleep 61
n=(); f=()
for run in $(seq "$RUNS"); do
  ns=$WORK/ns$run fs=$WORK/fs$run
  if [ $((run % 2)) = 1 ]; then
    n+=("$(ms nix-store --store "$ns" --option substituters '' --add "$WORK/tree")"); np=$(cat "$WORK/out"); sync; sleep 1
    f+=("$(ms "$FIRN" --store "$fs" add "$WORK/tree")"); fp=$(cat "$WORK/out")
  else
    f+=("$(ms "$FIRN" --store "$fs" add "$WORK/tree")"); fp=$(cat "$WORK/out"); sync; sleep 1
    n+=("$(ms nix-store --store "$ns" --option substituters '' --add "$WORK/tree")"); np=$(cat "$WORK/out")
  fi
  [ "$np" = "$fp" ] || { echo "paths differ: $np $fp" >&2; exit 1; }
  [ "$(nix-store --store "$ns" -q --hash "$np")" = "$(nix-store --store "$fs" -q --hash "$fp")" ] || { echo "hashes differ" >&2; exit 1; }
  sync; sleep 1
done
"$FIRN" --store "$fs" verify --check-contents 2>/dev/null
python3 - "${n[*]}" "${f[*]}" <<'PY'
import statistics, sys
n, f = list(map(int, sys.argv[1].split())), list(map(int, sys.argv[2].split()))
mn, mf = statistics.median(n), statistics.median(f)
print(f"| `add` of the tree (fresh store) | {mn:.0f} ms | {mf:.0f} ms | {mn/mf:.2f} | {' '.join(map(str,n))} / {' '.join(map(str,f))} |")
PY
