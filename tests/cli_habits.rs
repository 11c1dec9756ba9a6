//! The command line a Nix 2.8 user expects: nix-store's spellings (`-qR`, `-r DRV!out`),
//! global build options anywhere on the line, `nix-hash`'s defaults, `nix path-info`'s
//! columns, `nix show-derivation -r`, help for every flag, one-line usage errors, shell
//! completions and man pages. Compared with the real Nix 2.8 on the same stores where
//! Nix has the feature; skipped with a printed reason where Nix (or root, for builds)
//! is missing, never in CI.
//!
//! That every argument of every command has help text is checked on clap's `Command`
//! tree itself, in the binary's unit tests (`crates/cli/src/main.rs`,
//! `every_flag_and_command_has_help`); here, on what `--help` prints.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod common;
use common::*;

use std::fs;
use std::path::Path;
use std::process::Output;

fn firn(root: &Path, args: &[&str]) -> Output {
    firn_at(root, args, None)
}

/// `nix-store`/`nix`/`nix-instantiate` on the chroot store at `root`, no substituters.
fn nix(root: &Path, cmd: &str, args: &[&str]) -> Output {
    let mut all: Vec<&str> = Vec::new();
    if cmd == "nix" {
        all.extend(["--extra-experimental-features", "nix-command"]);
    }
    all.extend_from_slice(args);
    all.extend([
        "--store",
        root.to_str().unwrap(),
        "--option",
        "substituters",
        "",
    ]);
    run(cmd, &all, None)
}

