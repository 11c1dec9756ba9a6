#!/usr/bin/env bash
# firn vs Nix 2.8, side by side in one run, on a tree of SIZE MB (default 400): the
# NAR hash (`firn hash` vs `nix-hash --type sha256`) and NAR serialisation piped into
# sha256sum (`firn dump` vs `nix-store --dump`). Checks both give the same bytes/hash.
# Usage: bench/nar-vs-nix.sh [SIZE_MB] [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${1:-400}; RUNS=${2:-3}
cargo build --release -q -p firn-cli
FIRN=$PWD/target/release/firn
WORK=$(mktemp -d /tmp/firn-narbench.XXXXXX)
trap 'chmod -R u+w "$WORK" 2>/dev/null; rm -rf "$WORK"' EXIT
TREE=$WORK/tree
# A tree like an installed package (a Python or Perl library): mostly files under
# 32 KiB holding about half of the bytes, a few larger ones holding the rest.
python3 - "$TREE" "$SIZE" <<'PY'
import os, random, sys
root, size_mb = sys.argv[1], int(sys.argv[2])
rnd = random.Random(1)
total, i = 0, 0
budget = size_mb * 1024 * 1024
while total < budget:
    d = os.path.join(root, f"dir{i % 97}", f"sub{i % 7}")
    os.makedirs(d, exist_ok=True)
    r = rnd.random()
    n = rnd.randint(100, 32_000) if r < 0.97 else rnd.randint(64_000, 1_000_000)
    with open(os.path.join(d, f"f{i}"), "wb") as f:
        f.write(os.urandom(n))
    if i % 10 == 0:
        os.chmod(os.path.join(d, f"f{i}"), 0o755)
    total += n; i += 1
print(f"{i} files, {total >> 20} MiB", file=sys.stderr)
PY
ROOT=$WORK/store
P=$("$FIRN" --store "$ROOT" add "$TREE")
REAL=$ROOT$P
# Warm the page cache, then check both agree.
cat $(find "$TREE" -type f) > /dev/null
[ "$("$FIRN" hash --type sha256 "$TREE")" = "$(nix-hash --type sha256 "$TREE")" ] || { echo "hashes differ!" >&2; exit 1; }
cmp <("$FIRN" --store "$ROOT" dump "$P") <(nix-store --dump "$REAL") || { echo "NARs differ!" >&2; exit 1; }
nar_bytes=$("$FIRN" --store "$ROOT" dump "$P" | wc -c)

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
time_ms() { for _ in $(seq "$RUNS"); do local t0 t1; t0=$(date +%s%N); "$@" > /dev/null; t1=$(date +%s%N); echo $(( (t1 - t0) / 1000000 )); done | median; }
report() { # label nix_ms firn_ms
  awk -v l="$1" -v n="$2" -v f="$3" -v b="$nar_bytes" 'BEGIN {
    printf "%s: nix %d ms (%.2f GB/s), firn %d ms (%.2f GB/s), ratio %.2fx\n", l, n, b/n/1e6, f, b/f/1e6, n/f }'
}
nix_ms=$(time_ms nix-hash --type sha256 "$TREE")
firn_ms=$(time_ms "$FIRN" hash --type sha256 "$TREE")
report "NAR sha256 of $((nar_bytes >> 20)) MiB (nix-hash vs firn hash)" "$nix_ms" "$firn_ms"
nix_ms=$(time_ms sh -c "nix-store --dump '$REAL' > /dev/null")
firn_ms=$(time_ms sh -c "'$FIRN' --store '$ROOT' dump '$P' > /dev/null")
report "dump > /dev/null (nix-store --dump vs firn dump)" "$nix_ms" "$firn_ms"
nix_ms=$(time_ms sh -c "nix-store --dump '$REAL' | sha256sum")
firn_ms=$(time_ms sh -c "'$FIRN' --store '$ROOT' dump '$P' | sha256sum")
report "dump | sha256sum (coreutils sha256sum bounds both)" "$nix_ms" "$firn_ms"
