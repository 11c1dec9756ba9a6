//! Derivation attributes real nixpkgs derivations use, built by firn and by real Nix
//! 2.8 from the same expression, in the sandbox: `exportReferencesGraph` (the closure
//! files in the build directory, and the structured-attributes form in `.attrs.json`)
//! gives byte-identical outputs; `__noChroot` is refused with `sandbox = true` with
//! Nix's message and builds outside the sandbox with `sandbox = relaxed`.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod common;
use common::*;

use std::fs;
use std::path::Path;
use std::process::Output;

const EXPR: &str = r#"
let
  sh = "/bin/sh";
  dep1 = derivation { name = "dep1"; system = "x86_64-linux"; builder = sh; args = ["-c" "echo dep1 > $out"]; };
  dep2 = derivation { name = "dep2"; system = "x86_64-linux"; builder = sh; args = ["-c" "echo ${dep1} > $out"]; };
in {
  legacy = derivation {
    name = "graph-legacy"; system = "x86_64-linux"; builder = sh;
    exportReferencesGraph = [ "closure" dep2 "drv-closure" dep2.drvPath ];
    args = [ "-c" "cat closure > $out; echo --- >> $out; cat drv-closure >> $out" ];
  };
  structured = derivation {
    name = "graph-structured"; system = "x86_64-linux"; builder = sh;
    __structuredAttrs = true;
    exportReferencesGraph = { closure = [ dep2 ]; };
    # No bash here for .attrs.sh: take $out from .attrs.json.
    args = [ "-c" "out=$(sed -e 's/.*\"outputs\":{\"out\":\"\\([^\"]*\\)\".*/\\1/' .attrs.json); cat .attrs.json > $out" ];
  };
  outside = derivation {
    name = "graph-outside"; system = "x86_64-linux"; builder = sh;
    exportReferencesGraph = [ "closure" "/tmp/not-in-the-store" ];
    args = [ "-c" "echo > $out" ];
  };
  nochroot = derivation {
    name = "nochroot"; system = "x86_64-linux"; builder = sh; __noChroot = true;
    args = [ "-c" "if [ -e /etc/debian_version ]; then echo host > $out; else echo sandbox > $out; fi" ];
  };
  chroot = derivation {
    name = "chroot"; system = "x86_64-linux"; builder = sh;
    args = [ "-c" "if [ -e /etc/debian_version ]; then echo host > $out; else echo sandbox > $out; fi" ];
  };
}"#;

fn contents(root: &Path, printed: &[u8]) -> String {
    let p = String::from_utf8_lossy(printed).trim().to_owned();
    fs::read_to_string(root.join(p.trim_start_matches('/'))).unwrap()
}

#[test]
fn export_references_graph_and_no_chroot_as_in_nix() {
    if !can_build() || !have_nix() {
        return;
    }
    let dir = tempdir("parity");
    let expr = dir.join("parity.nix");
    fs::write(&expr, EXPR).unwrap();
    let (ours, theirs) = (dir.join("firn"), dir.join("nix"));
    for attr in ["legacy", "structured"] {
        let d = instantiate_attr(&ours, &expr, attr);
        assert_eq!(instantiate_attr(&theirs, &expr, attr), d);
        let nix = ok(realise_in_sandbox(
            "nix-store",
            &theirs,
            &[("sandbox", "true")],
            &[],
            &d,
        ));
        let firn = ok(realise_in_sandbox(
            firn_bin(),
            &ours,
            &[("sandbox", "true")],
            &[],
            &d,
        ));
        assert_eq!(firn, nix, "{attr}: the same output path");
        let (a, b) = (
            contents(&ours, firn.as_bytes()),
            contents(&theirs, nix.as_bytes()),
        );
        assert_eq!(a, b, "{attr}: byte-identical output");
        // And the graph is really there (a closure of two paths, the .drv's with its
        // outputs' closures).
        assert!(a.contains("-dep1") && a.contains("-dep2"), "{attr}: {a}");
        if attr == "legacy" {
            assert!(a.contains("-dep2.drv\n"), "{a}");
        } else {
            assert!(a.contains("\"closureSize\":"), "{a}");
        }
    }
    // A path outside the store: refused, with Nix's message.
    let d = instantiate_attr(&ours, &expr, "outside");
    instantiate_attr(&theirs, &expr, "outside");
    let nix = realise_in_sandbox("nix-store", &theirs, &[("sandbox", "true")], &[], &d);
    let firn = realise_in_sandbox(firn_bin(), &ours, &[("sandbox", "true")], &[], &d);
    assert_eq!(firn.status.code(), nix.status.code());
    let said = |o: &Output| {
        String::from_utf8_lossy(&o.stderr)
            .lines()
            .rfind(|l| l.starts_with("error:"))
            .unwrap_or("")
            .to_owned()
    };
    assert_eq!(said(&firn), said(&nix));
    assert!(said(&firn).contains("non-store path '/tmp/not-in-the-store'"));

    // __noChroot: refused with sandbox = true, as Nix does, and nothing built.
    let d = instantiate_attr(&ours, &expr, "nochroot");
    instantiate_attr(&theirs, &expr, "nochroot");
    let nix = realise_in_sandbox("nix-store", &theirs, &[("sandbox", "true")], &[], &d);
    let firn = realise_in_sandbox(firn_bin(), &ours, &[("sandbox", "true")], &[], &d);
    assert_eq!(nix.status.code(), Some(1));
    assert_eq!(firn.status.code(), Some(1));
    assert_eq!(said(&firn), said(&nix));
    // With sandbox = relaxed it builds outside the sandbox (Nix's `useChroot`); a
    // derivation without __noChroot stays inside. (Nix 2.8 itself sandboxes every build
    // into a store rooted elsewhere than `/`, a "diverted" store such as these test
    // stores, whatever the setting; firn builds there unsandboxed with the store bound
    // at its logical place, so the setting means the same in every store.)
    let firn = ok(realise_in_sandbox(
        firn_bin(),
        &ours,
        &[("sandbox", "relaxed")],
        &[],
        &d,
    ));
    assert_eq!(contents(&ours, firn.as_bytes()), "host\n");
    let d = instantiate_attr(&ours, &expr, "chroot");
    let firn = ok(realise_in_sandbox(
        firn_bin(),
        &ours,
        &[("sandbox", "relaxed")],
        &[],
        &d,
    ));
    assert_eq!(contents(&ours, firn.as_bytes()), "sandbox\n");
    assert_verifies(&ours, "parity");
    remove(&dir);
}
