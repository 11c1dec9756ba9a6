//! The store commands end to end, against real Nix 2.8 on the same store roots: a store
//! written by firn is accepted and read identically by `nix-store`, and a store written
//! by Nix is read identically by firn. Needs Nix (installed by .ci/run); skips with a
//! printed reason elsewhere, never in CI.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod common;
use common::*;

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};

fn firn(root: &Path, args: &[&str]) -> Output {
    let mut all = vec!["--store", root.to_str().unwrap()];
    all.extend_from_slice(args);
    run(env!("CARGO_BIN_EXE_firn"), &all, None)
}

fn firn_in(root: &Path, args: &[&str], stdin: &[u8]) -> Output {
    let mut all = vec!["--store", root.to_str().unwrap()];
    all.extend_from_slice(args);
    run(env!("CARGO_BIN_EXE_firn"), &all, Some(stdin))
}

fn nix(root: &Path, cmd: &str, args: &[&str]) -> Output {
    let mut all: Vec<&str> = args.to_vec();
    all.extend([
        "--store",
        root.to_str().unwrap(),
        "--option",
        "substituters",
        "",
    ]);
    if cmd == "nix" {
        all.insert(0, "--extra-experimental-features");
        all.insert(1, "nix-command");
    }
    run(cmd, &all, None)
}