fn instantiate(root: &Path, file: &str) -> String {
    let f = fixtures().join("exprs").join(file);
    ok(nix(root, "nix-instantiate", &[f.to_str().unwrap()]))
        .trim()
        .to_owned()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Same stdout and same success as Nix's, for `what`.
fn assert_same(ours: &Output, theirs: &Output, what: &str) {
    assert_eq!(
        text(&ours.stdout),
        text(&theirs.stdout),
        "{what}: firn stderr: {} / nix stderr: {}",
        text(&ours.stderr),
        text(&theirs.stderr)
    );
    assert_eq!(
        ours.status.success(),
        theirs.status.success(),
        "{what}: firn {:?} ({}), nix {:?} ({})",
        ours.status.code(),
        text(&ours.stderr),
        theirs.status.code(),
        text(&theirs.stderr)
    );
}

/// `nix-store -q` in all its spellings (`-qR`, `-q -R`, `--query --requisites`, `-qd`,
/// `-q` alone = `--outputs`, …) equals what Nix prints on the same store, path by path
/// and for all paths at once; `firn query -R` too.
#[test]
fn query_short_forms_equal_nix_store() {
    if !have_nix() {
        return;
    }
    let root = tempdir("habits-query");
    for f in ["with-src.nix", "chain.nix", "multi.nix", "diamond.nix"] {
        instantiate(&root, f);
    }
    let all = ok(nix(&root, "nix", &["path-info", "--all"]));
    let paths: Vec<&str> = all.lines().collect();
    assert!(paths.len() >= 8, "{paths:?}");
    let forms: &[&[&str]] = &[
        &["-qR"],
        &["-q", "-R"],
        &["--query", "--requisites"],
        &["-q", "--requisites"],
        &["-qd"],
        &["-q", "--deriver"],
        &["-q", "--references"],
        &["-q", "--referrers"],
        &["-q", "--referers"],
        &["-q", "--referrers-closure"],
        &["-q", "--hash"],
        &["-q", "--size"],
        &["-q", "--tree"],
        &["-q", "--include-outputs", "-R"],
        &["-qR", "--include-outputs"],
    ];
    let mut n = 0;
    for p in &paths {
        for form in forms {
            let args = [*form, &[*p]].concat();
            assert_same(
                &firn(&root, &args),
                &nix(&root, "nix-store", &args),
                &format!("{args:?}"),
            );
            n += 1;
        }
        if p.ends_with(".drv") {
            // No query flag: the outputs, as nix-store's default.
            for form in [&["-q"][..], &["-q", "--outputs"], &["query"]] {
                let theirs = nix(&root, "nix-store", &[&["-q"][..], &[*p]].concat());
                let ours = firn(&root, &[form, &[*p]].concat());
                assert_same(&ours, &theirs, &format!("{form:?} {p}"));
                assert!(!ours.stdout.is_empty(), "{form:?} {p}");
            }
        }
    }
    assert!(n > 100, "{n} comparisons");
    // All paths at once, and firn's own spelling.
    let args = [&["-qR"][..], &paths].concat();
    let theirs = ok(nix(&root, "nix-store", &args));
    assert_eq!(ok(firn(&root, &args)), theirs);
    assert_eq!(
        ok(firn(&root, &[&["query", "-R"][..], &paths].concat())),
        theirs
    );
    // Two query kinds conflict, in Nix ("conflicts with earlier flag") and in firn.
    let out = firn(&root, &["-q", "--hash", "--size", paths[0]]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        !nix(&root, "nix-store", &["-q", "--hash", "--size", paths[0]])
            .status
            .success()
    );
    // --use-output on derivations whose outputs were never built: an error naming the
    // output, as Nix.
    let drv = paths.iter().find(|p| p.ends_with("multi.drv")).unwrap();
    let theirs = nix(&root, "nix-store", &["-qRu", drv]);
    let ours = firn(&root, &["-qRu", drv]);
    assert_same(&ours, &theirs, "-qRu unbuilt");
    assert!(
        text(&ours.stderr).contains("multi-lib' is not valid"),
        "{}",
        text(&ours.stderr)
    );
    remove(&root);
}

/// A store with built outputs (firn builds `multi.nix` with busybox as /bin/sh): `DRV!out`
/// realises what `DRV^out` does and prints what `nix-store -r DRV!out` prints on it; the
/// queries that look at outputs (`-u`, `--include-outputs`), `path-info --sigs` and
/// `-S` agree with Nix; `-Q` hides the builder's output, `-L` is accepted.
#[test]
fn bang_outputs_and_built_stores_as_nix() {
    if !can_build() || !have_nix() {
        return;
    }
    let root = tempdir("habits-bang");
    let drv = instantiate(&root, "multi.nix");
    let sh = ["--option", "sandbox-paths", "/bin/sh=/bin/busybox"];
    let bang = format!("{drv}!dev,lib");
    let caret = format!("{drv}^dev,lib");
    // nix-store's own spelling: `-r`, `!`, a global option after the command.
    let by_bang = ok(firn(&root, &[&sh[..], &["-r", &bang, "-j", "1"]].concat()));
    assert_eq!(
        by_bang,
        "/nix/store/b2p59gds04g42svlsw89viqi8iz6avm1-multi-lib\n/nix/store/bz1rwqj4qhmnwmgw77m4761mh0f58w4m-multi-dev\n"
    );
    assert_eq!(ok(firn(&root, &["realise", &caret])), by_bang);
    assert_eq!(ok(nix(&root, "nix-store", &["-r", &bang])), by_bang);
    // `!*` and `^*`: every output (Nix 2.8 takes `*` as an output name, so no Nix here).
    let star = ok(firn(
        &root,
        &[&sh[..], &["realise", &format!("{drv}!*")]].concat(),
    ));
    assert_eq!(star.lines().count(), 3, "{star}");
    assert_eq!(ok(firn(&root, &["realise", &format!("{drv}^*")])), star);
    assert_eq!(ok(firn(&root, &["realise", &drv])), star);
    assert_eq!(ok(nix(&root, "nix-store", &["-r", &drv])), star);
    // Empty names are dropped, as Nix drops them; none left is every output.
    for odd in ["!", "!,", "!dev,,lib", "!,dev,lib"] {
        let arg = format!("{drv}{odd}");
        let theirs = ok(nix(&root, "nix-store", &["-r", &arg]));
        assert_eq!(ok(firn(&root, &["realise", &arg])), theirs, "{odd}");
        let want = if odd.contains("dev") { &by_bang } else { &star };
        assert_eq!(&theirs, want, "{odd}");
    }

    let outs: Vec<&str> = star.lines().collect();
    for args in [
        vec!["-qR", "--include-outputs", &drv],
        vec!["-qRu", &drv],
        vec!["-q", "--use-output", "--hash", &drv],
        vec!["-q", "-u", "--size", &drv],
        vec!["-q", "-u", "--references", &drv],
        vec!["-qd", outs[0]],
        vec!["-qf", &drv],
        vec!["-qRf", outs[1]],
    ] {
        assert_same(
            &firn(&root, &args),
            &nix(&root, "nix-store", &args),
            &format!("{args:?}"),
        );
    }
    for flags in [
        &["--sigs"][..],
        &["-r", "--sigs"],
        &["-S"],
        &["-rsS"],
        &["--json", "-S"],
        &["--json", "-r"],
    ] {
        let args = [flags, &outs].concat();
        assert_same(
            &firn(&root, &[&["path-info"][..], &args].concat()),
            &nix(&root, "nix", &[&["path-info"][..], &args].concat()),
            &format!("path-info {args:?}"),
        );
    }
    let sigs = ok(firn(&root, &["path-info", "--sigs", outs[0]]));
    assert!(sigs.contains("\tultimate"), "{sigs}");

    // -Q: no builder output; -L: accepted, the output shown as by default.
    let loud = format!(
        r#"{{"name":"loud","outputs":{{"out":{{}}}},"inputSrcs":[],"inputDrvs":{{}},"system":"x86_64-linux","builder":"/bin/busybox","args":["sh","-c",{}],"env":{{"name":"loud","out":"","builder":"/bin/busybox","system":"x86_64-linux"}}}}"#,
        json_string("echo builder-says-hello >&2; echo x > $out")
    );
    let loud_drv = ok(firn_at(
        &root,
        &["derivation", "add"],
        Some(loud.as_bytes()),
    ));
    let nosandbox = ["--option", "sandbox", "false"];
    let quiet = firn(
        &root,
        &[&nosandbox[..], &["realise", "-Q", loud_drv.trim()]].concat(),
    );
    assert!(quiet.status.success(), "{}", text(&quiet.stderr));
    assert!(
        !text(&quiet.stderr).contains("builder-says-hello"),
        "{}",
        text(&quiet.stderr)
    );
    let log = ok(firn(&root, &["-l", loud_drv.trim()]));
    assert!(log.contains("builder-says-hello"), "{log}");
    let loud_out = ok(firn(&root, &["-q", loud_drv.trim()]));
    ok(firn(&root, &["delete", loud_out.trim()]));
    let shown = firn(
        &root,
        &[&nosandbox[..], &["-r", "-L", loud_drv.trim()]].concat(),
    );
    assert!(shown.status.success(), "{}", text(&shown.stderr));
    assert!(
        text(&shown.stderr).contains("builder-says-hello"),
        "{}",
        text(&shown.stderr)
    );
    remove(&root);
}

/// `--timeout`, `--max-silent-time`, `--cores`, `-j`/`--max-jobs`, `-k`/`--keep-going`,
/// `-K`/`--keep-failed` before or after the command set the settings of the same names,
/// as `nix show-config` with the same flags shows them.
#[test]
fn global_build_options_anywhere() {
    let flags = [
        "--timeout",
        "7",
        "--max-silent-time",
        "9",
        "--cores",
        "3",
        "-j",
        "4",
        "-k",
        "-K",
    ];
    let names = [
        "timeout",
        "max-silent-time",
        "cores",
        "max-jobs",
        "keep-going",
        "keep-failed",
    ];
    let pick = |s: &str| -> Vec<String> {
        s.lines()
            .filter(|l| names.iter().any(|n| l.starts_with(&format!("{n} = "))))
            .map(str::to_owned)
            .collect()
    };
    let after = pick(&ok(run(
        firn_bin(),
        &[&["show-config"][..], &flags].concat(),
        None,
    )));
    let before = pick(&ok(run(
        firn_bin(),
        &[&flags[..], &["show-config"]].concat(),
        None,
    )));
    let long = pick(&ok(run(
        firn_bin(),
        &[
            "--max-jobs",
            "4",
            "show-config",
            "--keep-going",
            "--keep-failed",
            "--timeout",
            "7",
            "--cores",
            "3",
            "--max-silent-time",
            "9",
        ],
        None,
    )));
    assert_eq!(after.len(), 6, "{after:?}");
    assert_eq!(before, after);
    assert_eq!(long, after);
    let defaults = pick(&ok(run(firn_bin(), &["show-config"], None)));
    assert_ne!(defaults, after);
    // A bad value is the setting's error, as with --option.
    let out = run(firn_bin(), &["show-config", "--timeout", "soon"], None);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr).trim(),
        "error: setting 'timeout' has invalid value 'soon'"
    );
    // And combined with a command's own short flags: `-qR … -k`.
    let root = tempdir("habits-global");
    let f = root.join("f");
    fs::write(&f, "x").unwrap();
    let p = ok(firn(&root, &["add", f.to_str().unwrap()]));
    let out = ok(firn(&root, &["-qR", p.trim(), "-k", "--timeout", "3"]));
    assert_eq!(out, p);
    remove(&root);
    if !have_nix() {
        return;
    }
    let none = std::env::temp_dir().join("firn-tests-no-config");
    let theirs = command("nix")
        .args([
            "--extra-experimental-features",
            "nix-command",
            "show-config",
        ])
        // nix's new command line has no -k/-K: their long forms.
        .args(flags.map(|f| match f {
            "-k" => "--keep-going",
            "-K" => "--keep-failed",
            f => f,
        }))
        .env("NIX_CONF_DIR", &none)
        .env("NIX_USER_CONF_FILES", "")
        .env_remove("NIX_CONFIG")
        .output()
        .unwrap();
    assert_eq!(pick(&ok(theirs)), after);
}

