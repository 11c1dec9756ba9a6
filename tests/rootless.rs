//! An ordinary user's whole path, as the README shows it: instantiate into the per-user
//! store, realise there, and run the result with `firn run`, which gives the store's
//! `/nix` a place in a user and mount namespace; another user's store refused with
//! what to do; `--store` read as Nix reads it.
//!
//! The ordinary user is uid 65534, simulated with `setpriv` from root: those tests need
//! root, nix-instantiate and /bin/busybox (in CI they run, elsewhere they say SKIPPED).

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod common;

use common::*;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// A derivation with a dependency: `hi`'s `bin/hi` prints a line and the file `dep`
/// wrote. Built by busybox only.
const HI_NIX: &str = r#"
let dep = derivation {
  name = "dep"; system = "x86_64-linux"; builder = "/bin/busybox";
  args = [ "sh" "-c" "echo from-dep > $out" ];
};
in derivation {
  name = "hi"; system = "x86_64-linux"; builder = "/bin/busybox"; inherit dep;
  args = [ "sh" "-c" "mkdir -p $out/bin; printf '#!/bin/busybox sh\\necho hello from hi\\n/bin/busybox cat %s\\n' $dep > $out/bin/hi; /bin/busybox chmod +x $out/bin/hi" ];
}
"#;

/// A home for uid 65534 holding a copy of firn (the test binary's directory is not
/// theirs to read) and `hi.nix`.
fn nobody_home(tag: &str) -> PathBuf {
    let home = tempdir(tag);
    fs::copy(firn_bin(), home.join("firn")).unwrap();
    fs::write(home.join("hi.nix"), HI_NIX).unwrap();
    let st = Command::new("chown")
        .args(["-R", "65534:65534"])
        .arg(&home)
        .status()
        .unwrap();
    assert!(st.success());
    let mut p = home.clone();
    while let Some(parent) = p.parent() {
        // The home's parents must be traversable.
        let _ = Command::new("chmod").arg("o+x").arg(parent).status();
        p = parent.to_path_buf();
    }
    home
}

/// `sh -c script` as uid 65534 in `home` with a clean environment (no settings file of
/// this machine), `stdin` as its input.
fn as_nobody(home: &Path, script: &str, extra_env: &[&str], stdin: &str) -> Output {
    let mut child = command_isolated("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .args([
            "env",
            "-i",
            &format!("HOME={}", home.display()),
            "PATH=/usr/bin:/bin",
            "NIX_CONF_DIR=/nonexistent",
            "FIRN_CONF_DIR=/nonexistent",
            "NIX_USER_CONF_FILES=",
        ])
        .args(extra_env)
        .args(["sh", "-c", &format!("cd \"$HOME\" && {script}")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The host's mount table (this process's mount namespace, where the tests run).
fn mounts() -> Vec<String> {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .map(|l| l.split(' ').skip(3).take(2).collect::<Vec<_>>().join(" "))
        .collect()
}

/// The mounts of `table` that `firn run` could have left: under `home`, or at `/nix`.
fn ours(table: &[String], home: &Path) -> Vec<String> {
    let home = home.display().to_string();
    table
        .iter()
        .filter(|m| {
            let point = m.split(' ').nth(1).unwrap_or("");
            m.contains(&home) || point == "/nix" || point.starts_with("/nix/")
        })
        .cloned()
        .collect()
}

/// Instantiate and realise `hi.nix` as uid 65534 into their own store, with a
/// `./result` link; returns the output path.
fn build_hi(home: &Path) -> (String, String) {
    let inst = as_nobody(
        home,
        "nix-instantiate --store \"$HOME/.local/share/firn/root\" --option substituters '' hi.nix",
        &[],
        "",
    );
    let drv = ok(inst).trim().to_owned();
    assert!(
        drv.starts_with("/nix/store/") && drv.ends_with("-hi.drv"),
        "{drv}"
    );
    let out = as_nobody(
        home,
        &format!("./firn --option sandbox-paths /bin/busybox realise --add-root ./result {drv}"),
        &[],
        "",
    );
    // As `nix-store -r --add-root`, the root is printed; it points at the output.
    assert_eq!(ok(out).trim(), home.join("result").to_str().unwrap());
    let path = fs::read_link(home.join("result"))
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        path.starts_with("/nix/store/") && path.ends_with("-hi"),
        "{path}"
    );
    (drv, path)
}

