#!/usr/bin/env bash
# A build farm on this machine: four remote "machines" (separate store roots behind one
# real sshd on 127.0.0.1, max-jobs 1 each) and a DAG of short sandboxed builds
# (LAYERS x WIDTH nodes, each needing two of the layer before, plus a top). The same
# instantiated derivation is realised with `max-jobs 0` by real Nix 2.8 dispatching
# (`nix-store -r --builders …`, its build hook) and by firn dispatching (`firn realise
# --option builders …`), each into a fresh local store with fresh remotes, runs
# alternating which goes first. Reported: makespan (medians, ratio Nix / firn: above 1
# means firn is faster) and the bytes that crossed the ssh connections (both ways,
# counted by a wrapper around the remote program).
# Usage: bench/farm-vs-nix.sh [LAYERS] [WIDTH] [RUNS] [REMOTE]   (REMOTE: nix-store | firn)
set -euo pipefail
cd "$(dirname "$0")/.."
LAYERS=${1:-30}; WIDTH=${2:-10}; RUNS=${3:-3}; REMOTE=${4:-nix-store}
cargo build --release -q -p firn-cli
FIRN=$PWD/target/release/firn
W=$(mktemp -d /tmp/firn-farm.XXXXXX)
cleanup() { [ -f "$W/sshd.pid" ] && kill "$(cat "$W/sshd.pid")" 2>/dev/null; rm -rf "$W"; }
trap cleanup EXIT
mkdir -p "$W/conf" "$W/count"
printf 'sandbox = true\nsandbox-paths = /bin/sh=/bin/busybox\nsubstituters =\nbuild-users-group =\n' > "$W/conf/nix.conf"
export NIX_CONF_DIR=$W/conf FIRN_CONF_DIR=$W/conf NIX_USER_CONF_FILES= XDG_CONFIG_HOME=$W/conf

# The sshd (as tests/remote.rs starts it).
ssh-keygen -q -t ed25519 -N '' -f "$W/hostkey"; ssh-keygen -q -t ed25519 -N '' -f "$W/userkey"
cp "$W/userkey.pub" "$W/authorized_keys"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$W/sshd_config" <<EOF
Port $PORT
ListenAddress 127.0.0.1
HostKey $W/hostkey
PermitRootLogin yes
AuthorizedKeysFile $W/authorized_keys
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PidFile $W/sshd.pid
MaxStartups 100
MaxSessions 100
SetEnv NIX_CONF_DIR=$W/conf FIRN_CONF_DIR=$W/conf NIX_USER_CONF_FILES= XDG_CONFIG_HOME=$W/conf
EOF
mkdir -p /run/sshd
/usr/sbin/sshd -f "$W/sshd_config" -E "$W/sshd.log"
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.05; done
export NIX_SSHOPTS="-p $PORT -i $W/userkey -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR"

# The remote program, behind a byte counter (stdin and stdout of the serve session).
case "$REMOTE" in nix-store) PROG=$(command -v nix-store) ;; firn) PROG=$FIRN ;; *) echo "REMOTE: nix-store or firn" >&2; exit 2 ;; esac
cat > "$W/remote.sh" <<EOF
#!/bin/bash
tag=\$\$
tee >(wc -c > "$W/count/in.\$tag") | "$PROG" "\$@" | tee >(wc -c > "$W/count/out.\$tag")
EOF
chmod +x "$W/remote.sh"

# The DAG.
python3 - "$LAYERS" "$WIDTH" > "$W/farm.nix" <<'PY'
import sys
layers, width = int(sys.argv[1]), int(sys.argv[2])
print('{ salt }: let\n  mk = name: deps: derivation { inherit name salt; system = builtins.currentSystem;'
      ' builder = "/bin/sh"; args = [ "-c" "echo ${name} > $out; for d in ${toString deps}; do head -c 64 $d >> $out; done" ]; };')