/// `firn hash` is `nix-hash`: md5 and base16 by default, `--flat`, `--base32`,
/// `--truncate` (only hashes over 160 bits), `--type`, byte for byte.
#[test]
fn hash_defaults_equal_nix_hash() {
    if !have_nix() {
        return;
    }
    let dir = tempdir("habits-hash");
    let file = dir.join("file");
    fs::write(&file, "hello\n").unwrap();
    let tree = dir.join("tree");
    fs::create_dir_all(tree.join("sub")).unwrap();
    fs::write(tree.join("sub/a"), "a").unwrap();
    std::os::unix::fs::symlink("sub/a", tree.join("link")).unwrap();
    let (f, t) = (file.to_str().unwrap(), tree.to_str().unwrap());
    let cases: &[&[&str]] = &[
        &[f],
        &[t],
        &[f, t],
        &["--flat", f],
        &["--base32", f],
        &["--base32", t],
        &["--truncate", f],
        &["--type", "sha256", f],
        &["--type", "sha256", "--truncate", f],
        &["--type", "sha256", "--truncate", "--base32", t],
        &["--type", "sha512", "--truncate", f],
        &["--type", "sha1", "--base32", "--flat", f],
        &["--type", "sha1", "--truncate", f],
        &["--flat", "--base32", "--type", "sha256", f],
    ];
    for args in cases {
        let theirs = ok(run("nix-hash", args, None));
        let mut ours = vec!["hash"];
        ours.extend_from_slice(args);
        assert_eq!(ok(run(firn_bin(), &ours, None)), theirs, "{args:?}");
    }
    assert_eq!(
        ok(run(firn_bin(), &["hash", f], None)),
        "d3ea68e810bc7f9297024c01b858679e\n"
    );
    // Odd arguments: the same status, output and error line as nix-hash (none is
    // nothing to do; an empty path and a missing one are errors in Nix's words).
    let missing = dir.join("missing");
    let missing = missing.to_str().unwrap();
    let odd: &[&[&str]] = &[
        &[],
        &[""],
        &["--flat", ""],
        &[missing],
        &["--flat", missing],
    ];
    for args in odd {
        let theirs = run("nix-hash", args, None);
        let mut ours = vec!["hash"];
        ours.extend_from_slice(args);
        let ours = run(firn_bin(), &ours, None);
        assert_eq!(ours.status.code(), theirs.status.code(), "{args:?}");
        assert_eq!(ours.stdout, theirs.stdout, "{args:?}");
        assert_eq!(text(&ours.stderr), text(&theirs.stderr), "{args:?}");
    }
    remove(&dir);
}

