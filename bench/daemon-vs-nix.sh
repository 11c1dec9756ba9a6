#!/usr/bin/env bash
# firn daemon vs Nix 2.8's nix-daemon, side by side in one run, driven by the same real
# Nix clients over each daemon's socket (each daemon on its own chroot store):
#   add     `nix-store --add` of N small files in one call (AddToStore per file)
#   query   `nix-store -q --hash` of those N paths in one call (QueryPathInfo per path)
#   connect C separate `nix-store -q --references P` calls (handshake, SetOptions, query)
#   build   `nix-build` of bench/trivial.nix's 100-leaf fan-in, sandboxed (busybox), -j2
# Runs alternate which daemon goes first; the table has each run and the medians with
# the ratio (nix-daemon time / firn time: above 1 means firn is faster).
# Usage: bench/daemon-vs-nix.sh [N] [C] [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-1000}; C=${2:-100}; RUNS=${3:-3}
# FIRN=/path/to/firn measures that binary (an older build, say) instead of building.
if [ -z "${FIRN:-}" ]; then cargo build --release -q -p firn-cli; FIRN=$PWD/target/release/firn; fi
WORK=$(mktemp -d /tmp/firn-dbench.XXXXXX)
cleanup() { for p in "$WORK"/*.pid; do [ -f "$p" ] && kill "$(cat "$p")" 2>/dev/null; done; rm -rf "$WORK"; }
trap cleanup EXIT
SP=/bin/sh=/bin/busybox
mkdir -p "$WORK/conf"
printf 'sandbox = true\nsandbox-paths = %s\nsubstituters =\nbuild-users-group =\nmax-jobs = 2\n' "$SP" > "$WORK/conf/nix.conf"
export NIX_CONF_DIR=$WORK/conf FIRN_CONF_DIR=$WORK/conf

start() { # which root -> prints the client's NIX_REMOTE (the daemon's pid in ROOT.pid)
  local which=$1 root=$2 sock
  if [ "$which" = nix ]; then
    sock=$root.sock
    NIX_DAEMON_SOCKET_PATH=$sock nix-daemon --store "$root" >/dev/null 2>&1 &
  else
    sock=$root/nix/var/nix/daemon-socket/socket
    env -u NIX_DAEMON_SOCKET_PATH "$FIRN" --store "$root" daemon >/dev/null 2>&1 &
  fi
  echo $! > "$root.pid"
  for _ in $(seq 200); do [ -S "$sock" ] && break; sleep 0.05; done
  echo "unix://$sock?root=$root"
}

ms() { local a; a=$(date +%s%N); "$@" >/dev/null 2>"$WORK/err" || { cat "$WORK/err" >&2; exit 1; }; echo $(( ($(date +%s%N) - a) / 1000000 )); }

mkdir -p "$WORK/files"
for i in $(seq "$N"); do echo "file $i" > "$WORK/files/f$i"; done
declare -A T
one_run() { # which run
  local which=$1 run=$2 root=$WORK/$1-$2 url
  url=$(start "$which" "$root")
  export NIX_REMOTE=$url NIX_STATE_DIR=$WORK/client-$which
  T[$which,add,$run]=$(ms nix-store --add "$WORK"/files/f*)
  mapfile -t paths < <(nix-store --add "$WORK"/files/f*)
  T[$which,query,$run]=$(ms nix-store -q --hash "${paths[@]}")
  local a; a=$(date +%s%N)
  for i in $(seq "$C"); do nix-store -q --references "${paths[$((i % N))]}" >/dev/null; done
  T[$which,connect,$run]=$(( ($(date +%s%N) - a) / 1000000 ))
  T[$which,build,$run]=$(ms nix-build --no-out-link -j2 bench/trivial.nix -A fanin --argstr salt "$run")
  # Same outputs as the other daemon's (the fan-in's output path and NAR hash).
  out=$(nix-build --no-out-link bench/trivial.nix -A fanin --argstr salt "$run" 2>/dev/null)
  echo "$out $(nix-store -q --hash "$out")" > "$WORK/$which-$run.out"
  kill "$(cat "$root.pid")"; rm -f "$root.pid"
  unset NIX_REMOTE NIX_STATE_DIR
}

for run in $(seq "$RUNS"); do
  if [ $((run % 2)) = 1 ]; then one_run nix "$run"; one_run firn "$run"; else one_run firn "$run"; one_run nix "$run"; fi
  cmp -s "$WORK/nix-$run.out" "$WORK/firn-$run.out" || { echo "outputs differ in run $run" >&2; exit 1; }
done

echo "| work | nix-daemon (median) | firn daemon (median) | ratio (Nix / firn) | runs (nix / firn, ms) |"
echo "|---|---|---|---|---|"
for w in add query connect build; do
  n=(); f=()
  for run in $(seq "$RUNS"); do n+=("${T[nix,$w,$run]}"); f+=("${T[firn,$w,$run]}"); done
  python3 - "$w" "$N" "$C" "${n[*]}" "${f[*]}" <<'PY'
import statistics, sys
w, N, C, n, f = sys.argv[1], sys.argv[2], sys.argv[3], list(map(int, sys.argv[4].split())), list(map(int, sys.argv[5].split()))
label = {"add": f"`nix-store --add` of {N} files", "query": f"`nix-store -q --hash` of {N} paths",
         "connect": f"{C} `nix-store -q --references` calls", "build": "`nix-build` 100-leaf fan-in, sandbox, -j2"}[w]
mn, mf = statistics.median(n), statistics.median(f)
print(f"| {label} | {mn:.0f} ms | {mf:.0f} ms | {mn/max(mf,1):.2f} | {' '.join(map(str,n))} / {' '.join(map(str,f))} |")
PY
done
