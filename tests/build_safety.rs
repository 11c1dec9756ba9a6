//! Two ways a build could lose data or run with too much privilege, as a Nix user
//! would hit them:
//!
//! - a rebuild of a derivation some of whose outputs are still valid must leave those
//!   outputs alone (Nix never deletes or overwrites a valid output), whether the build
//!   then fails or succeeds, in the sandbox and without it;
//! - builds never run as the caller (root) because the build users are missing or busy:
//!   a `build-users-group` that does not exist is an error, as in Nix, and a busy pool
//!   makes the build wait for a user ("waiting for UID to build …").
//!
//! Building needs root, nix-instantiate and /bin/busybox: in CI these tests run.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod common;
use common::*;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A two-output busybox derivation: `out` holds a file, `dev` refers to `out`. The
/// builder fails after writing both outputs when `/marker` exists in its view (the
/// sandbox gets it through an optional `sandbox-paths` entry; unsandboxed it is
/// `marker` itself).
fn two_output_drv(root: &Path, name: &str, marker: &str) -> String {
    let script = format!(
        "mkdir $out $dev; echo built > $out/file; echo $out > $dev/ref; \
         cat /proc/sys/kernel/random/uuid > $out/stamp; \
         if [ -e {marker} ]; then echo failing on purpose; exit 1; fi"
    );
    let json = format!(
        r#"{{"name":"{name}","outputs":{{"out":{{}},"dev":{{}}}},"inputSrcs":[],"inputDrvs":{{}},"system":"x86_64-linux","builder":"/bin/busybox","args":["sh","-c",{}],"env":{{"name":"{name}","out":"","dev":"","builder":"/bin/busybox","system":"x86_64-linux","outputs":"out dev"}}}}"#,
        json_string(&script)
    );
    let out = firn_at(root, &["derivation", "add"], Some(json.as_bytes()));
    ok(out).trim().to_owned()
}

fn real(root: &Path, printed: &str) -> PathBuf {
    root.join(printed.trim().trim_start_matches('/'))
}

/// `firn realise` with the sandbox on or off.
fn realise(root: &Path, sandboxed: bool, marker_host: &Path, target: &str) -> Output {
    let paths = format!("/bin/busybox /marker={}?", marker_host.display());
    let mut args = vec!["--option", "sandbox"];
    args.push(if sandboxed { "true" } else { "false" });
    args.extend(["--option", "sandbox-paths", &paths, "realise", target]);
    firn_at(root, &args, None)
}