/// `firn path-info -r/-s/-S/--sigs/--json` on paths with references equals
/// `nix path-info`'s, in its order (references first) and columns.
#[test]
fn path_info_columns_equal_nix() {
    if !have_nix() {
        return;
    }
    let root = tempdir("habits-pathinfo");
    let drv = instantiate(&root, "with-src.nix");
    let closure = ok(nix(&root, "nix-store", &["-qR", &drv]));
    let srcs: Vec<&str> = closure.lines().filter(|p| !p.ends_with(".drv")).collect();
    assert!(srcs.len() >= 3, "{srcs:?}");
    let mut reversed = srcs.clone();
    reversed.reverse();
    for flags in [
        &[][..],
        &["-r"],
        &["--recursive"],
        &["-s"],
        &["-S"],
        &["--closure-size"],
        &["-rS"],
        &["-rsS"],
        &["--sigs"],
        &["-r", "--sigs"],
        &["--json", "-S"],
        &["--json", "-r"],
        &["--json", "-rS"],
    ] {
        for paths in [&srcs, &reversed, &srcs[1..2].to_vec()] {
            let args = [&["path-info"][..], flags, paths].concat();
            assert_same(
                &firn(&root, &args),
                &nix(&root, "nix", &args),
                &format!("{args:?}"),
            );
        }
    }
    // `-h` is --human-readable, as Nix's (help is --help there).
    let theirs = nix(&root, "nix", &[&["path-info", "-rsSh"][..], &srcs].concat());
    for h in ["-rsSh", "-hrsS"] {
        let ours = firn(&root, &[&["path-info", h][..], &srcs].concat());
        assert_same(&ours, &theirs, "path-info -h");
    }
    let long = firn(
        &root,
        &[&["path-info", "-rsS", "--human-readable"][..], &srcs].concat(),
    );
    assert_same(&long, &theirs, "path-info --human-readable");
    remove(&root);
}

