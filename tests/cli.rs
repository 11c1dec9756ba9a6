//! The `firn` binary, end to end: `derivation show` and `derivation print` against the
//! fixtures produced by real Nix 2.8, their errors, and (where Nix is installed) a live
//! comparison with `nix show-derivation`.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod common;
use common::*;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn firn(args: &[&str], stdin: Option<&[u8]>) -> Output {
    run(firn_bin(), args, stdin)
}

/// A failure: exit 1 and exactly one `error:` line on stderr, no panic.
fn assert_one_error_line(out: &Output, must_contain: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(out.stdout.is_empty(), "no output on failure");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line expected, got: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    for s in must_contain {
        assert!(lines[0].contains(s), "{stderr:?} should contain {s:?}");
    }
}

fn case_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = fs::read_dir(fixtures().join("cases"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    dirs.sort();
    assert!(dirs.len() >= 30);
    dirs
}

fn drv_files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir.join("drv"))
        .unwrap()
        .map(|e| e.unwrap().path().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn show_matches_nix_for_every_case() {
    for dir in case_dirs() {
        let top = fs::read_to_string(dir.join("drvPath")).unwrap();
        let base = top.trim().rsplit('/').next().unwrap().to_owned();
        let file = dir.join("drv").join(&base);
        let out = firn(&["derivation", "show", file.to_str().unwrap()], None);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            out.stdout,
            fs::read(dir.join("show-derivation.json")).unwrap(),
            "{base}"
        );

        // All .drv files of the closure at once, in any order: `nix show-derivation -r`.
        let mut files = drv_files(&dir);
        files.reverse();
        let mut args = vec!["derivation", "show"];
        args.extend(files.iter().map(String::as_str));
        args.push(file.to_str().unwrap()); // a duplicate is shown once
        let out = firn(&args, None);
        assert!(out.status.success());
        assert_eq!(
            out.stdout,
            fs::read(dir.join("show-derivation-recursive.json")).unwrap(),
            "{base} (recursive)"
        );
    }
}

#[test]
fn print_inverts_show() {
    for dir in case_dirs() {
        for file in drv_files(&dir) {
            let shown = firn(&["derivation", "show", &file], None);
            assert!(shown.status.success());
            let printed = firn(&["derivation", "print"], Some(&shown.stdout));
            assert!(
                printed.status.success(),
                "{}",
                String::from_utf8_lossy(&printed.stderr)
            );
            assert_eq!(printed.stdout, fs::read(&file).unwrap(), "{file}");
        }
    }
}

#[test]
fn show_reads_logical_store_paths_from_the_store_root() {
    let root = tempdir("show-root");
    let store = root.join("nix/store");
    fs::create_dir_all(&store).unwrap();
    let dir = fixtures().join("cases/chain");
    let top = fs::read_to_string(dir.join("drvPath")).unwrap();
    let top = top.trim();
    let base = top.rsplit('/').next().unwrap();
    fs::copy(dir.join("drv").join(base), store.join(base)).unwrap();
    let out = firn(
        &["--store", root.to_str().unwrap(), "derivation", "show", top],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        out.stdout,
        fs::read(dir.join("show-derivation.json")).unwrap()
    );
    // Same through FIRN_STORE.
    let out = firn_command()
        .args(["derivation", "show", top])
        .env("FIRN_STORE", &root)
        .output()
        .unwrap();
    assert_eq!(
        out.stdout,
        fs::read(dir.join("show-derivation.json")).unwrap()
    );
    fs::remove_dir_all(&root).unwrap();
}

#[test]
fn malformed_files_fail_with_one_clear_line() {
    let dir = fixtures().join("malformed");
    let mut n = 0;
    for e in fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_none_or(|x| x != "drv") {
            continue;
        }
        let rc = fs::read_to_string(p.with_extension("nix.rc")).unwrap();
        let out = firn(&["derivation", "show", p.to_str().unwrap()], None);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{}: {stderr}", p.display());
        if rc.trim() == "0" {
            assert!(out.status.success(), "{}: {stderr}", p.display());
        } else {
            let name = p.file_name().unwrap().to_str().unwrap();
            let nix_err = fs::read_to_string(p.with_extension("nix.err")).unwrap_or_default();
            if nix_err.contains("experimental Nix feature") {
                // Refused for the missing feature, in Nix's very words.
                assert_one_error_line(&out, &[]);
                assert_eq!(stderr.trim(), nix_err.trim(), "{name}");
                n += 1;
                continue;
            }
            assert_one_error_line(&out, &["parsing derivation", name, "at byte"]);
            n += 1;
        }
    }
    assert!(n >= 25);
}

#[test]
fn bad_arguments_and_input() {
    let out = firn(&["derivation", "show", "/nonexistent/x.drv"], None);
    assert_one_error_line(&out, &["/nonexistent/x.drv", "No such file"]);

    let out = firn(&["derivation", "print"], Some(b"{\"a\": "));
    assert_one_error_line(&out, &["stdin", "invalid JSON at byte 6"]);

    let out = firn(&["derivation", "print"], Some(b"[]"));
    assert_one_error_line(&out, &["expected an object"]);

    let two = fs::read(fixtures().join("cases/chain/show-derivation-recursive.json")).unwrap();
    let out = firn(&["derivation", "print"], Some(&two));
    assert_one_error_line(&out, &["holds 3 derivations"]);

    let json = br#"{"/nix/store/qhk42s8j7kqg82l6ncz33d8xx332vz9f-x.drv": {"outputs": {"out": {"path": "/nix/store/qhk42s8j7kqg82l6ncz33d8xx332vz9f-x", "hashAlgo": "sha256", "hash": "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"}}, "inputSrcs": [], "inputDrvs": {}, "system": "s", "builder": "b", "args": [], "env": {}}}"#;
    let out = firn(&["derivation", "print"], Some(json));
    assert_one_error_line(
        &out,
        &["outputs.out.path", "does not match the fixed output"],
    );

    let out = firn(
        &["--option", "no-such-setting", "1", "derivation", "show"],
        None,
    );
    assert_eq!(out.status.code(), Some(1), "usage error: missing DRV");
}