fn partially_valid_rebuild(sandboxed: bool) {
    let tag = if sandboxed {
        "pv-sandbox"
    } else {
        "pv-nosandbox"
    };
    let root = tempdir(tag);
    let marker_host = root.join("marker");
    let marker = if sandboxed {
        "/marker".to_owned()
    } else {
        marker_host.display().to_string()
    };
    let drv = two_output_drv(&root, tag, &marker);
    let outs = ok(realise(&root, sandboxed, &marker_host, &format!("{drv}^*")));
    let outs: Vec<&str> = outs.lines().collect();
    assert_eq!(outs.len(), 2, "{outs:?}");
    let (dev, out) = match outs[0].ends_with("-dev") {
        true => (outs[0], outs[1]),
        false => (outs[1], outs[0]),
    };
    let out_file = real(&root, out).join("file");
    assert_eq!(fs::read_to_string(&out_file).unwrap(), "built\n");
    let inode = std::os::unix::fs::MetadataExt::ino(&fs::metadata(&out_file).unwrap());
    // Each build writes a new stamp: a valid output written over in place (same inode)
    // shows up here.
    let stamp = real(&root, out).join("stamp");
    let stamp_before = fs::read_to_string(&stamp).unwrap();
    ok(firn_at(&root, &["delete", dev], None));
    assert!(!real(&root, dev).exists());

    // A failing rebuild of `dev` leaves the valid `out` as it was.
    fs::write(&marker_host, "").unwrap();
    let failed = realise(&root, sandboxed, &marker_host, &format!("{drv}^dev"));
    assert_eq!(
        failed.status.code(),
        Some(100),
        "{}",
        String::from_utf8_lossy(&failed.stderr)
    );
    assert_eq!(
        fs::read_to_string(&out_file).unwrap(),
        "built\n",
        "the valid output 'out' was deleted by a failing rebuild of 'dev'"
    );
    assert_eq!(
        std::os::unix::fs::MetadataExt::ino(&fs::metadata(&out_file).unwrap()),
        inode,
        "the valid output 'out' was replaced by a failing rebuild of 'dev'"
    );
    assert!(
        !real(&root, dev).exists(),
        "nothing of the failed dev stays"
    );
    let v = firn_at(&root, &["verify", "--check-contents"], None);
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
    assert!(
        !String::from_utf8_lossy(&v.stderr).contains("disappeared"),
        "{}",
        String::from_utf8_lossy(&v.stderr)
    );

    // A succeeding rebuild of `dev` builds it and still leaves `out` alone (the same
    // file, not a copy moved over it), with dev's reference to out registered.
    fs::remove_file(&marker_host).unwrap();
    let built = ok(realise(
        &root,
        sandboxed,
        &marker_host,
        &format!("{drv}^dev"),
    ));
    assert_eq!(built.trim(), dev);
    assert_eq!(
        std::os::unix::fs::MetadataExt::ino(&fs::metadata(&out_file).unwrap()),
        inode,
        "the valid output 'out' was replaced"
    );
    assert_eq!(
        fs::read_to_string(&stamp).unwrap(),
        stamp_before,
        "the valid output 'out' was written over"
    );
    assert_eq!(
        fs::read_to_string(real(&root, dev).join("ref")).unwrap(),
        format!("{out}\n"),
        "dev refers to out's real path (no rewritten placeholder left)"
    );
    let refs = ok(firn_at(&root, &["query", "--references", dev], None));
    assert_eq!(refs.trim(), out, "dev's reference to out is registered");
    assert_verifies(&root, tag);
    // Nothing but the derivation and its two outputs is in the store.
    let entries = store_entries(&root);
    assert_eq!(entries.len(), 3, "{entries:?}");
    remove(&root);
}

#[test]
fn failed_or_succeeding_rebuild_keeps_valid_outputs_in_the_sandbox() {
    if !can_build() {
        return;
    }
    partially_valid_rebuild(true);
}

#[test]
fn failed_or_succeeding_rebuild_keeps_valid_outputs_without_the_sandbox() {
    if !can_build() {
        return;
    }
    partially_valid_rebuild(false);
}

/// A builder that says who it runs as (its uid, and the uid map: in the sandbox the
/// host uid is the map's second field).
fn id_drv(root: &Path, name: &str) -> String {
    let json = format!(
        r#"{{"name":"{name}","outputs":{{"out":{{}}}},"inputSrcs":[],"inputDrvs":{{}},"system":"x86_64-linux","builder":"/bin/busybox","args":["sh","-c","/bin/busybox id -u > $out; /bin/busybox cat /proc/self/uid_map >> $out"],"env":{{"name":"{name}","out":"","builder":"/bin/busybox","system":"x86_64-linux"}}}}"#
    );
    ok(firn_at(root, &["derivation", "add"], Some(json.as_bytes())))
        .trim()
        .to_owned()
}

