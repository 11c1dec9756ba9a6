//! `firn realise` with `--option sandbox false`, end to end: the cases of
//! nix-2.8-vectors whose builders need only shell built-ins (the host's /bin/sh runs
//! them: the sandbox, with busybox as /bin/sh, is the next issue) give Nix's output
//! paths, NAR hashes, sizes, references, messages and exit codes; scheduling (`-j`,
//! `--keep-going`) and two concurrent realisers are checked with busybox builders.
//! Building needs root (build users, a mount namespace): in CI these tests run.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod common;
use common::*;

use std::fs;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Instant;

fn firn(root: &Path, args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut all = vec![
        "--store",
        root.to_str().unwrap(),
        "--option",
        "sandbox",
        "false",
    ];
    all.extend_from_slice(args);
    run(firn_bin(), &all, stdin)
}

fn instantiate(root: &Path, file: &str) -> String {
    let out = Command::new("nix-instantiate")
        .args([
            "--store",
            root.to_str().unwrap(),
            "--option",
            "substituters",
            "",
        ])
        .arg(fixtures().join("exprs").join(file))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// The registered narHash, narSize and references of the path an `.info` file of
/// nix-2.8-vectors describes (`path`, `narHash`, `narSize`, `reference` lines) are Nix's.
fn assert_matches_nix_info(root: &Path, info: &str, case: &str) {
    let field = |k: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(k))
            .unwrap_or_default()
            .to_owned()
    };
    let path = field("path ");
    let q =
        |flag: &str| String::from_utf8(firn(root, &["query", flag, &path], None).stdout).unwrap();
    assert_eq!(q("--hash").trim(), field("narHash "), "{case} {path}");
    assert_eq!(q("--size").trim(), field("narSize "), "{case} {path}");
    let refs = q("--references");
    let mut ours: Vec<&str> = refs.lines().collect();
    ours.sort();
    let mut theirs: Vec<&str> = info
        .lines()
        .filter_map(|l| l.strip_prefix("reference "))
        .collect();
    theirs.sort();
    assert_eq!(ours, theirs, "{case} {path}");
}

fn vector(case: &str, file: &str) -> String {
    fs::read_to_string(
        fixtures()
            .join("nix-2.8-vectors/cases")
            .join(case)
            .join(file),
    )
    .unwrap()
}

#[test]
fn vector_cases_build_like_nix() {
    if !can_build() {
        return;
    }
    let root = tempdir("vectors");
    for (case, file) in [
        ("single", "single.nix"),
        ("escapes", "escapes.nix"),
        ("fixed-flat", "fixed-flat.nix"),
        ("fixed-flat-sri", "fixed-flat-sri.nix"),
        ("fixed-rec-sha1", "fixed-rec-sha1.nix"),
        ("verify-victim", "verify-victim.nix"),
    ] {
        let drv = instantiate(&root, file);
        let out = firn(&root, &["realise", &drv], None);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{case}: {stderr}");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            vector(case, "realise.stdout"),
            "{case}"
        );
        // narHash, narSize, deriver, references: as `nix-store -q` reports for Nix's build.
        // narHash, narSize and references as Nix recorded them for its own build.
        assert_matches_nix_info(&root, &vector(case, "nar/out.info"), case);
        // Realising again builds nothing.
        let again = firn(&root, &["realise", &drv], None);
        assert!(again.status.success());
        assert!(
            !String::from_utf8_lossy(&again.stderr).contains("building"),
            "{case}: rebuilt"
        );
    }
    assert_verifies(&root, "after the builds");
    remove(&root);
}

#[test]
fn failures_exit_and_say_what_nix_says() {
    if !can_build() {
        return;
    }
    let root = tempdir("failures");
    // fail-exit: exit 100, Nix's message, the builder's stderr in the log.
    let drv = instantiate(&root, "fail-exit.nix");
    let out = firn(&root, &["realise", &drv], None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(100), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "error: builder for '{drv}' failed with exit code 3"
        )),
        "{stderr}"
    );
    assert!(stderr.contains("about to fail"));
    let log = firn(&root, &["log", &drv], None);
    assert_eq!(
        String::from_utf8_lossy(&log.stdout),
        vector("fail-exit", "build.log")
    );
    // As `nix-store -l`: several paths, their logs in order; the first without one
    // stops there, in Nix's words.
    let twice = firn(&root, &["log", &drv, &drv], None);
    assert_eq!(
        String::from_utf8_lossy(&twice.stdout),
        vector("fail-exit", "build.log").repeat(2)
    );
    let nothing = "/nix/store/00000000000000000000000000000000-nothing";
    let missing = firn(&root, &["log", &drv, nothing], None);
    assert_eq!(missing.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&missing.stdout),
        vector("fail-exit", "build.log")
    );
    assert_eq!(
        String::from_utf8_lossy(&missing.stderr),
        format!("error: build log of derivation '{nothing}' is not available\n")
    );
    // fail-no-output: exit 1.
    let drv = instantiate(&root, "fail-no-output.nix");
    let out = firn(&root, &["realise", &drv], None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("failed to produce output path for output 'out' at"),
        "{stderr}"
    );
    // fixed-wrong: exit 102, and the content registered under the path it hashes to.
    let drv = instantiate(&root, "fixed-wrong.nix");
    let out = firn(&root, &["realise", &drv], None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(102), "{stderr}");
    assert!(
        stderr.contains("hash mismatch in fixed-output derivation"),
        "{stderr}"
    );
    assert!(
        stderr.contains("got: sha256-cVc7kiqHq8P9GpV/LPoJ2eFpmFZ92HioXhIWYRJ1GAY="),
        "{stderr}"
    );
    let got = "/nix/store/mgll3wg0yx8ch5rss14lj7w8lncq3avf-fixed-wrong";
    let d = firn(&root, &["query", "--deriver", got], None);
    assert_eq!(String::from_utf8_lossy(&d.stdout).trim(), drv);
    let v = firn(&root, &["verify", "--check-contents"], None);
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
    remove(&root);
}

