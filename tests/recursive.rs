//! Recursive Nix (`experimental-features = recursive-nix`): `firn realise` of a
//! derivation with `requiredSystemFeatures = ["recursive-nix"]` whose builder runs the
//! real Nix 2.8 client against its private socket (`NIX_REMOTE`). Inside, the build can
//! query and build its inputs, add a path, build an inner derivation, and link both
//! into its output, which then refers to them; it cannot see, build or refer to a
//! valid store path outside its closure, and the output does not refer to it even
//! though it names it. Without the feature, firn refuses as Nix does.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod common;
use common::*;

use std::fs;
use std::path::Path;

/// The builder's script: each check it makes is a line of its log.
const SCRIPT: &str = r#"
set -e
mkdir $out
nix="nix --experimental-features nix-command"
$nix path-info $dummy
$nix build --no-link $dummy
test -e $unreachable
if $nix path-info $unreachable; then echo LEAK-path-info; exit 1; fi
if $nix build --no-link $unreachable 2>err; then echo LEAK-build; exit 1; fi
grep 'in recursive Nix because path is unknown' err
if $nix store cat $unreachable 2>err; then echo LEAK-cat; exit 1; fi
if $nix eval --impure --expr "builtins.toFile \"x\" \"\${builtins.storePath \"$unreachable\"}\"" 2>err; then
  echo LEAK-reference; exit 1
fi
grep -E 'cannot substitute unknown path|cannot add a path referring' err
echo foobar > foobar
foobar=$($nix store add-path ./foobar)
$nix path-info $foobar
ln -s $foobar $out/foobar
test "$($nix path-info --all | wc -l)" -eq 3
$nix build -o inner --impure --expr 'derivation { name = "inner1"; system = "x86_64-linux"; builder = "/bin/sh"; args = ["-c" "echo blaat > $out"]; }'
ln -s $(readlink inner) $out/inner1
echo $unreachable > $out/names-unreachable
echo RECURSIVE-OK
"#;

fn expr(dir: &Path) -> std::path::PathBuf {
    let script = dir.join("script.sh");
    fs::write(&script, SCRIPT).unwrap();
    let e = dir.join("rec.nix");
    fs::write(
        &e,
        format!(
            r#"derivation {{
  name = "recursive"; system = "x86_64-linux"; builder = "/bin/sh";
  args = [ "-e" {script} ];
  PATH = "/usr/bin:/bin";
  requiredSystemFeatures = [ "recursive-nix" ];
  dummy = builtins.toFile "dummy" "bla bla";
  unreachable = builtins.getEnv "UNREACHABLE";
}}"#,
            script = script.display()
        ),
    )
    .unwrap();
    e
}

fn instantiate(root: &Path, e: &Path, unreachable: &str) -> String {
    ok(command("nix-instantiate")
        .args(["--store", root.to_str().unwrap()])
        .args(["--option", "substituters", ""])
        .env("UNREACHABLE", unreachable)
        .arg(e)
        .output()
        .unwrap())
    .trim()
    .to_owned()
}

#[test]
fn realise_a_recursive_nix_build_restricted_to_its_closure() {
    if !can_build() || !have_nix() {
        return;
    }
    let dir = tempdir("recursive");
    let root = dir.join("root");
    let outside = dir.join("outside");
    fs::write(&outside, "not in the closure").unwrap();
    let unreachable = ok(firn_at(&root, &["add", outside.to_str().unwrap()], None));
    let unreachable = unreachable.trim();
    let drv = instantiate(&root, &expr(&dir), unreachable);

    // Without the experimental feature: Nix's refusal (no such system feature).
    let out = firn_at(
        &root,
        &["--option", "sandbox", "false", "realise", &drv],
        None,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("with features {recursive-nix} is required to build"),
        "{err}"
    );

    let out = firn_at(
        &root,
        &[
            "--option",
            "experimental-features",
            "recursive-nix",
            "--option",
            "sandbox",
            "false",
            "realise",
            &drv,
        ],
        None,
    );
    let log = ok(firn_at(&root, &["log", &drv], None));
    assert!(
        out.status.success(),
        "{}\n{log}",
        String::from_utf8_lossy(&out.stderr)
    );
    let output = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(log.contains("RECURSIVE-OK"), "{log}");
    // The reference to the outside path was refused by the restricted store.
    assert!(log.contains("in recursive Nix"), "{log}");

    let real = root.join(output.trim_start_matches('/'));
    let inner = fs::read_link(real.join("inner1")).unwrap();
    let inner_real = root.join(inner.to_str().unwrap().trim_start_matches('/'));
    assert_eq!(fs::read_to_string(inner_real).unwrap(), "blaat\n");
    let refs = ok(firn_at(&root, &["query", "--references", &output], None));
    let foobar = fs::read_link(real.join("foobar")).unwrap();
    assert!(refs.contains(foobar.to_str().unwrap()), "{refs}");
    assert!(refs.contains(inner.to_str().unwrap()), "{refs}");
    // Named in the output, but not a reference: it was never allowed.
    assert!(fs::read_to_string(real.join("names-unreachable"))
        .unwrap()
        .contains(unreachable));
    assert!(!refs.contains(unreachable), "{refs}");
    // The socket went with the build.
    assert_verifies(&root, "after the recursive build");
    remove(&dir);
}

/// In the sandbox: the paths the build adds (a file and a directory) appear in its
/// store (copied into the sandbox's root) and its output refers to them.
#[test]
fn added_paths_appear_in_the_sandbox() {
    if !can_build() || !have_nix() {
        return;
    }
    let dir = tempdir("recursive-sandbox");
    let root = dir.join("root");
    let script = dir.join("s.sh");
    fs::write(
        &script,
        r#"set -e
mkdir $out
nix="nix --experimental-features nix-command"
echo foobar > foobar
foobar=$($nix store add-path ./foobar)
test "$(cat $foobar)" = foobar
mkdir d; echo inside > d/f
d=$($nix store add-path ./d)
test "$(cat $d/f)" = inside
ln -s $foobar $out/foobar
ln -s $d $out/d
echo SANDBOX-OK
"#,
    )
    .unwrap();
    let e = dir.join("r.nix");
    fs::write(
        &e,
        format!(
            r#"derivation {{ name = "recursive-sandboxed"; system = "x86_64-linux";
  builder = "/bin/sh"; args = [ "-e" {} ]; PATH = "/usr/bin:/bin";
  requiredSystemFeatures = [ "recursive-nix" ]; }}"#,
            script.display()
        ),
    )
    .unwrap();
    let drv = instantiate(&root, &e, "");
    let out = realise_in_sandbox(
        firn_bin(),
        &root,
        &[
            ("experimental-features", "recursive-nix"),
            // The nix client and its libraries.
            (
                "sandbox-paths",
                "/bin/sh=/bin/busybox /usr /lib /lib64? /etc/nix?",
            ),
        ],
        &[],
        &drv,
    );
    let log = String::from_utf8_lossy(&firn_at(&root, &["log", &drv], None).stdout).into_owned();
    assert!(
        out.status.success(),
        "{}\n{log}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(log.contains("SANDBOX-OK"), "{log}");
    let output = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let refs = ok(firn_at(&root, &["query", "--references", &output], None));
    assert_eq!(refs.lines().count(), 2, "{refs}");
    assert!(refs.contains("-foobar") && refs.contains("-d\n"), "{refs}");
    remove(&dir);
}