#[test]
fn an_ordinary_user_runs_what_they_built() {
    if !can_build() {
        return;
    }
    let before = mounts();
    let home = nobody_home("rootless-walk");
    let store = home.join(".local/share/firn/root");
    let (drv, path) = build_hi(&home);

    // On the host, the output is under the user's store, and ./result dangles.
    assert!(store
        .join(path.trim_start_matches('/'))
        .join("bin/hi")
        .is_file());
    assert_eq!(
        fs::read_link(home.join("result")).unwrap(),
        Path::new(&path)
    );
    assert!(
        fs::metadata(home.join("result")).is_err(),
        "/nix/store/…-hi must not exist on the host"
    );

    // In `firn run`, it does.
    let out = as_nobody(&home, "./firn run -- ./result/bin/hi", &[], "");
    assert_eq!(ok(out), "hello from hi\nfrom-dep\n");
    let out = as_nobody(&home, "./firn run cat result/bin/hi", &[], "");
    assert!(ok(out).starts_with("#!/bin/busybox sh\n"));

    // The store's /nix is /nix: the outputs and derivations are listed there.
    let listed = ok(as_nobody(&home, "./firn run -- ls /nix/store", &[], ""));
    let listed: Vec<&str> = listed.lines().collect();
    for p in [&path, &drv] {
        let base = p.trim_start_matches("/nix/store/");
        assert!(listed.contains(&base), "{base} in {listed:?}");
    }
    assert!(listed.iter().any(|l| l.ends_with("-dep")), "{listed:?}");
    assert_eq!(
        listed
            .iter()
            .copied()
            .collect::<std::collections::BTreeSet<_>>(),
        store_entries(&store).iter().map(String::as_str).collect(),
        "the same store"
    );

    // Nix works in there, on the same store, and finds the same derivation.
    let again = as_nobody(
        &home,
        "./firn run -- nix-instantiate --store \"$HOME/.local/share/firn/root\" --option substituters '' hi.nix",
        &[],
        "",
    );
    assert_eq!(ok(again).trim(), drv);

    // The caller is mapped to itself, without setgroups; the host is visible.
    let who = ok(as_nobody(
        &home,
        "./firn run -- sh -c 'id -u; id -g; cat /proc/self/uid_map /proc/self/setgroups; ls -d \"$HOME\"/hi.nix; ls -d /etc/passwd'",
        &[],
        "",
    ));
    let who: Vec<String> = who
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    assert_eq!(who[..4], ["65534", "65534", "65534 65534 1", "deny"]);
    assert_eq!(
        who[4..],
        [format!("{}/hi.nix", home.display()), "/etc/passwd".into()]
    );

    // The command's status is firn's; one that cannot be run is 127 or 126.
    let out = as_nobody(&home, "./firn run -- sh -c 'exit 7'", &[], "");
    assert_eq!(out.status.code(), Some(7));
    let out = as_nobody(&home, "./firn run -- no-such-command --flag", &[], "");
    assert_eq!(out.status.code(), Some(127));
    assert_eq!(
        text(&out.stderr),
        "error: unable to execute 'no-such-command': No such file or directory\n"
    );
    let out = as_nobody(&home, "./firn run -- ./hi.nix", &[], "");
    assert_eq!(out.status.code(), Some(126));
    assert_eq!(
        text(&out.stderr),
        "error: unable to execute './hi.nix': Permission denied\n"
    );

    // `firn shell`: $SHELL, else /bin/sh, the same way.
    let out = as_nobody(&home, "./firn shell", &[], "cat /nix/store/*-dep; exit 4\n");
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "from-dep\n");
    let my_shell = home.join("my-shell");
    fs::write(
        &my_shell,
        "#!/bin/sh\necho \"my shell, $# arguments, in $(ls -d /nix/store)\"\n",
    )
    .unwrap();
    fs::set_permissions(&my_shell, fs::Permissions::from_mode(0o755)).unwrap();
    let shell_env = format!("SHELL={}", my_shell.display());
    let out = as_nobody(&home, "./firn shell", &[&shell_env], "");
    assert_eq!(ok(out), "my shell, 0 arguments, in /nix/store\n");

    // Root runs the same with --store on the user's store.
    let out = firn_command()
        .args([
            "--store",
            store.to_str().unwrap(),
            "run",
            "--",
            "result/bin/hi",
        ])
        .current_dir(&home)
        .output()
        .unwrap();
    assert_eq!(ok(out), "hello from hi\nfrom-dep\n");

    // Nothing of it is left mounted on the host: not the tmpfs on the store root, nor
    // the store at /nix (the namespace's mounts are private).
    let after = mounts();
    assert_eq!(ours(&before, &home), ours(&after, &home));
    assert!(ours(&after, &home).is_empty(), "{after:?}");
    assert_verifies(&store, "the user's store");
    remove(&home);
}

