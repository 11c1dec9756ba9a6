//! What `firn realise` tells the user, against real Nix 2.8 on the same derivations:
//! the "will be built" list in Nix's build order, a quiet failure's last log lines and
//! where the full log is, `--check`'s "checking outputs of", `--log-format
//! internal-json` as `nix-store --log-format internal-json` writes it, and
//! `--dry-run --json`.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod common;
use common::*;

use std::fs;
use std::process::Output;

const EXPR: &str = r#"
let
  mk = name: deps: derivation {
    inherit name; system = "x86_64-linux"; builder = "/bin/sh";
    args = [ "-c" "echo building ${name}; echo second line of ${name} >&2; echo ${toString deps} > $out" ];
  };
  a = mk "a" [];
  b = mk "b" [ a ];
  c = mk "c" [ a ];
  d = mk "d" [ b c ];
  e = mk "e" [];
  top = mk "top" [ d e ];
in {
  inherit top;
  fail = derivation {
    name = "fail"; system = "x86_64-linux"; builder = "/bin/sh";
    args = [ "-c" "for i in 1 2 3 4 5 6 7 8 9 10 11 12; do echo line $i; done; exit 3" ];
  };
}"#;

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The lines after "… will be built:", up to the first that is not indented.
fn will_be_built(err: &str) -> Vec<String> {
    err.lines()
        .skip_while(|l| !l.ends_with("will be built:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .map(|l| l.trim().to_owned())
        .collect()
}

#[test]
fn messages_as_nix_prints_them() {
    if !can_build() || !have_nix() {
        return;
    }
    let dir = tempdir("cli-logs");
    let expr = dir.join("dag.nix");
    fs::write(&expr, EXPR).unwrap();
    let (ours, theirs) = (dir.join("firn"), dir.join("nix"));
    let top = instantiate_attr(&ours, &expr, "top");
    assert_eq!(instantiate_attr(&theirs, &expr, "top"), top);

    // The "will be built" list, in Nix's order (dependencies first), not sorted.
    let nix = realise_in_sandbox("nix-store", &theirs, &[], &["--dry-run"], &top);
    let firn = realise_in_sandbox(firn_bin(), &ours, &[], &["--dry-run"], &top);
    let (nix_list, firn_list) = (will_be_built(&stderr(&nix)), will_be_built(&stderr(&firn)));
    assert_eq!(nix_list.len(), 6, "{}", stderr(&nix));
    assert_eq!(firn_list, nix_list);
    let mut sorted = nix_list.clone();
    sorted.sort();
    assert_ne!(sorted, nix_list, "the DAG must tell the orders apart");
    // --dry-run --json: the same list, as JSON.
    let json = ok(realise_in_sandbox(
        firn_bin(),
        &ours,
        &[],
        &["--dry-run", "--json"],
        &top,
    ));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let listed: Vec<String> = v["willBuild"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(listed, nix_list);

    // internal-json: Nix's activities for the builds and their log lines.
    let firn = realise_in_sandbox(
        firn_bin(),
        &ours,
        &[],
        &["--log-format", "internal-json"],
        &top,
    );
    let nix = realise_in_sandbox(
        "nix-store",
        &theirs,
        &[],
        &["--log-format", "internal-json"],
        &top,
    );
    assert!(firn.status.success(), "{}", stderr(&firn));
    assert!(nix.status.success(), "{}", stderr(&nix));
    let essentials = |err: &str| -> Vec<String> {
        let mut ids = std::collections::BTreeMap::new();
        let mut out = Vec::new();
        for l in err.lines() {
            let v: serde_json::Value = serde_json::from_str(
                l.strip_prefix("@nix ")
                    .unwrap_or_else(|| panic!("not a JSON log line: {l}")),
            )
            .unwrap();
            match (v["action"].as_str().unwrap(), v["type"].as_u64()) {
                ("start", Some(105)) => {
                    ids.insert(v["id"].as_u64().unwrap(), v["fields"][0].clone());
                    out.push(format!(
                        "start {} {} {}",
                        v["text"], v["level"], v["fields"]
                    ));
                }
                ("result", Some(101)) => {
                    let drv = &ids[&v["id"].as_u64().unwrap()];
                    out.push(format!("log {drv} {}", v["fields"]));
                }
                ("stop", _) => {
                    if let Some(drv) = ids.remove(&v["id"].as_u64().unwrap()) {
                        out.push(format!("stop {drv}"));
                    }
                }
                ("msg", _) if v["level"] == 3 => out.push(format!("msg {}", v["msg"])),
                _ => {}
            }
        }
        out
    };
    assert_eq!(essentials(&stderr(&firn)), essentials(&stderr(&nix)));
    assert!(essentials(&stderr(&firn)).len() > 20);

    // --check says "checking outputs of", as Nix.
    let firn = realise_in_sandbox(firn_bin(), &ours, &[], &["--check"], &top);
    let nix = realise_in_sandbox("nix-store", &theirs, &[], &["--check"], &top);
    let checking = |o: &Output| {
        stderr(o)
            .lines()
            .find(|l| l.starts_with("checking outputs of"))
            .map(str::to_owned)
    };
    assert!(checking(&nix).is_some(), "{}", stderr(&nix));
    assert_eq!(checking(&firn), checking(&nix));

    // A quiet failure: Nix's error with the last lines of the log and where the rest is.
    let fail = instantiate_attr(&ours, &expr, "fail");
    instantiate_attr(&theirs, &expr, "fail");
    let nix = realise_in_sandbox("nix-store", &theirs, &[], &["-Q"], &fail);
    let firn = realise_in_sandbox(firn_bin(), &ours, &[], &["--quiet"], &fail);
    assert_eq!(nix.status.code(), Some(100));
    assert_eq!(firn.status.code(), Some(100));
    let error_block = |err: &str| -> String {
        err.lines()
            .skip_while(|l| !l.starts_with("error:"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let expected = error_block(&stderr(&nix)).replace("'nix log ", "'firn log ");
    assert!(expected.contains("last 10 log lines:"), "{expected}");
    assert!(expected.contains("> line 12"), "{expected}");
    assert_eq!(error_block(&stderr(&firn)), expected);
    // -v: a line per build with its time and what it used; -vv: and where its log is.
    let d = instantiate_attr(&ours, &expr, "top");
    let v = realise_in_sandbox(firn_bin(), &ours, &[], &["--check", "-vv"], &d);
    let err = stderr(&v);
    let line = err
        .lines()
        .find(|l| l.starts_with(&format!("built '{d}' in ")))
        .unwrap_or_else(|| panic!("{err}"));
    assert!(line.contains(", log '"), "{line}");
    assert!(!stderr(&realise_in_sandbox(
        firn_bin(),
        &ours,
        &[],
        &["--check"],
        &d
    ))
    .contains("built '"));
    // -L: every line prefixed with the derivation's name; parallel builds too.
    let (ours2, dir2) = (dir.join("firn2"), dir.join("firn3"));
    let top2 = instantiate_attr(&ours2, &expr, "top");
    let l = stderr(&realise_in_sandbox(firn_bin(), &ours2, &[], &["-L"], &top2));
    assert!(l.lines().any(|x| x == "a> building a"), "{l}");
    assert!(l.lines().any(|x| x == "top> second line of top"), "{l}");
    assert!(!l.lines().any(|x| x == "building a"), "{l}");
    let top3 = instantiate_attr(&dir2, &expr, "top");
    let plain = stderr(&realise_in_sandbox(firn_bin(), &dir2, &[], &["-j1"], &top3));
    assert!(
        plain.lines().any(|x| x == "building a"),
        "one build at a time: raw lines: {plain}"
    );
    // Not quiet, the log was shown: one error line, as Nix.
    let firn = realise_in_sandbox(firn_bin(), &ours, &[], &[], &fail);
    assert!(stderr(&firn).contains("line 12"));
    assert!(!stderr(&firn).contains("last 10 log lines"));
    remove(&dir);
}
