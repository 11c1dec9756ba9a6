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
python3 - "$ROOT/nix/var/nix/db/db.sqlite" "$N" <<'PY'
import hashlib, random, sqlite3, sys
db, n = sys.argv[1], int(sys.argv[2])
alphabet = "0123456789abcdfghijklmnpqrsvwxyz"
def b32(i):
    h = hashlib.sha256(str(i).encode()).digest()
    v = int.from_bytes(h[:20], "little")
    return "".join(alphabet[(v >> (5 * k)) & 31] for k in range(32))
paths = [f"/nix/store/{b32(i)}-pkg-{i}" for i in range(n)]
c = sqlite3.connect(db)
c.execute("pragma journal_mode = wal")
with c:
    c.executemany("insert into ValidPaths (path, hash, registrationTime, narSize) values (?, ?, 1, 120)",
                  [(p, "sha256:" + hashlib.sha256(p.encode()).hexdigest()) for p in paths])
    ids = {p: i for p, i in c.execute("select path, id from ValidPaths")}
    rnd = random.Random(42)
    refs = set()
    for i in range(1, n):
        for j in rnd.sample(range(max(0, i - 50), i), min(3, i)):
            refs.add((ids[paths[i]], ids[paths[j]]))
    c.executemany("insert into Refs (referrer, reference) values (?, ?)", sorted(refs))
print(paths[-1])
PY
top=$(python3 -c "
import hashlib; a='0123456789abcdfghijklmnpqrsvwxyz'; i=$N-1
v=int.from_bytes(hashlib.sha256(str(i).encode()).digest()[:20],'little')
print('/nix/store/'+''.join(a[(v>>(5*k))&31] for k in range(32))+'-pkg-'+str(i))")

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
time_ms() { for _ in $(seq "$RUNS"); do local t0 t1; t0=$(date +%s%N); "$@" > /dev/null; t1=$(date +%s%N); echo $(( (t1 - t0) / 1000000 )); done | median; }

cmp <(nix-store "${S[@]}" -qR "$top") <("$FIRN" --store "$ROOT" query --requisites "$top") \
  || { echo "outputs differ!" >&2; exit 1; }
count=$(nix-store "${S[@]}" -qR "$top" | wc -l)
nix_ms=$(time_ms nix-store "${S[@]}" -qR "$top")
firn_ms=$(time_ms "$FIRN" --store "$ROOT" query --requisites "$top")
echo "query --requisites over $N paths (closure $count): nix ${nix_ms} ms, firn ${firn_ms} ms, ratio $(awk "BEGIN{printf \"%.1f\", $nix_ms/($firn_ms>0?$firn_ms:1)}")x"