/// A tree with the awkward cases: executables, symlinks, empty things, odd names.
fn make_tree(at: &Path) {
    fs::create_dir_all(at.join("sub/empty")).unwrap();
    fs::write(at.join("file"), b"hello\n").unwrap();
    fs::write(at.join("empty"), b"").unwrap();
    fs::write(at.join("eight---"), b"12345678").unwrap();
    fs::write(at.join("sub/nine"), b"123456789").unwrap();
    fs::write(at.join("with space"), b"x").unwrap();
    fs::write(at.join(".hidden"), b"h").unwrap();
    fs::write(at.join("sub/exe"), b"#!/bin/sh\n").unwrap();
    fs::set_permissions(at.join("sub/exe"), fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("file", at.join("link")).unwrap();
    std::os::unix::fs::symlink("/does/not/exist", at.join("dangling")).unwrap();
}

#[test]
fn add_gives_nixs_paths_and_nix_accepts_the_store() {
    let root = tempdir("add");
    let ex = fixtures().join("exprs");
    let input = ex.join("input.txt");
    let srcdir = ex.join("srcdir");
    let (i, s) = (input.to_str().unwrap(), srcdir.to_str().unwrap());
    // nix-2.8-vectors/add-paths.txt
    assert_eq!(
        ok(firn(&root, &["add", i])),
        "/nix/store/53brh2sp2k9hhbc9mrj3j8ziix41jmha-input.txt\n"
    );
    assert_eq!(
        ok(firn(&root, &["add", s])),
        "/nix/store/nz11y973v9p0kp6ww97lqr379d0pmxrq-srcdir\n"
    );
    assert_eq!(
        ok(firn(&root, &["add-fixed", "sha256", i])),
        "/nix/store/b7jx86l86fkl00fvjswwr0fk1n9fv8lr-input.txt\n"
    );
    assert_eq!(
        ok(firn(&root, &["add-fixed", "--recursive", "sha256", i])),
        "/nix/store/53brh2sp2k9hhbc9mrj3j8ziix41jmha-input.txt\n"
    );
    assert_eq!(
        ok(firn(&root, &["add-fixed", "sha1", i])),
        "/nix/store/5b0jx7pi00j0ija1nqvap37ip4kpws3i-input.txt\n"
    );
    // Canonical metadata: mtime 1, 0444 files, 0555 executables and directories.
    {
        use std::os::unix::fs::MetadataExt;
        let real = root.join("nix/store/nz11y973v9p0kp6ww97lqr379d0pmxrq-srcdir");
        for (rel, mode) in [("", 0o555), ("a.txt", 0o444), ("run.sh", 0o555)] {
            let m = fs::symlink_metadata(real.join(rel)).unwrap();
            assert_eq!(m.mode() & 0o7777, mode, "{rel}");
            assert_eq!(m.mtime(), 1, "{rel}");
        }
        let link = fs::symlink_metadata(real.join("link-to-a")).unwrap();
        assert!(link.file_type().is_symlink());
        assert_eq!(link.mtime(), 1);
    }
    // A symlink outside the store (like ./result) stands for its target.
    let link = root.join("result");
    std::os::unix::fs::symlink(
        "/nix/store/53brh2sp2k9hhbc9mrj3j8ziix41jmha-input.txt",
        &link,
    )
    .unwrap();
    assert_eq!(
        ok(firn(&root, &["query", "--size", link.to_str().unwrap()])),
        "144\n"
    );
    let info = ok(firn(
        &root,
        &[
            "query",
            "--hash",
            "/nix/store/53brh2sp2k9hhbc9mrj3j8ziix41jmha-input.txt",
        ],
    ));
    assert_eq!(
        info,
        "sha256:0qx1iv69q1p14apwcv6hdkbm5jvdzc4f0c3y9hxn135bsdn8qlih\n"
    );
    assert_eq!(
        ok(firn(
            &root,
            &[
                "query",
                "--size",
                "/nix/store/nz11y973v9p0kp6ww97lqr379d0pmxrq-srcdir"
            ]
        )),
        "744\n"
    );
    assert!(firn(&root, &["verify", "--check-contents"])
        .status
        .success());

    if !have_nix() {
        return remove(&root);
    }
    // Same paths as the live Nix on a generated tree, and Nix accepts firn's store.
    let tree = tempdir("add-tree").join("tree");
    make_tree(&tree);
    let t = tree.to_str().unwrap();
    let nroot = tempdir("add-nix");
    for args in [
        vec!["--add", t],
        vec!["--add-fixed", "sha512", i],
        vec!["--add-fixed", "--recursive", "md5", t],
    ] {
        let theirs = ok(nix(&nroot, "nix-store", &args));
        let mut ours_args = vec![if args[0] == "--add" {
            "add"
        } else {
            "add-fixed"
        }];
        ours_args.extend(args[1..].iter().copied());
        assert_eq!(ok(firn(&root, &ours_args)), theirs, "{args:?}");
    }
    let out = nix(&root, "nix-store", &["--verify", "--check-contents"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!String::from_utf8_lossy(&out.stderr).contains("modified"));
    remove(&root);
    remove(&nroot);
    remove(tree.parent().unwrap());
}

/// Every `nix-store -q` flag firn supports, on every path of a store.
const QUERIES: &[&str] = &[
    "--references",
    "--referrers",
    "--requisites",
    "--referrers-closure",
    "--deriver",
    "--hash",
    "--size",
    "--tree",
    "--graph",
    "--valid-derivers",
];

fn compare_queries(root: &Path) -> usize {
    let all = ok(nix(root, "nix", &["path-info", "--all"]));
    let mut paths: Vec<String> = all.lines().map(str::to_owned).collect();
    paths.sort();
    assert!(paths.len() >= 5, "{paths:?}");
    let mut n = 0;
    for p in &paths {
        for q in QUERIES {
            let theirs = nix(root, "nix-store", &["-q", q, p]);
            let ours = firn(root, &["query", q, p]);
            assert_eq!(
                String::from_utf8_lossy(&ours.stdout),
                String::from_utf8_lossy(&theirs.stdout),
                "{q} {p}: {}",
                String::from_utf8_lossy(&ours.stderr)
            );
            n += 1;
        }
        // Nix prints roots from an unordered map: compare as sets of lines.
        let sorted = |s: String| {
            let mut v: Vec<String> = s.lines().map(str::to_owned).collect();
            v.sort();
            v
        };
        let theirs = sorted(ok(nix(root, "nix-store", &["-q", "--roots", p])));
        assert_eq!(
            sorted(ok(firn(root, &["query", "--roots", p]))),
            theirs,
            "--roots {p}"
        );
        if p.ends_with(".drv") {
            let theirs = ok(nix(root, "nix-store", &["-q", "--outputs", p]));
            assert_eq!(
                ok(firn(root, &["query", "--outputs", p])),
                theirs,
                "--outputs {p}"
            );
        }
        let theirs = ok(nix(root, "nix", &["path-info", "--json", p]));
        assert_eq!(
            ok(firn(root, &["path-info", "--json", p])),
            theirs,
            "path-info {p}"
        );
        // `nix-store --dump` serialises a file system path: the physical one.
        let real = root.join(p.trim_start_matches('/'));
        let theirs = ok_bytes(run("nix-store", &["--dump", real.to_str().unwrap()], None));
        assert_eq!(firn(root, &["dump", p]).stdout, theirs, "dump {p}");
    }
    // Several arguments at once.
    let theirs = ok(nix(
        root,
        "nix-store",
        &[
            &["-qR"][..],
            &paths.iter().map(String::as_str).collect::<Vec<_>>(),
        ]
        .concat(),
    ));
    let mut args = vec!["query", "--requisites"];
    args.extend(paths.iter().map(String::as_str));
    assert_eq!(ok(firn(root, &args)), theirs);
    n
}

#[test]
fn store_written_by_nix_reads_the_same_in_firn() {
    if !have_nix() {
        return;
    }
    let root = tempdir("nixwrote");
    let ex = fixtures().join("exprs");
    for (file, attr) in [
        ("multi.nix", None),
        ("needs-dev.nix", None),
        ("with-src.nix", None),
        ("diamond.nix", None),
        ("extra.nix", Some("fodUserMany")),
    ] {
        let f = ex.join(file);
        let mut args = vec![f.to_str().unwrap()];
        if let Some(a) = attr {
            args.extend(["-A", a]);
        }
        ok(nix(&root, "nix-instantiate", &args));
    }
    // Roots: direct, indirect (through a link outside the store), and one inside
    // gcroots/auto whose target is gone (Nix removes such stale links).
    let gcroots = root.join("nix/var/nix/gcroots");
    let user = tempdir("nixwrote-user");
    let drvs = ok(nix(
        &root,
        "nix-instantiate",
        &[ex.join("multi.nix").to_str().unwrap()],
    ));
    std::os::unix::fs::symlink(drvs.trim(), gcroots.join("direct")).unwrap();
    let src = ok(nix(
        &root,
        "nix-store",
        &["--add", ex.join("input.txt").to_str().unwrap()],
    ));
    std::os::unix::fs::symlink(src.trim(), user.join("result")).unwrap();
    fs::create_dir_all(gcroots.join("auto")).unwrap();
    std::os::unix::fs::symlink(user.join("result"), gcroots.join("auto/indirect")).unwrap();
    let n = compare_queries(&root);
    assert!(n > 100, "{n} comparisons");
    std::os::unix::fs::symlink(user.join("gone"), gcroots.join("auto/stale")).unwrap();
    ok(firn(&root, &["query", "--roots", src.trim()]));
    assert!(
        fs::symlink_metadata(gcroots.join("auto/stale")).is_err(),
        "stale root kept"
    );
    remove(&user);
    let v = firn(&root, &["verify", "--check-contents"]);
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
    remove(&root);
}

/// `add` and `add-fixed` arguments as Nix reads them: the name is `baseNameOf` of the
/// argument as typed (`.` is named `.`, `a//` has no name), `--add` reads the argument
/// made absolute and canonical (`f/` is `f`; errors name the absolute path) and
/// `--add-fixed` as typed. The same output, first error line and exit status as Nix,
/// argument by argument, from the same working directory.
#[test]
fn add_arguments_are_read_as_nix_reads_them() {
    if !have_nix() {
        return;
    }
    let root = tempdir("add-args");
    let work = root.join("work/sub");
    fs::create_dir_all(&work).unwrap();
    fs::write(work.join("f"), b"f\n").unwrap();
    let odd = root.join("odd");
    fs::create_dir_all(odd.join("d")).unwrap();
    let made = Command::new("mkfifo")
        .arg(odd.join("d/fifo"))
        .status()
        .unwrap();
    assert!(made.success(), "mkfifo");
    let odd_d = odd.join("d");
    let cases: Vec<Vec<&str>> = [
        ".",
        "..",
        "./",
        "../sub/.",
        "f/",
        "f//",
        "",
        "nope",
        odd_d.to_str().unwrap(),
    ]
    .iter()
    .flat_map(|a| {
        [
            vec!["--add", *a],
            vec!["--add-fixed", "--recursive", "sha256", *a],
        ]
    })
    .chain([vec!["--add-fixed", "sha256", "f/"]])
    .collect();
    let first_error = |o: &Output| {
        String::from_utf8_lossy(&o.stderr)
            .lines()
            .find(|l| l.starts_with("error:"))
            .map(str::to_owned)
    };
    for args in cases {
        let store = |tag: &str| root.join(format!("{tag}-store"));
        let nix = command("nix-store")
            .args(["--store", store("nix").to_str().unwrap()])
            .args(["--option", "substituters", ""])
            .args(&args)
            .current_dir(&work)
            .output()
            .unwrap();
        let mut firn_args = vec![args[0].trim_start_matches("--")];
        firn_args.extend(&args[1..]);
        let firn = firn_command()
            .args(["--store", store("firn").to_str().unwrap()])
            .args(&firn_args)
            .current_dir(&work)
            .output()
            .unwrap();
        assert_eq!(firn.status.code(), nix.status.code(), "{args:?}");
        assert_eq!(firn.stdout, nix.stdout, "{args:?}");
        assert_eq!(first_error(&firn), first_error(&nix), "{args:?}");
    }
    assert_verifies(&root.join("firn-store"), "after the odd adds");
    remove(&root);
}

/// A query argument outside the store is named as Nix names it: made absolute, its
/// symlinks followed (`followLinksToStorePath`): the same line and status as Nix.
#[test]
fn query_arguments_outside_the_store_are_named_as_nix_names_them() {
    if !have_nix() {
        return;
    }
    let root = tempdir("query-args");
    let work = root.join("work");
    fs::create_dir_all(&work).unwrap();
    fs::write(work.join("f"), b"f\n").unwrap();
    std::os::unix::fs::symlink(&root, work.join("up")).unwrap();
    for arg in ["/tmp", "f", "", "/nix/store/", "up", "./f/../f"] {
        let store = root.join("store");
        let nix = command("nix-store")
            .args(["--store", store.to_str().unwrap()])
            .args(["--option", "substituters", "", "-q", "--hash", arg])
            .current_dir(&work)
            .output()
            .unwrap();
        let firn = firn_command()
            .args(["--store", store.to_str().unwrap(), "query", "--hash", arg])
            .current_dir(&work)
            .output()
            .unwrap();
        assert_eq!(firn.status.code(), nix.status.code(), "{arg:?}");
        assert_eq!(
            String::from_utf8_lossy(&firn.stderr).trim_end(),
            String::from_utf8_lossy(&nix.stderr).trim_end(),
            "{arg:?}"
        );
    }
    remove(&root);
}

/// `verify-path` as `nix-store --verify-path`: silent and 0 for intact paths, Nix's
/// "was modified!" line for each modified one (the rest still checked) and 1, an
/// invalid path or unreadable contents the error; the same stderr and status as Nix on
/// the same stores.
#[test]
fn verify_path_reports_as_nix_does() {
    if !have_nix() {
        return;
    }
    let root = tempdir("verify-path");
    fs::write(root.join("h"), b"hello\n").unwrap();
    fs::write(root.join("o"), b"other\n").unwrap();
    let invalid = "/nix/store/ab3li50xq0nl4q5lxdyinb8w8y13my9s-f";
    let mut seen: Vec<Vec<(Option<i32>, String)>> = Vec::new();
    for tool in ["nix", "firn"] {
        let store = root.join(format!("{tool}-store"));
        let s = store.to_str().unwrap().to_owned();
        let run_tool = |args: &[&str]| -> Output {
            match tool {
                "nix" => {
                    let mut all = vec![
                        "--store",
                        &s,
                        "--option",
                        "substituters",
                        "",
                        "--verify-path",
                    ];
                    all.extend(args);
                    run("nix-store", &all, None)
                }
                _ => {
                    let mut all = vec!["--store", &s, "verify-path"];
                    all.extend(args);
                    run(firn_bin(), &all, None)
                }
            }
        };
        let h = ok(firn(&store, &["add", root.join("h").to_str().unwrap()]));
        let o = ok(firn(&store, &["add", root.join("o").to_str().unwrap()]));
        let (h, o) = (h.trim(), o.trim());
        let real = store.join(h.trim_start_matches('/'));
        let mut outs = vec![run_tool(&[h, o]), run_tool(&[])];
        fs::set_permissions(&real, fs::Permissions::from_mode(0o644)).unwrap();
        fs::write(&real, b"bye\n").unwrap();
        outs.push(run_tool(&[h, o]));
        outs.push(run_tool(&[invalid, h]));
        fs::remove_file(&real).unwrap();
        outs.push(run_tool(&[h]));
        seen.push(
            outs.iter()
                .map(|out| {
                    assert!(out.stdout.is_empty());
                    let err = String::from_utf8_lossy(&out.stderr).replace(&s, "ROOT");
                    (out.status.code(), err)
                })
                .collect(),
        );
    }
    assert_eq!(seen[1], seen[0], "firn (right) against Nix (left)");
    assert_eq!(seen[0][0], (Some(0), String::new()), "intact");
    assert_eq!(seen[0][2].0, Some(1), "modified");
    assert!(seen[0][2]
        .1
        .contains("was modified! expected hash 'sha256:"));
    remove(&root);
}

/// `export` writes what `nix-store --export` writes, byte for byte (a closure with a
/// reference and derivers); each tool imports the other's export into a fresh store
/// with the same paths, hashes, references and derivers; a stream that is not an
/// export and a path whose contents changed are one error each, nothing half-added.
#[test]
fn export_and_import_match_nix() {
    if !can_build() || !have_nix() {
        return;
    }
    let root = tempdir("export");
    let store = root.join("store");
    let drv = {
        let out = command("nix-instantiate")
            .args([
                "--store",
                store.to_str().unwrap(),
                "--option",
                "substituters",
                "",
            ])
            .arg(fixtures().join("exprs/chain.nix"))
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    let out = ok(firn(
        &store,
        &["--option", "sandbox", "false", "realise", &drv],
    ));
    let closure: Vec<String> = ok(firn(&store, &["query", "--requisites", out.trim()]))
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(closure.len(), 2, "{closure:?}");
    let mut args = vec!["export"];
    args.extend(closure.iter().map(String::as_str));
    let ours = firn(&store, &args);
    assert!(
        ours.status.success(),
        "{}",
        String::from_utf8_lossy(&ours.stderr)
    );
    let mut nix_args = vec!["--export"];
    nix_args.extend(closure.iter().map(String::as_str));
    let theirs = nix(&store, "nix-store", &nix_args);
    assert!(theirs.status.success());
    assert_eq!(
        ours.stdout, theirs.stdout,
        "the same bytes as nix-store --export"
    );

    let info = |s: &Path, p: &str| {
        ["--hash", "--references", "--deriver"]
            .map(|q| ok(nix(s, "nix-store", &["-q", q, p])))
            .join("")
    };
    let into_nix = root.join("into-nix");
    let imported = command("nix-store")
        .args([
            "--store",
            into_nix.to_str().unwrap(),
            "--option",
            "substituters",
            "",
            "--import",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let imported = {
        let mut child = imported;
        use std::io::Write;
        child.stdin.take().unwrap().write_all(&ours.stdout).unwrap();
        child.wait_with_output().unwrap()
    };
    assert!(imported.status.success());
    let into_firn = root.join("into-firn");
    let ours_in = firn_in(&into_firn, &["import"], &theirs.stdout);
    assert!(
        ours_in.status.success(),
        "{}",
        String::from_utf8_lossy(&ours_in.stderr)
    );
    assert_eq!(
        ours_in.stdout, imported.stdout,
        "the imported paths, as Nix lists them"
    );
    for p in &closure {
        assert_eq!(info(&into_firn, p), info(&store, p), "{p}");
        assert_eq!(info(&into_nix, p), info(&store, p), "{p}");
    }
    assert_verifies(&into_firn, "after the import");

    // Not an export: one line, nothing added.
    let junk = root.join("junk");
    let bad = firn_in(&junk, &["import"], b"this is not an export at all");
    assert_eq!(bad.status.code(), Some(1));
    assert_eq!(String::from_utf8_lossy(&bad.stderr).lines().count(), 1);
    assert!(
        store_entries(&junk).is_empty(),
        "{:?}",
        store_entries(&junk)
    );
    // A path whose contents changed is refused with Nix's words.
    let real = store.join(out.trim().trim_start_matches('/'));
    fs::set_permissions(&real, fs::Permissions::from_mode(0o644)).unwrap();
    fs::write(&real, b"changed\n").unwrap();
    let changed = firn(&store, &["export", out.trim()]);
    assert_eq!(changed.status.code(), Some(1));
    let err = String::from_utf8_lossy(&changed.stderr);
    assert!(
        err.starts_with(&format!(
            "error: hash of path '{}' has changed from 'sha256:",
            out.trim()
        )),
        "{err}"
    );
    remove(&root);
}

#[test]
fn derivations_added_by_firn_match_nix_and_nix_reads_them() {
    if !have_nix() {
        return;
    }
    let root = tempdir("drvadd");
    let nroot = tempdir("drvadd-nix");
    let ex = fixtures().join("exprs");
    // Instantiate with Nix in its own store, then rebuild the same .drv files in firn's
    // store from their JSON with every output path blanked: the paths must match.
    let drv = ok(nix(
        &nroot,
        "nix-instantiate",
        &[ex.join("with-src.nix").to_str().unwrap()],
    ));
    let drv = drv.trim().to_owned();
    let closure = ok(nix(&nroot, "nix-store", &["-qR", &drv]));
    for p in closure.lines() {
        if p.ends_with(".drv") {
            let json = ok(nix(&nroot, "nix", &["show-derivation", p]));
            let blank = blank_outputs(&json);
            let got = ok(firn_in(&root, &["derivation", "add"], blank.as_bytes()));
            assert_eq!(got.trim(), p, "{json}");
        } else {
            // Sources (files and `builtins.toFile` text paths): Nix imports them into
            // firn's store, which also checks that Nix writes into a store firn made.
            let out = run(
                "nix-store",
                &[
                    "--store",
                    root.to_str().unwrap(),
                    "--option",
                    "substituters",
                    "",
                    "--option",
                    "require-sigs",
                    "false",
                    "--import",
                ],
                Some(&export_of(&nroot, p)),
            );
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let out = nix(&root, "nix-store", &["--verify", "--check-contents"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let theirs = ok(nix(&root, "nix", &["show-derivation", &drv]));
    assert_eq!(ok(firn(&root, &["derivation", "show", &drv])), theirs);
    compare_queries(&root);
    remove(&root);
    remove(&nroot);
}

fn export_of(root: &Path, p: &str) -> Vec<u8> {
    ok_bytes(nix(root, "nix-store", &["--export", p]))
}

fn ok_bytes(out: Output) -> Vec<u8> {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Replace every input-addressed output path (in `outputs` and in `env`) by "".
fn blank_outputs(json: &str) -> String {
    let mut s = json.to_owned();
    let paths: Vec<String> = json
        .lines()
        .filter(|l| l.trim_start().starts_with("\"path\": "))
        .map(|l| {
            l.trim()
                .trim_start_matches("\"path\": ")
                .trim_end_matches(',')
                .trim_matches('"')
                .to_owned()
        })
        .collect();
    if json.contains("\"hashAlgo\"") {
        return s; // fixed outputs keep their path
    }
    for p in paths {
        s = s
            .replace(&format!("\"path\": \"{p}\""), "\"path\": \"\"")
            .replace(&format!("\"{p}\""), "\"\"");
    }
    s.replace("\"path\": \"\"", "")
        .replace("{\n        \n      }", "{}")
}

#[test]
fn bad_input_is_one_error_line_and_changes_nothing() {
    let root = tempdir("bad");
    let ex = fixtures().join("exprs");
    let p = ok(firn(&root, &["add", ex.join("srcdir").to_str().unwrap()]));
    let p = p.trim();
    let one_line = |out: &Output, needle: &str| {
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.starts_with("error: ") && err.contains(needle),
            "{err:?} lacks {needle:?}"
        );
    };
    one_line(
        &firn(
            &root,
            &[
                "query",
                "--references",
                "/nix/store/00000000000000000000000000000000-nope",
            ],
        ),
        "is not valid",
    );
    one_line(
        &firn(&root, &["dump", "/tmp/not-in-store"]),
        "'/tmp/not-in-store': No such file or directory",
    );
    let nar = firn(&root, &["dump", p]).stdout;
    assert!(nar.len() > 100);
    let target = root.join("restored");
    for cut in [0, 13, 40, nar.len() / 2, nar.len() - 1] {
        let out = firn_in(&root, &["restore", target.to_str().unwrap()], &nar[..cut]);
        assert_eq!(out.status.code(), Some(1));
        assert!(
            !target.exists(),
            "a failed restore left {}",
            target.display()
        );
        assert!(fs::read_dir(&root).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .contains("tmp")));
    }
    ok(firn_in(&root, &["restore", target.to_str().unwrap()], &nar));
    assert!(target.join("subdir").is_dir() || target.is_dir());
    // Where it cannot go: one line naming the target (not a temporary sibling).
    let nowhere = root.join("no/such/dir");
    one_line(
        &firn_in(&root, &["restore", nowhere.to_str().unwrap()], &nar),
        &format!(
            "cannot create '{}': No such file or directory",
            nowhere.display()
        ),
    );
    one_line(
        &firn_in(&root, &["restore", target.to_str().unwrap()], &nar),
        &format!("path '{}' already exists", target.display()),
    );
    // A referenced path cannot be deleted.
    let json = format!(
        r#"{{"name":"x","outputs":{{"out":{{}}}},"inputSrcs":["{p}"],"inputDrvs":{{}},"system":"s","builder":"/bin/sh","args":[],"env":{{"out":"","name":"x"}}}}"#
    );
    let note = ok(firn_in(&root, &["derivation", "add"], json.as_bytes()));
    one_line(&firn(&root, &["delete", p]), "still referenced");
    assert!(Path::new(&root.join(p.trim_start_matches('/'))).exists());
    ok(firn(&root, &["delete", note.trim()]));
    ok(firn(&root, &["delete", p]));
    assert!(!Path::new(&root.join(p.trim_start_matches('/'))).exists());
    // A corrupted store file is found by verify (exit 1), and nothing else is.
    let q = ok(firn(
        &root,
        &["add", ex.join("input.txt").to_str().unwrap()],
    ));
    let real = root.join(q.trim().trim_start_matches('/'));
    fs::set_permissions(&real, fs::Permissions::from_mode(0o644)).unwrap();
    fs::write(&real, b"corrupted\n").unwrap();
    let v = firn(&root, &["verify", "--check-contents"]);
    assert_eq!(v.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&v.stderr).contains("was modified!"));
    remove(&root);
}

/// Four processes adding paths to one store at once: no "database is locked", every
/// path registered once, and the store verifies.
#[test]
fn concurrent_adds_do_not_fail() {
    let root = tempdir("concurrent");
    let src = tempdir("concurrent-src");
    let mut files = Vec::new();
    for i in 0..40 {
        let f = src.join(format!("file-{i}"));
        fs::write(&f, format!("content {i}\n")).unwrap();
        files.push(f);
    }
    // Initialise the store first so the processes race on adds, not on creation.
    ok(firn(&root, &["add", files[0].to_str().unwrap()]));
    let children: Vec<_> = (0..4)
        .map(|k| {
            let mut args = vec![
                "--store".to_owned(),
                root.to_str().unwrap().to_owned(),
                "add".to_owned(),
            ];
            // Overlapping sets: every file is added by two processes.
            for (i, f) in files.iter().enumerate() {
                if i % 4 == k || (i + 1) % 4 == k {
                    args.push(f.to_str().unwrap().to_owned());
                }
            }
            firn_command()
                .args(&args)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{err}");
        // Not even a retried one surfaces: the busy handler retries whole transactions.
        assert!(!err.contains("database is locked"), "{err}");
        assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 20);
    }
    let v = firn(&root, &["verify", "--check-contents"]);
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
    // Every file once: 40 distinct paths, each registered.
    let mut all = BTreeSet::new();
    for f in &files {
        all.insert(ok(firn(&root, &["add", f.to_str().unwrap()])));
    }
    assert_eq!(all.len(), 40);
    if have_nix() {
        let listed = ok(nix(&root, "nix", &["path-info", "--all"]));
        assert_eq!(listed.lines().count(), 40, "{listed}");
    }
    remove(&root);
    remove(&src);
}

#[test]
fn derivation_add_dry_run_writes_nothing() {
    let root = tempdir("dryrun");
    let json = br#"{"name":"x","outputs":{"out":{}},"inputSrcs":[],"inputDrvs":{},"system":"x86_64-linux","builder":"/bin/sh","args":["-c","echo hello > $out"],"env":{"builder":"/bin/sh","name":"single","out":"","system":"x86_64-linux"}}"#;
    // The same derivation as nix-2.8-vectors' `single`, whose name is "single".
    let json = String::from_utf8_lossy(json).replace(r#""name":"x""#, r#""name":"single""#);
    let dry = ok(firn_in(
        &root,
        &["derivation", "add", "--dry-run"],
        json.as_bytes(),
    ));
    assert_eq!(
        dry,
        "/nix/store/b5fhw5mqajxk2lhicxn81a8fidm0l89x-single.drv\n"
    );
    assert!(!root
        .join("nix/store/b5fhw5mqajxk2lhicxn81a8fidm0l89x-single.drv")
        .exists());
    let real = ok(firn_in(&root, &["derivation", "add"], json.as_bytes()));
    assert_eq!(real, dry);
    assert_eq!(
        ok(firn(&root, &["query", "--outputs", real.trim()])),
        "/nix/store/qhk42s8j7kqg82l6ncz33d8xx332vz9f-single\n"
    );
    assert_eq!(
        ok(firn(
            &root,
            &[
                "query",
                "--valid-derivers",
                "/nix/store/qhk42s8j7kqg82l6ncz33d8xx332vz9f-single"
            ]
        )),
        real
    );
    // Bad JSON or a missing input: one error line, nothing registered.
    let bad = json.replace(
        r#""inputSrcs":[]"#,
        r#""inputSrcs":["/nix/store/00000000000000000000000000000000-missing"]"#,
    );
    let out = firn_in(&root, &["derivation", "add"], bad.as_bytes());
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not valid"));
    remove(&root);
}

/// A file named `*.drv` added as a source is checked as a derivation, as Nix does.
#[test]
fn added_drv_files_are_checked_like_nix() {
    let root = tempdir("adddrv");
    let src = tempdir("adddrv-src");
    let single = fixtures().join("cases/single/drv/b5fhw5mqajxk2lhicxn81a8fidm0l89x-single.drv");
    let good = src.join("single.drv");
    fs::copy(&single, &good).unwrap();
    let added = ok(firn(&root, &["add", good.to_str().unwrap()]));
    assert_eq!(
        ok(firn(
            &root,
            &[
                "query",
                "--valid-derivers",
                "/nix/store/qhk42s8j7kqg82l6ncz33d8xx332vz9f-single"
            ]
        )),
        added
    );
    // Same text under another name: its output path is wrong for that name.
    let bad = src.join("other.drv");
    fs::copy(&single, &bad).unwrap();
    let out = firn(&root, &["add", bad.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("has incorrect output '/nix/store/qhk42s8j7kqg82l6ncz33d8xx332vz9f-single'"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1);
    if have_nix() {
        let nroot = tempdir("adddrv-nix");
        assert_eq!(
            ok(nix(&nroot, "nix-store", &["--add", good.to_str().unwrap()])),
            added
        );
        let theirs = nix(&nroot, "nix-store", &["--add", bad.to_str().unwrap()]);
        assert!(!theirs.status.success());
        assert!(String::from_utf8_lossy(&theirs.stderr).contains("has incorrect output"));
        remove(&nroot);
    }
    remove(&root);
    remove(&src);
}

/// NAR bytes from tokens, each framed as Nix frames strings.
fn nar(tokens: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for t in tokens {
        out.extend_from_slice(&(t.len() as u64).to_le_bytes());
        out.extend_from_slice(t);
        out.resize(out.len().next_multiple_of(8), 0);
    }
    out
}

#[test]
fn restore_rejects_escaping_nars_and_leaves_nothing() {
    let root = tempdir("escape");
    let dir = |entries: Vec<Vec<&'static [u8]>>| {
        let mut t: Vec<&[u8]> = vec![b"nix-archive-1", b"(", b"type", b"directory"];
        for e in &entries {
            t.extend_from_slice(e);
        }
        t.push(b")");
        nar(&t)
    };
    let file = |name: &'static [u8]| -> Vec<&'static [u8]> {
        vec![
            b"entry",
            b"(",
            b"name",
            name,
            b"node",
            b"(",
            b"type",
            b"regular",
            b"contents",
            b"x",
            b")",
            b")",
        ]
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("dotdot", dir(vec![file(b"..")])),
        ("dot", dir(vec![file(b".")])),
        ("slash", dir(vec![file(b"a/b")])),
        ("empty", dir(vec![file(b"")])),
        ("nul", dir(vec![file(b"a\0b")])),
        ("duplicate", dir(vec![file(b"a"), file(b"a")])),
        ("unsorted", dir(vec![file(b"b"), file(b"a")])),
        ("symlink-then-write", {
            let mut t: Vec<&[u8]> = vec![b"nix-archive-1", b"(", b"type", b"directory"];
            t.extend_from_slice(&[
                b"entry", b"(", b"name", b"a", b"node", b"(", b"type", b"symlink", b"target",
                b"/tmp", b")", b")",
            ]);
            t.extend_from_slice(&file(b"a"));
            t.push(b")");
            nar(&t)
        }),
        (
            "bad-magic",
            nar(&[
                b"nix-archive-2",
                b"(",
                b"type",
                b"regular",
                b"contents",
                b"x",
                b")",
            ]),
        ),
        (
            "trailing",
            [
                nar(&[
                    b"nix-archive-1",
                    b"(",
                    b"type",
                    b"regular",
                    b"contents",
                    b"x",
                    b")",
                ]),
                vec![0; 8],
            ]
            .concat(),
        ),
    ];
    for (name, bytes) in cases {
        let target = root.join(name);
        let out = firn_in(&root, &["restore", target.to_str().unwrap()], &bytes);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: {err}");
        assert_eq!(err.lines().count(), 1, "{name}: {err}");
        assert!(err.starts_with("error: "), "{name}: {err}");
        let left: Vec<_> = fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(left.is_empty(), "{name}: left {left:?}");
        assert!(!Path::new("/tmp/a").exists() || name != "symlink-then-write");
    }
    // And a good one restores.
    let good = dir(vec![file(b"a"), file(b"b")]);
    ok(firn_in(
        &root,
        &["restore", root.join("good").to_str().unwrap()],
        &good,
    ));
    assert_eq!(fs::read(root.join("good/b")).unwrap(), b"x");
    remove(&root);
}

/// A path lock held by another process (as Nix holds it: flock on `<path>.lock`) makes
/// firn wait, then go on.
#[test]
fn add_waits_for_a_held_path_lock() {
    if Command::new("flock").arg("--version").output().is_err() {
        assert!(
            std::env::var("CI").ok().as_deref() != Some("true"),
            "CI needs util-linux flock"
        );
        eprintln!("SKIPPED add_waits_for_a_held_path_lock: no flock(1)");
        return;
    }
    let root = tempdir("lockwait");
    let input = fixtures().join("exprs/input.txt");
    ok(firn(
        &root,
        &["add", fixtures().join("exprs/srcdir").to_str().unwrap()],
    ));
    let lock = root.join("nix/store/53brh2sp2k9hhbc9mrj3j8ziix41jmha-input.txt.lock");
    let holder = Command::new("flock")
        .arg(&lock)
        .args(["sleep", "1.5"])
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let t0 = std::time::Instant::now();
    let out = firn(&root, &["add", input.to_str().unwrap()]);
    let waited = t0.elapsed();
    let mut holder = holder;
    holder.wait().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(waited.as_millis() >= 900, "did not wait: {waited:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("waiting for lock on"));
    remove(&root);
}

/// A process killed between creating the store directory and giving it its group and
/// mode leaves it `0755 root:root`: the next open repairs it as Nix's does (1775, group
/// `nixbld`, when run as root), or build users could not create their outputs.
#[test]
fn store_dir_mode_is_repaired_on_open_as_nix_does() {
    if !have_nix() {
        return;
    }
    let mode_after = |use_nix: bool| {
        let root = tempdir(if use_nix { "mode-nix" } else { "mode-firn" });
        let store = root.join("nix/store");
        fs::create_dir_all(&store).unwrap();
        fs::set_permissions(&store, fs::Permissions::from_mode(0o755)).unwrap();
        let f = root.join("f");
        fs::write(&f, b"x").unwrap();
        let out = if use_nix {
            nix(&root, "nix-store", &["--add", f.to_str().unwrap()])
        } else {
            firn(&root, &["add", f.to_str().unwrap()])
        };
        ok(out);
        let meta = fs::metadata(&store).unwrap();
        use std::os::unix::fs::MetadataExt;
        remove(&root);
        (meta.mode() & 0o7777, meta.uid(), meta.gid())
    };
    let nix_made = mode_after(true);
    if ::nix::unistd::Uid::effective().is_root() {
        assert_eq!(nix_made.0, 0o1775, "Nix 2.8 repairs the mode as root");
    }
    assert_eq!(mode_after(false), nix_made);
}

/// The one derivation object of `nix show-derivation` JSON, without its key.
fn bare(json: &str) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    let obj = v.as_object().unwrap();
    assert_eq!(obj.len(), 1, "{json}");
    obj.values().next().unwrap().clone()
}

fn add_json(root: &Path, obj: &serde_json::Value, args: &[&str]) -> Output {
    let mut all = vec!["derivation", "add"];
    all.extend_from_slice(args);
    firn_in(root, &all, serde_json::to_string(obj).unwrap().as_bytes())
}

/// `derivation add` takes what Nix writes: a `__structuredAttrs` derivation (its name is
/// only in env.__json), and outputs to be computed as `{}`, `{"path": ""}` or without
/// `path`, as Nix prints a `.drv` whose outputs are `("out","","","")`.
#[test]
fn derivation_add_takes_what_nix_writes() {
    if !have_nix() {
        return;
    }
    let root = tempdir("drvadd-forms");
    let nroot = tempdir("drvadd-forms-nix");
    let ex = fixtures().join("exprs");
    for expr in ["single.nix", "structured.nix"] {
        let drv = ok(nix(
            &nroot,
            "nix-instantiate",
            &[ex.join(expr).to_str().unwrap()],
        ));
        let drv = drv.trim();
        let json = ok(nix(&nroot, "nix", &["show-derivation", drv]));
        let obj = bare(&json);
        if expr == "structured.nix" {
            assert!(obj["env"].get("name").is_none(), "{json}");
        }
        // As Nix wrote it, with every path filled in.
        assert_eq!(ok(add_json(&root, &obj, &[])).trim(), drv, "{expr}");
        let outputs: Vec<String> = obj["outputs"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        for blank in [serde_json::json!({ "path": "" }), serde_json::json!({})] {
            let mut o = obj.clone();
            for name in &outputs {
                o["outputs"][name] = blank.clone();
                o["env"][name] = "".into();
            }
            assert_eq!(
                ok(add_json(&root, &o, &["--dry-run"])).trim(),
                drv,
                "{expr} with outputs {blank}"
            );
            assert_eq!(ok(add_json(&root, &o, &[])).trim(), drv, "{expr}");
        }
        // What Nix shows for a `.drv` with outputs to be computed reads the same.
        let theirs = ok(nix(&root, "nix", &["show-derivation", drv]));
        assert_eq!(theirs, json, "{expr}");
    }
    // Nix shows `("out","","","")` as `{}`.
    let src = tempdir("drvadd-forms-src");
    let single = fs::read_to_string(
        fixtures().join("cases/single/drv/b5fhw5mqajxk2lhicxn81a8fidm0l89x-single.drv"),
    )
    .unwrap();
    let deferred = single.replace("/nix/store/qhk42s8j7kqg82l6ncz33d8xx332vz9f-single", "");
    fs::write(src.join("single.drv"), deferred).unwrap();
    let p = ok(nix(
        &nroot,
        "nix-store",
        &["--add", src.join("single.drv").to_str().unwrap()],
    ));
    let json = ok(nix(&nroot, "nix", &["show-derivation", p.trim()]));
    assert!(json.contains("\"out\": {}"), "{json}");
    assert_eq!(
        ok(firn_in(&root, &["derivation", "add"], json.as_bytes())).trim(),
        "/nix/store/b5fhw5mqajxk2lhicxn81a8fidm0l89x-single.drv"
    );
    let out = nix(&root, "nix-store", &["--verify", "--check-contents"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    remove(&root);
    remove(&nroot);
    remove(&src);
}

/// What the store holds: its entries and (with Nix) every valid path's metadata.
fn store_state(root: &Path) -> (Vec<String>, String) {
    let mut entries: Vec<String> = fs::read_dir(root.join("nix/store"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    entries.sort();
    let infos = if have_nix() {
        ok(nix(root, "nix", &["path-info", "--all", "--json"]))
    } else {
        String::new()
    };
    (entries, infos)
}

/// A derivation whose output paths are given but wrong is refused, naming the output and
/// both paths, and nothing is written; Nix refuses the same `.drv` when it is added.
#[test]
fn derivation_add_refuses_wrong_output_paths() {
    let root = tempdir("drvadd-wrong");
    let dir = fixtures().join("cases/single");
    let obj = bare(&fs::read_to_string(dir.join("show-derivation.json")).unwrap());
    let good = "/nix/store/qhk42s8j7kqg82l6ncz33d8xx332vz9f-single";
    let bad = "/nix/store/00000000000000000000000000000000-single";
    // Something in the store already, so that "unchanged" means something.
    ok(firn(
        &root,
        &["add", fixtures().join("exprs/input.txt").to_str().unwrap()],
    ));
    // (The first time Nix opens the store it makes `.links`.)
    store_state(&root);
    let before = store_state(&root);
    let mut cases = Vec::new();
    let mut o = obj.clone();
    o["outputs"]["out"]["path"] = bad.into();
    cases.push((
        o,
        format!("has incorrect output '{bad}', should be '{good}'"),
        " (output 'out')".to_owned(),
        true,
    ));
    let mut o = obj.clone();
    o["env"]["out"] = bad.into();
    cases.push((
        o,
        format!("has incorrect environment variable 'out', should be '{good}'"),
        format!(" (it is '{bad}')"),
        true,
    ));
    // The output to be computed, its variable wrong: Nix takes such a `.drv` as it is
    // (it checks no deferred output), but firn would have to change what it was given.
    let mut o = obj.clone();
    o["outputs"]["out"] = serde_json::json!({});
    o["env"]["out"] = bad.into();
    cases.push((
        o,
        format!("has incorrect environment variable 'out', should be '{good}'"),
        format!(" (it is '{bad}')"),
        false,
    ));
    let src = tempdir("drvadd-wrong-src");
    let nroot = tempdir("drvadd-wrong-nix");
    for (obj, nixs, ours, nix_refuses) in cases {
        for args in [&["--dry-run"][..], &[]] {
            let out = add_json(&root, &obj, args);
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{err}");
            assert!(out.stdout.is_empty());
            assert_eq!(err.lines().count(), 1, "{err}");
            assert!(err.starts_with("error: derivation '/nix/store/"), "{err}");
            assert!(err.trim_end().ends_with(&format!("{nixs}{ours}")), "{err}");
            assert_eq!(store_state(&root), before, "{err}");
        }
        if have_nix() {
            // The same derivation as a `.drv` file, added to Nix's store.
            let text = firn_in(
                &root,
                &["derivation", "print"],
                serde_json::to_string(&obj).unwrap().as_bytes(),
            );
            let file = src.join("single.drv");
            fs::write(&file, ok_bytes(text)).unwrap();
            let theirs = nix(&nroot, "nix-store", &["--add", file.to_str().unwrap()]);
            let err = String::from_utf8_lossy(&theirs.stderr);
            if nix_refuses {
                assert!(!theirs.status.success());
                assert!(err.contains(&nixs), "{err}");
            } else {
                assert!(theirs.status.success(), "{err}");
            }
        }
    }
    let v = firn(&root, &["verify", "--check-contents"]);
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
    remove(&root);
    remove(&src);
    remove(&nroot);
}

/// `firn dump` serialises any path as `nix-store --dump` does: a symlink as a symlink,
/// relative paths from the working directory; a logical store path from under the root.
#[test]
fn dump_matches_nix_for_any_path() {
    let root = tempdir("dump-any");
    let tree = tempdir("dump-any-tree");
    make_tree(&tree.join("dir"));
    std::os::unix::fs::symlink("dir", tree.join("dirlink")).unwrap();
    std::os::unix::fs::symlink("dir/file", tree.join("filelink")).unwrap();
    let dump = |cmd: &str, args: &[&str]| -> Output {
        Command::new(cmd)
            .args(args)
            .current_dir(&tree)
            .env_remove("FIRN_STORE")
            .output()
            .unwrap()
    };
    let firn_bin = env!("CARGO_BIN_EXE_firn");
    let store = root.to_str().unwrap();
    let mut paths = vec![
        "dir/file",
        "dir/sub/exe",
        "dir",
        "dir/link",
        "dir/dangling",
        "dirlink",
        "dirlink/",
        "filelink",
        "./dirlink/../dir/empty",
        ".",
    ];
    let abs = tree.join("dirlink").to_str().unwrap().to_owned();
    paths.push(&abs);
    // A store path that is a symlink, and a file inside a store path.
    let link_path = ok(firn(
        &root,
        &["add", tree.join("dirlink").to_str().unwrap()],
    ));
    let dir_path = ok(firn(&root, &["add", tree.join("dir").to_str().unwrap()]));
    let inside = format!("{}/sub/nine", dir_path.trim());
    let store_paths = [link_path.trim(), dir_path.trim(), inside.as_str()];
    for p in &paths {
        let ours = dump(firn_bin, &["--store", store, "dump", p]);
        assert!(
            ours.status.success(),
            "{p}: {}",
            String::from_utf8_lossy(&ours.stderr)
        );
        if have_nix() {
            let theirs = dump("nix-store", &["--dump", p]);
            assert_eq!(ours.stdout, ok_bytes(theirs), "dump {p}");
        }
    }
    for p in store_paths {
        let ours = ok_bytes(firn(&root, &["dump", p]));
        if have_nix() {
            // `nix-store --dump` reads the file system: the physical path.
            let real = root.join(p.trim_start_matches('/'));
            let theirs = dump("nix-store", &["--dump", real.to_str().unwrap()]);
            assert_eq!(ours, ok_bytes(theirs), "dump {p}");
        }
    }
    // The root of a symlink's NAR is the symlink.
    let nar = ok_bytes(firn(&root, &["dump", link_path.trim()]));
    assert!(nar.windows(7).any(|w| w == b"symlink"));
    assert!(!nar.windows(9).any(|w| w == b"directory"));
    // A path that is not there: one line, and (unlike Nix) no partial NAR on stdout.
    let out = dump(firn_bin, &["--store", store, "dump", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert_eq!(
        err.trim_end(),
        "error: getting status of 'nope': No such file or directory",
        "Nix's words"
    );
    remove(&root);
    remove(&tree);
}

/// The directories (and the one symlink) a store's state has, with their modes and link
/// targets relative to `root`: what `LocalStore`'s constructor makes, leaving out what
/// only one of the tools makes (firn's log directories, made as it opens a store; Nix's
/// `db/reserved` and the collector's socket, made as they are needed).
fn layout_of(root: &Path) -> BTreeSet<String> {
    use std::os::unix::fs::MetadataExt;
    let mut out = BTreeSet::new();
    let mut todo = vec![root.to_path_buf()];
    let mut all = Vec::new();
    while let Some(dir) = todo.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.symlink_metadata().unwrap().is_dir() {
                todo.push(p.clone());
            }
            all.push(p);
        }
    }
    for path in all {
        let rel = path.strip_prefix(root).unwrap().display().to_string();
        let skip = rel.starts_with("nix/var/log")
            || rel.starts_with("nix/var/nix/gc-socket")
            || rel.starts_with("nix/var/nix/db/")
            || (rel.starts_with("nix/store/") && !rel.starts_with("nix/store/.links"));
        if skip {
            continue;
        }
        let m = path.symlink_metadata().unwrap();
        let what = if m.file_type().is_symlink() {
            let t = fs::read_link(&path).unwrap();
            format!("-> {}", t.strip_prefix(root).unwrap_or(&t).display())
        } else {
            format!("{:o}", m.mode() & 0o7777)
        };
        out.insert(format!("{rel} {what}"));
    }
    out
}

/// A store firn makes has the state directories Nix's `LocalStore` makes (`.links`, the
/// `per-user` directories and this user's own in them, `gcroots/profiles` linking to the
/// profiles, so that real Nix collecting a store firn made keeps what profiles hold), and
/// real Nix makes the same ones.
#[test]
fn a_new_store_has_the_layout_nix_makes() {
    let root = tempdir("layout");
    let src = tempdir("layout-src");
    fs::write(src.join("f"), "f\n").unwrap();
    ok(firn(&root, &["add", src.join("f").to_str().unwrap()]));
    let user = nix::unistd::User::from_uid(nix::unistd::geteuid())
        .unwrap()
        .unwrap()
        .name;
    // From LocalStore::LocalStore and LocalStore::createUser (Nix 2.8).
    let mut want: BTreeSet<String> = [
        "nix 755",
        "nix/store 1775",
        "nix/store/.links 755",
        "nix/var 755",
        "nix/var/nix 755",
        "nix/var/nix/db 755",
        "nix/var/nix/gc.lock 600",
        "nix/var/nix/gcroots 755",
        "nix/var/nix/gcroots/per-user 755",
        "nix/var/nix/gcroots/profiles -> nix/var/nix/profiles",
        "nix/var/nix/profiles 755",
        "nix/var/nix/profiles/per-user 755",
        "nix/var/nix/temproots 755",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    want.insert(format!("nix/var/nix/gcroots/per-user/{user} 755"));
    want.insert(format!("nix/var/nix/profiles/per-user/{user} 755"));
    let got = layout_of(&root);
    assert_eq!(got, want);
    // A store that has its `gcroots` keeps it as it is: no link is made again.
    fs::remove_file(root.join("nix/var/nix/gcroots/profiles")).unwrap();
    ok(firn(
        &root,
        &[
            "query",
            "--hash",
            ok(firn(&root, &["add", src.join("f").to_str().unwrap()])).trim(),
        ],
    ));
    assert!(fs::symlink_metadata(root.join("nix/var/nix/gcroots/profiles")).is_err());
    if !have_nix() {
        println!("skipped the comparison with real Nix: nix-store is not installed");
    } else {
        let nroot = tempdir("layout-nix");
        ok(nix(
            &nroot,
            "nix-store",
            &["--add", src.join("f").to_str().unwrap()],
        ));
        assert_eq!(layout_of(&nroot), want, "Nix makes the same");
        remove(&nroot);
    }
    remove(&root);
    remove(&src);
}
