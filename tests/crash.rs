//! Crash safety and concurrency (issue 6), with real processes and real signals:
//!
//! - `firn realise` (a DAG of sandboxed busybox builds), `add` (a tree of a few MB),
//!   `restore` (a NAR on stdin), `derivation add` and `gc` are SIGKILLed at offsets
//!   spread over their normal run time (measured first, on an identical store). After
//!   every kill: `firn verify --check-contents` and Nix 2.8's accept the store (a valid
//!   path is complete: its contents hash to the registered narHash), no process of the
//!   killed run is left, no lock is held, and a rerun of the same command completes,
//!   without waiting for any lock, with the result of an uninterrupted run (same paths,
//!   same NAR hashes); what the kill left behind is garbage the next `firn gc` deletes.
//! - SIGINT (to the process group, as Ctrl-C sends it) and SIGTERM (to firn alone)
//!   during a sandboxed realise: exit 1 with one `error:` line naming what was
//!   interrupted, builders gone, build directories (in a private `TMPDIR`) and
//!   `<drv>.chroot` roots removed, no partial output, the store verifies, a rerun builds.
//!   (`tests/realise.rs` covers the same without the sandbox.)
//! - Three concurrent realisers of one 30-node DAG: all succeed with the same output,
//!   and every derivation is built exactly once.
//!
//! Building needs root, Nix and /bin/busybox, the rest needs Nix (to verify with it):
//! in CI all of it runs; elsewhere a test without what it needs prints why it skips.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod common;
use common::firn_at as firn;
use common::*;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;

/// Kills per command, at `duration * i / OFFSETS` for `i` in `0..OFFSETS`.
const OFFSETS: u32 = 12;

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn output_of(root: &Path, drv: &str) -> String {
    ok(firn(root, &["query", "--outputs", drv], None))
        .trim()
        .to_owned()
}

/// The JSON of a derivation with one output `out`.
fn drv_json(
    name: &str,
    builder: &str,
    args: &[&str],
    env: &[(&str, &str)],
    srcs: &[&str],
    drvs: &[&str],
) -> String {
    let q = |s: &str| json_string(s);
    let args: Vec<String> = args.iter().map(|a| q(a)).collect();
    let mut env_all: BTreeMap<&str, &str> = env.iter().copied().collect();
    env_all.extend([
        ("name", name),
        ("out", ""),
        ("builder", builder),
        ("system", "x86_64-linux"),
    ]);
    let env: Vec<String> = env_all
        .iter()
        .map(|(k, v)| format!("{}:{}", q(k), q(v)))
        .collect();
    let srcs: Vec<String> = srcs.iter().map(|s| q(s)).collect();
    let drvs: Vec<String> = drvs.iter().map(|d| format!("{}:[\"out\"]", q(d))).collect();
    format!(
        r#"{{"name":{},"outputs":{{"out":{{}}}},"inputSrcs":[{}],"inputDrvs":{{{}}},"system":"x86_64-linux","builder":{},"args":[{}],"env":{{{}}}}}"#,
        q(name),
        srcs.join(","),
        drvs.join(","),
        q(builder),
        args.join(","),
        env.join(",")
    )
}

fn add_drv(root: &Path, json: &str) -> String {
    ok(firn(root, &["derivation", "add"], Some(json.as_bytes())))
        .trim()
        .to_owned()
}

/// A sandboxed busybox build that leaves a background process (which the sandbox must
/// kill with it), writes a few files and the paths of its inputs' outputs (so it refers
/// to them), then sleeps `sleep` seconds. `marker` is in the builder's command line, so
/// in that of every process it forks: `pgrep -f MARKER` finds what is left of it.
fn busybox_node(root: &Path, name: &str, deps: &[&str], marker: &str, sleep: &str) -> String {
    let dep_outs: Vec<String> = deps.iter().map(|d| output_of(root, d)).collect();
    let script = format!(
        ": {marker}; /bin/busybox sh -c 'sleep 30; true' {marker}-bg & \
         mkdir $out; for i in 1 2 3; do echo \"$name $i\" > $out/f$i; done; \
         for d in $deps; do echo $d >> $out/inputs; cat $d/f1 >> $out/inputs; done; \
         sleep {sleep}"
    );
    add_drv(
        root,
        &drv_json(
            name,
            "/bin/busybox",
            &["sh", "-c", &script],
            &[("deps", &dep_outs.join(" "))],
            &[],
            deps,
        ),
    )
}