/// Root without --store runs the command directly: the real /nix, this mount namespace.
#[test]
fn root_runs_the_command_directly() {
    if !nix::unistd::Uid::effective().is_root() {
        assert!(!is_ci(), "CI runs the tests as root");
        eprintln!("SKIPPED: not root");
        return;
    }
    let ns = fs::read_link("/proc/self/ns/mnt").unwrap();
    let out = firn_command()
        .args(["run", "--", "readlink", "/proc/self/ns/mnt"])
        .output()
        .unwrap();
    assert_eq!(ok(out).trim(), ns.to_str().unwrap());
    let out = firn_command()
        .args(["run", "sh", "-c", "exit 5"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(5));
    // With --store, its /nix in a mount namespace of its own.
    let root = tempdir("root-run");
    let out = firn_command()
        .arg("--store")
        .arg(&root)
        .args([
            "run",
            "--",
            "sh",
            "-c",
            "readlink /proc/self/ns/mnt; stat -c %i /nix/store",
        ])
        .output()
        .unwrap();
    let out = ok(out);
    let lines: Vec<&str> = out.lines().collect();
    assert_ne!(lines[0], ns.to_str().unwrap());
    let ino = fs::metadata(root.join("nix/store")).unwrap().ino();
    assert_eq!(lines[1], ino.to_string());
    remove(&root);
}

/// Another user's store: an error naming both users and what to do, for every command
/// (and `firn run`), the store untouched.
#[test]
fn another_users_store_says_what_to_do() {
    if !can_build() {
        return;
    }
    let home = nobody_home("rootless-foreign");
    let theirs = tempdir("rootless-foreign-store");
    let file = home.join("f");
    fs::write(&file, "some content").unwrap();
    let added = ok(firn_at(&theirs, &["add", file.to_str().unwrap()], None));
    let added = added.trim();
    let entries = store_entries(&theirs);
    let expected = format!(
        "error: the store at '{}' belongs to user 'root' and cannot be opened by 'nobody': \
         use your own store (drop --store to use {}/.local/share/firn/root) or a daemon\n",
        theirs.display(),
        home.display()
    );
    for cmd in [
        format!("./firn --store {} query --hash {added}", theirs.display()),
        format!("./firn --store {} add f", theirs.display()),
        format!("./firn --store {} run true", theirs.display()),
        format!("FIRN_STORE={} ./firn shell", theirs.display()),
    ] {
        let out = as_nobody(&home, &cmd, &[], "");
        assert_eq!(out.status.code(), Some(1), "{cmd}");
        assert_eq!(text(&out.stderr), expected, "{cmd}");
        assert!(out.stdout.is_empty(), "{cmd}");
    }
    assert_eq!(store_entries(&theirs), entries);
    assert_verifies(&theirs, "the other user's store");
    // Dropping --store gives the user their own.
    let out = as_nobody(&home, "./firn add f", &[], "");
    assert_eq!(ok(out).trim(), added);
    assert!(home
        .join(".local/share/firn/root")
        .join(added.trim_start_matches('/'))
        .exists());
    remove(&home);
    remove(&theirs);
}

/// `--store SPEC` as Nix 2.8 reads it: a relative path with a `/` is a local store at
/// its absolute path, a bare word is no store, and a root that cannot be made says
/// which directory, in Nix's words.
#[test]
fn store_specs_are_read_as_nix_reads_them() {
    if !have_nix() {
        return;
    }
    let dir = tempdir("store-specs");
    fs::write(dir.join("plain-file"), "").unwrap();
    let query = [
        "query",
        "--hash",
        "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-x",
    ];
    let nix_query = [
        "-q",
        "--hash",
        "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-x",
    ];
    for (spec, expected) in [
        (
            "./firn-rel",
            "error: path '/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-x' is not valid\n",
        ),
        ("sub/../nix-rel", ""),
        (
            "bare-word",
            "error: don't know how to open Nix store 'bare-word'\n",
        ),
        (
            "/proc/no-such-dir/deeper",
            "error: creating directory '/proc/no-such-dir': No such file or directory\n",
        ),
        (
            "/proc/self",
            "error: creating directory '/proc/self/nix': No such file or directory\n",
        ),
        ("plain-file/x", ""),
        ("/etc/passwd", "error: '/etc/passwd' is not a directory\n"),
    ] {
        let firn = firn_command()
            .arg("--store")
            .arg(spec)
            .args(query)
            .current_dir(&dir)
            .output()
            .unwrap();
        let nix = command("nix-store")
            .args(["--store", spec, "--option", "substituters", ""])
            .args(nix_query)
            .current_dir(&dir)
            .output()
            .unwrap();
        assert_eq!(firn.status.code(), Some(1), "{spec}");
        assert_eq!(nix.status.code(), Some(1), "{spec}");
        assert_eq!(text(&firn.stderr), text(&nix.stderr), "{spec}");
        if !expected.is_empty() {
            assert_eq!(text(&firn.stderr), expected, "{spec}");
        }
    }
    // The relative stores are where Nix put its own, at the absolute path.
    assert!(dir.join("firn-rel/nix/store").is_dir());
    assert!(dir.join("nix-rel/nix/store").is_dir());
    assert!(!dir.join("sub").exists());
    assert_eq!(
        text(
            &firn_command()
                .args(["--store", "plain-file/x"])
                .args(query)
                .current_dir(&dir)
                .output()
                .unwrap()
                .stderr
        ),
        format!("error: '{}/plain-file' is not a directory\n", dir.display())
    );
    // The store firn made at ./firn-rel is one Nix opens at the same place.
    let added = ok(firn_command()
        .args(["--store", "./firn-rel", "add", "plain-file"])
        .current_dir(&dir)
        .output()
        .unwrap());
    let valid = command("nix-store")
        .args(["--store", "./firn-rel", "--option", "substituters", ""])
        .args(["--check-validity", added.trim()])
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(valid.status.success(), "{}", text(&valid.stderr));
    remove(&dir);
}

/// An ordinary user's `firn add` gives the tree the store's metadata as it restores it
/// (no second walk): dirs 0555, files 0444 or 0555, mtime 1, the user's own. A failed
/// add, stopped after some directories were read-only already, leaves nothing behind
/// (an ordinary user cannot delete entries of a 0555 directory without making it
/// writable first).
#[test]
fn an_ordinary_users_add_is_canonical_and_a_failed_one_leaves_nothing() {
    if !can_build() {
        return;
    }
    let home = nobody_home("rootless-add");
    let store = home.join("st");
    // "a" (with a subdirectory) is restored, and read-only, before "z/secret" fails
    // ("m/big" makes sure the end of "a" has reached the restorer by then).
    let make = "mkdir -p t/a/b t/m t/z && echo 1 > t/a/b/f && echo 2 > t/a/x && ln -s x t/a/l \
                && printf '#!/bin/sh\\n' > t/a/run && chmod 755 t/a/run \
                && head -c 3000000 /dev/zero > t/m/big \
                && echo 3 > t/z/secret && chmod 000 t/z/secret";
    ok(as_nobody(&home, make, &[], ""));
    let failed = as_nobody(&home, "./firn --store \"$HOME/st\" add t", &[], "");
    assert!(!failed.status.success());
    let err = text(&failed.stderr);
    assert!(
        err.starts_with("error: ") && err.contains("secret") && err.lines().count() == 1,
        "{err}"
    );
    let left: Vec<_> = fs::read_dir(store.join("nix/store"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != ".links")
        .collect();
    assert!(left.is_empty(), "a failed add left {left:?}");

    ok(as_nobody(&home, "chmod 644 t/z/secret", &[], ""));
    let out = as_nobody(&home, "./firn --store \"$HOME/st\" add t", &[], "");
    let path = ok(out).trim().to_owned();
    let real = store.join(path.trim_start_matches('/'));
    let mut seen = 0;
    for e in walk(&real) {
        let m = fs::symlink_metadata(&e).unwrap();
        let at = e.display();
        assert_eq!((m.uid(), m.gid()), (65534, 65534), "{at}");
        assert_eq!((m.mtime(), m.mtime_nsec()), (1, 0), "{at}");
        let mode = m.mode() & 0o7777;
        if m.is_dir() {
            assert_eq!(mode, 0o555, "{at}");
        } else if m.is_file() {
            let want = if e.ends_with("run") { 0o555 } else { 0o444 };
            assert_eq!(mode, want, "{at}");
        }
        seen += 1;
    }
    assert_eq!(
        seen, 11,
        "t, a, a/b, a/b/f, a/x, a/l, a/run, m, m/big, z, z/secret"
    );
    let verify = as_nobody(
        &home,
        "./firn --store \"$HOME/st\" verify --check-contents",
        &[],
        "",
    );
    assert!(verify.status.success(), "{}", text(&verify.stderr));
    remove(&home);
}

/// `root` and everything below it, not following symlinks.
fn walk(root: &Path) -> Vec<PathBuf> {
    let mut all = vec![root.to_path_buf()];
    let mut i = 0;
    while i < all.len() {
        let p = all[i].clone();
        if fs::symlink_metadata(&p).unwrap().is_dir() {
            for e in fs::read_dir(&p).unwrap() {
                all.push(e.unwrap().path());
            }
        }
        i += 1;
    }
    all
}
