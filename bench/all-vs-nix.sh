#!/usr/bin/env bash
# Every row of issue 16's table, firn vs Nix 2.8 side by side in one run (run as root):
#   add       `firn add` vs `nix-store --add` of a copy of TREE (default the 664 MB
#             /usr/lib/x86_64-linux-gnu), fresh stores
#   verify    `verify --check-contents` of those stores (the NAR hash of the tree), and of
#             a store holding each top-level entry of the tree as its own path
#   dump      `dump` of the tree's path to /dev/null, and into a pipe (`| cat`)
#   fan-in    realise 100 leaves + 1, sandbox, -j2 (bench/trivial.nix)
#   chain     realise a chain of 100, sandbox, -j2
#   query     `query --requisites` / `--referrers-closure` on 20,000 registered paths
#   1 GiB     realise one derivation whose output is 1 GiB (bench/big.nix): the
#             registration of a large output (scan + NAR hash)
#   daemon    the rows of bench/daemon-vs-nix.sh (add, query, connect, build through
#             each daemon's socket with the real Nix clients)
# Each measure alternates who goes first (odd runs Nix, even runs firn), with a pause
# between the two; the table gives the medians, the ratio (Nix time / firn time: above
# 1 means firn is faster) and every run. Outputs are checked equal (paths, NAR hashes,
# NAR bytes, query output).
# Usage: [FIRN=BINARY] bench/all-vs-nix.sh [TREE] [RUNS] [DAEMON_N]
set -euo pipefail
# Both tools measured offline: Nix gets `--option substituters ''`, and firn (whose
# default cache is Nix's too) reads this.
export NIX_CONFIG="substituters ="
cd "$(dirname "$0")/.."
SRC=${1:-/usr/lib/x86_64-linux-gnu}; RUNS=${2:-3}; DN=${3:-1000}
# FIRN=/path/to/firn measures that binary (an older build, say) instead of building.
if [ -z "${FIRN:-}" ]; then cargo build --release -q -p firn-cli; FIRN=$PWD/target/release/firn; fi
export FIRN
WORK=$(mktemp -d /tmp/firn-allbench.XXXXXX)
trap 'chmod -R u+w "$WORK" 2>/dev/null; rm -rf "$WORK"' EXIT
NIXS=(--option substituters '')
SP=/bin/sh=/bin/busybox

# ms CMD...: run CMD (stdout to $WORK/out), print its wall time in ms; fail loudly.
ms() {
  local a; a=$(date +%s%N)
  "$@" > "$WORK/out" 2> "$WORK/err" || { echo "failed: $*" >&2; cat "$WORK/err" >&2; exit 1; }
  echo $(( ($(date +%s%N) - a) / 1000000 ))
}
# row LABEL "NIX_MS..." "FIRN_MS...": one line of the table, medians and ratio.
row() {
  python3 - "$1" "$2" "$3" <<'PY'
import statistics, sys
label, n, f = sys.argv[1], list(map(int, sys.argv[2].split())), list(map(int, sys.argv[3].split()))
mn, mf = statistics.median(n), statistics.median(f)
print(f"| {label} | {mn:.0f} ms | {mf:.0f} ms | {mn / max(mf, 1):.2f} | {' '.join(map(str, n))} / {' '.join(map(str, f))} |")
PY
}
# pair NIX_CMD FIRN_CMD RUN: time both, in the run's order; sets $nt and $ft.
pair() {
  if [ $(($3 % 2)) = 1 ]; then nt=$(ms $1); sleep 1; ft=$(ms $2); else ft=$(ms $2); sleep 1; nt=$(ms $1); fi
}

echo "| work | Nix 2.8 (median) | firn (median) | ratio (Nix / firn) | runs (nix / firn, ms) |"
echo "|---|---|---|---|---|"

