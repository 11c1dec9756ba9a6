# Oracle derivations for firn-build's plan module (crates/build/tests/plan.rs).
# Built once with the real Nix 2.8.0; see ../README.md for the exact commands.
# Every builder copies what it was given (env, argv[0], build-dir files) into its output
# or, for the fixed-output one, prints it to the build log.
let
  script = ''
    out=$(sed -n 's/.*"outputs":{[^}]*"out":"\([^"]*\)".*/\1/p' .attrs.json)
    dev=$(sed -n 's/.*"outputs":{[^}]*"dev":"\([^"]*\)".*/\1/p' .attrs.json)
    mkdir $out
    cp .attrs.json $out/attrs.json
    cp .attrs.sh $out/attrs.sh
    env > $out/env
    ls -la /build > $out/ls-build
    echo dev > $dev
  '';
in
{
  # Plain environment: placeholders, passAsFile (incl. a name with no attribute and an
  # explicit <name>Path attribute), forced variables, impureEnvVars on a non-FOD.
  env = derivation {
    name = "plan-oracle-env";
    system = "x86_64-linux";
    builder = "/bin/sh";
    args = [ "-c" ''
      mkdir $out
      env > $out/env
      echo "$0" > $out/argv0
      echo ${builtins.placeholder "out"} > $out/placeholder-arg
      for f in .attr-*; do cp $f $out/file$f; done
      ls -la /build > $out/ls-build
    '' ];
    phvar = "${builtins.placeholder "out"}/bin";
    big = "line1\n${builtins.placeholder "out"}\n";
    other = "x";
    otherPath = "explicit";
    passAsFile = [ "big" "missing" "other" ];
    NIX_BUILD_TOP = "/override";
    PWD = "/override";
    NIX_STORE = "/not-the-store";
    impureEnvVars = [ "PLAN_ORACLE_SET" ];
  };

  # Fixed-output: impureEnvVars set / unset in the caller, and ones naming variables
  # Nix sets itself before (TMPDIR, NIX_OUTPUT_CHECKED) and after (NIX_LOG_FD).
  fod = derivation {
    name = "plan-oracle-fod";
    system = "x86_64-linux";
    builder = "/bin/sh";
    args = [ "-c" "env | sort >&2; echo hello > $out" ];
    impureEnvVars = [ "PLAN_ORACLE_SET" "PLAN_ORACLE_UNSET" "TMPDIR" "NIX_OUTPUT_CHECKED" "NIX_LOG_FD" ];
    outputHashMode = "flat";
    outputHashAlgo = "sha256";
    outputHash = "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03";
  };

  # Structured attrs: every JSON shape .attrs.sh treats differently.
  structured = derivation {
    name = "plan-oracle-structured";
    system = "x86_64-linux";
    builder = "/bin/sh";
    __structuredAttrs = true;
    outputs = [ "out" "dev" ];
    args = [ "-c" script ];
    aFloat = 1.5;
    negFloat = -2.5;
    integralFloat = 3.0;
    bigFloat = 1.0e20;
    negBigFloat = -(1.0e20);
    roundedFloat = 123456789.0;
    smallFloat = 0.0001;
    tinyFloat = 1.5e-7;
    big = 1099511627776;
    wrap = 4294967295;
    neg = -5;
    maxInt = 9223372036854775807;
    q = "it's";
    ctrl = builtins.fromJSON ''"a\u0001b\bc\fd\u007fe\u001f\t\r"'';
    unicode = "é";
    ph = builtins.placeholder "out";
    phDev = "${builtins.placeholder "dev"}/lib";
    t = true;
    f = false;
    n = null;
    emptyList = [ ];
    scalars = [ true false null 1 "x'y" 3.0 ];
    withFloat = [ 1 2.5 ];
    emptySet = { };
    flat = { a = 1; "b c" = "d'e"; z = false; n = null; };
    nested = { a = [ 1 ]; };
    "weird-key" = 1;
    "1x" = 2;
    _under = "u";
    "é" = "key";
    passAsFile = [ "q" ];
    impureEnvVars = [ "PLAN_ORACLE_SET" ];
  };
}