/// A busybox derivation, added with `firn derivation add`.
fn busybox_drv(root: &Path, name: &str, script: &str, inputs: &[&str]) -> String {
    let input_drvs: Vec<String> = inputs
        .iter()
        .map(|d| format!("\"{d}\": [\"out\"]"))
        .collect();
    let json = format!(
        r#"{{"name":"{name}","outputs":{{"out":{{}}}},"inputSrcs":[],"inputDrvs":{{{}}},"system":"x86_64-linux","builder":"/bin/busybox","args":["sh","-c",{}],"env":{{"name":"{name}","out":"","builder":"/bin/busybox","system":"x86_64-linux"}}}}"#,
        input_drvs.join(","),
        json_string(script)
    );
    let out = firn(root, &["derivation", "add"], Some(json.as_bytes()));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

#[test]
fn max_jobs_runs_builds_in_parallel() {
    if !can_build() {
        return;
    }
    let root = tempdir("jobs");
    let a = busybox_drv(&root, "par-a", "sleep 2; echo a > $out", &[]);
    let b = busybox_drv(&root, "par-b", "sleep 2; echo b > $out", &[]);
    let t0 = Instant::now();
    let out = firn(&root, &["realise", "-j2", &a, &b], None);
    let parallel = t0.elapsed();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 2);
    // Two 2 s builds: together well under 4 s, one after the other at least 4 s.
    assert!(parallel.as_millis() < 3500, "-j2 took {parallel:?}");
    let c = busybox_drv(&root, "ser-c", "sleep 2; echo c > $out", &[]);
    let d = busybox_drv(&root, "ser-d", "sleep 2; echo d > $out", &[]);
    let t0 = Instant::now();
    let out = firn(&root, &["realise", "-j1", &c, &d], None);
    assert!(out.status.success());
    assert!(
        t0.elapsed().as_millis() >= 2000,
        "-j1 took {:?}",
        t0.elapsed()
    );
    remove(&root);
}

#[test]
fn keep_going_builds_the_independent_rest() {
    if !can_build() {
        return;
    }
    let root = tempdir("keepgoing");
    let bad = busybox_drv(&root, "bad", "exit 1", &[]);
    let dependent = busybox_drv(&root, "dependent", "echo x > $out", &[&bad]);
    let good = busybox_drv(&root, "good", "sleep 0.2; echo ok > $out", &[]);
    let out = firn(&root, &["realise", "--keep-going", &dependent, &good], None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(100), "{stderr}");
    assert!(stderr.contains("1 dependency of derivation"), "{stderr}");
    let q = firn(&root, &["query", "--outputs", &good], None);
    let good_out = String::from_utf8(q.stdout).unwrap();
    let v = firn(&root, &["path-info", good_out.trim()], None);
    assert!(
        v.status.success(),
        "the independent build was not done: {stderr}"
    );
    // Without --keep-going the first failure stops the rest.
    let root2 = tempdir("stop");
    let bad = busybox_drv(&root2, "bad", "exit 1", &[]);
    let slow = busybox_drv(&root2, "slow", "sleep 0.5; echo ok > $out", &[]);
    let out = firn(&root2, &["realise", &bad, &slow], None);
    assert_eq!(out.status.code(), Some(100));
    remove(&root);
    remove(&root2);
}