/// Instantiate the extra expressions with the real Nix into a fresh chroot store and
/// compare `firn derivation show` with `nix show-derivation` on the same store paths.
#[test]
fn live_against_real_nix() {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    if !have_nix() {
        assert!(!ci, "CI must install nix-bin 2.8 (see .ci/run)");
        eprintln!(
            "SKIPPED live_against_real_nix: Nix 2.8 is not installed (apt-get install nix-bin)"
        );
        return;
    }
    let root = tempdir("live");
    let store = root.to_str().unwrap();
    let exprs = fixtures().join("exprs");
    let nix = |args: &[&str]| -> Output {
        Command::new(args[0])
            .args(&args[1..])
            .args(["--store", store, "--option", "substituters", ""])
            .current_dir(&exprs)
            .output()
            .unwrap()
    };
    let mut compared = 0;
    for attr in [
        "stdenvLike",
        "rawBytes",
        "coercions",
        "fodUserMany",
        "outputsOrder",
        "deepChain",
    ] {
        let out = nix(&["nix-instantiate", "extra.nix", "-A", attr]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let drv = String::from_utf8(out.stdout).unwrap();
        let drv = drv.trim().split('!').next().unwrap().to_owned();
        let want = nix(&[
            "nix",
            "--extra-experimental-features",
            "nix-command",
            "show-derivation",
            "-r",
            &drv,
        ]);
        assert!(
            want.status.success(),
            "{}",
            String::from_utf8_lossy(&want.stderr)
        );
        let closure = nix(&["nix-store", "-qR", &drv]);
        let mut args = vec!["--store", store, "derivation", "show"];
        let closure = String::from_utf8(closure.stdout).unwrap();
        args.extend(closure.lines().filter(|l| l.ends_with(".drv")));
        let got = firn(&args, None);
        assert!(
            got.status.success(),
            "{}",
            String::from_utf8_lossy(&got.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&got.stdout),
            String::from_utf8_lossy(&want.stdout),
            "{attr}"
        );
        assert_eq!(got.stdout, want.stdout, "{attr}");
        compared += 1;
    }
    assert_eq!(compared, 6);
    let _ = Command::new("chmod").args(["-R", "u+w", store]).status();
    let _ = fs::remove_dir_all(&root);
}

/// The one derivation object of show-derivation JSON, without its key.
fn bare(json: &[u8]) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_slice(json).unwrap();
    let obj = v.as_object().unwrap();
    assert_eq!(obj.len(), 1);
    obj.values().next().unwrap().clone()
}

fn print(obj: &serde_json::Value) -> Output {
    firn(
        &["derivation", "print"],
        Some(serde_json::to_string(obj).unwrap().as_bytes()),
    )
}

fn without(bytes: &[u8], part: &[u8]) -> Vec<u8> {
    let i = bytes
        .windows(part.len())
        .position(|w| w == part)
        .unwrap_or_else(|| panic!("{} lacks {}", bytes.escape_ascii(), part.escape_ascii()));
    [&bytes[..i], &bytes[i + part.len()..]].concat()
}

/// `derivation print` needs no name: the ATerm holds none. Compared with the `.drv`
/// files real Nix 2.8 wrote (`fixtures/cases`).
#[test]
fn print_needs_no_name() {
    let case = |name: &str| {
        let dir = fixtures().join("cases").join(name);
        let top = fs::read_to_string(dir.join("drvPath")).unwrap();
        let base = top.trim().rsplit('/').next().unwrap().to_owned();
        let drv = fs::read(dir.join("drv").join(base)).unwrap();
        (
            bare(&fs::read(dir.join("show-derivation.json")).unwrap()),
            drv,
        )
    };
    // __structuredAttrs: the name is only in env.__json (as nix-instantiate wrote it).
    let (obj, drv) = case("structured");
    assert!(obj["env"].get("name").is_none() && obj.get("name").is_none());
    assert_eq!(ok(print(&obj)).into_bytes(), drv);

    // No name anywhere: the same ATerm but for the env entry taken away.
    let (mut obj, drv) = case("single");
    obj["env"].as_object_mut().unwrap().remove("name");
    let want = without(&drv, br#"("name","single"),"#);
    assert_eq!(ok(print(&obj)).into_bytes(), want);

    // `{"path": ""}` is `{}`: the `("out","","","")` Nix writes before computing it.
    obj["env"]["out"] = "".into();
    obj["outputs"]["out"] = serde_json::json!({ "path": "" });
    let empty_path = ok(print(&obj));
    obj["outputs"]["out"] = serde_json::json!({});
    assert_eq!(ok(print(&obj)), empty_path);
    assert!(
        empty_path.starts_with(r#"Derive([("out","","","")],"#),
        "{empty_path}"
    );

    // A fixed output's path holds the name; without that path, one clear error.
    let (mut obj, drv) = case("fixed-flat");
    obj["env"].as_object_mut().unwrap().remove("name");
    let want = without(&drv, br#"("name","fixed-flat"),"#);
    assert_eq!(ok(print(&obj)).into_bytes(), want);
    obj["outputs"]["out"]
        .as_object_mut()
        .unwrap()
        .remove("path");
    assert_one_error_line(
        &print(&obj),
        &["outputs.out", "depends on the derivation's name"],
    );
}
