# N stdenv-like derivations (~10 KB of env each, a few shared inputs): the input of
# bench/show-vs-nix.sh.
{ n ? 1000 }:
let
  extra = import ../fixtures/exprs/extra.nix;
  base = extra.stdenvLike.drvAttrs;
in builtins.genList (i: derivation (base // { name = "pkg-${toString i}"; version = toString i; })) n
