# Trivial derivations for bench/sandbox-vs-nix.sh: `fanin` (n leaves and one derivation
# depending on all of them), `chain` (n derivations, each depending on the previous) and
# `bigclosure` (one derivation with 1,000 input files), `dirclosure` (1,000 input
# directories). `salt` makes every run's
# derivations new, so nothing is cached between runs.
{ salt ? "0", n ? 100, dirsFile ? null }:
let
  mk = name: script: extra: derivation ({
    inherit name salt;
    system = "x86_64-linux";
    builder = "/bin/sh";
    args = [ "-c" script ];
  } // extra);
  leaves = builtins.genList (i: mk "leaf-${toString i}" "echo ${toString i} > $out" { }) n;
  chainFrom = prev: i: mk "chain-${toString i}" "echo $prev > $out" { inherit prev; };
  srcs = builtins.genList (i: builtins.toFile "src-${toString i}" "${salt} ${toString i}") 1000;
in {
  fanin = mk "fanin" "echo $deps > $out" { deps = leaves; };
  chain = builtins.foldl' chainFrom (mk "chain-0" "echo 0 > $out" { }) (builtins.genList (i: i + 1) (n - 1));
  bigclosure = mk "bigclosure" "echo > $out" { inherit srcs; };
  one = mk "one" "echo > $out" { };
  # 1,000 directories added to the store beforehand (their paths listed in dirsFile).
  dirclosure = mk "dirclosure" "echo > $out" { dirs = map builtins.storePath (import dirsFile); };
}
