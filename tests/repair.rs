//! `verify --check-contents --repair` as Nix 2.8's without substituters: a modified
//! output whose derivation is valid is rebuilt in the sandbox and put in place in one
//! step; what cannot be rebuilt is said, and the store is left as it was.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod common;
use common::*;

use std::fs;
use std::path::Path;

fn verify(root: &Path, repair: bool) -> std::process::Output {
    let mut args = vec![
        "--option",
        "sandbox-paths",
        "/bin/busybox",
        "verify",
        "--check-contents",
    ];
    if repair {
        args.push("--repair");
    }
    firn_at(root, &args, None)
}

#[test]
fn a_modified_output_is_rebuilt_and_replaced() {
    if !can_build() {
        return;
    }
    let root = tempdir("repair");
    let json = r#"{"name":"fixme","outputs":{"out":{}},"inputSrcs":[],"inputDrvs":{},"system":"x86_64-linux","builder":"/bin/busybox","args":["sh","-c","mkdir $out; echo original > $out/data"],"env":{"name":"fixme","out":"","builder":"/bin/busybox","system":"x86_64-linux"}}"#;
    let drv = ok(firn_at(
        &root,
        &["derivation", "add"],
        Some(json.as_bytes()),
    ))
    .trim()
    .to_owned();
    let out = ok(firn_at(
        &root,
        &["--option", "sandbox-paths", "/bin/busybox", "realise", &drv],
        None,
    ))
    .trim()
    .to_owned();
    let data = root.join(out.trim_start_matches('/')).join("data");
    // Someone writes over the output.
    let dir = data.parent().unwrap();
    command("chmod")
        .arg("u+w")
        .arg(dir)
        .arg(&data)
        .status()
        .unwrap();
    fs::write(&data, "tampered\n").unwrap();
    let checked = verify(&root, false);
    assert_eq!(checked.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&checked.stderr).contains(&format!("path '{out}' was modified!"))
    );

    let repaired = verify(&root, true);
    let err = String::from_utf8_lossy(&repaired.stderr);
    assert!(repaired.status.success(), "{err}");
    assert!(
        err.contains(&format!("repairing outputs of '{drv}'...")),
        "{err}"
    );
    assert!(!err.contains("not all store errors were fixed"), "{err}");
    assert_eq!(fs::read_to_string(&data).unwrap(), "original\n");
    assert_verifies(&root, "after the repair");
    // Nothing of the swap is left beside the output.
    let aside: Vec<String> = store_entries(&root)
        .into_iter()
        .filter(|e| e.contains("repair-old"))
        .collect();
    assert!(aside.is_empty(), "{aside:?}");
    // `repair-path` (nix-store --repair-path) does the same for the paths it is given,
    // modified or not.
    fs::write(&data, "tampered again\n").unwrap();
    let sp = ["--option", "sandbox-paths", "/bin/busybox"];
    let again = firn_at(&root, &[&sp[..], &["repair-path", &out]].concat(), None);
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert_eq!(fs::read_to_string(&data).unwrap(), "original\n");
    let intact = firn_at(&root, &[&sp[..], &["--repair-path", &out]].concat(), None);
    assert!(
        intact.status.success(),
        "{}",
        String::from_utf8_lossy(&intact.stderr)
    );
    assert_verifies(&root, "after repair-path");

    // A modified path with no derivation to rebuild it from cannot be repaired.
    let src = root.join("plain.txt");
    fs::write(&src, "plain\n").unwrap();
    let added = ok(firn_at(&root, &["add", src.to_str().unwrap()], None))
        .trim()
        .to_owned();
    let real = root.join(added.trim_start_matches('/'));
    command("chmod").arg("u+w").arg(&real).status().unwrap();
    fs::write(&real, "changed\n").unwrap();
    let repaired = verify(&root, true);
    let err = String::from_utf8_lossy(&repaired.stderr);
    assert_eq!(repaired.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("warning: cannot repair '{added}'")),
        "{err}"
    );
    assert!(
        err.contains("warning: not all store errors were fixed"),
        "{err}"
    );
    let refused = firn_at(&root, &["repair-path", &added], None);
    assert_eq!(refused.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&refused.stderr),
        format!("error: cannot repair path '{added}'\n")
    );
    let invalid = "/nix/store/00000000000000000000000000000000-gone";
    let refused = firn_at(&root, &["repair-path", invalid], None);
    assert_eq!(refused.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&refused.stderr),
        format!("error: path '{invalid}' is not valid\n")
    );
    remove(&root);
}