# --- add, verify, dump of the tree ---------------------------------------------------
cp -a "$SRC" "$WORK/tree" 2>/dev/null || true
cat $(find "$WORK/tree" -type f) > /dev/null 2>&1 || true
# A new pair of stores per run, deleted after the tree's rows, and a start once earlier
# deletions are a minute old: ext4 without a journal (as here) skips inodes deleted less
# than 60 s ago when it allocates, one buffer lookup each (`recently_deleted` was a
# fifth of firn's CPU time when each run deleted the last run's stores first).
sleep 61
n=(); f=()
for run in $(seq "$RUNS"); do
  NS=$WORK/ns$run FS=$WORK/fs$run
  add_nix() { nix-store --store "$NS" "${NIXS[@]}" --add "$WORK/tree"; }
  add_firn() { "$FIRN" --store "$FS" add "$WORK/tree"; }
  if [ $((run % 2)) = 1 ]; then
    n+=("$(ms add_nix)"); np=$(cat "$WORK/out"); sync; sleep 1; f+=("$(ms add_firn)"); fp=$(cat "$WORK/out")
  else
    f+=("$(ms add_firn)"); fp=$(cat "$WORK/out"); sync; sleep 1; n+=("$(ms add_nix)"); np=$(cat "$WORK/out")
  fi
  [ "$np" = "$fp" ] || { echo "paths differ: $np $fp" >&2; exit 1; }
  [ "$(nix-store --store "$NS" -q --hash "$np")" = "$(nix-store --store "$FS" -q --hash "$fp")" ] \
    || { echo "NAR hashes differ" >&2; exit 1; }
done
sync
row "\`add\` of the $(du -sh "$WORK/tree" | cut -f1) tree ($(find "$WORK/tree" | wc -l) entries, fresh store)" "${n[*]}" "${f[*]}"
P=$np
verify_nix() { nix-store --store "$NS" --verify --check-contents; }
verify_firn() { "$FIRN" --store "$FS" verify --check-contents; }
dump_null_nix() { nix-store --dump "$NS$P" > /dev/null; }
dump_null_firn() { "$FIRN" --store "$FS" dump "$P" > /dev/null; }
dump_pipe_nix() { nix-store --dump "$NS$P" | cat > /dev/null; }
dump_pipe_firn() { "$FIRN" --store "$FS" dump "$P" | cat > /dev/null; }
cmp <(nix-store --dump "$NS$P") <("$FIRN" --store "$FS" dump "$P") || { echo "NARs differ" >&2; exit 1; }
for what in verify dump_null dump_pipe; do
  n=(); f=()
  for run in $(seq "$RUNS"); do pair "${what}_nix" "${what}_firn" "$run"; n+=("$nt"); f+=("$ft"); done
  case $what in
    verify) label="\`verify --check-contents\` of that store (NAR hash of the tree)" ;;
    dump_null) label="\`dump\` of the tree's path to /dev/null" ;;
    dump_pipe) label="\`dump\` of the tree's path into a pipe (\`| cat > /dev/null\`)" ;;
  esac
  row "$label" "${n[*]}" "${f[*]}"
done
# The same bytes as one store path per top-level entry of the tree (untimed adds):
# a store of many paths is what `verify --check-contents` usually meets, and there both
# cores can hash (one path each), where one path's NAR hash is one SHA-256 stream.
NM=$WORK/nsmany FM=$WORK/fsmany
(cd "$WORK/tree" && nix-store --store "$NM" "${NIXS[@]}" --add -- * > "$WORK/many-nix")
(cd "$WORK/tree" && "$FIRN" --store "$FM" add -- * > "$WORK/many-firn")
cmp "$WORK/many-nix" "$WORK/many-firn" || { echo "paths of the entries differ" >&2; exit 1; }
verify_many_nix() { nix-store --store "$NM" --verify --check-contents; }
verify_many_firn() { "$FIRN" --store "$FM" verify --check-contents; }
n=(); f=()
for run in $(seq "$RUNS"); do pair verify_many_nix verify_many_firn "$run"; n+=("$nt"); f+=("$ft"); done
row "\`verify --check-contents\` of a store of $(wc -l < "$WORK/many-nix") paths (the tree's top-level entries)" "${n[*]}" "${f[*]}"
chmod -R u+w "$WORK"/ns* "$WORK"/fs*; rm -rf "$WORK"/ns* "$WORK"/fs*; sync
sleep 61 # the same: the builds below start once those deletions are a minute old