/// `derivation show OUTPUT` shows the derivation that has OUTPUT as an output, as `nix
/// show-derivation` does with a store path that is not a derivation (built or not); a
/// path no valid derivation outputs is Nix's "does not have a known deriver".
#[test]
fn derivation_show_of_an_output_is_its_derivation() {
    if !have_nix() {
        return;
    }
    let root = tempdir("habits-showout");
    let c = instantiate(&root, "chain.nix");
    let out = ok(firn(&root, &["query", "--outputs", &c]))
        .trim()
        .to_owned();
    assert!(!out.ends_with(".drv"), "{out}");
    let src = root.join("plain.txt");
    fs::write(&src, "plain\n").unwrap();
    let plain = ok(firn(&root, &["add", src.to_str().unwrap()]))
        .trim()
        .to_owned();
    for args in [vec![out.as_str()], vec!["-r", &out], vec![&out, &c]] {
        let theirs = nix(&root, "nix", &[&["show-derivation"][..], &args].concat());
        let ours = firn(&root, &[&["derivation", "show"][..], &args].concat());
        assert_same(&ours, &theirs, &format!("show {args:?}"));
    }
    let shown: serde_json::Value =
        serde_json::from_str(&ok(firn(&root, &["derivation", "show", &out]))).unwrap();
    assert_eq!(
        shown.as_object().unwrap().keys().collect::<Vec<_>>(),
        [&c],
        "keyed by the derivation"
    );
    let refused = firn(&root, &["derivation", "show", &plain]);
    assert_eq!(refused.status.code(), Some(1));
    assert_eq!(
        text(&refused.stderr),
        format!("error: '{plain}' does not have a known deriver\n")
    );
    let theirs = nix(&root, "nix", &["show-derivation", &plain]);
    assert!(
        text(&theirs.stderr).contains(&format!("'{plain}' does not have a known deriver")),
        "{}",
        text(&theirs.stderr)
    );
    remove(&root);
}

/// `firn derivation show -r` is `nix show-derivation -r`: the closure's derivations.
#[test]
fn derivation_show_recursive_equals_nix() {
    if !have_nix() {
        return;
    }
    let root = tempdir("habits-showdrv");
    let c = instantiate(&root, "chain.nix");
    let w = instantiate(&root, "with-src.nix");
    for args in [
        vec![c.as_str()],
        vec![c.as_str(), w.as_str()],
        vec![w.as_str()],
    ] {
        for r in ["-r", "--recursive"] {
            let theirs = nix(&root, "nix", &[&["show-derivation", r][..], &args].concat());
            let ours = firn(&root, &[&["derivation", "show", r][..], &args].concat());
            assert_same(&ours, &theirs, &format!("show -r {args:?}"));
        }
    }
    let theirs: serde_json::Value =
        serde_json::from_str(&ok(nix(&root, "nix", &["show-derivation", "-r", &c]))).unwrap();
    assert_eq!(theirs.as_object().unwrap().len(), 3, "chain a, b, c");
    // A .drv file outside the store stands for itself and its inputs' closures.
    let copy = root.join("copy-chain-c.drv");
    fs::copy(root.join(c.trim_start_matches('/')), &copy).unwrap();
    let ours: serde_json::Value = serde_json::from_str(&ok(firn(
        &root,
        &["derivation", "show", "-r", copy.to_str().unwrap()],
    )))
    .unwrap();
    // copy-chain-c.drv (keyed in the store dir, as without -r), chain-b and chain-a.
    let keys: Vec<&String> = ours.as_object().unwrap().keys().collect();
    assert_eq!(keys.len(), 3, "{ours}");
    assert!(
        keys.contains(&&"/nix/store/copy-chain-c.drv".to_owned()),
        "{keys:?}"
    );
    remove(&root);
}

