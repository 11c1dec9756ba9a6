//! What this machine may build, as Nix 2.8 decides it: a derivation for another
//! `system` (unless in `extra-platforms`), one requiring a feature not in
//! `system-features`, and any build with `max-jobs = 0` are refused before anything
//! runs, with Nix's message and exit status — each compared with real Nix on the same
//! derivation.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod common;
use common::*;

use std::fs;
use std::process::Output;

const EXPR: &str = r#"{
  other = derivation { name = "other"; system = "aarch64-linux"; builder = "/bin/sh"; args = ["-c" "echo > $out"]; };
  feat = derivation { name = "feat"; system = "x86_64-linux"; builder = "/bin/sh"; args = ["-c" "echo > $out"]; requiredSystemFeatures = ["gpu" "big-parallel"]; };
  structured = derivation { name = "structured"; system = "x86_64-linux"; builder = "/bin/sh"; args = ["-c" ". .attrs.sh; echo > $out"]; __structuredAttrs = true; requiredSystemFeatures = ["gpu"]; };
  plain = derivation { name = "plain"; system = "x86_64-linux"; builder = "/bin/sh"; args = ["-c" "echo > $out"]; };
}"#;

fn last_error(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .rfind(|l| l.starts_with("error:"))
        .unwrap_or("")
        .to_owned()
}

#[test]
fn wrong_platform_missing_features_and_no_slots_fail_as_in_nix() {
    if !can_build() || !have_nix() {
        return;
    }
    let dir = tempdir("platform");
    let expr = dir.join("plat.nix");
    fs::write(&expr, EXPR).unwrap();
    let (ours, theirs) = (dir.join("firn"), dir.join("nix"));
    for (attr, opts) in [
        ("other", &[][..]),
        ("feat", &[][..]),
        ("structured", &[][..]),
        ("plain", &[("max-jobs", "0")][..]),
    ] {
        let d = instantiate_attr(&ours, &expr, attr);
        assert_eq!(instantiate_attr(&theirs, &expr, attr), d);
        let nix = realise_in_sandbox("nix-store", &theirs, opts, &[], &d);
        let firn = realise_in_sandbox(firn_bin(), &ours, opts, &[], &d);
        assert_eq!(nix.status.code(), Some(1), "{attr}");
        assert_eq!(firn.status.code(), nix.status.code(), "{attr}");
        let expected = last_error(&nix);
        assert!(!expected.is_empty(), "{attr}");
        // Nix adds a second line (a link to the manual) to the max-jobs one.
        assert_eq!(last_error(&firn), expected, "{attr}");
        assert_eq!(
            String::from_utf8_lossy(&firn.stderr)
                .lines()
                .filter(|l| l.starts_with("error:"))
                .count(),
            1
        );
        assert!(firn.stdout.is_empty());
    }
    // With the platform in extra-platforms, or the features in system-features, it builds.
    let d = instantiate_attr(&ours, &expr, "other");
    ok(realise_in_sandbox(
        firn_bin(),
        &ours,
        &[("extra-platforms", "aarch64-linux")],
        &[],
        &d,
    ));
    let d = instantiate_attr(&ours, &expr, "feat");
    ok(realise_in_sandbox(
        firn_bin(),
        &ours,
        &[("extra-system-features", "gpu")],
        &[],
        &d,
    ));
    assert_verifies(&ours, "platform");
    remove(&dir);
}