#[test]
fn missing_build_users_group_is_an_error_not_a_build_as_root() {
    if !can_build() {
        return;
    }
    let root = tempdir("nogroup");
    let drv = id_drv(&root, "whoami");
    for sandbox in ["false", "true"] {
        let out = firn_at(
            &root,
            &[
                "--option",
                "sandbox",
                sandbox,
                "--option",
                "sandbox-paths",
                "/bin/busybox",
                "--option",
                "build-users-group",
                "nosuchgroup",
                "realise",
                &drv,
            ],
            None,
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "sandbox {sandbox}: {err}");
        assert!(
            err.contains("the group 'nosuchgroup' specified in 'build-users-group' does not exist"),
            "sandbox {sandbox}: {err}"
        );
        assert_eq!(
            err.lines().filter(|l| l.starts_with("error:")).count(),
            1,
            "{err}"
        );
        assert!(out.stdout.is_empty());
    }
    // Nothing was built, nothing is left but the derivation.
    assert_eq!(store_entries(&root).len(), 1, "{:?}", store_entries(&root));
    // An explicit empty group builds as the caller.
    let out = ok(firn_at(
        &root,
        &[
            "--option",
            "sandbox",
            "false",
            "--option",
            "build-users-group",
            "",
            "realise",
            &drv,
        ],
        None,
    ));
    let said = fs::read_to_string(real(&root, &out)).unwrap();
    assert_eq!(said.lines().next(), Some("0"), "{said}");
    remove(&root);
}

/// A build-users group of its own with one member, so the test can make the pool busy
/// without touching `nixbld`.
fn one_user_group() -> (String, u32) {
    let group = "firntestbld";
    let user = "firntestbld1";
    let have = |db: &str, name: &str| {
        Command::new("getent")
            .args([db, name])
            .stdout(Stdio::null())
            .status()
            .unwrap()
            .success()
    };
    if !have("group", group) {
        assert!(Command::new("groupadd")
            .args(["--system", group])
            .status()
            .unwrap()
            .success());
    }
    if !have("passwd", user) {
        assert!(Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                "--gid",
                group,
                "--groups",
                group,
                user,
            ])
            .status()
            .unwrap()
            .success());
    }
    let uid = Command::new("id").args(["-u", user]).output().unwrap();
    let uid = String::from_utf8_lossy(&uid.stdout).trim().parse().unwrap();
    (group.to_owned(), uid)
}

#[test]
fn busy_build_users_make_the_build_wait_never_run_as_root() {
    if !can_build() {
        return;
    }
    busy_build_users(true);
    // Unsandboxed too: the store directory is handed to the configured group (as
    // Nix does), so its member can create the output there.
    busy_build_users(false);
}

fn busy_build_users(sandboxed: bool) {
    let (group, uid) = one_user_group();
    let root = tempdir(if sandboxed {
        "busyusers"
    } else {
        "busyusers-nosandbox"
    });
    let drv = id_drv(&root, "waiter");
    // Hold the only build user's pool lock (as another build would) for 3 s.
    let pool = PathBuf::from(format!("/nix/var/nix/userpool/{uid}"));
    fs::create_dir_all(pool.parent().unwrap()).unwrap();
    let mut holder = Command::new("flock")
        .arg(&pool)
        .args(["sleep", "3"])
        .spawn()
        .unwrap();
    // Until flock has the lock, our build could take the user first.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Command::new("flock")
        .args(["-n"])
        .arg(&pool)
        .arg("true")
        .status()
        .unwrap()
        .success()
    {
        assert!(Instant::now() < deadline, "flock never took the lock");
        std::thread::sleep(Duration::from_millis(20));
    }
    let started = Instant::now();
    let out = firn_at(
        &root,
        &[
            "--option",
            "sandbox",
            if sandboxed { "true" } else { "false" },
            "--option",
            "sandbox-paths",
            "/bin/busybox",
            "--option",
            "build-users-group",
            &group,
            "realise",
            &drv,
        ],
        None,
    );
    let waited = started.elapsed();
    holder.wait().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let printed = ok(out);
    assert!(
        err.contains(&format!("waiting for UID to build '{drv}'")),
        "{err}"
    );
    assert!(
        waited >= Duration::from_millis(1500),
        "built after {waited:?} while the only build user was busy"
    );
    let said = fs::read_to_string(real(&root, &printed)).unwrap();
    let map: Vec<&str> = said
        .lines()
        .nth(1)
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let expected = match sandboxed {
        // Inside its user namespace, uid 1000 maps to the build user.
        true => vec!["1000".to_owned(), uid.to_string(), "1".to_owned()],
        // Unsandboxed: the initial namespace's identity map.
        false => vec!["0".to_owned(), "0".to_owned(), "4294967295".to_owned()],
    };
    assert_eq!(map, expected, "{said}");
    let builder_uid = if sandboxed {
        "1000".to_owned()
    } else {
        uid.to_string()
    };
    assert_eq!(
        said.lines().next(),
        Some(builder_uid.as_str()),
        "the build ran as the build user once it was free: {said}"
    );
    remove(&root);
}

