//! Settings files in `nix.conf` syntax: the same files real Nix 2.8 reads give the same
//! values (`firn show-config` against `nix show-config`), firn's own files over Nix's,
//! `--option` over both, `include`/`!include`, `extra-`, unknown settings warned about
//! once, bad values refused naming the file, and a file that turns the sandbox off
//! makes every unsandboxed build say so.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod common;
use common::*;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::Output;

/// firn with the settings files under `dir` (`nix/`, `firn/`, `home/`).
fn firn_conf(dir: &Path, args: &[&str], extra_env: &[(&str, &str)]) -> Output {
    let mut c = firn_command();
    c.env("NIX_CONF_DIR", dir.join("nix"))
        .env("FIRN_CONF_DIR", dir.join("firn"))
        .env("XDG_CONFIG_HOME", dir.join("home"))
        .env("NIX_USER_CONF_FILES", "")
        // The files here say what there is to say (and the defaults are compared).
        .env_remove("NIX_CONFIG")
        .args(args);
    for (k, v) in extra_env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn shown(out: &Output) -> BTreeMap<String, String> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once(" = "))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn write(dir: &Path, rel: &str, text: &str) {
    let p = dir.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, text).unwrap();
}

#[test]
fn the_files_nix_reads_give_the_values_nix_shows() {
    if !have_nix() {
        return;
    }
    let dir = tempdir("conf-nix");
    write(
        &dir,
        "nix/nix.conf",
        "# Nix's own file\nsandbox = false\nmax-jobs = 3  # trailing comment\ninclude more.conf\n\
         !include absent.conf\nextra-sandbox-paths = /a=/b /c?\ntrusted-users = root\n",
    );
    write(
        &dir,
        "nix/more.conf",
        "cores = 5\nsandbox-paths = /z\ntimeout = 7\nkeep-going = yes\nbuild-max-silent-time = 9\n",
    );
    let nix = command("nix")
        .env("NIX_CONF_DIR", dir.join("nix"))
        .env("NIX_USER_CONF_FILES", "")
        .args([
            "--extra-experimental-features",
            "nix-command",
            "show-config",
        ])
        .output()
        .unwrap();
    assert!(nix.status.success());
    let nix = shown(&nix);
    let out = firn_conf(&dir, &["show-config"], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    // A setting of Nix's that firn does not act on is no typo: no warning.
    assert!(!err.contains("trusted-users"), "{err}");
    let firn = shown(&out);
    for name in [
        "sandbox",
        "max-jobs",
        "cores",
        "sandbox-paths",
        "timeout",
        "keep-going",
        "max-silent-time",
        "keep-failed",
        "max-build-log-size",
        "build-users-group",
        "keep-outputs",
        "keep-derivations",
        "system",
        "extra-platforms",
        "system-features",
        "substituters",
        "trusted-public-keys",
    ] {
        assert_eq!(firn.get(name), nix.get(name), "setting '{name}'");
    }
    assert_eq!(firn["sandbox-paths"], "/a=/b /c? /z");
    remove(&dir);
}

#[test]
fn precedence_warnings_and_errors() {
    let dir = tempdir("conf-order");
    write(
        &dir,
        "nix/nix.conf",
        "cores = 1\nmax-jobs = 1\ntimeout = 1\nfoo-typo = 1\n",
    );
    write(
        &dir,
        "firn/firn.conf",
        "cores = 2\nmax-jobs = 2\nfoo-typo = 2\n",
    );
    write(&dir, "home/firn/firn.conf", "cores = 3\n");
    let out = firn_conf(
        &dir,
        &[
            "--option",
            "timeout",
            "4",
            "--option",
            "foo-typo",
            "3",
            "show-config",
        ],
        &[("NIX_CONFIG", "max-keep = 1\nmax-build-log-size = 5")],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let s = shown(&out);
    assert_eq!(
        s["cores"], "3",
        "firn's user file over firn's and Nix's global ones"
    );
    assert_eq!(s["max-jobs"], "2", "firn's global file over Nix's");
    assert_eq!(s["timeout"], "4", "--option over every file");
    assert_eq!(s["max-build-log-size"], "5", "NIX_CONFIG");
    // Each unknown setting is warned about once, however often it is given.
    assert_eq!(
        err.matches("warning: unknown setting 'foo-typo'").count(),
        1,
        "{err}"
    );
    assert_eq!(
        err.matches("warning: unknown setting 'max-keep'").count(),
        1,
        "{err}"
    );

    // A bad value names the setting and the file; a bad line names the line.
    write(&dir, "firn/firn.conf", "cores = many\n");
    let out = firn_conf(&dir, &["show-config"], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        format!(
            "error: setting 'cores' has invalid value 'many' (in '{}')",
            dir.join("firn/firn.conf").display()
        )
    );
    write(&dir, "firn/firn.conf", "cores 4\n");
    let out = firn_conf(&dir, &["show-config"], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        format!(
            "error: illegal configuration line 'cores 4' in '{}'",
            dir.join("firn/firn.conf").display()
        )
    );
    write(&dir, "firn/firn.conf", "include nowhere.conf\n");
    let out = firn_conf(&dir, &["show-config"], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nowhere.conf' included from"));
    // A bad --option value is refused too (Nix 2.8 only warns and ignores it).
    fs::remove_file(dir.join("firn/firn.conf")).unwrap();
    let out = firn_conf(
        &dir,
        &["--option", "keep-going", "maybe", "show-config"],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "error: Boolean setting 'keep-going' has invalid value 'maybe'"
    );
    remove(&dir);
}

#[test]
fn a_file_that_turns_the_sandbox_off_is_named_on_every_build() {
    if !can_build() {
        return;
    }
    let dir = tempdir("conf-sandbox");
    write(&dir, "nix/nix.conf", "sandbox = false\n");
    let root = dir.join("store");
    let add = |name: &str| {
        let json = format!(
            r#"{{"name":"{name}","outputs":{{"out":{{}}}},"inputSrcs":[],"inputDrvs":{{}},"system":"x86_64-linux","builder":"/bin/busybox","args":["sh","-c","echo > $out"],"env":{{"name":"{name}","out":"","builder":"/bin/busybox","system":"x86_64-linux"}}}}"#
        );
        ok(firn_at(
            &root,
            &["derivation", "add"],
            Some(json.as_bytes()),
        ))
        .trim()
        .to_owned()
    };
    let (a, b) = (add("a"), add("b"));
    let store = root.to_str().unwrap();
    let out = firn_conf(&dir, &["--store", store, "realise", &a, &b], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let conf = dir.join("nix/nix.conf");
    for d in [&a, &b] {
        assert!(
            err.contains(&format!(
                "warning: building '{d}' without the sandbox: 'sandbox = false' in '{}'",
                conf.display()
            )),
            "{err}"
        );
    }
    // Said on the command line, it is no surprise: no warning.
    let c = add("c");
    let out = firn_conf(
        &dir,
        &[
            "--store", store, "--option", "sandbox", "false", "realise", &c,
        ],
        &[],
    );
    assert!(out.status.success());
    assert!(!String::from_utf8_lossy(&out.stderr).contains("without the sandbox"));
    remove(&dir);
}
