# One derivation whose output is 1 GiB (four copies of `src`, a 256 MiB file of random
# bytes added to the store beforehand), for bench/all-vs-nix.sh: how long registering a
# large output takes (canonicalisation, reference scan, NAR hash). `salt` makes every
# run's derivation new.
{ salt ? "0", src }:
{
  big = derivation {
    name = "big";
    inherit salt;
    src = builtins.storePath src;
    system = "x86_64-linux";
    builder = "/bin/sh";
    args = [ "-c" "cat $src $src $src $src > $out" ];
  };
}