# --- sandboxed realisations: fan-in, chain, 1 GiB output -----------------------------
head -c $((256 << 20)) /dev/urandom > "$WORK/blob"
realise_rows() { # ATTR LABEL NIXFILE [extra instantiate args...]
  local attr=$1 label=$2 file=$3; shift 3
  n=(); f=()
  for run in $(seq "$RUNS"); do
    local salt="$run-$attr-$RANDOM$RANDOM" NS=$WORK/rn FS=$WORK/rf extra=()
    rm -rf "$NS" "$FS"
    if [ "$attr" = big ]; then
      local blob; blob=$(nix-store --store "$NS" "${NIXS[@]}" --add "$WORK/blob")
      "$FIRN" --store "$FS" add "$WORK/blob" > /dev/null
      extra=(--argstr src "$blob")
    fi
    local drv
    drv=$(nix-instantiate --store "$NS" "${NIXS[@]}" --argstr salt "$salt" "${extra[@]}" "$@" -A "$attr" "$file" 2>/dev/null)
    nix-instantiate --store "$FS" "${NIXS[@]}" --argstr salt "$salt" "${extra[@]}" "$@" -A "$attr" "$file" >/dev/null 2>&1
    r_nix() { nix-store --store "$NS" "${NIXS[@]}" --option sandbox true --option sandbox-paths "$SP" -j2 -r "$drv"; }
    r_firn() { "$FIRN" --quiet --store "$FS" --option sandbox true --option sandbox-paths "$SP" realise -j2 "$drv"; }
    pair r_nix r_firn "$run"; n+=("$nt"); f+=("$ft")
    local out; out=$(nix-store --store "$NS" -q --outputs "$drv")
    [ "$(nix-store --store "$NS" -q --hash "$out")" = "$(nix-store --store "$FS" -q --hash "$out")" ] \
      || { echo "outputs differ for $attr" >&2; exit 1; }
    rm -rf "$NS" "$FS"; sleep 1
  done
  row "$label" "${n[*]}" "${f[*]}"
}
realise_rows fanin "realise 100-leaf fan-in, sandbox, -j2" bench/trivial.nix --arg n 100
realise_rows chain "realise 100-long chain, sandbox, -j2" bench/trivial.nix --arg n 100
realise_rows big "realise a derivation with a 1 GiB output (registration: scan + NAR hash), sandbox" bench/big.nix

# --- queries on 20,000 registered paths ----------------------------------------------
Q=$WORK/q; N=20000
nix-store --store "$Q" "${NIXS[@]}" --add bench/many.nix > /dev/null
python3 bench/query-db.py "$Q/nix/var/nix/db/db.sqlite" "$N" > "$WORK/ends"
last=$(sed -n 1p "$WORK/ends"); first=$(sed -n 2p "$WORK/ends")
for q in requisites referrers-closure; do
  p=$last; [ "$q" = referrers-closure ] && p=$first
  cmp <(nix-store --store "$Q" "${NIXS[@]}" -q "--$q" "$p") <("$FIRN" --store "$Q" query "--$q" "$p") \
    || { echo "query --$q outputs differ" >&2; exit 1; }
  q_nix() { nix-store --store "$Q" "${NIXS[@]}" -q "--$q" "$p"; }
  q_firn() { "$FIRN" --store "$Q" query "--$q" "$p"; }
  n=(); f=()
  for run in $(seq "$RUNS"); do pair q_nix q_firn "$run"; n+=("$nt"); f+=("$ft"); done
  row "\`query --$q\`, $N paths ($(wc -l < "$WORK/out") printed)" "${n[*]}" "${f[*]}"
done
rm -rf "$Q"

# --- through the daemons -------------------------------------------------------------
bench/daemon-vs-nix.sh "$DN" 100 "$RUNS" | tail -n +3