/// Every option line of every command's `--help` has a description; the top-level help
/// names the default store and the sandbox; global options are under their own heading.
#[test]
fn help_describes_every_flag() {
    let top = ok(run(firn_bin(), &["--help"], None));
    for needle in [
        "~/.local/share/firn/root",
        "/nix for root",
        "sandbox",
        "Global options:",
        "Build settings:",
    ] {
        assert!(top.contains(needle), "{needle}: {top}");
    }
    let commands: Vec<String> = top
        .split("Commands:")
        .nth(1)
        .unwrap()
        .split("\n\n")
        .next()
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("  ") && !l.starts_with("   "))
        .map(|l| {
            l.split_whitespace()
                .next()
                .unwrap()
                .trim_end_matches(',')
                .to_owned()
        })
        .collect();
    assert!(commands.len() >= 15, "{commands:?}");
    let mut helps = vec![(vec![], top)];
    for c in &commands {
        helps.push((vec![c.clone()], ok(run(firn_bin(), &[c, "--help"], None))));
    }
    for sub in ["show", "print", "add"] {
        let args = ["derivation", sub, "--help"];
        helps.push((
            vec![args[0].into(), sub.into()],
            ok(run(firn_bin(), &args, None)),
        ));
    }
    let mut checked = 0;
    for (cmd, help) in &helps {
        let mut in_args = false;
        let lines: Vec<&str> = help.lines().collect();
        for (i, &line) in lines.iter().enumerate() {
            if line.ends_with(':') && !line.starts_with(' ') {
                in_args = line != "Usage:" && line != "Commands:";
                continue;
            }
            if !in_args || !line.starts_with("  ") {
                continue;
            }
            let t = line.trim_start();
            // An option or argument line: the name, two spaces or more, its help; or (in
            // the long help of a command with a long description) its help on the next
            // line, indented further.
            let indent = line.len() - t.len();
            if indent <= 6 && (t.starts_with('-') || t.starts_with('<') || t.starts_with('[')) {
                let same_line = t
                    .split_once("  ")
                    .is_some_and(|(_, h)| !h.trim().is_empty());
                let next_line = lines.get(i + 1).is_some_and(|n| {
                    n.len() - n.trim_start().len() > indent + 2 && !n.trim().is_empty()
                });
                let described = same_line || next_line;
                assert!(described, "firn {cmd:?}: no help for {t:?}");
                checked += 1;
            }
        }
    }
    assert!(checked > 150, "{checked} option lines");
    let q = &helps
        .iter()
        .find(|(c, _)| c == &["query".to_owned()])
        .unwrap()
        .1;
    for flag in [
        "--requisites",
        "--include-outputs",
        "--use-output",
        "--force-realise",
        "-R,",
        "-d,",
    ] {
        assert!(q.contains(flag), "{flag}: {q}");
    }
    // The command's own options come before the global ones.
    assert!(q.find("--requisites").unwrap() < q.find("Global options:").unwrap());
}

/// I/O errors a user causes are one `error:` line in the system's words (Nix's
/// `strerror`), naming what was being done and the path, never Rust's `(os error N)`.
#[test]
fn io_errors_are_one_line_in_the_systems_words() {
    let dir = tempdir("habits-io");
    let store = dir.join("store");
    let s = store.to_str().unwrap();
    let nowhere = dir.join("no/such/dir");
    let nw = nowhere.to_str().unwrap();
    let cases: Vec<(Vec<&str>, String)> = vec![
        (
            vec!["--store", s, "dump", nw],
            format!("error: getting status of '{nw}': No such file or directory"),
        ),
        (
            vec!["--store", s, "add", nw],
            format!("error: getting status of '{nw}': No such file or directory"),
        ),
        (
            vec!["hash", "--flat", nw],
            format!("error: opening file '{nw}': No such file or directory"),
        ),
        (
            vec!["restore", nw],
            format!("error: cannot create '{nw}': No such file or directory"),
        ),
        (
            vec![
                "--store",
                s,
                "sign",
                "--key-file",
                nw,
                "/nix/store/00000000000000000000000000000000-x",
            ],
            format!("error: reading the key file '{nw}': No such file or directory"),
        ),
    ];
    // The NAR of an empty regular file: strings as 8-byte little-endian lengths, then
    // the bytes padded to 8.
    let mut nar = Vec::new();
    for t in [
        &b"nix-archive-1"[..],
        b"(",
        b"type",
        b"regular",
        b"contents",
        b"",
        b")",
    ] {
        nar.extend((t.len() as u64).to_le_bytes());
        nar.extend(t);
        nar.resize(nar.len().div_ceil(8) * 8, 0);
    }
    for (args, want) in cases {
        let out = run(firn_bin(), &args, Some(&nar));
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert_eq!(text(&out.stderr).trim_end(), want, "{args:?}");
    }
    remove(&dir);
}

