//! Garbage collection end to end: roots, live and dead sets compared with real Nix 2.8
//! on the same store; exactly the dead paths deleted, referrers first, and a store both
//! verifiers accept afterwards; temporary roots of live processes (this test process,
//! through `Store::add_temp_root`) protect, those of dead ones are removed; adds wait
//! for a running collection; leftover locks, chroots and check outputs go unless a
//! build holds them; `--max-freed`; `delete` refuses live paths with the reason; what a
//! crash mid-collection leaves is accepted. The Nix comparisons need Nix (installed by
//! .ci/run) and are skipped with a printed reason elsewhere, never in CI.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod common;
use common::*;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use firn_derivation::StorePath;
use firn_store::lock::PathLocks;
use firn_store::{Registration, Store, StoreLayout, ValidPathInfo};

fn firn(root: &Path, args: &[&str]) -> Output {
    let mut all = vec!["--store", root.to_str().unwrap()];
    all.extend_from_slice(args);
    run(firn_bin(), &all, None)
}

fn firn_in(root: &Path, args: &[&str], stdin: &[u8]) -> Output {
    let mut all = vec!["--store", root.to_str().unwrap()];
    all.extend_from_slice(args);
    run(firn_bin(), &all, Some(stdin))
}

fn nix(root: &Path, args: &[&str]) -> Output {
    let mut all: Vec<&str> = args.to_vec();
    all.extend([
        "--store",
        root.to_str().unwrap(),
        "--option",
        "substituters",
        "",
    ]);
    run("nix-store", &all, None)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The command failed with exactly one `error:` line, the last one, containing `what`.
fn refused(o: &Output, what: &str) -> String {
    assert_eq!(o.status.code(), Some(1), "{}", stderr(o));
    let err = stderr(o);
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{err}");
    assert_eq!(err.lines().last(), Some(errors[0]), "{err}");
    assert!(errors[0].contains(what), "wanted '{what}' in: {err}");
    errors[0].to_owned()
}

/// Add a file with `content` (named `name`) to the store; its logical path.
fn add_file(root: &Path, scratch: &Path, name: &str, content: &[u8]) -> String {
    let f = scratch.join(name);
    fs::write(&f, content).unwrap();
    ok(firn(root, &["add", f.to_str().unwrap()]))
        .trim()
        .to_owned()
}

/// A derivation with one output `out`, given sources and input derivations.
fn add_drv(root: &Path, name: &str, srcs: &[&str], drvs: &[&str]) -> String {
    let q = |s: &&str| format!("\"{s}\"");
    let srcs: Vec<String> = srcs.iter().map(q).collect();
    let drvs: Vec<String> = drvs.iter().map(|d| format!("\"{d}\":[\"out\"]")).collect();
    let json = format!(
        r#"{{"name":"{name}","outputs":{{"out":{{}}}},"inputSrcs":[{}],"inputDrvs":{{{}}},"system":"x86_64-linux","builder":"/bin/sh","args":["-c","true"],"env":{{"out":"","name":"{name}"}}}}"#,
        srcs.join(","),
        drvs.join(",")
    );
    ok(firn_in(root, &["derivation", "add"], json.as_bytes()))
        .trim()
        .to_owned()
}

fn output_of(root: &Path, drv: &str) -> String {
    ok(firn(root, &["query", "--outputs", drv]))
        .trim()
        .to_owned()
}

fn real(root: &Path, logical: &str) -> PathBuf {
    root.join(logical.trim_start_matches('/'))
}

fn sp(logical: &str) -> StorePath {
    StorePath::from_base_name(logical.trim_start_matches("/nix/store/").as_bytes()).unwrap()
}

/// Register `content` as the built output of `drv` (what a build's registration does),
/// with the derivation as its deriver.
fn register_output(root: &Path, drv: &str, content: &[u8]) -> String {
    let out = output_of(root, drv);
    let at = real(root, &out);
    fs::write(&at, content).unwrap();
    firn_store::canonical::canonicalise_path_metadata(&at).unwrap();
    let (nar_hash, nar_size) = firn_store::nar::hash_path(&at).unwrap();
    let mut store = Store::open(&StoreLayout::chroot(root)).unwrap();
    store
        .db_mut()
        .register_valid_paths(&[Registration {
            info: ValidPathInfo {
                path: sp(&out),
                nar_hash,
                nar_size,
                references: BTreeSet::new(),
                deriver: Some(sp(drv)),
                registration_time: 1,
                ultimate: true,
                sigs: Vec::new(),
                ca: None,
            },
            drv_outputs: BTreeMap::new(),
        }])
        .unwrap();
    out
}

/// The names in the store directory (without Nix's `.links`).
fn entries(root: &Path) -> BTreeSet<String> {
    fs::read_dir(root.join("nix/store"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != ".links")
        .collect()
}

fn valid_paths(root: &Path) -> BTreeSet<String> {
    let store = Store::open(&StoreLayout::chroot(root)).unwrap();
    let all = store.db().query_all_valid_paths().unwrap();
    all.iter().map(|p| store.store_dir().display(p)).collect()
}

fn lines(s: &str) -> BTreeSet<String> {
    s.lines().map(str::to_owned).collect()
}

/// Both verifiers accept the store, with nothing to fix or report.
fn assert_verifies(root: &Path, with_nix: bool) {
    let out = firn(root, &["verify", "--check-contents"]);
    assert!(out.status.success(), "firn verify: {}", stderr(&out));
    for bad in ["disappeared", "modified", "warning"] {
        assert!(!stderr(&out).contains(bad), "firn verify: {}", stderr(&out));
    }
    if with_nix {
        let out = nix(root, &["--verify", "--check-contents"]);
        assert!(out.status.success(), "nix verify: {}", stderr(&out));
        for bad in ["disappeared", "modified", "warning"] {
            assert!(!stderr(&out).contains(bad), "nix verify: {}", stderr(&out));
        }
    }
}

/// The store paths in `deleting '…'` lines, in order.
fn deleted_in_order(err: &str) -> Vec<String> {
    err.lines()
        .filter_map(|l| l.strip_prefix("deleting '")?.strip_suffix('\''))
        .map(str::to_owned)
        .collect()
}

fn copy_store(from: &Path, to: &Path) {
    let st = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success());
}

/// A tree with directories (read-only once in the store), files, an executable and a
/// symlink: Nix counts freed bytes of files and symlinks, not directories.
fn make_tree(at: &Path, seed: u8) {
    for i in 0..5 {
        fs::create_dir_all(at.join(format!("d{i}/e"))).unwrap();
        fs::write(at.join(format!("d{i}/e/f")), vec![seed; 20_000 + i * 1000]).unwrap();
    }
    fs::write(at.join("exe"), b"#!/bin/sh\n").unwrap();
    fs::set_permissions(at.join("exe"), fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("exe", at.join("link")).unwrap();
}

#[test]
fn gc_agrees_with_nix_and_deletes_exactly_the_dead_paths_referrers_first() {
    let root = tempdir("gc-main");
    let scratch = tempdir("gc-main-scratch");
    let store = root.join("s");
    let r = store.as_path();
    let s: Vec<String> = (1..=6)
        .map(|i| {
            add_file(
                r,
                &scratch,
                &format!("s{i}"),
                format!("source {i}\n").as_bytes(),
            )
        })
        .collect();
    make_tree(&scratch.join("t1"), b'1');
    make_tree(&scratch.join("t2"), b'2');
    let t1 = ok(firn(r, &["add", scratch.join("t1").to_str().unwrap()]))
        .trim()
        .to_owned();
    let t2 = ok(firn(r, &["add", scratch.join("t2").to_str().unwrap()]))
        .trim()
        .to_owned();
    let d1 = add_drv(r, "one", &[&s[0]], &[]);
    let d2 = add_drv(r, "two", &[&s[1]], &[&d1]);
    let d3 = add_drv(r, "three", &[&s[2]], &[]);
    let d4 = add_drv(r, "four", &[&s[4]], &[]);
    let o4 = register_output(r, &d4, b"built by four\n");
    let d5 = add_drv(r, "five", &[&s[5]], &[]);
    let d6 = add_drv(r, "six", &[], &[&d5]);
    let d7 = add_drv(r, "seven", &[&s[5]], &[&d6, &d5]);

    // Roots of every kind findRoots knows.
    let gcroots = r.join("nix/var/nix/gcroots");
    std::os::unix::fs::symlink(&d2, gcroots.join("direct")).unwrap();
    let user = root.join("user");
    fs::create_dir_all(&user).unwrap();
    std::os::unix::fs::symlink(&s[2], user.join("result")).unwrap();
    fs::create_dir_all(gcroots.join("auto")).unwrap();
    std::os::unix::fs::symlink(user.join("result"), gcroots.join("auto/indirect")).unwrap();
    std::os::unix::fs::symlink(user.join("gone"), gcroots.join("auto/stale")).unwrap();
    std::os::unix::fs::symlink(&s[3], r.join("nix/var/nix/profiles/profile-1-link")).unwrap();
    fs::write(gcroots.join(o4.trim_start_matches("/nix/store/")), b"").unwrap();
    std::os::unix::fs::symlink(format!("{t2}/d0/e"), gcroots.join("inside")).unwrap();
    // A free lock next to a dead path: garbage too.
    fs::write(real(r, &format!("{d3}.lock")), b"").unwrap();

    let live: BTreeSet<String> = [
        &d2, &d1, &s[0], &s[1], // closure of a direct root
        &s[2], // indirect root
        &s[3], // profile
        &o4, &d4, &s[4], // a root's deriver and its closure (keep-derivations)
        &t2,   // a link into a store object
    ]
    .into_iter()
    .cloned()
    .collect();
    let mut dead: BTreeSet<String> = [&d3, &s[5], &d5, &d6, &d7, &t1]
        .into_iter()
        .cloned()
        .collect();
    dead.insert(format!("{d3}.lock"));

    let roots = ok(firn(r, &["gc", "--print-roots"]));
    assert!(
        !gcroots.join("auto/stale").exists(),
        "a stale auto root stays"
    );
    let want_roots = format!(
        "{g}/auto/indirect -> {s3}\n{g}/direct -> {d2}\n{g}/inside -> {t2}\n{g}/{o4b} -> {o4}\n{p}/profile-1-link -> {s4}\n",
        g = gcroots.display(),
        s3 = s[2],
        o4b = o4.trim_start_matches("/nix/store/"),
        p = r.join("nix/var/nix/profiles").display(),
        s4 = s[3]
    );
    // Lines sorted by link; `auto/indirect` shows the user's link, as Nix shows it.
    let want_roots = want_roots.replace(
        &format!("{}/auto/indirect ->", gcroots.display()),
        &format!("{} ->", user.join("result").display()),
    );
    let mut sorted: Vec<&str> = want_roots.lines().collect();
    sorted.sort();
    assert_eq!(roots, sorted.join("\n") + "\n");
    let live_out = ok(firn(r, &["gc", "--print-live"]));
    let dead_out = ok(firn(r, &["gc", "--print-dead"]));
    assert_eq!(lines(&live_out), live);
    assert_eq!(lines(&dead_out), dead);
    // Printed sorted, as nix-store prints its std::set.
    let mut v: Vec<&str> = dead_out.lines().collect();
    v.sort();
    assert_eq!(dead_out.lines().collect::<Vec<_>>(), v);

    let with_nix = have_nix();
    if with_nix {
        assert_eq!(ok(nix(r, &["--gc", "--print-roots"])), roots);
        assert_eq!(ok(nix(r, &["--gc", "--print-live"])), live_out);
        assert_eq!(ok(nix(r, &["--gc", "--print-dead"])), dead_out);
        assert_eq!(
            lines(&ok(firn(r, &["query", "--roots", &s[0]]))),
            lines(&ok(nix(r, &["-q", "--roots", &s[0]])))
        );
    }
    // Listing deleted nothing.
    assert!(dead.iter().all(|p| real(r, p).symlink_metadata().is_ok()));

    let theirs = root.join("nix-copy");
    if with_nix {
        copy_store(r, &theirs);
    }
    let out = firn(r, &["gc"]);
    let freed = ok(out.clone());
    let err = stderr(&out);
    assert!(
        freed.starts_with(&format!("{} store paths deleted, ", dead.len())),
        "{freed}"
    );
    assert!(freed.ends_with(" MiB freed\n"), "{freed}");
    assert!(err.starts_with("finding garbage collector roots...\ndeleting garbage...\n"));
    // Exactly the dead entries went, and the database agrees with the disk.
    let remaining = entries(r);
    let want: BTreeSet<String> = live
        .iter()
        .map(|p| p.trim_start_matches("/nix/store/").to_owned())
        .collect();
    assert_eq!(remaining, want);
    assert_eq!(valid_paths(r), live);
    // Referrers before references.
    let order = deleted_in_order(&err);
    assert_eq!(order.iter().cloned().collect::<BTreeSet<_>>(), dead);
    let pos = |p: &str| order.iter().position(|x| x == p).unwrap();
    for (referrer, reference) in [
        (&d7, &d6),
        (&d7, &d5),
        (&d6, &d5),
        (&d5, &s[5]),
        (&d7, &s[5]),
    ] {
        assert!(
            pos(referrer) < pos(reference),
            "{referrer} deleted after {reference}: {order:?}"
        );
    }
    assert_verifies(r, with_nix);

    if with_nix {
        // Nix collects its copy the same way: same count, same bytes, same leftovers.
        let nix_freed = ok(nix(&theirs, &["--gc"]));
        assert_eq!(freed, nix_freed);
        assert_eq!(entries(&theirs), remaining);
        assert_verifies(&theirs, true);
    }
    // Nothing left to collect.
    assert_eq!(
        ok(firn(r, &["gc"])),
        "0 store paths deleted, 0.00 MiB freed\n"
    );
    remove(&root);
    remove(&scratch);
}

#[test]
fn temp_roots_of_live_processes_protect_and_dead_ones_are_removed() {
    let root = tempdir("gc-temp");
    let scratch = tempdir("gc-temp-scratch");
    let r = root.as_path();
    let p = add_file(r, &scratch, "kept", b"kept while in use\n");
    let q = add_file(r, &scratch, "stale", b"only a dead process wanted this\n");
    let never = "/nix/store/00000000000000000000000000000000-not-yet";

    // This process uses `p` (and is about to create `never`), as a build would.
    let store = Store::open(&StoreLayout::chroot(r)).unwrap();
    store.add_temp_root(&sp(&p)).unwrap();
    store.add_temp_root(&sp(never)).unwrap();
    store.add_temp_root(&sp(&p)).unwrap(); // cheap and idempotent
    let pid = std::process::id();
    let mine = r.join(format!("nix/var/nix/temproots/{pid}"));
    assert_eq!(
        fs::read(&mine).unwrap(),
        format!("{p}\0{never}\0").as_bytes()
    );

    // A process that died with `q` in its temporary roots: its file is not locked.
    let mut child = Command::new("true").spawn().unwrap();
    let dead_pid = child.id();
    child.wait().unwrap();
    let theirs = r.join(format!("nix/var/nix/temproots/{dead_pid}"));
    fs::write(&theirs, format!("{q}\0")).unwrap();

    let with_nix = have_nix();
    if with_nix {
        // Nix reads firn's temporary roots file as its own (and drops the dead one).
        let roots = ok(nix(r, &["--gc", "--print-roots"]));
        assert_eq!(
            roots,
            format!("{{temp:{pid}}} -> {never}\n{{temp:{pid}}} -> {p}\n")
        );
        assert!(!theirs.exists());
        assert_eq!(ok(nix(r, &["--gc", "--print-dead"])), format!("{q}\n"));
        fs::write(&theirs, format!("{q}\0")).unwrap();
    }
    let roots = firn(r, &["gc", "--print-roots"]);
    assert_eq!(
        ok(roots.clone()),
        format!("{{temp:{pid}}} -> {never}\n{{temp:{pid}}} -> {p}\n")
    );
    assert!(stderr(&roots).contains(&format!(
        "removing stale temporary roots file '{}'",
        theirs.display()
    )));
    assert!(!theirs.exists(), "a dead process's temporary roots stay");
    fs::write(&theirs, format!("{q}\0")).unwrap();
    assert_eq!(ok(firn(r, &["gc", "--print-dead"])), format!("{q}\n"));
    assert!(lines(&ok(firn(r, &["gc", "--print-live"]))).contains(&p));
    assert_eq!(
        ok(firn(r, &["query", "--roots", &p])),
        format!("{{temp:{pid}}} -> {p}\n")
    );
    assert_eq!(
        ok(firn(r, &["gc"])),
        "1 store paths deleted, 0.00 MiB freed\n"
    );
    assert!(real(r, &p).exists());
    assert!(!real(r, &q).exists());
    assert!(
        mine.exists(),
        "the collector removed a live process's roots"
    );
    refused(
        &firn(r, &["delete", &p]),
        &format!("it is in use by process {pid} (a temporary root)"),
    );

    // Once this process lets go, its file goes and the path is garbage.
    drop(store);
    assert!(!mine.exists());
    assert_eq!(ok(firn(r, &["gc", "--print-dead"])), format!("{p}\n"));
    ok(firn(r, &["gc"]));
    assert!(!real(r, &p).exists());
    assert_verifies(r, with_nix);
    remove(&root);
    remove(&scratch);
}

#[test]
fn runtime_roots_keep_what_running_processes_use() {
    let root = tempdir("gc-runtime");
    let scratch = tempdir("gc-runtime-scratch");
    let r = root.as_path();
    let used = add_file(r, &scratch, "used", b"in a running process's environment\n");
    let unused = add_file(r, &scratch, "unused", b"garbage\n");
    // A process that mentions `used` (inside it, as a PATH entry would) in its
    // environment; the logical store path, as for a store at /.
    let mut holder = Command::new("sleep")
        .arg("60")
        .env("FIRN_TEST_RUNTIME_ROOT", format!("x:{used}/bin:y"))
        .spawn()
        .unwrap();
    let pid = holder.id();
    let want = format!("/proc/{pid}/environ -> {used}\n");
    let roots = ok(firn(r, &["gc", "--print-roots"]));
    assert_eq!(roots, want);
    if have_nix() {
        assert_eq!(ok(nix(r, &["--gc", "--print-roots"])), want);
        assert_eq!(ok(nix(r, &["--gc", "--print-dead"])), format!("{unused}\n"));
    }
    assert_eq!(ok(firn(r, &["gc", "--print-dead"])), format!("{unused}\n"));
    refused(
        &firn(r, &["delete", &used]),
        &format!("it is a GC root ('/proc/{pid}/environ')"),
    );
    ok(firn(r, &["gc"]));
    assert!(real(r, &used).exists());
    assert!(!real(r, &unused).exists());
    holder.kill().unwrap();
    holder.wait().unwrap();
    assert_eq!(ok(firn(r, &["gc", "--print-dead"])), format!("{used}\n"));
    remove(&root);
    remove(&scratch);
}

#[test]
fn adds_wait_for_a_running_collection_which_never_deletes_what_they_produce() {
    let root = tempdir("gc-concurrent");
    let scratch = tempdir("gc-concurrent-scratch");
    let r = root.as_path();
    let file = scratch.join("waits");
    fs::write(&file, b"added after the collection\n").unwrap();
    let with_nix = have_nix();

    // While a collection holds the GC lock, an add waits for it.
    let store = Store::open(&StoreLayout::chroot(r)).unwrap();
    let gc = store.lock_gc(true).unwrap();
    let adder = firn_command()
        .args([
            "--store",
            r.to_str().unwrap(),
            "add",
            file.to_str().unwrap(),
        ])
        .env_remove("FIRN_STORE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut adder = adder;
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        adder.try_wait().unwrap().is_none(),
        "an add ran during a collection"
    );
    drop(gc);
    let out = adder.wait_with_output().unwrap();
    let added_path = ok(out.clone());
    assert!(
        stderr(&out).contains("waiting for the big garbage collector lock..."),
        "{}",
        stderr(&out)
    );
    assert!(real(r, added_path.trim()).exists());

    // Collections running over and over while this process adds paths: each path is
    // there and valid when its add returns, and stays so while we hold the store.
    let stop = Arc::new(AtomicBool::new(false));
    let runs = Arc::new(AtomicUsize::new(0));
    let collector = {
        let (stop, runs, root) = (stop.clone(), runs.clone(), r.to_path_buf());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let out = firn(&root, &["--quiet", "gc"]);
                assert!(out.status.success(), "{}", stderr(&out));
                runs.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    let mut store = store;
    let mut added = Vec::new();
    let mut i = 0;
    while (i < 40 || runs.load(Ordering::SeqCst) < 5) && i < 5000 {
        let info = store
            .add_text(
                &format!("t{i}"),
                format!("text {i}\n").as_bytes(),
                BTreeSet::new(),
                BTreeMap::new(),
            )
            .unwrap();
        assert!(store.db().is_valid_path(&info.path).unwrap());
        assert!(store.real_path(&info.path).exists());
        added.push(info.path);
        i += 1;
    }
    stop.store(true, Ordering::SeqCst);
    collector.join().unwrap();
    assert!(runs.load(Ordering::SeqCst) >= 5);
    for p in &added {
        assert!(store.db().is_valid_path(p).unwrap(), "{p:?} was collected");
        assert!(store.real_path(p).exists(), "{p:?} was collected");
    }
    drop(store);
    // Now they are garbage like anything else (as is the path added first, if the
    // collections have not taken it already: its adder is gone).
    let first = usize::from(real(r, added_path.trim()).exists());
    let freed = ok(firn(r, &["gc"]));
    assert!(
        freed.starts_with(&format!("{} store paths deleted", added.len() + first)),
        "{freed}"
    );
    assert!(entries(r).is_empty(), "{:?}", entries(r));
    assert_verifies(r, with_nix);
    remove(&root);
    remove(&scratch);
}

#[test]
fn nix_processes_adding_during_a_collection_keep_their_paths() {
    if !have_nix() {
        return;
    }
    let root = tempdir("gc-nix-adds");
    let scratch = tempdir("gc-nix-adds-scratch");
    let r = root.as_path();
    // Plenty of garbage, so that the collection takes a while; the files Nix adds
    // again are part of it.
    let files: Vec<PathBuf> = (0..1000)
        .map(|i| {
            let f = scratch.join(format!("g{i:04}"));
            fs::write(&f, format!("garbage {i}\n")).unwrap();
            f
        })
        .collect();
    let args: Vec<&str> = files.iter().map(|f| f.to_str().unwrap()).collect();
    let mut all = vec!["add"];
    all.extend(&args);
    let paths: Vec<String> = ok(firn(r, &all)).lines().map(str::to_owned).collect();
    assert_eq!(paths.len(), files.len());

    let mut gc = firn_command()
        .args(["--store", r.to_str().unwrap(), "gc"])
        .env_remove("FIRN_STORE")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let err = gc.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut all = String::new();
        for line in std::io::BufReader::new(err).lines() {
            let line = line.unwrap();
            if line == "deleting garbage..." {
                let _ = tx.send(());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    // From here on the collector holds the GC lock and listens on its socket.
    rx.recv_timeout(Duration::from_secs(60)).unwrap();
    let mut during = Vec::new();
    for (i, f) in files.iter().enumerate().rev().step_by(7) {
        let out = nix(r, &["--add", f.to_str().unwrap()]);
        let p = ok(out).trim().to_owned();
        assert_eq!(p, paths[i]);
        if gc.try_wait().unwrap().is_some() {
            break;
        }
        during.push(p);
    }
    let status = gc.wait().unwrap();
    let log = reader.join().unwrap();
    eprintln!("{} Nix adds during the collection", during.len());
    assert!(status.success(), "{log}");
    assert!(
        during.len() >= 2,
        "the collection was over too soon to test anything ({} adds)",
        during.len()
    );
    // Every path a Nix process added while the collection ran is there and valid:
    // the collector kept it, or deleted it before Nix's root arrived and Nix made it
    // again.
    let valid = valid_paths(r);
    for p in &during {
        assert!(valid.contains(p), "{p} was collected under Nix's feet");
        assert!(real(r, p).exists(), "{p} was collected under Nix's feet");
    }
    assert!(
        valid.len() < paths.len() / 2,
        "the collection kept too much"
    );
    assert_verifies(r, true);
    remove(&root);
    remove(&scratch);
}

#[test]
fn leftover_locks_chroots_and_checks_go_unless_a_build_holds_them() {
    let root = tempdir("gc-leftovers");
    let scratch = tempdir("gc-leftovers-scratch");
    let r = root.as_path();
    let live = add_file(r, &scratch, "live", b"rooted\n");
    std::os::unix::fs::symlink(&live, r.join("nix/var/nix/gcroots/live")).unwrap();
    let busy_drv = add_drv(r, "busy", &[], &[]);
    let busy_out = output_of(r, &busy_drv);
    let idle_drv = add_drv(r, "idle", &[], &[]);
    let idle_out = output_of(r, &idle_drv);
    let checked = add_file(r, &scratch, "checked", b"checked\n");

    // A build of `busy` in progress: its output lock held, a half-written output, its
    // chroot (read-only directories inside), and a `--check` of `checked` running.
    let _building = PathLocks::lock([real(r, &busy_out), real(r, &checked)], false, |_| {})
        .unwrap()
        .unwrap();
    let chroot = |drv: &str| {
        let c = real(r, &format!("{drv}.chroot"));
        fs::create_dir_all(c.join("nix/store/x")).unwrap();
        fs::write(c.join("nix/store/x/f"), b"inside").unwrap();
        fs::set_permissions(c.join("nix/store/x"), fs::Permissions::from_mode(0o555)).unwrap();
        fs::set_permissions(c.join("nix/store"), fs::Permissions::from_mode(0o555)).unwrap();
    };
    chroot(&busy_drv);
    fs::create_dir_all(real(r, &busy_out)).unwrap();
    fs::write(real(r, &format!("{checked}.check")), b"differs").unwrap();
    // Leftovers of builds and adds that died.
    chroot(&idle_drv);
    fs::write(real(r, &idle_out), b"half").unwrap();
    fs::write(real(r, &format!("{idle_out}.check")), b"differs").unwrap();
    fs::write(real(r, &format!("{live}.lock")), b"").unwrap();
    let mut child = Command::new("true").spawn().unwrap();
    let dead_pid = child.id();
    child.wait().unwrap();
    let base = |p: &str| p.trim_start_matches("/nix/store/").to_owned();
    let dead_tmp = format!(".{}.tmp-{dead_pid}", base(&idle_out));
    let live_tmp = format!(".{}.tmp-{}", base(&idle_out), std::process::id());
    fs::create_dir_all(real(r, &format!("/nix/store/{dead_tmp}/sub"))).unwrap();
    fs::write(real(r, &format!("/nix/store/{live_tmp}")), b"being added").unwrap();

    let in_use: BTreeSet<String> = [
        format!("{busy_out}.lock"),
        format!("{checked}.lock"),
        format!("{busy_drv}.chroot"),
        busy_out.clone(),
        format!("{checked}.check"),
        live_tmp.clone(),
    ]
    .into_iter()
    .map(|p| base(&p))
    .collect();
    let leftovers: BTreeSet<String> = [
        format!("{idle_drv}.chroot"),
        idle_out.clone(),
        format!("{idle_out}.check"),
        format!("{live}.lock"),
    ]
    .into_iter()
    .collect();
    let mut dead = leftovers.clone();
    dead.extend([busy_drv.clone(), idle_drv.clone(), checked.clone()]);
    assert_eq!(lines(&ok(firn(r, &["gc", "--print-dead"]))), dead);

    let out = firn(r, &["gc"]);
    ok(out.clone());
    let mut want: BTreeSet<String> = in_use.clone();
    want.insert(base(&live));
    assert_eq!(entries(r), want);
    let gone = deleted_in_order(&stderr(&out));
    assert!(gone.contains(&format!("/nix/store/{dead_tmp}")), "{gone:?}");
    assert_verifies(r, false);

    // The build ends (its locks released): what it left is garbage now.
    drop(_building);
    fs::remove_file(real(r, &format!("/nix/store/{live_tmp}"))).unwrap();
    ok(firn(r, &["gc"]));
    assert_eq!(entries(r), BTreeSet::from([base(&live)]));
    assert_verifies(r, have_nix());
    remove(&root);
    remove(&scratch);
}

#[test]
fn max_freed_stops_early_as_nix_does() {
    let root = tempdir("gc-max");
    let scratch = tempdir("gc-max-scratch");
    let r = root.join("s");
    for i in 0..3u8 {
        add_file(&r, &scratch, &format!("big{i}"), &vec![i; 100_000]);
    }
    let bad = firn(&r, &["gc", "--max-freed", "1x"]);
    refused(&bad, "invalid unit specifier 'X'");
    let bad = firn(&r, &["gc", "--max-freed", "1.5"]);
    refused(&bad, "'1.5' is not an integer");
    // Nothing to free, nothing freed; a negative limit counts as 0.
    for zero in ["0", "-5"] {
        assert_eq!(
            ok(firn(&r, &["gc", "--max-freed", zero])),
            "0 store paths deleted, 0.00 MiB freed\n"
        );
        assert_eq!(entries(&r).len(), 3);
    }
    let with_nix = have_nix();
    let theirs = root.join("nix-copy");
    if with_nix {
        copy_store(&r, &theirs);
    }
    // 150 KiB: the first file frees 100000 bytes, the second passes the limit.
    let out = firn(&r, &["gc", "--max-freed", "150k"]);
    assert_eq!(ok(out.clone()), "2 store paths deleted, 0.19 MiB freed\n");
    assert!(stderr(&out).contains("deleted more than 153600 bytes; stopping"));
    assert_eq!(entries(&r).len(), 1);
    assert_eq!(valid_paths(&r).len(), 1);
    assert_verifies(&r, with_nix);
    if with_nix {
        let out = nix(&theirs, &["--gc", "--max-freed", "150k"]);
        assert_eq!(ok(out), "2 store paths deleted, 0.19 MiB freed\n");
    }
    assert_eq!(
        ok(firn(&r, &["gc", "--max-freed", "1M"])),
        "1 store paths deleted, 0.10 MiB freed\n"
    );
    remove(&root);
    remove(&scratch);
}

#[test]
fn delete_refuses_live_paths_naming_the_reason() {
    let root = tempdir("gc-delete");
    let scratch = tempdir("gc-delete-scratch");
    let r = root.as_path();
    let rooted = add_file(r, &scratch, "rooted", b"rooted\n");
    let link = r.join("nix/var/nix/gcroots/keep");
    std::os::unix::fs::symlink(&rooted, &link).unwrap();
    let src = add_file(r, &scratch, "src", b"src\n");
    let user = add_drv(r, "user", &[&src], &[]);
    let needed = add_file(r, &scratch, "needed", b"needed by a root\n");
    let top = add_drv(r, "top", &[&needed], &[]);
    std::os::unix::fs::symlink(&top, r.join("nix/var/nix/gcroots/top")).unwrap();
    let built = add_drv(r, "built", &[], &[]);
    let out = register_output(r, &built, b"output\n");
    let free = add_file(r, &scratch, "free", b"free\n");
    let with_nix = have_nix();

    let cases = [
        (
            vec![rooted.as_str()],
            format!("it is a GC root ('{}')", link.display()),
        ),
        (
            vec![src.as_str()],
            format!("it is still referenced by '{user}'"),
        ),
        (
            vec![needed.as_str()],
            format!("it is needed by '{top}', a GC root"),
        ),
        (
            vec![built.as_str()],
            format!("the derivation's output '{out}' is still valid"),
        ),
        // All or nothing: `free` could go, `rooted` cannot, so neither goes.
        (
            vec![free.as_str(), rooted.as_str()],
            format!("cannot delete path '{rooted}' since it is still alive"),
        ),
    ];
    for (args, why) in &cases {
        let mut all = vec!["delete"];
        all.extend(args);
        let line = refused(&firn(r, &all), why);
        assert!(line.starts_with("error: cannot delete path '"), "{line}");
        for a in args {
            assert!(real(r, a).exists(), "{a} was deleted by a refused delete");
        }
        // (Nix deletes path by path: it would delete `free` before refusing.)
        if with_nix && args.len() == 1 {
            let mut all = vec!["--delete"];
            all.extend(args);
            assert_eq!(nix(r, &all).status.code(), Some(1), "nix agrees: {args:?}");
        }
    }
    // A path with its referrer, a derivation with its output: allowed together, the
    // referrer first.
    let out_del = firn(r, &["delete", &src, &user, &out, &built, &free]);
    assert_eq!(
        ok(out_del.clone()),
        "5 store paths deleted, 0.00 MiB freed\n"
    );
    let order = deleted_in_order(&stderr(&out_del));
    let pos = |p: &str| order.iter().position(|x| x == p).unwrap();
    assert!(pos(&user) < pos(&src), "{order:?}");
    for p in [&src, &user, &out, &built, &free] {
        assert!(!real(r, p).exists());
    }
    // Deleting it again: an invalid path is garbage, present or not (Nix deletes it
    // and counts it).
    assert_eq!(
        ok(firn(r, &["delete", &src])),
        "1 store paths deleted, 0.00 MiB freed\n"
    );
    if with_nix {
        assert_eq!(
            ok(nix(r, &["--delete", &src])),
            "1 store paths deleted, 0.00 MiB freed\n"
        );
    }
    assert_eq!(
        valid_paths(r),
        BTreeSet::from([rooted.clone(), needed.clone(), top.clone()])
    );
    assert_verifies(r, with_nix);
    remove(&root);
    remove(&scratch);
}

#[test]
fn what_a_crash_mid_collection_leaves_is_accepted_and_collected_later() {
    let root = tempdir("gc-crash");
    let scratch = tempdir("gc-crash-scratch");
    let r = root.as_path();
    let with_nix = have_nix();
    let keep = add_file(r, &scratch, "keep", b"rooted\n");
    std::os::unix::fs::symlink(&keep, r.join("nix/var/nix/gcroots/keep")).unwrap();
    make_tree(&scratch.join("tree"), b'x');
    let tree = ok(firn(r, &["add", scratch.join("tree").to_str().unwrap()]))
        .trim()
        .to_owned();
    let leaf = add_file(r, &scratch, "leaf", b"leaf\n");
    let drv = add_drv(r, "mid", &[&leaf], &[]);

    // The states a collection passes through, made by hand: `drv` invalidated but
    // still on disk (crash right after the invalidation), `tree` invalidated and half
    // deleted (crash during the deletion). The referrer went first, so no valid path
    // refers to an invalid one.
    {
        let mut store = Store::open(&StoreLayout::chroot(r)).unwrap();
        for p in [&drv, &tree] {
            store
                .db_mut()
                .invalidate_paths(&BTreeSet::from([sp(p)]))
                .unwrap();
        }
    }
    let t = real(r, &tree);
    fs::set_permissions(&t, fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(t.join("d0"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(t.join("d0/e"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::remove_file(t.join("d0/e/f")).unwrap();
    fs::remove_file(t.join("exe")).unwrap();
    assert_verifies(r, with_nix);
    assert_eq!(
        lines(&ok(firn(r, &["gc", "--print-dead"]))),
        BTreeSet::from([drv.clone(), tree.clone(), leaf.clone()])
    );
    ok(firn(r, &["gc"]));
    assert_eq!(
        entries(r),
        BTreeSet::from([keep.trim_start_matches("/nix/store/").to_owned()])
    );
    assert_verifies(r, with_nix);

    // And for real: collections killed at different moments.
    for (n, delay) in [5u64, 20, 60, 150].into_iter().enumerate() {
        let trees: Vec<String> = (0..40)
            .map(|i| {
                let t = scratch.join(format!("k{n}-{i}"));
                make_tree(&t, i as u8);
                t.to_str().unwrap().to_owned()
            })
            .collect();
        let mut args = vec!["add"];
        args.extend(trees.iter().map(String::as_str));
        ok(firn(r, &args));
        let mut child = firn_command()
            .args(["--store", r.to_str().unwrap(), "--quiet", "gc"])
            .env_remove("FIRN_STORE")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay));
        let _ = child.kill();
        child.wait().unwrap();
        assert_verifies(r, with_nix);
        ok(firn(r, &["gc"]));
        assert_eq!(entries(r).len(), 1);
        assert_verifies(r, false);
    }
    remove(&root);
    remove(&scratch);
}

/// `realise --add-root LINK` makes the root Nix 2.8's `addPermRoot` makes, under the
/// same `gcroots/auto/` name: real Nix lists it, and rooting the same LINK again with
/// real `nix-store -r --add-root` replaces it instead of adding a second one.
#[test]
fn realise_add_root_makes_the_indirect_root_nix_makes() {
    if !have_nix() {
        return;
    }
    let root = tempdir("gc-add-root");
    let scratch = tempdir("gc-add-root-scratch");
    let r = root.join("s");
    let p = add_file(&r, &scratch, "rooted", b"keep me\n");
    let link = scratch.join("result");
    let out = ok(firn(
        &r,
        &["realise", "--add-root", link.to_str().unwrap(), &p],
    ));
    // As `nix-store -r --add-root`: the root is printed, not the path.
    assert_eq!(out, format!("{}\n", link.display()));
    assert_eq!(fs::read_link(&link).unwrap(), PathBuf::from(&p));
    let auto = r.join("nix/var/nix/gcroots/auto");
    let names = |dir: &Path| -> BTreeSet<String> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    };
    let firns = names(&auto);
    assert_eq!(firns.len(), 1, "{firns:?}");
    let line = format!("{} -> {p}\n", link.display());
    assert_eq!(ok(nix(&r, &["--gc", "--print-roots"])), line);
    assert_eq!(ok(firn(&r, &["gc", "--print-roots"])), line);

    assert_eq!(
        ok(nix(&r, &["-r", &p, "--add-root", link.to_str().unwrap()])),
        out,
        "Nix prints the same"
    );
    assert_eq!(names(&auto), firns, "Nix named the same root differently");
    assert_eq!(ok(nix(&r, &["--gc", "--print-dead"])), "");

    // Gone LINK: both collectors drop the stale indirect root and the path.
    fs::remove_file(&link).unwrap();
    let gc = firn(&r, &["gc"]);
    assert!(gc.status.success(), "{}", stderr(&gc));
    assert!(names(&auto).is_empty());
    assert!(stderr(&gc).contains(&format!(
        "removing stale link from '{}/{}' to '{}'",
        auto.display(),
        firns.first().unwrap(),
        link.display()
    )));
    assert!(!valid_paths(&r).contains(&p));
    remove(&root);
    remove(&scratch);
}

/// `gc` reads its flags as `nix-store --gc` does (any may be repeated, `--print-roots`
/// wins, the last of `--print-live`/`--print-dead` counts), and what `gc` and `delete`
/// print, stdout and stderr, is what Nix prints on the same store (the `.links` lines
/// included: every store has `.links`, as Nix makes it).
#[test]
fn gc_flags_and_messages_are_nixs() {
    let root = tempdir("gc-flags");
    let scratch = tempdir("gc-flags-scratch");
    let r = root.join("s");
    let live = add_file(&r, &scratch, "live", b"live\n");
    let dead = add_file(&r, &scratch, "dead", b"dead\n");
    let link = r.join("nix/var/nix/gcroots/keep");
    std::os::unix::fs::symlink(&live, &link).unwrap();
    let roots_line = format!("{} -> {live}\n", link.display());
    let cases: [(&[&str], String); 6] = [
        (&["--print-dead", "--print-live"], format!("{live}\n")),
        (&["--print-live", "--print-dead"], format!("{dead}\n")),
        (&["--print-dead", "--print-dead"], format!("{dead}\n")),
        (&["--print-dead", "--print-roots"], roots_line.clone()),
        (
            &["--print-roots", "--print-live", "--print-roots"],
            roots_line,
        ),
        (
            &["--max-freed", "1", "--print-dead", "--max-freed", "0"],
            String::new(),
        ),
    ];
    let with_nix = have_nix();
    if !with_nix {
        println!("skipped the comparisons with real Nix: nix-store is not installed");
    }
    for (flags, want) in &cases {
        let mut args = vec!["gc"];
        args.extend_from_slice(flags);
        let out = firn(&r, &args);
        assert_eq!(&ok(out), want, "{flags:?}");
        if with_nix {
            let mut args = vec!["--gc"];
            args.extend_from_slice(flags);
            assert_eq!(&ok(nix(&r, &args)), want, "Nix: {flags:?}");
        }
    }
    // A deleting collection and a delete, each on its own copy for Nix.
    let other = add_file(&r, &scratch, "other", b"other\n");
    let theirs = root.join("nix-copy");
    copy_store(&r, &theirs);
    let ours = firn(&r, &["gc"]);
    // The paths go in the store directory's order: compared as a set, in their place.
    let lines: Vec<String> = stderr(&ours).lines().map(str::to_owned).collect();
    let deleted: BTreeSet<String> = deleted_in_order(&stderr(&ours)).into_iter().collect();
    assert_eq!(deleted, BTreeSet::from([dead.clone(), other.clone()]));
    assert_eq!(
        lines
            .iter()
            .filter(|l| !l.starts_with("deleting '"))
            .collect::<Vec<_>>(),
        [
            "finding garbage collector roots...",
            "deleting garbage...",
            "deleting unused links...",
            "note: currently hard linking saves -0.00 MiB"
        ]
    );
    assert!(lines[2].starts_with("deleting '") && lines[3].starts_with("deleting '"));
    assert_eq!(ok(ours), "2 store paths deleted, 0.00 MiB freed\n");
    let delete_err = |p: &str| {
        format!(
            "finding garbage collector roots...\ndeleting '{p}'\n\
             deleting unused links...\nnote: currently hard linking saves -0.00 MiB\n"
        )
    };
    if with_nix {
        let out = nix(&theirs, &["--delete", &dead]);
        assert_eq!(stderr(&out), delete_err(&dead), "Nix");
        let out = nix(&theirs, &["--gc"]);
        assert_eq!(
            stderr(&out),
            format!(
                "finding garbage collector roots...\ndeleting garbage...\ndeleting '{other}'\n\
                 deleting unused links...\nnote: currently hard linking saves -0.00 MiB\n"
            ),
            "Nix"
        );
    }
    let again = add_file(&r, &scratch, "dead", b"dead\n");
    let out = firn(&r, &["delete", &again]);
    assert_eq!(stderr(&out), delete_err(&again));
    assert_eq!(ok(out), "1 store paths deleted, 0.00 MiB freed\n");
    remove(&root);
    remove(&scratch);
}