/// A build that cannot start leaves nothing: no build directory in TMPDIR, no sandbox
/// root or lock file in the store. A builder missing from the sandbox fails as Nix's
/// does (exit 100) and says where the sandbox takes its files from.
#[test]
fn a_build_that_cannot_start_leaves_nothing() {
    if !can_build() {
        return;
    }
    let root = tempdir("nostart");
    let tmp = root.join("tmp");
    fs::create_dir_all(&tmp).unwrap();
    let json = r#"{"name":"nosh","outputs":{"out":{}},"inputSrcs":[],"inputDrvs":{},"system":"x86_64-linux","builder":"/bin/sh","args":["-c","echo > $out"],"env":{"name":"nosh","out":"","builder":"/bin/sh","system":"x86_64-linux"}}"#;
    let drv = ok(firn_at(
        &root,
        &["derivation", "add"],
        Some(json.as_bytes()),
    ))
    .trim()
    .to_owned();
    let before = store_entries(&root);
    let realise = |drv: &str| {
        firn_command()
            .args(["--store", root.to_str().unwrap(), "realise", drv])
            .env("TMPDIR", &tmp)
            .output()
            .unwrap()
    };
    let out = realise(&drv);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(100), "{err}");
    assert!(
        err.contains(&format!(
            "error: builder for '{drv}' failed: the sandbox has no '/bin/sh'"
        )),
        "{err}"
    );
    assert!(err.contains("sandbox-paths /bin/sh=/bin/busybox"), "{err}");
    assert_eq!(store_entries(&root), before, "nothing added to the store");
    assert_eq!(
        fs::read_dir(&tmp).unwrap().count(),
        0,
        "no build directory left"
    );

    // An input that disappeared from the disk (still registered): the sandbox cannot
    // bind it; nothing of the build stays either.
    let src = root.join("input.txt");
    fs::write(&src, "input\n").unwrap();
    let input = ok(firn_at(&root, &["add", src.to_str().unwrap()], None))
        .trim()
        .to_owned();
    let json = format!(
        r#"{{"name":"gone","outputs":{{"out":{{}}}},"inputSrcs":["{input}"],"inputDrvs":{{}},"system":"x86_64-linux","builder":"/bin/busybox","args":["sh","-c","cat {input} > $out"],"env":{{"name":"gone","out":"","builder":"/bin/busybox","system":"x86_64-linux"}}}}"#
    );
    let drv = ok(firn_at(
        &root,
        &["derivation", "add"],
        Some(json.as_bytes()),
    ))
    .trim()
    .to_owned();
    fs::remove_file(real(&root, &input)).unwrap();
    let before = store_entries(&root);
    let out = firn_command()
        .args(["--store", root.to_str().unwrap()])
        .args(["--option", "sandbox-paths", "/bin/busybox", "realise", &drv])
        .env("TMPDIR", &tmp)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&input),
        "the error names the missing input: {err}"
    );
    assert_eq!(store_entries(&root), before, "nothing added to the store");
    assert_eq!(
        fs::read_dir(&tmp).unwrap().count(),
        0,
        "no build directory left"
    );
    remove(&root);
}