/// Commands given no path do nothing and succeed, as nix-store's do (`-q --graph` prints
/// an empty graph, `--delete` only tidies `.links`): output, messages and status the
/// same as Nix's on the same store.
#[test]
fn no_paths_is_nothing_to_do_as_in_nix() {
    let root = tempdir("habits-noargs");
    let src = root.join("f");
    fs::write(&src, "f\n").unwrap();
    let kept = ok(firn(&root, &["add", src.to_str().unwrap()]));
    let cases: [(&[&str], &[&str], &str); 9] = [
        (&["realise"], &["-r"], ""),
        (&["add"], &["--add"], ""),
        (&["add-fixed", "sha256"], &["--add-fixed", "sha256"], ""),
        (&["query"], &["-q"], ""),
        (&["-qR"], &["-qR"], ""),
        (&["query", "--tree"], &["-q", "--tree"], ""),
        (
            &["query", "--graph"],
            &["-q", "--graph"],
            "digraph G {\n}\n",
        ),
        (&["query", "--hash"], &["-q", "--hash"], ""),
        (
            &["delete"],
            &["--delete"],
            "0 store paths deleted, 0.00 MiB freed\n",
        ),
    ];
    for (ours, theirs, want) in cases {
        let out = firn(&root, ours);
        assert_eq!(ok(out.clone()), want, "{ours:?}");
        if have_nix() {
            assert_same(&out, &nix(&root, "nix-store", theirs), &format!("{ours:?}"));
            assert_eq!(
                text(&out.stderr),
                text(&nix(&root, "nix-store", theirs).stderr),
                "{ours:?}"
            );
        }
    }
    if !have_nix() {
        println!("skipped the comparisons with real Nix: nix-store is not installed");
    }
    // Nothing was deleted or added.
    assert_eq!(ok(firn(&root, &["add", src.to_str().unwrap()])), kept);
    remove(&root);
}

/// Usage errors: one `error:` line, then one hint line naming the command's help; exit
/// 1, nothing on stdout (clap's default is several lines of usage and exit 2).
#[test]
fn usage_errors_are_one_line_and_a_hint() {
    for (args, hint, needle) in [
        (&["query", "--bogus", "x"][..], "firn query", "'--bogus'"),
        (&["-q", "--jsn", "x"], "firn query", "'--jsn'"),
        (&["add-fixed"], "firn add-fixed", "<ALGO>"),
        (&[], "firn", "no command given"),
        (&["derivation"], "firn derivation", "no command given"),
        (&["nonesuch"], "firn", "'nonesuch'"),
        (&["hash", "--type"], "firn hash", "--type"),
        (
            &["query", "--hash", "--size", "x"],
            "firn query",
            "cannot be used with",
        ),
        (&["completions", "tcsh"], "firn completions", "'tcsh'"),
        (
            &["path-info", "--jsn", "x"],
            "firn path-info",
            "similar argument exists: '--json'",
        ),
    ] {
        let out = run(firn_bin(), args, None);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(out.stdout.is_empty(), "{args:?}");
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 2, "{args:?}: {err}");
        assert!(lines[0].starts_with("error: "), "{args:?}: {err}");
        assert!(lines[0].contains(needle), "{args:?}: {err}");
        assert_eq!(
            lines[1],
            format!("Try '{hint} --help' for more information."),
            "{args:?}"
        );
    }
    // --help and --version are no errors.
    for args in [
        &["--help"][..],
        &["--version"],
        &["query", "--help"],
        &["-q", "--help"],
    ] {
        let out = run(firn_bin(), args, None);
        assert!(out.status.success(), "{args:?}");
        assert!(!out.stdout.is_empty() && out.stderr.is_empty(), "{args:?}");
    }
}

