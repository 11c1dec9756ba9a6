#!/usr/bin/env bash
# firn vs Nix 2.8, side by side in one run, both with the sandbox on and -j2 (run as
# root): realise N trivial derivations as a fan-in (N leaves + 1) and as a chain (N),
# then one derivation whose input closure is 1,000 files and one whose input closure is
# 1,000 directories (set-up cost of the sandbox's root), then one trivial derivation. Each run uses fresh derivations
# (a new salt) in fresh chroot stores; both tools get the same .drv files.
# Usage: bench/sandbox-vs-nix.sh [N] [RUNS]
set -euo pipefail
# Both tools measured offline: Nix gets `--option substituters ''`, and firn (whose
# default cache is Nix's too) reads this.
export NIX_CONFIG="substituters ="
cd "$(dirname "$0")/.."
N=${1:-100}; RUNS=${2:-3}
cargo build --release -q -p firn-cli
FIRN=$PWD/target/release/firn
WORK=$(mktemp -d /tmp/firn-sbench.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
SP="/bin/sh=/bin/busybox"

printf '| run | case | builds | nix | firn | nix/build | firn/build | ratio |\n| --- | --- | --- | --- | --- | --- | --- | --- |\n'
for run in $(seq 1 "$RUNS"); do
  for attr in fanin chain bigclosure dirclosure one; do
    salt="$run-$attr-$RANDOM$RANDOM"
    NS=$WORK/nix-$run-$attr; FS=$WORK/firn-$run-$attr
    extra=()
    if [ "$attr" = dirclosure ]; then
      rm -rf "$WORK/dirs"; mkdir -p "$WORK/dirs"
      for i in $(seq 1 1000); do mkdir "$WORK/dirs/d$i"; echo "$salt $i" > "$WORK/dirs/d$i/f"; done
      nix-store --store "$NS" --add "$WORK"/dirs/* > "$WORK/dirs.txt"
      nix-store --store "$FS" --add "$WORK"/dirs/* > /dev/null
      { echo '['; sed 's/.*/"&"/' "$WORK/dirs.txt"; echo ']'; } > "$WORK/dirs.nix"
      extra=(--arg dirsFile "$WORK/dirs.nix")
    fi
    drv=$(nix-instantiate --store "$NS" --option substituters '' --argstr salt "$salt" --arg n "$N" "${extra[@]}" -A "$attr" bench/trivial.nix 2>"$WORK/inst.err") || { cat "$WORK/inst.err"; exit 1; }
    nix-instantiate --store "$FS" --option substituters '' --argstr salt "$salt" --arg n "$N" "${extra[@]}" -A "$attr" bench/trivial.nix >/dev/null 2>&1
    builds=$(nix-store --store "$NS" -qR "$drv" | grep -c '\.drv$')
    run_nix() {
      local a; a=$(date +%s%N)
      nix-store --store "$NS" --option substituters '' --option sandbox true \
        --option sandbox-paths "$SP" -j2 -r "$drv" >/dev/null 2>"$WORK/nix.err" || { cat "$WORK/nix.err"; exit 1; }
      n_ns=$(( $(date +%s%N) - a ))
    }
    run_firn() {
      local a; a=$(date +%s%N)
      "$FIRN" --quiet --store "$FS" --option sandbox true --option sandbox-paths "$SP" realise -j2 "$drv" >/dev/null 2>"$WORK/firn.err" || { cat "$WORK/firn.err"; exit 1; }
      f_ns=$(( $(date +%s%N) - a ))
    }
    # The kernel finishes tearing down a run's namespaces after it exits, which slows
    # whatever runs next: alternate who goes first, and let things settle in between.
    if [ $((run % 2)) = 1 ]; then run_nix; sleep 1; run_firn; else run_firn; sleep 1; run_nix; fi
    # Same outputs, same hashes.
    out=$(nix-store --store "$NS" -q --outputs "$drv")
    [ "$(nix-store --store "$NS" -q --hash "$out")" = "$(nix-store --store "$FS" -q --hash "$out")" ] || { echo "outputs differ for $attr" >&2; exit 1; }
    n_ms=$((n_ns / 1000000)); f_ms=$((f_ns / 1000000))
    python3 - "$run" "$attr" "$builds" "$n_ms" "$f_ms" <<'PY'
import sys
run, attr, builds, n, f = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
print(f"| {run} | {attr} | {builds} | {n} ms | {f} ms | {n/builds:.1f} ms | {f/builds:.1f} ms | {n/max(f,1):.1f}x |")
PY
    rm -rf "$NS" "$FS"
  done
done
