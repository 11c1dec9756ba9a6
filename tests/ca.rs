//! Content-addressed derivations (`ca-derivations`), built by firn and by real Nix 2.8
//! from the same `.drv`s into separate roots: a floating CA derivation whose output
//! refers to itself, a CA derivation depending on it (resolved before it is built) and
//! an input-addressed one depending on that (deferred). The output paths, NAR hashes,
//! `ca` fields and the Realisations and RealisationsRefs rows must be Nix's, real Nix
//! must read firn's realisations (`nix realisation info`), and without the feature
//! firn refuses as Nix does.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod common;
use common::*;

use std::fs;
use std::path::Path;

const EXPR: &str = r#"
let
  sh = "/bin/sh";
  ca = args: derivation ({ system = "x86_64-linux"; builder = sh; __contentAddressed = true;
    outputHashMode = "recursive"; outputHashAlgo = "sha256"; } // args);
in rec {
  root = ca { name = "ca-root";
    args = ["-c" "mkdir $out; echo hello > $out/hello; echo $out > $out/me; ln -s $out $out/self"]; };
  dependent = ca { name = "ca-dependent";
    args = ["-c" "mkdir $out; cat ${root}/hello > $out/copy; echo ${root} > $out/ref"]; };
  legacy = derivation { name = "ia-on-ca"; system = "x86_64-linux"; builder = sh;
    args = ["-c" "echo ${dependent}/copy > $out"]; };
}"#;

const CA: (&str, &str) = ("experimental-features", "ca-derivations");

fn instantiate(root: &Path, expr: &Path, attr: &str) -> String {
    instantiate_attr_with(root, expr, attr, &[CA])
}

fn sql(root: &Path, query: &str) -> String {
    ok(command("sqlite3")
        .arg(root.join("nix/var/nix/db/db.sqlite"))
        .arg(query)
        .output()
        .unwrap())
}

fn realisation_info(root: &Path, drv: &str) -> String {
    ok(command("nix")
        .args(["--store", root.to_str().unwrap()])
        .args(["--option", "substituters", ""])
        .args([
            "--extra-experimental-features",
            "nix-command ca-derivations",
        ])
        .args(["realisation", "info", "--json"])
        .arg(drv)
        .output()
        .unwrap())
}

#[test]
fn a_ca_chain_builds_as_in_nix() {
    if !can_build() || !have_nix() {
        return;
    }
    let dir = tempdir("ca-chain");
    let expr = dir.join("ca.nix");
    fs::write(&expr, EXPR).unwrap();
    let (firn_root, nix_root) = (dir.join("firn"), dir.join("nix"));
    let drv = instantiate(&firn_root, &expr, "legacy");
    assert_eq!(instantiate(&nix_root, &expr, "legacy"), drv);

    // Signed as they are registered (paths and realisations): ed25519 is deterministic,
    // so the signatures must be Nix's too.
    let (sk, _, _) = keypair(&dir, "ca-test-1");
    let sign = ("secret-key-files", sk.to_str().unwrap());
    let by_firn = ok(realise_in_sandbox(
        firn_bin(),
        &firn_root,
        &[CA, sign],
        &[],
        &drv,
    ));
    let by_nix = ok(realise_in_sandbox(
        "nix-store",
        &nix_root,
        &[CA, sign],
        &[],
        &drv,
    ));
    assert_eq!(by_firn, by_nix);

    // The content-addressed outputs: same paths, NAR hashes, sizes, references, `ca`.
    let paths =
        "select path, hash, narSize, ca from ValidPaths where ca like 'fixed:%' order by path";
    let refs = "select a.path, b.path from Refs join ValidPaths a on a.id = referrer \
                join ValidPaths b on b.id = reference where a.ca like 'fixed:%' order by 1, 2";
    let realisations = "select r.drvPath, r.outputName, v.path, coalesce(r.signatures, 'NULL') \
                        from Realisations r join ValidPaths v on v.id = r.outputPath order by 1, 2";
    let realisation_refs =
        "select a.drvPath || '!' || a.outputName, b.drvPath || '!' || b.outputName \
                            from RealisationsRefs x join Realisations a on a.id = x.referrer \
                            join Realisations b on b.id = x.realisationReference order by 1, 2";
    let sigs =
        "select path, coalesce(sigs, 'NULL') from ValidPaths where ca like 'fixed:%' order by path";
    for q in [paths, refs, realisations, realisation_refs, sigs] {
        let (f, n) = (sql(&firn_root, q), sql(&nix_root, q));
        assert!(!n.is_empty(), "{q}: Nix has no rows");
        assert_eq!(f, n, "{q}");
    }
    assert!(
        sql(&firn_root, realisations).contains("ca-test-1:"),
        "realisations signed"
    );
    // The root refers to itself, under its final path.
    let self_ref = sql(
        &firn_root,
        "select count(*) from Refs join ValidPaths v on v.id = referrer \
         where referrer = reference and v.path like '%-ca-root'",
    );
    assert_eq!(self_ref.trim(), "1");
    assert_eq!(
        fs::read_to_string(firn_root.join("nix/var/nix/db/ca-schema")).unwrap(),
        "3"
    );
    // Real Nix reads firn's realisations, and finds them Nix's.
    assert_eq!(
        realisation_info(&firn_root, &drv),
        realisation_info(&nix_root, &drv)
    );
    assert_verifies(&firn_root, "ca chain");

    // Built again: nothing to build, the same paths (the realisations say so).
    let again = ok(realise_in_sandbox(firn_bin(), &firn_root, &[CA], &[], &drv));
    assert_eq!(again, by_firn);
    remove(&dir);
}

#[test]
fn without_the_feature_firn_refuses_as_nix_does() {
    if !can_build() || !have_nix() {
        return;
    }
    let dir = tempdir("ca-nofeature");
    let expr = dir.join("ca.nix");
    fs::write(&expr, EXPR).unwrap();
    let root = dir.join("root");
    let drv = instantiate(&root, &expr, "root");
    let by_firn = realise_in_sandbox(firn_bin(), &root, &[], &[], &drv);
    let by_nix = realise_in_sandbox("nix-store", &root, &[], &[], &drv);
    assert_eq!(by_firn.status.code(), by_nix.status.code());
    let want = "error: experimental Nix feature 'ca-derivations' is disabled; use \
                '--extra-experimental-features ca-derivations' to override";
    assert!(String::from_utf8_lossy(&by_nix.stderr).contains(want));
    let firn_err = String::from_utf8_lossy(&by_firn.stderr);
    assert!(firn_err.lines().any(|l| l == want), "{firn_err}");
    assert!(!firn_err.contains("panicked"));
    // Refused before saying what would be built, as Nix (which reads it first).
    assert_eq!(
        firn_err.trim(),
        String::from_utf8_lossy(&by_nix.stderr).trim()
    );
    remove(&dir);
}