/// Completion scripts for bash, zsh and fish from the clap definitions; the bash one is
/// sourced by bash and completes commands and flags.
#[test]
fn completions_for_bash_zsh_fish() {
    let dir = tempdir("habits-completions");
    for (shell, marker) in [
        ("bash", "complete -F _firn"),
        ("zsh", "#compdef firn"),
        ("fish", "complete -c firn"),
    ] {
        let script = ok(run(firn_bin(), &["completions", shell], None));
        assert!(script.contains(marker), "{shell}");
        for word in [
            "realise",
            "query",
            "--requisites",
            "--include-outputs",
            "--store",
            "--keep-failed",
        ] {
            let word = match shell {
                // fish names long options without their dashes: `-l requisites`.
                "fish" => word.trim_start_matches('-'),
                _ => word,
            };
            assert!(script.contains(word), "{shell}: {word}");
        }
        assert!(script.len() > 5000, "{shell}: {} bytes", script.len());
        fs::write(dir.join(shell), &script).unwrap();
    }
    let bash = dir.join("bash");
    let complete = |words: &str| -> String {
        let n = words.split_whitespace().count() - usize::from(!words.ends_with(' '));
        let cmd = format!(
            "set -e; source {}; COMP_WORDS=({words}); {}COMP_CWORD={n}; _firn firn; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            bash.display(),
            if words.ends_with(' ') { "COMP_WORDS+=(''); " } else { "" },
        );
        let out = run("bash", &["-c", &cmd], None);
        assert!(out.status.success(), "{words}: {}", text(&out.stderr));
        text(&out.stdout)
    };
    let subs = complete("firn que");
    assert!(subs.lines().any(|l| l == "query"), "{subs}");
    let flags = complete("firn query --req");
    assert!(flags.lines().any(|l| l == "--requisites"), "{flags}");
    for (shell, check) in [("zsh", "-n"), ("fish", "--no-execute")] {
        if run("which", &[shell], None).status.success() {
            let out = run(shell, &[check, dir.join(shell).to_str().unwrap()], None);
            assert!(out.status.success(), "{shell}: {}", text(&out.stderr));
        }
    }
    remove(&dir);
}

/// `firn man DIR`: firn.1 and a page per command, valid roff that `man -l` formats.
#[test]
fn man_pages_are_written_and_readable() {
    let dir = tempdir("habits-man");
    let out = run(
        firn_bin(),
        &["man", dir.join("man1").to_str().unwrap()],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    for page in [
        "firn.1",
        "firn-query.1",
        "firn-realise.1",
        "firn-path-info.1",
        "firn-derivation.1",
        "firn-derivation-show.1",
        "firn-hash.1",
        "firn-completions.1",
    ] {
        let roff = fs::read_to_string(dir.join("man1").join(page)).unwrap();
        let name = page.trim_end_matches(".1");
        assert!(
            roff.lines()
                .any(|l| l.starts_with(&format!(".TH {name} 1"))),
            "{page}: {}",
            &roff[..roff.len().min(300)]
        );
        assert!(
            roff.contains(".SH NAME") && roff.contains(".SH SYNOPSIS"),
            "{page}"
        );
    }
    if run("which", &["man"], None).status.success() {
        let page = dir.join("man1/firn-query.1");
        let out = command("man")
            .args(["-l", page.to_str().unwrap()])
            .env("MANWIDTH", "100")
            .env("MANPAGER", "cat")
            .env("PAGER", "cat")
            .output()
            .unwrap();
        let shown = ok(out);
        for needle in [
            "firn-query",
            "--requisites",
            "--include-outputs",
            "--keep-failed",
        ] {
            assert!(shown.contains(needle), "{needle}: {shown}");
        }
    } else {
        eprintln!("SKIPPED man -l: man is not installed");
    }
    // A file where the directory should be: one error line.
    let file = dir.join("file");
    fs::write(&file, "").unwrap();
    let out = run(firn_bin(), &["man", file.to_str().unwrap()], None);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr).lines().count(),
        1,
        "{}",
        text(&out.stderr)
    );
    remove(&dir);
}