for l in range(layers):
    for i in range(width):
        deps = '' if l == 0 else f'n{l-1}_{i} n{l-1}_{(i+1) % width}'
        print(f'  n{l}_{i} = mk "n{l}-{i}" [ {deps} ];')
print('in mk "top" [ ' + ' '.join(f'n{layers-1}_{i}' for i in range(width)) + ' ]')
PY
NODES=$((LAYERS * WIDTH + 1))

builders() { # run which -> the builders line (four machines, one slot each)
  local b=() i
  for i in 1 2 3 4; do b+=("ssh://root@127.0.0.1?remote-program=$W/remote.sh&remote-store=$W/$2-$1-m$i x86_64-linux - 1 1"); done
  local IFS=';'; echo "${b[*]}"
}

declare -A T B
one_run() { # which run
  local which=$1 run=$2 local=$W/$1-$2-local drv a out
  drv=$(nix-instantiate --store "$local" "$W/farm.nix" --argstr salt "$run" 2>/dev/null)
  rm -f "$W"/count/*
  a=$(date +%s%N)
  if [ "$which" = nix ]; then
    out=$(nix-store --store "$local" -r "$drv" --max-jobs 0 --builders "$(builders "$run" nix)" 2>"$W/err") || { tail "$W/err" >&2; exit 1; }
  else
    out=$("$FIRN" --store "$local" --option builders "$(builders "$run" firn)" --max-jobs 0 realise "$drv" 2>"$W/err") || { tail "$W/err" >&2; exit 1; }
  fi
  T[$which,$run]=$(( ($(date +%s%N) - a) / 1000000 ))
  sleep 0.3 # the counters' last writes
  B[$which,$run]=$(cat "$W"/count/* 2>/dev/null | awk '{s+=$1} END {print s+0}')
  echo "$out $(nix-store --store "$local" -q --hash "$out")" > "$W/$which-$run.out"
  # Every node was built remotely: none in the local log of builds.
  grep -c "^building '.*' on 'ssh://" "$W/err" > "$W/$which-$run.remote" || true
}

for run in $(seq "$RUNS"); do
  if [ $((run % 2)) = 1 ]; then one_run nix "$run"; one_run firn "$run"; else one_run firn "$run"; one_run nix "$run"; fi
  cmp -s "$W/nix-$run.out" "$W/firn-$run.out" || { echo "outputs differ in run $run" >&2; cat "$W/nix-$run.out" "$W/firn-$run.out" >&2; exit 1; }
  [ "$(cat "$W/firn-$run.remote")" = "$NODES" ] || { echo "firn built $(cat "$W/firn-$run.remote") of $NODES nodes remotely" >&2; exit 1; }
done

n=(); f=(); nb=(); fb=()
for run in $(seq "$RUNS"); do n+=("${T[nix,$run]}"); f+=("${T[firn,$run]}"); nb+=("${B[nix,$run]}"); fb+=("${B[firn,$run]}"); done
python3 - "$NODES" "$REMOTE" "${n[*]}" "${f[*]}" "${nb[*]}" "${fb[*]}" <<'PY'
import statistics, sys
nodes, remote = sys.argv[1], sys.argv[2]
n, f, nb, fb = (list(map(int, a.split())) for a in sys.argv[3:7])
mn, mf = statistics.median(n), statistics.median(f)
bn, bf = statistics.median(nb), statistics.median(fb)
print("| farm: 4 machines x 1 slot, remote program %s | Nix 2.8 dispatching | firn dispatching | ratio (Nix / firn) | runs (nix / firn) |" % remote)
print("|---|---|---|---|---|")
print(f"| makespan, {nodes}-node DAG | {mn/1000:.2f} s | {mf/1000:.2f} s | {mn/max(mf,1):.2f} | {' '.join(map(str,n))} / {' '.join(map(str,f))} ms |")
print(f"| bytes over ssh (both ways) | {bn/1e6:.2f} MB | {bf/1e6:.2f} MB | {bn/max(bf,1):.2f} | {' '.join(map(str,nb))} / {' '.join(map(str,fb))} |")
PY