#[test]
fn concurrent_realisers_build_once() {
    if !can_build() {
        return;
    }
    let root = tempdir("once");
    let counter = root.join("count");
    fs::write(&counter, b"").unwrap();
    fs::set_permissions(
        &counter,
        std::os::unix::fs::PermissionsExt::from_mode(0o666),
    )
    .unwrap();
    let script = format!(
        "echo built >> {}; sleep 1; echo x > $out",
        counter.display()
    );
    let drv = busybox_drv(&root, "once", &script, &[]);
    let spawn = || {
        firn_command()
            .args([
                "--store",
                root.to_str().unwrap(),
                "--option",
                "sandbox",
                "false",
                "realise",
                &drv,
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    assert!(b.status.success(), "{}", String::from_utf8_lossy(&b.stderr));
    assert_eq!(a.stdout, b.stdout);
    assert_eq!(
        fs::read_to_string(&counter).unwrap().lines().count(),
        1,
        "built more than once"
    );
    remove(&root);
}

/// Ctrl-C / SIGTERM: the builder and what it started die, the build directory and the
/// partial output are removed, one error line, non-zero exit, the store still verifies
/// and a rerun completes.
#[test]
fn interrupt_cleans_up() {
    if !can_build() {
        return;
    }
    let root = tempdir("interrupt");
    let gate = root.join("slow");
    fs::write(&gate, b"").unwrap();
    fs::set_permissions(&gate, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
    let marker = format!("firn-interrupt-marker-{}", std::process::id());
    // Slow (and leaves a background process) only while the gate file exists.
    let script = format!(
        "echo partial > $out; if [ -e {g} ]; then /bin/busybox sh -c 'sleep 60; true' {marker} & sleep 60; fi; echo done > $out",
        g = gate.display()
    );
    let drv = busybox_drv(&root, "interrupt-me", &script, &[]);
    for sig in ["INT", "TERM"] {
        let child = firn_command()
            .args([
                "--store",
                root.to_str().unwrap(),
                "--option",
                "sandbox",
                "false",
                "realise",
                &drv,
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(1500));
        // The background process is there before the interrupt (so its absence after
        // means something).
        let before = Command::new("pgrep")
            .args(["-f", &marker])
            .output()
            .unwrap();
        assert!(
            !before.stdout.is_empty(),
            "{sig}: the test builder did not start its background process"
        );
        Command::new("kill")
            .args([&format!("-{sig}"), &child.id().to_string()])
            .status()
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{sig}: {stderr}");
        let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(errors.len(), 1, "{sig}: {stderr}");
        // It says by what and what was stopped mid-build.
        assert!(
            errors[0].contains(&format!("interrupted by SIG{sig} while building '{drv}'")),
            "{sig}: {stderr}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
        let left = Command::new("pgrep")
            .args(["-f", &marker])
            .output()
            .unwrap();
        assert!(left.stdout.is_empty(), "{sig}: a builder process survived");
        let dirs: Vec<_> = fs::read_dir(std::env::temp_dir())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains("interrupt-me"))
            .collect();
        assert!(dirs.is_empty(), "{sig}: build directory left: {dirs:?}");
        let v = firn(&root, &["verify", "--check-contents"], None);
        assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
    }
    fs::remove_file(&gate).unwrap();
    let out = firn(&root, &["realise", &drv], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    remove(&root);
}

fn firn_opts(root: &Path, opts: &[(&str, &str)], args: &[&str]) -> Output {
    let mut all: Vec<String> = Vec::new();
    for (k, v) in opts {
        all.extend(["--option".to_owned(), (*k).to_owned(), (*v).to_owned()]);
    }
    all.extend(args.iter().map(|s| (*s).to_owned()));
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    firn(root, &refs, None)
}

#[test]
fn time_and_log_limits_kill_the_build() {
    if !can_build() {
        return;
    }
    let root = tempdir("limits");
    let t = busybox_drv(&root, "too-slow", "sleep 30; echo x > $out", &[]);
    let t0 = Instant::now();
    let out = firn_opts(&root, &[("timeout", "1")], &["realise", &t]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(101), "{stderr}");
    assert!(stderr.contains("timed out after 1 seconds"), "{stderr}");
    assert!(t0.elapsed().as_secs() < 10);

    let s = busybox_drv(
        &root,
        "too-quiet",
        "echo started; sleep 30; echo x > $out",
        &[],
    );
    let out = firn_opts(&root, &[("max-silent-time", "1")], &["realise", &s]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(101), "{stderr}");
    assert!(
        stderr.contains("timed out after 1 seconds of silence"),
        "{stderr}"
    );

    let l = busybox_drv(
        &root,
        "too-chatty",
        "i=0; while [ $i -lt 200 ]; do echo 0123456789; i=$((i+1)); done; sleep 30; echo x > $out",
        &[],
    );
    let out = firn_opts(&root, &[("max-build-log-size", "100")], &["realise", &l]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    // Nix's wording, and the derivation named (Nix: "building of 'DRV!*' from .drv
    // file killed after …").
    assert!(
        stderr.contains(&format!(
            "error: building '{l}' killed after writing more than 100 bytes of log output"
        )),
        "{stderr}"
    );
    let v = firn(&root, &["verify", "--check-contents"], None);
    assert!(v.status.success());
    remove(&root);
}

/// A builder that closes its output and goes on working is waited for (Nix 2.8 kills it
/// on EOF, #2176), in the sandbox and out of it, and firn does not spin meanwhile: its
/// output's end is always readable, so the worker stops polling it and looks at the
/// build on a timer.
#[test]
fn builder_closing_its_output_is_not_killed() {
    if !can_build() {
        return;
    }
    for sandbox in ["false", "true"] {
        let root = tempdir(&format!("eof-{sandbox}"));
        let d = busybox_drv(
            &root,
            "closes-output",
            "echo bye; exec >&- 2>&-; sleep 1; echo done > $out",
            &[],
        );
        let mut child = firn_command()
            .args(["--store", root.to_str().unwrap()])
            .args(["--option", "sandbox", sandbox])
            .args(["--option", "sandbox-paths", "/bin/busybox", "realise", &d])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // firn's own CPU time (utime + stime, in USER_HZ = 100 ticks a second), read
        // until it exits: a worker polling the ended output would use about the whole
        // second of the builder's sleep.
        let stat = format!("/proc/{}/stat", child.id());
        let (mut ticks, mut samples) = (0u64, 0);
        while child.try_wait().unwrap().is_none() {
            if let Ok(text) = fs::read_to_string(&stat) {
                samples += 1;
                let fields: Vec<&str> = text
                    .rsplit(')')
                    .next()
                    .unwrap()
                    .split_whitespace()
                    .collect();
                ticks = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "sandbox {sandbox}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // The build sleeps a second: its CPU time was seen while it ran, not skipped.
        assert!(
            samples >= 10,
            "sandbox {sandbox}: only {samples} samples of firn's CPU"
        );
        assert!(
            ticks < 40,
            "sandbox {sandbox}: firn used {ticks} ticks of CPU"
        );
        let path = String::from_utf8(out.stdout).unwrap();
        let dump = firn(&root, &["dump", path.trim()], None);
        assert!(String::from_utf8_lossy(&dump.stdout).contains("done"));
        remove(&root);
    }
}

/// Every case of nix-2.8-vectors, built in the sandbox with busybox as /bin/sh (as the
/// vectors were made): same exit code, same output paths, and for every output Nix
/// recorded, the same narHash, narSize and references. The probes (env-probe,
/// fod-probe, and structured, which copies `ls -la /build` and its environment into
/// its output) record identities, times and Nix 2.8's host-side NIX_ATTRS_* paths, so
/// only their exit code is compared; the plan tests check their environments.
#[test]
fn every_vector_case_builds_in_the_sandbox_like_nix() {
    if !can_build() {
        return;
    }
    let root = tempdir("sandbox-vectors");
    let list = fs::read_to_string(fixtures().join("nix-2.8-vectors/cases.list")).unwrap();
    let mut built = 0;
    for line in list
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (case, file, attr) = (f[0], f[1], f[2]);
        let mut args = vec![
            "--store".to_owned(),
            root.to_str().unwrap().to_owned(),
            "--option".to_owned(),
            "substituters".to_owned(),
            String::new(),
            fixtures()
                .join("exprs")
                .join(file)
                .to_str()
                .unwrap()
                .to_owned(),
        ];
        if attr != "-" {
            args.extend(["-A".to_owned(), attr.to_owned()]);
        }
        let inst = Command::new("nix-instantiate")
            .args(&args)
            .output()
            .unwrap();
        assert!(
            inst.status.success(),
            "{case}: {}",
            String::from_utf8_lossy(&inst.stderr)
        );
        let drv = String::from_utf8(inst.stdout)
            .unwrap()
            .trim()
            .split('!')
            .next()
            .unwrap()
            .to_owned();
        let out = firn_command()
            .args([
                "--store",
                root.to_str().unwrap(),
                "--option",
                "sandbox-paths",
                "/bin/sh=/bin/busybox",
                "realise",
                &drv,
            ])
            .env("PROBE_IMPURE_VAR", "from-caller")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let want_rc: i32 = vector(case, "realise.rc").trim().parse().unwrap();
        assert_eq!(out.status.code(), Some(want_rc), "{case}: {stderr}");
        if ["env-probe", "fod-probe", "structured"].contains(&case) {
            continue;
        }
        if want_rc == 0 {
            assert_eq!(
                String::from_utf8_lossy(&out.stdout),
                vector(case, "realise.stdout"),
                "{case}"
            );
        }
        let nar_dir = fixtures()
            .join("nix-2.8-vectors/cases")
            .join(case)
            .join("nar");
        for e in fs::read_dir(&nar_dir).into_iter().flatten() {
            let p = e.unwrap().path();
            if p.extension().is_none_or(|x| x != "info") {
                continue;
            }
            assert_matches_nix_info(&root, &fs::read_to_string(&p).unwrap(), case);
            built += 1;
        }
    }
    assert!(built >= 15, "only {built} outputs compared");
    assert_verifies(&root, "after the builds");
    remove(&root);
}

/// `--check` rebuilds and compares: same output → 0; different → 104, and with -K the
/// new output is kept as `<out>.check`, as Nix does.
#[test]
fn check_finds_nondeterminism() {
    if !can_build() {
        return;
    }
    let root = tempdir("check");
    let sandboxed = |args: &[&str]| {
        let mut all = vec![
            "--store",
            root.to_str().unwrap(),
            "--option",
            "sandbox-paths",
            "/bin/sh=/bin/busybox /bin/busybox",
        ];
        all.extend_from_slice(args);
        run(firn_bin(), &all, None)
    };
    let det = busybox_drv(&root, "deterministic", "echo same > $out", &[]);
    let nondet = busybox_drv(
        &root,
        "nondet",
        "cat /proc/sys/kernel/random/uuid > $out",
        &[],
    );
    for d in [&det, &nondet] {
        let out = sandboxed(&["realise", d]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = sandboxed(&["realise", "--check", &det]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = sandboxed(&["realise", "--check", "-K", &nondet]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(104), "{stderr}");
    assert!(stderr.contains("may not be deterministic"), "{stderr}");
    let q = firn(&root, &["query", "--outputs", &nondet], None);
    let outp = String::from_utf8(q.stdout).unwrap();
    let check = root.join(format!("{}.check", outp.trim().trim_start_matches('/')));
    assert!(check.exists(), "no {}", check.display());
    // The registered output is untouched and still verifies.
    let v = firn(&root, &["verify", "--check-contents"], None);
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
    remove(&root);
}

/// On a terminal a status line `[done/running/total] building NAME: last line` is
/// redrawn under the scrolling log; without one, plain lines only.
#[test]
fn progress_line_on_a_terminal_only() {
    if !can_build() {
        return;
    }
    let root = tempdir("progress");
    let d = busybox_drv(
        &root,
        "progress-demo",
        "for i in 1 2 3; do echo step $i; sleep 0.3; done; echo x > $out",
        &[],
    );
    let cmd = format!(
        "{} --store {} --option sandbox false realise {d}",
        firn_bin(),
        root.display()
    );
    let typescript = root.join("typescript");
    let st = command_isolated("script")
        .args(["-qc", &cmd, typescript.to_str().unwrap()])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    let seen = String::from_utf8_lossy(&fs::read(&typescript).unwrap()).into_owned();
    assert!(
        seen.contains("\x1b[K[0/1/1] building progress-demo: step"),
        "{seen:?}"
    );
    assert!(seen.contains("step 3"));
    // Not a terminal: no escape sequences at all.
    let d2 = busybox_drv(&root, "progress-plain", "echo hi; echo x > $out", &[]);
    let out = firn(&root, &["realise", &d2], None);
    assert!(out.status.success());
    assert!(!String::from_utf8_lossy(&out.stderr).contains('\x1b'));
    remove(&root);
}

/// `--dry-run` builds nothing; `--json` gives one object per derivation; `--add-root`
/// makes an indirect GC root that `query --roots` sees; `-K` keeps a failed build's
/// directory and says where.
#[test]
fn dry_run_json_add_root_keep_failed() {
    if !can_build() {
        return;
    }
    let root = tempdir("flags");
    let d = busybox_drv(&root, "flags-ok", "echo hi; echo x > $out", &[]);
    let out = firn(&root, &["realise", "--dry-run", &d], None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && out.stdout.is_empty(), "{stderr}");
    assert!(
        stderr.contains("this derivation will be built:") && !stderr.contains("building '"),
        "{stderr}"
    );
    let outp = String::from_utf8(firn(&root, &["query", "--outputs", &d], None).stdout).unwrap();
    assert!(!root.join(outp.trim().trim_start_matches('/')).exists());

    let link = root.join("result");
    let out = firn(
        &root,
        &[
            "realise",
            "--json",
            "--add-root",
            link.to_str().unwrap(),
            &d,
        ],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json = String::from_utf8(out.stdout).unwrap();
    assert!(json.starts_with("[{\"drvPath\":"), "{json}");
    assert!(
        json.contains("\"status\":\"Built\"") && json.contains("\"success\":true"),
        "{json}"
    );
    assert!(
        json.contains(&format!("\"out\":\"{}\"", outp.trim())),
        "{json}"
    );
    assert_eq!(fs::read_link(&link).unwrap().to_str().unwrap(), outp.trim());
    let roots =
        String::from_utf8(firn(&root, &["query", "--roots", outp.trim()], None).stdout).unwrap();
    assert!(
        roots.contains(&format!("{} -> {}", link.display(), outp.trim())),
        "{roots}"
    );

    let bad = busybox_drv(
        &root,
        "flags-bad",
        "echo partial > $NIX_BUILD_TOP/left; exit 2",
        &[],
    );
    let out = firn(&root, &["realise", "-K", &bad], None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(100), "{stderr}");
    let kept = stderr
        .lines()
        .find_map(|l| l.strip_prefix("note: keeping build directory '"))
        .map(|l| l.trim_end_matches('\'').to_owned())
        .unwrap_or_else(|| panic!("no keep note: {stderr}"));
    assert_eq!(
        fs::read_to_string(Path::new(&kept).join("left")).unwrap(),
        "partial\n"
    );
    remove(Path::new(&kept));
    remove(&root);
}

const GC_WARNING: &str =
    "warning: you did not specify '--add-root'; the result might be removed by the garbage collector";

/// What `realise` prints is what `nix-store -r` prints, per argument in order (a
/// repeated argument again, each argument's paths sorted), and with `--add-root LINK`
/// the roots instead of the paths, named as Nix names them (`LINK`, then `LINK-N` for
/// the N-th argument, `-NAME` for an output other than `out`), pointing where Nix's do;
/// without `--add-root`, Nix's warning that the results may be collected, once.
#[test]
fn realise_prints_and_roots_per_argument_as_nix_does() {
    if !can_build() || !have_nix() {
        return;
    }
    let root = tempdir("realise-order");
    let mut seen = Vec::new();
    for tool in ["nix", "firn"] {
        let store = root.join(format!("{tool}-store"));
        let drv = instantiate(&store, "multi.nix");
        let file = root.join("plain.txt");
        fs::write(&file, b"plain\n").unwrap();
        let plain = String::from_utf8(firn(&store, &["add", file.to_str().unwrap()], None).stdout)
            .unwrap()
            .trim()
            .to_owned();
        let links = root.join(format!("{tool}-links"));
        fs::create_dir_all(&links).unwrap();
        let link = links.join("r");
        let dev = format!("{drv}!dev");
        let run_tool = |extra: &[&str]| -> Output {
            let mut args = vec![drv.as_str(), plain.as_str(), dev.as_str(), drv.as_str()];
            args.extend_from_slice(extra);
            match tool {
                "nix" => {
                    let mut all = vec![
                        "--store",
                        store.to_str().unwrap(),
                        "--option",
                        "substituters",
                        "",
                        "--option",
                        "sandbox-paths",
                        "/bin/sh=/bin/busybox",
                        "-r",
                    ];
                    all.extend(args);
                    run("nix-store", &all, None)
                }
                _ => {
                    let mut all = vec![
                        "--store",
                        store.to_str().unwrap(),
                        "--option",
                        "sandbox-paths",
                        "/bin/sh=/bin/busybox",
                        "realise",
                    ];
                    all.extend(args);
                    run(firn_bin(), &all, None)
                }
            }
        };
        let plain_out = run_tool(&[]);
        assert!(
            plain_out.status.success(),
            "{tool}: {}",
            String::from_utf8_lossy(&plain_out.stderr)
        );
        let rooted = run_tool(&["--add-root", link.to_str().unwrap()]);
        assert!(rooted.status.success(), "{tool}");
        let mut made: Vec<(String, String)> = fs::read_dir(&links)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let target = fs::read_link(e.path()).unwrap();
                (
                    e.file_name().to_string_lossy().into_owned(),
                    target.display().to_string(),
                )
            })
            .collect();
        made.sort();
        let text = |o: &Output| {
            String::from_utf8_lossy(&o.stdout).replace(&links.display().to_string(), "LINKS")
        };
        // Nix's `printGCWarning`: once per run without --add-root, never with it.
        let warnings = |o: &Output| {
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .filter(|l| *l == GC_WARNING)
                .count()
        };
        let warned = (warnings(&plain_out), warnings(&rooted));
        seen.push((text(&plain_out), text(&rooted), made, warned));
        if tool == "firn" {
            let quiet = run_tool(&["--no-gc-warning"]);
            assert!(quiet.status.success());
            assert_eq!(warnings(&quiet), 0, "--no-gc-warning");
            assert_eq!(text(&quiet), seen[1].0);
        }
    }
    assert_eq!(seen[0].3, (1, 0), "Nix warns once without --add-root");
    assert_eq!(seen[1], seen[0], "firn (right) against Nix (left)");
    assert_eq!(
        seen[0].0.lines().count(),
        8,
        "3 + 1 + 1 + 3 lines: {}",
        seen[0].0
    );
    assert_eq!(seen[0].2.len(), 8);
    assert!(seen[0].1.starts_with("LINKS/r\n"), "{}", seen[0].1);
    remove(&root);
}

/// `DRV^dev` realises the derivation and prints only the wanted output.
#[test]
fn wanted_outputs_are_honoured() {
    if !can_build() {
        return;
    }
    let root = tempdir("wanted");
    let drv = instantiate(&root, "multi.nix");
    let out = run(
        firn_bin(),
        &[
            "--store",
            root.to_str().unwrap(),
            "--option",
            "sandbox-paths",
            "/bin/sh=/bin/busybox",
            "realise",
            &format!("{drv}^dev,lib"),
        ],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // nix-2.8-vectors/cases/multi: lib, dev (sorted by path), not out.
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "/nix/store/b2p59gds04g42svlsw89viqi8iz6avm1-multi-lib\n/nix/store/bz1rwqj4qhmnwmgw77m4761mh0f58w4m-multi-dev\n"
    );
    let out = firn(&root, &["realise", &format!("{drv}^nope")], None);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not have wanted outputs 'nope'"));
    remove(&root);
}

/// The isolation battery, for what the sandbox does so far (the user namespace and
/// seccomp are still to come): each line of the probe's output states one property,
/// and each is asserted here.
#[test]
fn sandbox_isolation_battery() {
    if !can_build() {
        return;
    }
    let root = tempdir("isolation");
    // Host-side things the builder must not see or reach.
    let shm = Command::new("ipcmk").args(["-M", "4096"]).output().unwrap();
    let sem = Command::new("ipcmk").args(["-S", "1"]).output().unwrap();
    let msg = Command::new("ipcmk").args(["-Q"]).output().unwrap();
    let ids: Vec<String> = [&shm, &sem, &msg]
        .iter()
        .filter_map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .last()
                .map(str::to_owned)
        })
        .collect();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let marker = format!("firn-host-marker-{}", std::process::id());
    let mut host_proc = Command::new("/bin/busybox")
        .args(["sh", "-c", "sleep 60; true", &marker])
        .spawn()
        .unwrap();
    let src_dir = root.join("src");
    fs::create_dir_all(&src_dir).unwrap();
    fs::write(src_dir.join("input.txt"), b"input\n").unwrap();
    fs::write(src_dir.join("unrelated.txt"), b"unrelated\n").unwrap();
    let input = String::from_utf8(
        firn(
            &root,
            &["add", src_dir.join("input.txt").to_str().unwrap()],
            None,
        )
        .stdout,
    )
    .unwrap();
    let unrelated = String::from_utf8(
        firn(
            &root,
            &["add", src_dir.join("unrelated.txt").to_str().unwrap()],
            None,
        )
        .stdout,
    )
    .unwrap();
    let (input, unrelated) = (input.trim().to_owned(), unrelated.trim().to_owned());
    let bg = format!("firn-bg-marker-{}", std::process::id());
    let script = format!(
        r#"
r() {{ echo "$1=$2" >> $out; }}
r hostname "$(hostname)"
r domainname "$(cat /proc/sys/kernel/domainname)"
r pid "$$"
r netdevs "$(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | tr '\n' ' ')"
r lo_up "$(ip link show lo | grep -c UP)"
r shm "$(tail -n +2 /proc/sysvipc/shm | wc -l)"
r sem "$(tail -n +2 /proc/sysvipc/sem | wc -l)"
r msg "$(tail -n +2 /proc/sysvipc/msg | wc -l)"
r nprocs "$(ls -d /proc/[0-9]* | wc -l)"
if nc -w 1 127.0.0.1 {port} < /dev/null; then r tcp reached; else r tcp refused; fi
if [ -e {unrelated} ]; then r unrelated present; else r unrelated absent; fi
if [ -e {input} ]; then r input present; else r input absent; fi
if echo x >> {input} 2>/dev/null; then r input_write ok; else r input_write denied; fi
r dev "$(ls /dev | tr '\n' ' ')"
r etc "$(ls /etc | tr '\n' ' ')"
r root "$(ls / | tr '\n' ' ')"
touch /build/suid
if chmod 4755 /build/suid 2>/dev/null; then r suid allowed; else r suid denied; fi
if chmod 0755 /build/suid; then r chmod ok; else r chmod denied; fi
r nnp "$(grep NoNewPrivs /proc/self/status | tr -d ' \t' | cut -d: -f2)"
r seccomp "$(grep '^Seccomp:' /proc/self/status | tr -d ' \t' | cut -d: -f2)"
r uid_map "$(cat /proc/self/uid_map | tr -s ' ' | sed 's/^ //')"
r gid_map "$(cat /proc/self/gid_map | tr -s ' ' | sed 's/^ //')"
r setgroups "$(cat /proc/self/setgroups)"
r ids "$(id -u):$(id -g):$(id -G)"
r caps "$(grep '^CapEff:' /proc/self/status | tr -d ' \t' | cut -d: -f2)"
r proc_sys "$(grep ' /proc/sys ' /proc/self/mounts | cut -d' ' -f4 | cut -d, -f1)"
r kallsyms "$(cat /proc/kallsyms 2>/dev/null | wc -c)"
r acpi "$(ls /proc/acpi 2>/dev/null | wc -l)"
if echo 1 > /proc/sysrq-trigger 2>/dev/null; then r sysrq writable; else r sysrq denied; fi
/bin/busybox sh -c 'sleep 60; true' {bg} &
"#
    );
    let json = format!(
        r#"{{"name":"isolation","outputs":{{"out":{{}}}},"inputSrcs":["{input}"],"inputDrvs":{{}},"system":"x86_64-linux","builder":"/bin/busybox","args":["sh","-c",{}],"env":{{"name":"isolation","out":"","builder":"/bin/busybox","system":"x86_64-linux"}}}}"#,
        json_string(&script)
    );
    let drv = String::from_utf8(firn(&root, &["derivation", "add"], Some(json.as_bytes())).stdout)
        .unwrap();
    let out = run(
        firn_bin(),
        &[
            "--store",
            root.to_str().unwrap(),
            "--option",
            "sandbox-paths",
            "/bin/busybox",
            "realise",
            drv.trim(),
        ],
        None,
    );
    let _ = host_proc.kill();
    let _ = host_proc.wait();
    for (id, flag) in ids.iter().zip(["-m", "-s", "-q"]) {
        let _ = Command::new("ipcrm").args([flag, id]).output();
    }
    drop(listener);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = String::from_utf8(out.stdout).unwrap();
    let probe = fs::read_to_string(root.join(path.trim().trim_start_matches('/'))).unwrap();
    let get = |k: &str| {
        probe
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap_or_else(|| panic!("{k} missing in {probe}"))
            .trim()
            .to_owned()
    };
    assert_eq!(get("hostname"), "localhost");
    assert_eq!(get("domainname"), "(none)");
    assert_eq!(get("pid"), "1", "the builder is PID 1");
    assert_eq!(get("netdevs"), "lo", "only lo");
    assert_eq!(get("lo_up"), "1");
    assert_eq!(
        (get("shm"), get("sem"), get("msg")),
        ("0".into(), "0".into(), "0".into()),
        "host SysV IPC visible"
    );
    // The host runs hundreds of processes (one of them `marker`); the builder's PID
    // namespace holds only its own few.
    let nprocs: usize = get("nprocs").parse().unwrap();
    assert!(
        nprocs < 8,
        "{nprocs} processes visible: host processes leak in"
    );
    assert_eq!(get("tcp"), "refused", "host loopback reachable");
    assert_eq!(get("unrelated"), "absent");
    assert_eq!(get("input"), "present");
    assert_eq!(get("input_write"), "denied", "inputs must be read-only");
    // /dev/kvm comes along where the host has it, as in Nix.
    let kvm = if Path::new("/dev/kvm").exists() {
        "kvm "
    } else {
        ""
    };
    assert_eq!(
        get("dev"),
        format!("fd full {kvm}null ptmx pts random shm stderr stdin stdout tty urandom zero")
    );
    // The user namespace: Nix's 1000:100 inside, the build user outside, no groups,
    // no capabilities.
    let (uid_map, gid_map) = (get("uid_map"), get("gid_map"));
    let umap: Vec<&str> = uid_map.split(' ').collect();
    let gmap: Vec<&str> = gid_map.split(' ').collect();
    assert_eq!((umap[0], umap[2]), ("1000", "1"), "uid_map {uid_map}");
    assert_eq!((gmap[0], gmap[2]), ("100", "1"), "gid_map {gid_map}");
    assert_ne!(umap[1], "0", "the builder must not be root outside");
    let nixbld = Command::new("getent")
        .args(["group", "nixbld"])
        .output()
        .unwrap();
    let nixbld_gid = String::from_utf8_lossy(&nixbld.stdout)
        .split(':')
        .nth(2)
        .unwrap_or("")
        .to_owned();
    assert_eq!(gmap[1], nixbld_gid, "mapped to the nixbld group");
    assert_eq!(get("setgroups"), "deny");
    assert_eq!(get("ids"), "1000:100:100");
    assert_eq!(get("caps"), "0000000000000000");
    // /proc is masked (beyond Nix, #4327).
    assert_eq!(get("proc_sys"), "ro", "/proc/sys must be read-only");
    assert_eq!(get("kallsyms"), "0", "/proc/kallsyms must be masked");
    assert_eq!(get("acpi"), "0", "/proc/acpi must be empty");
    assert_eq!(get("sysrq"), "denied");
    assert_eq!(get("etc"), "group hosts passwd");
    assert_eq!(get("root"), "bin build dev etc nix proc tmp");
    assert_eq!(get("suid"), "denied", "chmod 4755 must fail (seccomp)");
    assert_eq!(get("chmod"), "ok", "ordinary chmod still works");
    assert_eq!(get("nnp"), "1");
    assert_eq!(get("seccomp"), "2");
    std::thread::sleep(std::time::Duration::from_millis(200));
    let left = Command::new("pgrep").args(["-f", &bg]).output().unwrap();
    assert!(
        left.stdout.is_empty(),
        "a background process of the builder survived"
    );
    remove(&root);
}