/// `cp -a`: a store (database, WAL, modes, owners, symlinks) as it is.
fn copy_tree(from: &Path, to: &Path) {
    remove(to);
    let st = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success(), "cp -a {} {}", from.display(), to.display());
}

/// The command lines of the live processes containing `needle`.
fn processes_with(needle: &str) -> String {
    let out = Command::new("pgrep")
        .args(["-a", "-f", needle])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Wait (a little) until no process has `needle` in its command line.
fn assert_no_process_with(needle: &str, ctx: &str) {
    let t0 = Instant::now();
    loop {
        let left = processes_with(needle);
        if left.is_empty() {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "{ctx}: processes of the killed run survived:\n{left}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Every lock file of the store can be taken exclusively at once: nobody holds one.
fn assert_no_lock_held(root: &Path, ctx: &str) {
    let var = root.join("nix/var/nix");
    let mut files = vec![var.join("gc.lock"), var.join("db/big-lock")];
    for dir in [root.join("nix/store"), var.join("temproots")] {
        if let Ok(rd) = fs::read_dir(&dir) {
            for e in rd.flatten() {
                let p = e.path();
                let is_lock = p.extension().is_some_and(|x| x == "lock");
                if (is_lock || dir.ends_with("temproots")) && p.is_file() {
                    files.push(p);
                }
            }
        }
    }
    for f in files {
        let Ok(file) = File::open(&f) else { continue };
        let taken = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock);
        assert!(taken.is_ok(), "{ctx}: {} is still locked", f.display());
    }
}

/// Output paths printed by a command, each with its NAR hash in the store.
fn paths_and_hashes(root: &Path, out: &Output) -> String {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut result = String::new();
    for p in text.lines() {
        let h = ok(firn(root, &["query", "--hash", p], None));
        result.push_str(&format!("{p} {}", h));
    }
    assert!(!result.is_empty(), "no output: {}", stderr(out));
    result
}

/// A command to kill: its arguments after `--store ROOT` (given the root), its stdin.
struct Job<'a> {
    tag: &'a str,
    args: &'a dyn Fn(&Path) -> Vec<String>,
    /// Fed in 64 KiB pieces with a pause between them, so that a kill can land anywhere
    /// in the stream.
    stdin: Option<&'a [u8]>,
    /// In the command line of the builders it starts.
    marker: Option<&'a str>,
    /// What the run produced, to compare with an uninterrupted run.
    result: &'a dyn Fn(&Path, &Output) -> String,
    /// Checks of the command's own, after a kill and before the rerun.
    after_kill: &'a dyn Fn(&Path, &str),
    /// Run `firn gc` after the rerun and expect an empty store: whatever the kill left
    /// (invalid paths, temporaries, locks, chroots) is garbage the collector deletes.
    collect_after: bool,
}

fn spawn_job(
    root: &Path,
    job: &Job<'_>,
    out: Stdio,
    err: Stdio,
) -> (Child, Option<std::thread::JoinHandle<()>>) {
    // Build directories of a killed firn stay where it made them: in the test's own
    // TMPDIR, removed with it, not in the machine's /tmp.
    let tmp = root.with_extension("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let mut child = firn_command()
        .arg("--store")
        .arg(root)
        .args((job.args)(root))
        .env("TMPDIR", &tmp)
        .env_remove("FIRN_STORE")
        .stdin(if job.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap();
    let feeder = job.stdin.map(|data| {
        let data = data.to_vec();
        let mut pipe = child.stdin.take().unwrap();
        std::thread::spawn(move || {
            use std::io::Write;
            for piece in data.chunks(64 << 10) {
                // A killed reader closes the pipe: stop feeding.
                if pipe.write_all(piece).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    });
    (child, feeder)
}

fn run_job(root: &Path, job: &Job<'_>) -> Output {
    let (child, feeder) = spawn_job(root, job, Stdio::piped(), Stdio::piped());
    let out = child.wait_with_output().unwrap();
    if let Some(f) = feeder {
        f.join().unwrap();
    }
    out
}

/// Run `job` on a copy of `template` once to time it and to get its result, then on a
/// fresh copy per offset: kill it with SIGKILL there and check the store, the processes
/// and the locks, rerun it and compare the result.
fn kill_at_offsets(template: &Path, job: &Job<'_>) {
    let tag = job.tag;
    let base = tempdir(&format!("crash-{tag}-runs"));
    // Timed twice, the shorter run counts: a load spike during the timing run would
    // put most offsets past the end of the later runs.
    let mut duration = Duration::MAX;
    let mut expected = String::new();
    for _ in 0..2 {
        let reference = base.join("reference");
        copy_tree(template, &reference);
        let t0 = Instant::now();
        let out = run_job(&reference, job);
        duration = duration.min(t0.elapsed());
        assert!(out.status.success(), "{tag}: {}", stderr(&out));
        let result = (job.result)(&reference, &out);
        assert!(
            expected.is_empty() || expected == result,
            "{tag}: not reproducible"
        );
        expected = result;
        remove(&reference);
    }
    let mut killed = 0;
    let mut during_builds = 0;
    for i in 0..OFFSETS {
        let offset = duration * i / OFFSETS;
        let ctx = format!("{tag}: killed after {offset:?} of {duration:?}");
        let root = base.join(format!("kill-{i:02}"));
        copy_tree(template, &root);
        let log = File::create(base.join("killed.stderr")).unwrap();
        let (mut child, feeder) = spawn_job(&root, job, Stdio::null(), Stdio::from(log));
        std::thread::sleep(offset);
        if child.try_wait().unwrap().is_none() {
            // A sandbox root in the store: a build is being set up, runs or is being
            // registered (a readdir, so the kill is not delayed).
            if job.marker.is_some() && store_entries(&root).iter().any(|n| n.ends_with(".chroot")) {
                during_builds += 1;
            }
            child.kill().unwrap();
        }
        let status = child.wait().unwrap();
        if let Some(f) = feeder {
            f.join().unwrap();
        }
        if status.signal() == Some(9) {
            killed += 1;
        } else {
            let log = fs::read_to_string(base.join("killed.stderr")).unwrap();
            assert!(status.success(), "{ctx}: {status}: {log}");
        }

        // Nothing of the killed run is left: not firn's forks (their command line holds
        // the root), not the builders.
        assert_no_process_with(root.to_str().unwrap(), &ctx);
        if let Some(m) = job.marker {
            assert_no_process_with(m, &ctx);
        }
        assert_no_lock_held(&root, &ctx);
        assert_verifies(&root, &ctx);
        (job.after_kill)(&root, &ctx);
        if std::env::var_os("CRASH_DEBUG").is_some() {
            eprintln!("{ctx}: {status}; left {:?}", store_entries(&root));
        }

        let again = run_job(&root, job);
        let err = stderr(&again);
        assert!(again.status.success(), "{ctx}: the rerun failed: {err}");
        assert!(
            !err.contains("waiting for"),
            "{ctx}: the rerun waited: {err}"
        );
        assert_eq!((job.result)(&root, &again), expected, "{ctx}: rerun");
        let v = firn(&root, &["verify", "--check-contents"], None);
        assert!(v.status.success(), "{ctx}: after the rerun: {}", stderr(&v));
        if job.collect_after {
            let gc = firn(&root, &["gc"], None);
            assert!(gc.status.success(), "{ctx}: gc: {}", stderr(&gc));
            let left = store_entries(&root);
            assert!(left.is_empty(), "{ctx}: gc left {left:?}");
        }
        remove(&root);
    }
    // Offsets must have hit the command while it ran (the last ones miss it when a run
    // is faster than the timing run: allow for a loaded machine).
    assert!(
        killed >= OFFSETS / 3,
        "{tag}: only {killed} of {OFFSETS} kills hit a running command ({duration:?})"
    );
    if job.marker.is_some() {
        assert!(
            during_builds >= 2,
            "{tag}: only {during_builds} kills hit a running build"
        );
    }
    eprintln!("{tag}: {killed} of {OFFSETS} kills landed in a {duration:?} run");
    if job.marker.is_some() {
        eprintln!("{tag}: {during_builds} of them during a build");
    }
    remove(&base);
}

fn no_check(_: &Path, _: &str) {}

#[test]
fn sigkill_during_realise() {
    if !can_build() {
        return;
    }
    let template = tempdir("crash-realise");
    let marker = format!("firn-crash-realise-{}", std::process::id());
    // a b → c(a, b), d(b) → e(c, d); two at a time.
    let a = busybox_node(&template, "kill-a", &[], &marker, "0.08");
    let b = busybox_node(&template, "kill-b", &[], &marker, "0.08");
    let c = busybox_node(&template, "kill-c", &[&a, &b], &marker, "0.08");
    let d = busybox_node(&template, "kill-d", &[&b], &marker, "0.08");
    let e = busybox_node(&template, "kill-e", &[&c, &d], &marker, "0.08");
    let args = |_: &Path| -> Vec<String> {
        [
            "--option",
            "sandbox-paths",
            "/bin/busybox",
            "realise",
            "-j2",
            &e,
        ]
        .map(str::to_owned)
        .to_vec()
    };
    kill_at_offsets(
        &template,
        &Job {
            tag: "realise",
            args: &args,
            stdin: None,
            marker: Some(&marker),
            result: &paths_and_hashes,
            after_kill: &no_check,
            collect_after: true,
        },
    );
    remove(&template);
}

/// A deterministic pseudo-random byte stream (xorshift), so sources do not compress.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A tree of about 3 MB: big files, small ones, a subdirectory, an executable, a symlink.
fn make_tree(dir: &Path) {
    fs::create_dir_all(dir.join("sub")).unwrap();
    for i in 0..16u64 {
        fs::write(dir.join(format!("big-{i}")), noise(i + 1, 200_000)).unwrap();
    }
    for i in 0..24 {
        fs::write(dir.join("sub").join(format!("small-{i}")), format!("{i}\n")).unwrap();
    }
    let exe = dir.join("run.sh");
    fs::write(&exe, "#!/bin/sh\necho hi\n").unwrap();
    fs::set_permissions(&exe, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("sub/small-1", dir.join("link")).unwrap();
}

#[test]
fn sigkill_during_add() {
    if !have_nix() {
        return;
    }
    let src = tempdir("crash-add-src").join("tree");
    make_tree(&src);
    // The store does not exist yet: the first kills land while it is being created.
    let template = tempdir("crash-add");
    let src_arg = src.to_str().unwrap().to_owned();
    let args = move |_: &Path| vec!["add".to_owned(), src_arg.clone()];
    kill_at_offsets(
        &template,
        &Job {
            tag: "add",
            args: &args,
            stdin: None,
            marker: None,
            result: &paths_and_hashes,
            after_kill: &no_check,
            collect_after: true,
        },
    );
    remove(&template);
    remove(src.parent().unwrap());
}

#[test]
fn sigkill_during_restore() {
    if !have_nix() {
        return;
    }
    let template = tempdir("crash-restore");
    let src = template.join("tree");
    make_tree(&src);
    let p = ok(firn(&template, &["add", src.to_str().unwrap()], None));
    remove(&src);
    let nar = firn(&template, &["dump", p.trim()], None).stdout;
    assert!(nar.len() > 3_000_000);
    let hash = |target: &Path| {
        let args = [
            "hash",
            "--type",
            "sha256",
            "--base32",
            target.to_str().unwrap(),
        ];
        format!("sha256:{}", ok(run(firn_bin(), &args, None)).trim())
    };
    let expected_hash = ok(firn(&template, &["query", "--hash", p.trim()], None));
    let args = |root: &Path| {
        vec![
            "restore".to_owned(),
            root.join("restored").to_str().unwrap().to_owned(),
        ]
    };
    // The restored tree is there whole or not at all (then only a temporary sibling
    // may be left); `restore` refuses an existing target, so a complete one is moved
    // away before the rerun.
    let after_kill = |root: &Path, ctx: &str| {
        let target = root.join("restored");
        if fs::symlink_metadata(&target).is_ok() {
            let got = hash(&target);
            assert_eq!(
                got,
                expected_hash.trim(),
                "{ctx}: an incomplete restore is at the target"
            );
            remove(&target);
        }
        for e in fs::read_dir(root).unwrap().flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            assert!(
                n == "nix" || n.starts_with(".restored.tmp-"),
                "{ctx}: restore left '{n}'"
            );
        }
    };
    let result = |root: &Path, _: &Output| hash(&root.join("restored"));
    kill_at_offsets(
        &template,
        &Job {
            tag: "restore",
            args: &args,
            stdin: Some(&nar),
            marker: None,
            result: &result,
            after_kill: &after_kill,
            collect_after: false,
        },
    );
    remove(&template);
}

#[test]
fn sigkill_during_derivation_add() {
    if !have_nix() {
        return;
    }
    // A chain of derivations with sources: adding one more hashes them all (modulo).
    let template = tempdir("crash-drv-add");
    let scratch = template.join("scratch");
    fs::create_dir_all(&scratch).unwrap();
    let mut files = Vec::new();
    for i in 0..30 {
        let f = scratch.join(format!("src-{i}"));
        fs::write(&f, format!("source {i}\n")).unwrap();
        files.push(f.to_str().unwrap().to_owned());
    }
    let mut args = vec!["add"];
    args.extend(files.iter().map(String::as_str));
    let srcs = ok(firn(&template, &args, None));
    let srcs: Vec<&str> = srcs.lines().collect();
    remove(&scratch);
    let mut prev: Vec<String> = Vec::new();
    for i in 0..15 {
        let drvs: Vec<&str> = prev.iter().map(String::as_str).collect();
        let json = drv_json(
            &format!("chain-{i}"),
            "/bin/sh",
            &["-c", "echo > $out"],
            &[],
            &srcs[i * 2..i * 2 + 2],
            &drvs,
        );
        prev.push(add_drv(&template, &json));
    }
    let drvs: Vec<&str> = prev.iter().map(String::as_str).collect();
    let json = drv_json("top", "/bin/sh", &["-c", "echo > $out"], &[], &srcs, &drvs);
    let args = |_: &Path| vec!["derivation".to_owned(), "add".to_owned()];
    kill_at_offsets(
        &template,
        &Job {
            tag: "derivation-add",
            args: &args,
            stdin: Some(json.as_bytes()),
            marker: None,
            result: &paths_and_hashes,
            after_kill: &no_check,
            collect_after: true,
        },
    );
    remove(&template);
}

#[test]
fn sigkill_during_gc() {
    if !have_nix() {
        return;
    }
    // Dead and live: 200 files, 20 trees, and two chains of derivations over sources,
    // one rooted (kept with its sources), one not (deleted referrers first).
    let template = tempdir("crash-gc");
    let scratch = template.join("scratch");
    fs::create_dir_all(&scratch).unwrap();
    let mut files = Vec::new();
    for i in 0..200 {
        let f = scratch.join(format!("file-{i}"));
        fs::write(&f, format!("file {i}\n")).unwrap();
        files.push(f.to_str().unwrap().to_owned());
    }
    for i in 0..20 {
        let t = scratch.join(format!("tree-{i}"));
        fs::create_dir_all(&t).unwrap();
        for j in 0..20 {
            fs::write(t.join(format!("f{j}")), format!("{i} {j}\n")).unwrap();
        }
        files.push(t.to_str().unwrap().to_owned());
    }
    let mut args = vec!["add"];
    args.extend(files.iter().map(String::as_str));
    let added = ok(firn(&template, &args, None));
    let added: Vec<&str> = added.lines().collect();
    remove(&scratch);
    let mut tops = Vec::new();
    for chain in ["kept", "dead"] {
        let mut prev: Vec<String> = Vec::new();
        for i in 0..10 {
            let drvs: Vec<&str> = prev.iter().map(String::as_str).collect();
            let k = if chain == "kept" { i } else { 10 + i };
            let json = drv_json(
                &format!("{chain}-{i}"),
                "/bin/sh",
                &["-c", "echo > $out"],
                &[],
                &added[k * 5..k * 5 + 5],
                &drvs,
            );
            prev = vec![add_drv(&template, &json)];
        }
        tops.push(prev.remove(0));
    }
    std::os::unix::fs::symlink(&tops[0], template.join("nix/var/nix/gcroots/keep")).unwrap();
    let args = |_: &Path| vec!["gc".to_owned()];
    // What is left once a collection completed: the rooted chain and its sources.
    let result = |root: &Path, _: &Output| {
        let live = ok(firn(root, &["gc", "--print-live"], None));
        let left: Vec<String> = store_entries(root).into_iter().collect();
        format!("live:\n{live}entries:\n{}", left.join("\n"))
    };
    kill_at_offsets(
        &template,
        &Job {
            tag: "gc",
            args: &args,
            stdin: None,
            marker: None,
            result: &result,
            after_kill: &no_check,
            collect_after: false,
        },
    );
    remove(&template);
}

/// Run `cmd`, giving up (and failing) after `limit`; stdout and stderr go to files.
fn wait_limited(mut child: Child, limit: Duration, what: &str) -> std::process::ExitStatus {
    let t0 = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn interrupt_stops_a_sandboxed_realise_and_cleans_up() {
    if !can_build() || !have_nix() {
        return;
    }
    let base = tempdir("crash-interrupt");
    let root = base.join("root");
    let tmp = base.join("tmp");
    let gate = base.join("gate");
    fs::create_dir_all(&tmp).unwrap();
    fs::create_dir_all(&gate).unwrap();
    let marker = format!("firn-crash-interrupt-{}", std::process::id());
    // `slow` waits for a minute (with a background process) while the gate is bound
    // into the sandbox, and is quick once it is gone.
    let fast = busybox_node(&root, "int-fast", &[], &marker, "0");
    let slow_script = format!(
        ": {marker}; mkdir $out; echo partial > $out/p; \
         if [ -e /gate ]; then /bin/busybox sh -c 'sleep 60; true' {marker}-bg & sleep 60; fi; \
         echo done > $out/d"
    );
    let slow = add_drv(
        &root,
        &drv_json(
            "int-slow",
            "/bin/busybox",
            &["sh", "-c", &slow_script],
            &[],
            &[],
            &[&fast],
        ),
    );
    let top = busybox_node(&root, "int-top", &[&slow], &marker, "0");
    let slow_out = output_of(&root, &slow);
    let sandbox_paths = format!("/bin/busybox /gate={}?", gate.display());
    let realise = |log: &Path| -> Child {
        firn_command()
            .args(["--store", root.to_str().unwrap()])
            .args(["--option", "sandbox-paths", &sandbox_paths])
            .args(["realise", &top])
            .env_remove("FIRN_STORE")
            .env("TMPDIR", &tmp)
            .stdin(Stdio::null())
            .stdout(File::create(log.with_extension("out")).unwrap())
            .stderr(File::create(log).unwrap())
            // Its own process group, as a shell's foreground job.
            .process_group(0)
            .spawn()
            .unwrap()
    };
    let chroots = || -> Vec<String> {
        store_entries(&root)
            .into_iter()
            .filter(|n| n.ends_with(".chroot") || n.contains(".tmp-"))
            .collect()
    };
    for (sig, group) in [(Signal::SIGINT, true), (Signal::SIGTERM, false)] {
        let ctx = format!("{sig} to the {}", if group { "group" } else { "process" });
        let log = base.join(format!("{sig}.log"));
        let child = realise(&log);
        let pid = Pid::from_raw(child.id() as i32);
        // Wait until the slow build runs (its background process is up).
        let t0 = Instant::now();
        while processes_with(&format!("{marker}-bg")).is_empty() {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "{ctx}: the slow build did not start: {}",
                fs::read_to_string(&log).unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // There is something to clean up (so its absence afterwards means something).
        assert!(
            fs::read_dir(&tmp).unwrap().next().is_some(),
            "{ctx}: no build dir"
        );
        assert!(!chroots().is_empty(), "{ctx}: no sandbox root");
        if group {
            killpg(pid, sig).unwrap();
        } else {
            kill(pid, sig).unwrap();
        }
        let status = wait_limited(child, Duration::from_secs(20), &ctx);
        let err = fs::read_to_string(&log).unwrap();
        assert_eq!(status.code(), Some(1), "{ctx}: {status}: {err}");
        let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(errors.len(), 1, "{ctx}: {err}");
        assert!(
            errors[0].contains("interrupted") && errors[0].contains(&top),
            "{ctx}: the message does not say what was interrupted: {err}"
        );
        assert_no_process_with(&marker, &ctx);
        assert_no_process_with(root.to_str().unwrap(), &ctx);
        let left: Vec<_> = fs::read_dir(&tmp)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        assert!(left.is_empty(), "{ctx}: build directories left: {left:?}");
        assert!(
            chroots().is_empty(),
            "{ctx}: left in the store: {:?}",
            chroots()
        );
        // No partial output: the slow build's output is neither valid nor on disk.
        let q = firn(&root, &["query", "--hash", &slow_out], None);
        assert!(
            !q.status.success(),
            "{ctx}: the interrupted output is valid"
        );
        assert!(
            fs::symlink_metadata(root.join(slow_out.trim_start_matches('/'))).is_err(),
            "{ctx}: the partial output is still there"
        );
        assert_no_lock_held(&root, &ctx);
        assert_verifies(&root, &ctx);
    }
    // The fast input was built before the interrupt and stays.
    ok(firn(
        &root,
        &["query", "--hash", &output_of(&root, &fast)],
        None,
    ));
    fs::remove_dir(&gate).unwrap();
    let log = base.join("rerun.log");
    let status = wait_limited(realise(&log), Duration::from_secs(30), "rerun");
    let err = fs::read_to_string(&log).unwrap();
    assert!(status.success(), "rerun: {err}");
    let printed = fs::read_to_string(log.with_extension("out")).unwrap();
    assert_eq!(printed.trim(), output_of(&root, &top));
    assert!(
        fs::read_dir(&tmp).unwrap().next().is_none(),
        "rerun left a build dir"
    );
    assert!(chroots().is_empty(), "rerun left {:?}", chroots());
    assert_verifies(&root, "after the rerun");
    remove(&base);
}

#[test]
fn concurrent_realisers_build_each_derivation_once() {
    if !can_build() || !have_nix() {
        return;
    }
    let root = tempdir("crash-concurrent");
    let marker = format!("firn-crash-concurrent-{}", std::process::id());
    // 5 layers of 6; each node depends on 2 or 3 of the layer before.
    let mut layers: Vec<Vec<String>> = Vec::new();
    for l in 0..5 {
        let mut layer = Vec::new();
        for k in 0..6 {
            let deps: Vec<&str> = match layers.last() {
                None => Vec::new(),
                Some(prev) => {
                    let mut d = vec![prev[k].as_str(), prev[(k + 1) % 6].as_str()];
                    if k % 2 == 0 {
                        d.push(prev[(k + 3) % 6].as_str());
                    }
                    d
                }
            };
            layer.push(busybox_node(
                &root,
                &format!("dag-{l}-{k}"),
                &deps,
                &marker,
                "0.05",
            ));
        }
        layers.push(layer);
    }
    let all: BTreeSet<&String> = layers.iter().flatten().collect();
    assert_eq!(all.len(), 30);
    let mut args = vec![
        "--store",
        root.to_str().unwrap(),
        "--option",
        "sandbox-paths",
        "/bin/busybox",
        "realise",
        "-j2",
    ];
    args.extend(layers[4].iter().map(String::as_str));
    let t0 = Instant::now();
    let children: Vec<Child> = (0..3)
        .map(|_| {
            firn_command()
                .args(&args)
                .env_remove("FIRN_STORE")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outs: Vec<Output> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    let took = t0.elapsed();
    let mut built: BTreeMap<String, usize> = BTreeMap::new();
    for o in &outs {
        assert!(o.status.success(), "{}", stderr(o));
        assert_eq!(o.stdout, outs[0].stdout);
        for line in stderr(o).lines() {
            if let Some(drv) = line
                .strip_prefix("building '")
                .and_then(|l| l.strip_suffix("'..."))
            {
                *built.entry(drv.to_owned()).or_default() += 1;
            }
        }
    }
    let printed = String::from_utf8_lossy(&outs[0].stdout);
    assert_eq!(printed.lines().count(), 6, "{printed}");
    let twice: Vec<_> = built.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "built more than once: {twice:?}");
    let built: BTreeSet<&String> = built.keys().collect();
    assert_eq!(built, all, "not every derivation was built");
    assert_no_process_with(&marker, "after the realisers");
    assert_verifies(&root, "after the realisers");
    eprintln!("3 realisers of a 30-node DAG: {took:?}");
    remove(&root);
}

/// Without keep-going, a failure stops the builds still running: they are killed and
/// their build directories and sandbox roots removed too.
#[test]
fn builds_cancelled_by_a_failure_are_cleaned_up() {
    if !can_build() {
        return;
    }
    let base = tempdir("crash-cancel");
    let root = base.join("root");
    let tmp = base.join("tmp");
    fs::create_dir_all(&tmp).unwrap();
    let marker = format!("firn-crash-cancel-{}", std::process::id());
    let slow = add_drv(
        &root,
        &drv_json(
            "cancel-slow",
            "/bin/busybox",
            &["sh", "-c", &format!(": {marker}; mkdir $out; sleep 60")],
            &[],
            &[],
            &[],
        ),
    );
    let failing = add_drv(
        &root,
        &drv_json(
            "cancel-fail",
            "/bin/busybox",
            &["sh", "-c", "sleep 0.5; exit 1"],
            &[],
            &[],
            &[],
        ),
    );
    let log = base.join("log");
    let child = firn_command()
        .args(["--store", root.to_str().unwrap()])
        .args(["--option", "sandbox-paths", "/bin/busybox"])
        .args(["realise", "-j2", &slow, &failing])
        .env_remove("FIRN_STORE")
        .env("TMPDIR", &tmp)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let status = wait_limited(child, Duration::from_secs(20), "realise");
    let err = fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(100), "{err}");
    assert!(err.contains(&format!("building '{slow}'")), "{err}");
    assert_no_process_with(&marker, "cancelled");
    let left: Vec<_> = fs::read_dir(&tmp)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "build directories left: {left:?}");
    let left: Vec<String> = store_entries(&root)
        .into_iter()
        .filter(|n| n.ends_with(".chroot") || n.contains(".tmp-"))
        .collect();
    assert!(left.is_empty(), "left in the store: {left:?}");
    assert_verifies(&root, "cancelled");
    remove(&base);
}
