//! The sandbox compared with Nix 2.8's: the probe derivations of nix-2.8-vectors built
//! by firn must see what they saw under Nix (identity, id maps, capabilities, `/`,
//! `/dev`, `/etc`, network, file modes and owners); a fixed-output builder shares the
//! host's network; `sandbox-paths` bring their store closure; an ordinary user builds in
//! the sandbox through user namespaces, into the per-user store. Needs root (to be an
//! ordinary user as well), nix-instantiate and /bin/busybox: in CI these tests run.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod common;
use common::*;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn instantiate(root: &Path, file: &str) -> String {
    let out = Command::new("nix-instantiate")
        .args(["--store", root.to_str().unwrap()])
        .args(["--option", "substituters", ""])
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

/// `firn realise` in the sandbox with busybox as /bin/sh, as the vectors were made.
fn realise(root: &Path, extra: &[&str], drv: &str) -> Output {
    let mut args = vec![
        "--store",
        root.to_str().unwrap(),
        "--option",
        "sandbox-paths",
        "/bin/sh=/bin/busybox",
    ];
    args.extend_from_slice(extra);
    args.extend(["realise", drv]);
    let out = firn_command()
        .args(&args)
        .env("PROBE_IMPURE_VAR", "from-caller")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// An `ls -la` line without what differs from run to run (link count, size or device
/// numbers' spacing, date): `perms owner group name[ -> target]`; other lines as
/// they are; `total` lines dropped.
fn normalise(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let t: Vec<&str> = line.split_whitespace().collect();
        if t.first() == Some(&"total") {
            continue;
        }
        let is_ls = t.len() >= 8
            && t[0].len() == 10
            && "-dlcbps".contains(&t[0][..1])
            && t[1].chars().all(|c| c.is_ascii_digit());
        if !is_ls {
            out.push_str(line);
            out.push('\n');
            continue;
        }
        // perms links owner group (size | major, minor) month day time|year name…
        let size_tokens = if t[4].ends_with(',') { 2 } else { 1 };
        let name = t[4 + size_tokens + 3..].join(" ");
        out.push_str(&format!("{} {} {} {}\n", t[0], t[2], t[3], name));
    }
    out
}

/// The probe's files that must be the same under firn as under Nix, and how to compare
/// them. Left out: `mounts` (order and host file systems), `ulimit` (inherited from the
/// caller), `ip-addr`/`proc-net-dev` for fixed-output builds (the host's interfaces).
const SAME: [&str; 25] = [
    "args",
    "domainname",
    "group",
    "home-test",
    "hostname",
    "hosts",
    "id",
    "ls-bin",
    "ls-build",
    "ls-dev",
    "ls-dev-shm",
    "ls-etc",
    "ls-fd",
    "ls-nix",
    "ls-proc-sysvipc",
    "ls-root",
    "ls-tmp",
    "passwd",
    "pwd",
    "setgroups",
    "status",
    "stdin-stat",
    "umask",
    "write-test",
    "env",
];

/// Compare one probe file; `host` adjusts what depends on the machine: the outside
/// ids in the maps, `/dev/kvm` (bound only where the host has it), the CPU count.
fn compare(name: &str, nix: &str, firn: &str, case: &str) {
    let fix = |s: &str| {
        let s = normalise(s);
        let cores = std::thread::available_parallelism().unwrap().get();
        s.lines()
            .filter(|l| !l.ends_with(" kvm"))
            .map(|l| {
                if l.starts_with("NIX_BUILD_CORES=") {
                    format!("NIX_BUILD_CORES={cores}")
                } else {
                    l.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(
        fix(firn),
        fix(nix),
        "{case}: probe '{name}' differs from Nix 2.8's"
    );
}

fn check_maps(nix: &str, firn: &str, case: &str) {
    // `1000 <build uid> 1`: the inside and the count as Nix, the outside a build user.
    let cols = |s: &str| -> Vec<String> {
        s.lines()
            .next()
            .unwrap_or("")
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    };
    let (n, f) = (cols(nix), cols(firn));
    assert_eq!((&f[0], &f[2]), (&n[0], &n[2]), "{case}: id map {firn}");
    assert_ne!(f[1], "0", "{case}: mapped to root outside");
}

#[test]
fn env_probe_sees_what_it_saw_under_nix() {
    if !can_build() {
        return;
    }
    let root = tempdir("probe-env");
    let drv = instantiate(&root, "env-probe.nix");
    let out = realise(&root, &[], &drv);
    let path = String::from_utf8(out.stdout).unwrap();
    let dir = root.join(path.trim().trim_start_matches('/'));
    let nix_dir = fixtures().join("nix-2.8-vectors/cases/env-probe/probe-output");
    let mut compared = 0;
    for name in SAME.iter().chain(&["ip-addr", "proc-net-dev", "resolv"]) {
        let nix = fs::read_to_string(nix_dir.join(name)).unwrap();
        let firn = fs::read_to_string(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        compare(name, &nix, &firn, "env-probe");
        compared += 1;
    }
    for name in ["uid_map", "gid_map"] {
        check_maps(
            &fs::read_to_string(nix_dir.join(name)).unwrap(),
            &fs::read_to_string(dir.join(name)).unwrap(),
            "env-probe",
        );
    }
    assert_eq!(compared, SAME.len() + 3);
    remove(&root);
}

/// Split fod-probe's log (`=== /build/probe/<name>` sections) into files.
fn sections(log: &str) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    let mut current: Option<(String, String)> = None;
    for line in log.lines() {
        if let Some(name) = line.strip_prefix("=== /build/probe/") {
            if let Some((n, t)) = current.take() {
                map.insert(n, t);
            }
            current = Some((name.to_owned(), String::new()));
        } else if let Some((_, t)) = &mut current {
            t.push_str(line);
            t.push('\n');
        }
    }
    if let Some((n, t)) = current {
        map.insert(n, t);
    }
    map
}

#[test]
fn fod_probe_sees_what_it_saw_under_nix() {
    if !can_build() {
        return;
    }
    let root = tempdir("probe-fod");
    let drv = instantiate(&root, "fod-probe.nix");
    realise(&root, &[], &drv);
    let log = run(
        firn_bin(),
        &["--store", root.to_str().unwrap(), "log", &drv],
        None,
    );
    let firn = sections(&String::from_utf8_lossy(&log.stdout));
    let nix = sections(
        &fs::read_to_string(fixtures().join("nix-2.8-vectors/cases/fod-probe/build.log")).unwrap(),
    );
    assert!(nix.len() > 20, "the vector's log has the probe sections");
    // /etc has the host's resolver files: their sizes and dates are the host's, the
    // names and modes differ by host too (Nix's hosts file was 0755 there): compare
    // names only.
    let names = |s: &str| -> Vec<String> {
        normalise(s)
            .lines()
            .filter_map(|l| l.split(' ').nth(3).map(str::to_owned))
            .collect()
    };
    assert_eq!(names(&firn["ls-etc"]), names(&nix["ls-etc"]), "fod /etc");
    for name in SAME
        .iter()
        .filter(|n| !["ls-etc", "ls-build", "hosts", "env", "ls-fd"].contains(n))
    {
        compare(name, &nix[*name], &firn[*name], "fod-probe");
    }
    check_maps(&nix["uid_map"], &firn["uid_map"], "fod-probe");
    // The impure variable passed through, as Nix does for fixed-output derivations.
    assert!(firn["env"].contains("PROBE_IMPURE_VAR=from-caller"));
    remove(&root);
}

/// `firn derivation add` of `json`: the `.drv` path.
fn add_drv(root: &Path, json: &str) -> String {
    ok(firn_at(root, &["derivation", "add"], Some(json.as_bytes())))
        .trim()
        .to_owned()
}

/// A derivation running `script` under busybox, with input sources `srcs` and the
/// `out` of the input derivations `drvs`.
fn busybox_drv(root: &Path, name: &str, script: &str, srcs: &[&str], drvs: &[&str]) -> String {
    let srcs: Vec<String> = srcs.iter().map(|p| format!("\"{p}\"")).collect();
    let drvs: Vec<String> = drvs.iter().map(|d| format!("\"{d}\":[\"out\"]")).collect();
    add_drv(
        root,
        &format!(
            r#"{{"name":"{name}","outputs":{{"out":{{}}}},"inputSrcs":[{}],"inputDrvs":{{{}}},"system":"x86_64-linux","builder":"/bin/busybox","args":["sh","-c",{}],"env":{{"name":"{name}","out":"","builder":"/bin/busybox","system":"x86_64-linux"}}}}"#,
            srcs.join(","),
            drvs.join(","),
            json_string(script)
        ),
    )
}

/// `firn realise DRV` in the sandbox with `sandbox_paths`.
fn realise_with(root: &Path, sandbox_paths: &str, drv: &str) -> Output {
    firn_at(
        root,
        &["--option", "sandbox-paths", sandbox_paths, "realise", drv],
        None,
    )
}

/// Where a store path printed by firn is on disk.
fn real(root: &Path, printed: &[u8]) -> PathBuf {
    root.join(
        String::from_utf8_lossy(printed)
            .trim()
            .trim_start_matches('/'),
    )
}

#[test]
fn fixed_output_builder_reaches_the_host_network_and_others_do_not() {
    if !can_build() {
        return;
    }
    let root = tempdir("fod-net");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    // Answer every connection with a line: the builder records what it got.
    let server = std::thread::spawn(move || {
        for s in listener.incoming().take(2) {
            use std::io::Write;
            let _ = s.map(|mut s| s.write_all(b"hello from the host\n"));
        }
    });
    let script = format!(
        "r=$(nc -w 2 127.0.0.1 {port} </dev/null) || r=refused; echo \"$r\" >&2; \
         test \"$r\" = 'hello from the host' && echo ok > $out"
    );
    // The fixed-output builder must reach it...
    let ok_hash = {
        let f = root.join("ok.txt");
        fs::write(&f, b"ok\n").unwrap();
        let out = run(
            firn_bin(),
            &["hash", "--type", "sha256", "--flat", f.to_str().unwrap()],
            None,
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    let fod = add_drv(
        &root,
        &format!(
            r#"{{"name":"fod-net","outputs":{{"out":{{"hashAlgo":"sha256","hash":"{ok_hash}"}}}},"inputSrcs":[],"inputDrvs":{{}},"system":"x86_64-linux","builder":"/bin/busybox","args":["sh","-c",{}],"env":{{"outputHashMode":"flat","outputHashAlgo":"sha256","outputHash":"{ok_hash}","name":"fod-net","out":"","builder":"/bin/busybox","system":"x86_64-linux"}}}}"#,
            json_string(&script)
        ),
    );
    let out = realise_with(&root, "/bin/busybox", &fod);
    assert!(
        out.status.success(),
        "a fixed-output builder must reach the host network: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // ...and the same script as an ordinary derivation must not.
    let plain = busybox_drv(&root, "plain-net", &script, &[], &[]);
    let out = realise_with(&root, "/bin/busybox", &plain);
    assert_eq!(out.status.code(), Some(100));
    assert!(String::from_utf8_lossy(&out.stderr).contains("refused"));
    // Unblock the server thread if the second connection never came.
    let _ = std::net::TcpStream::connect(("127.0.0.1", port));
    server.join().unwrap();
    remove(&root);
}

#[test]
fn sandbox_paths_in_the_store_bring_their_closure() {
    if !can_build() {
        return;
    }
    let root = tempdir("sandbox-closure");
    let src = root.join("dep.txt");
    fs::write(&src, b"dep\n").unwrap();
    let dep = ok(firn_at(&root, &["add", src.to_str().unwrap()], None));
    let dep = dep.trim();
    // `tool`'s output refers to `dep`: it is the closure's second member.
    let tool_drv = busybox_drv(&root, "tool", &format!("echo {dep} > $out"), &[dep], &[]);
    let tool = ok(realise_with(&root, "/bin/busybox", &tool_drv));
    let tool = tool.trim();
    let user = busybox_drv(
        &root,
        "user",
        &format!("test -e {tool} && test -e $(cat {tool}) && cat $(cat {tool}) > $out"),
        &[],
        &[],
    );
    let out = realise_with(&root, &format!("/bin/busybox {tool}"), &user);
    assert!(
        out.status.success(),
        "the sandbox path and its references must be there: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let content = fs::read_to_string(real(&root, &out.stdout)).unwrap();
    assert_eq!(content, "dep\n");
    // A path that is not valid is refused, not silently skipped.
    let bogus = "/nix/store/00000000000000000000000000000000-bogus";
    let again = busybox_drv(&root, "user2", "echo > $out", &[], &[]);
    let out = realise_with(&root, &format!("/bin/busybox {bogus}"), &again);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a valid store path"), "{err}");
    remove(&root);
}

/// An ordinary user, no daemon: `firn realise` builds in the sandbox (user namespaces)
/// into `~/.local/share/firn/root`, and the builder is 1000:100 mapped to the caller.
#[test]
fn ordinary_user_builds_in_the_sandbox() {
    if !can_build() {
        return;
    }
    let home = tempdir("nonroot-home");
    // The binary must be reachable by the unprivileged user.
    let bin: PathBuf = home.join("firn");
    fs::copy(firn_bin(), &bin).unwrap();
    Command::new("chown")
        .args(["-R", "65534:65534", home.to_str().unwrap()])
        .status()
        .unwrap();
    let mut p = home.clone();
    while let Some(parent) = p.parent() {
        // tempdir's parents must be traversable.
        let _ = Command::new("chmod")
            .args(["o+x", parent.to_str().unwrap()])
            .status();
        p = parent.to_path_buf();
    }
    let json = r#"{"name":"nonroot","outputs":{"out":{}},"inputSrcs":[],"inputDrvs":{},"system":"x86_64-linux","builder":"/bin/sh","args":["-c","{ id; cat /proc/self/uid_map; hostname; ls /; } > $out"],"env":{"name":"nonroot","out":"","builder":"/bin/sh","system":"x86_64-linux"}}"#;
    fs::write(home.join("d.json"), json).unwrap();
    let script = format!(
        "set -e; cd {h}; d=$(./firn derivation add < d.json); ./firn --option sandbox-paths /bin/sh=/bin/busybox realise \"$d\"",
        h = home.display()
    );
    let out = command_isolated("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .args([
            "env",
            "-i",
            &format!("HOME={}", home.display()),
            "PATH=/usr/bin:/bin",
            // No settings file of this machine (its nix.conf turns the sandbox off).
            "NIX_CONF_DIR=/nonexistent",
            "FIRN_CONF_DIR=/nonexistent",
            "NIX_USER_CONF_FILES=",
        ])
        .args(["sh", "-c", &script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = String::from_utf8(out.stdout).unwrap();
    let real = home
        .join(".local/share/firn/root")
        .join(path.trim().trim_start_matches('/'));
    let seen = fs::read_to_string(&real).unwrap();
    let lines: Vec<&str> = seen.lines().collect();
    assert_eq!(lines[0], "uid=1000(nixbld) gid=100(nixbld)");
    let map: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(map, ["1000", "65534", "1"], "mapped to the caller");
    assert_eq!(lines[2], "localhost");
    assert_eq!(lines[3..].join(" "), "bin build dev etc nix proc tmp");
    // The store the user wrote is one firn and Nix accept.
    assert_verifies(&home.join(".local/share/firn/root"), "the user's store");
    remove(&home);
}

/// `firn gc` running over and over while a sandboxed chain builds deletes nothing the
/// build needs or has produced (temp roots), and the spare sandbox roots firn keeps
/// between builds are left alone while it runs; once the realise is over, a collection
/// takes everything (nothing is rooted) and the store verifies.
#[test]
fn collections_during_a_build_spare_what_it_uses() {
    if !can_build() {
        return;
    }
    let root = tempdir("gc-during-build");
    // Directory outputs, read by the next step only after a while: they are mounted
    // into its sandbox, so a collection that deleted one would be seen (a file input
    // is a hard link, which a deletion in the store would not disturb).
    let a = busybox_drv(&root, "step-a", "mkdir $out; echo a > $out/f", &[], &[]);
    let b = busybox_drv(
        &root,
        "step-b",
        "sleep 1; mkdir $out; cat /nix/store/*-step-a/f > $out/f; echo b >> $out/f",
        &[],
        &[&a],
    );
    let c = busybox_drv(
        &root,
        "step-c",
        "sleep 1; cat /nix/store/*-step-b/f > $out; echo c >> $out",
        &[],
        &[&b],
    );
    // The derivations are rooted (as a user's would be); the outputs are not, while
    // they are being built: only the temp roots of the running realise protect them.
    // The final one becomes rooted by `--add-root` once built (otherwise a collection
    // started just before the realise exits may rightly take it).
    let gcroot = root.join("nix/var/nix/gcroots/test-drv");
    std::os::unix::fs::symlink(&c, &gcroot).unwrap();
    let result = root.join("result");
    let mut realise = firn_command()
        .args(["--store", root.to_str().unwrap()])
        .args(["--option", "sandbox-paths", "/bin/busybox", "realise", &c])
        .arg("--add-root")
        .arg(&result)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut collections = 0;
    let started = std::time::Instant::now();
    while realise.try_wait().unwrap().is_none() {
        ok(firn_at(&root, &["gc"], None));
        collections += 1;
        assert!(started.elapsed().as_secs() < 60, "realise hangs");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let out = realise.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "a collection broke the build: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(collections >= 5, "only {collections} collections ran");
    // As `nix-store -r --add-root`, the root is printed.
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        result.to_str().unwrap()
    );
    let built = real(
        &root,
        fs::read_link(&result).unwrap().to_str().unwrap().as_bytes(),
    );
    assert_eq!(fs::read_to_string(&built).unwrap(), "a\nb\nc\n");
    assert_verifies(&root, "after the build");
    // Without the roots, a collection deletes the outputs and the derivations, and no spare root or chroot is left in the store directory.
    fs::remove_file(&gcroot).unwrap();
    fs::remove_file(&result).unwrap();
    let gc = firn_at(&root, &["gc"], None);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&gc.stdout),
        String::from_utf8_lossy(&gc.stderr)
    );
    assert!(
        gc.status.success() && !said.lines().any(|l| l.starts_with("0 store paths")),
        "{said}"
    );
    assert!(!built.exists());
    let leftovers: Vec<String> = store_entries(&root)
        .into_iter()
        .filter(|n| n.contains("chroot") || n.contains("spare") || n.ends_with(".lock"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    remove(&root);
}

/// When the namespaces cannot be made (here: no user namespace may be created), the
/// build fails with one clear error naming the step and what to do — it is never run
/// unsandboxed (Nix #8165) — and leaves no root, build directory or output behind.
#[test]
fn namespace_failure_is_an_error_not_an_unsandboxed_build() {
    if !can_build() {
        return;
    }
    let root = tempdir("ns-fail");
    let tmp = root.join("tmp");
    fs::create_dir_all(&tmp).unwrap();
    let json = r#"{"name":"nsfail","outputs":{"out":{}},"inputSrcs":[],"inputDrvs":{},"system":"x86_64-linux","builder":"/bin/sh","args":["-c","echo built > $out"],"env":{"name":"nsfail","out":"","builder":"/bin/sh","system":"x86_64-linux"}}"#;
    fs::write(root.join("d.json"), json).unwrap();
    // A user namespace of our own in which the limit on user namespaces is 0; firn is
    // root there, without build users (their ids are not mapped).
    let script = format!(
        "echo 0 > /proc/sys/user/max_user_namespaces || exit 99; \
         d=$({firn} --store {r} derivation add < {r}/d.json) || exit 98; \
         TMPDIR={t} {firn} --store {r} --option build-users-group '' \
           --option sandbox-paths /bin/sh=/bin/busybox realise \"$d\"",
        firn = firn_bin(),
        r = root.display(),
        t = tmp.display()
    );
    let out = command_isolated("unshare")
        .args(["--user", "--map-root-user", "sh", "-c", &script])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(
        errors[0].contains("creating the user, mount, PID, IPC, UTS and network namespaces")
            && errors[0].contains("max_user_namespaces")
            && errors[0].contains("--option sandbox false"),
        "{}",
        errors[0]
    );
    assert!(out.stdout.is_empty(), "nothing was built");
    let left: Vec<String> = store_entries(&root)
        .into_iter()
        .filter(|n| !n.ends_with(".drv") && !n.ends_with(".lock"))
        .collect();
    assert!(left.is_empty(), "left in the store: {left:?}");
    assert_eq!(fs::read_dir(&tmp).unwrap().count(), 0, "build dir left");
    assert_verifies(&root, "after the failed start");
    remove(&root);
}

/// Many directory inputs get their mount points on a tmpfs under an overlay (the
/// root's store dir is the upper layer): the builder sees each input, read-only, and
/// nothing else in the store; its output lands in the store as usual; nothing is left
/// in /dev/shm or the store directory. A few inputs take the plain path: same result.
#[test]
fn many_directory_inputs_are_mounted_through_an_overlay() {
    if !can_build() {
        return;
    }
    let root = tempdir("overlay-inputs");
    // What a firn killed mid-build would leave in /dev/shm (no process has this pid):
    // the next run that needs the overlay removes it.
    let shm_dir = Path::new("/dev/shm");
    let has_shm = shm_dir.is_dir();
    if !has_shm {
        eprintln!("NOTE: no /dev/shm here: the mount points go on disk, the overlay is not used");
    }
    let stale = shm_dir.join(".firn-lower-999999999-x.drv.chroot");
    if has_shm {
        fs::create_dir_all(stale.join("some-input")).unwrap();
    }
    for count in [40, 3] {
        let src = root.join(format!("src-{count}"));
        let mut inputs = Vec::new();
        for i in 0..count {
            let d = src.join(format!("dir-{count}-{i}"));
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join("f"), format!("{i}\n")).unwrap();
            let p = ok(firn_at(&root, &["add", d.to_str().unwrap()], None));
            inputs.push(p.trim().to_owned());
        }
        let script = format!(
            "set -e; for d in {all}; do cat $d/f >> $out; done; \
             if echo x > {first}/f 2>/dev/null; then echo WRITABLE >> $out; fi; \
             if mkdir {first}/new 2>/dev/null; then echo WRITABLE >> $out; fi; \
             ls /nix/store | wc -l > /build/n; echo \"entries $(cat /build/n)\" >> $out; \
             stat -c '%A %U %G' /nix/store >> $out; \
             echo \"overlay $(grep -c ' /nix/store overlay ' /proc/self/mounts || true)\" >> $out",
            all = inputs.join(" "),
            first = inputs[0]
        );
        let srcs: Vec<&str> = inputs.iter().map(String::as_str).collect();
        let drv = busybox_drv(&root, &format!("many-{count}"), &script, &srcs, &[]);
        let out = realise_with(&root, "/bin/busybox", &drv);
        assert!(
            out.status.success(),
            "{count}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got = fs::read_to_string(real(&root, &out.stdout)).unwrap();
        let mut want: String = (0..count).map(|i| format!("{i}\n")).collect();
        // The inputs and the output being built, nothing else.
        want.push_str(&format!("entries {}\n", count + 1));
        want.push_str("drwxrwxr-t nobody nixbld\n");
        // The overlay is what served the many inputs (and only them).
        let overlay = usize::from(has_shm && count >= 16);
        want.push_str(&format!("overlay {overlay}\n"));
        assert_eq!(got, want, "{count} inputs");
    }
    let shm: Vec<String> = fs::read_dir(shm_dir)
        .into_iter()
        .flatten()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".firn-lower"))
        .collect();
    assert!(shm.is_empty(), "left in /dev/shm: {shm:?}");
    let left: Vec<String> = store_entries(&root)
        .into_iter()
        .filter(|n| n.contains("chroot") || n.contains("spare"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    assert_verifies(&root, "after the builds");
    remove(&root);
}

/// Spare roots keep the input links of their last build for the next (a chain needs
/// most of them again), but a build sees only its own inputs: what the last build had
/// and this one has not is gone before its builder starts.
#[test]
fn a_reused_root_shows_each_build_only_its_own_inputs() {
    if !can_build() {
        return;
    }
    let root = tempdir("reused-root-inputs");
    let a = busybox_drv(&root, "leaf-a", "echo a > $out", &[], &[]);
    let b = busybox_drv(&root, "leaf-b", "echo b > $out", &[], &[]);
    let listing = "ls /nix/store | sed 's/^[a-z0-9]*-//' | sort | tr '\\n' ' ' >> $out; \
                   for n in a b; do cat /nix/store/*-leaf-$n >> $out 2>/dev/null || true; done";
    // `x` needs a and b; `y` needs a and x (built after x, in x's root, one job).
    let x = busybox_drv(
        &root,
        "x",
        &format!("echo x > $out; {listing}"),
        &[],
        &[&a, &b],
    );
    let y = busybox_drv(
        &root,
        "y",
        &format!("echo y > $out; {listing}"),
        &[],
        &[&a, &x],
    );
    let y_out = ok(firn_at(
        &root,
        &[
            "--option",
            "sandbox-paths",
            "/bin/busybox",
            "realise",
            "-j1",
            &y,
        ],
        None,
    ));
    let got_y = fs::read_to_string(real(&root, y_out.as_bytes())).unwrap();
    assert_eq!(got_y, "y\nleaf-a x y a\n");
    let x_out = ok(firn_at(&root, &["query", "--outputs", &x], None));
    let got_x = fs::read_to_string(real(&root, x_out.as_bytes())).unwrap();
    assert_eq!(got_x, "x\nleaf-a leaf-b x a\nb\n");
    assert_verifies(&root, "after the builds");
    remove(&root);
}

/// A sandboxed build's directory is reused by the next sandboxed build of the run, but
/// what the last builder left in it (and its mode) does not come along, and no build
/// directory is left once the run is over.
#[test]
fn a_reused_build_directory_comes_empty_and_private() {
    if !can_build() {
        return;
    }
    let root = tempdir("reused-build-dir");
    let tmp = root.join("tmp");
    fs::create_dir_all(&tmp).unwrap();
    let probe = "echo \"$(ls -A /build | tr '\\n' ' ')|$(stat -c '%a %u' /build)\" >> $out";
    let first = busybox_drv(
        &root,
        "first",
        &format!("{probe}; echo junk > /build/junk; mkdir /build/d; chmod 777 /build"),
        &[],
        &[],
    );
    let second = busybox_drv(&root, "second", probe, &[], &[&first]);
    let second_out = ok(firn_command()
        .args(["--store", root.to_str().unwrap()])
        .args(["--option", "sandbox-paths", "/bin/busybox"])
        .args(["realise", "-j1", &second])
        .env("TMPDIR", &tmp)
        .output()
        .unwrap());
    let got = fs::read_to_string(real(&root, second_out.as_bytes())).unwrap();
    assert_eq!(got, "|700 1000\n", "what the second build saw in /build");
    let first_out = ok(firn_at(&root, &["query", "--outputs", &first], None));
    let got = fs::read_to_string(real(&root, first_out.as_bytes())).unwrap();
    assert_eq!(got, "|700 1000\n", "what the first build saw in /build");
    let left: Vec<_> = fs::read_dir(&tmp)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "left in TMPDIR: {left:?}");
    remove(&root);
}

/// No core dumps in the sandbox even where firn's hard limit on them is finite (Nix
/// 2.8's `setrlimit(RLIMIT_CORE, {0, RLIM_INFINITY})` fails as a whole there, so its
/// builders keep the caller's limit).
#[test]
fn no_core_dumps_under_a_finite_hard_limit() {
    if !can_build() {
        return;
    }
    let root = tempdir("core-limit");
    let drv = busybox_drv(
        &root,
        "core",
        "ulimit -c > $out; ulimit -H -c >> $out",
        &[],
        &[],
    );
    let out = command_isolated("prlimit")
        .args(["--core=4096:8192", "--"])
        .arg(firn_bin())
        .args([
            "--store",
            root.to_str().unwrap(),
            "--option",
            "sandbox-paths",
            "/bin/busybox",
            "realise",
            &drv,
        ])
        .output()
        .unwrap();
    let printed = ok(out);
    let limits = fs::read_to_string(real(&root, printed.as_bytes())).unwrap();
    let limits: Vec<&str> = limits.lines().collect();
    // Soft limit 0; the hard limit (busybox counts 512-byte blocks) is left as it was.
    assert_eq!(limits, ["0", "16"], "{limits:?}");
    remove(&root);
}
