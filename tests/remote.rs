//! firn as a Nix remote builder: a real `sshd` on 127.0.0.1 (its own host key, user key
//! and config, made here), real Nix 2.8 as the client (`nix-build --builders
//! 'ssh://root@127.0.0.1?remote-program=firn&remote-store=R …' --max-jobs 0`, `nix copy
//! --to/--from ssh://…`), and firn's `--serve --write --store R` at the other end. Needs
//! root, Nix, busybox and OpenSSH's server (`.ci/run` installs them): in CI these tests
//! must run; elsewhere they print SKIPPED.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

const SSHD: &str = "/usr/sbin/sshd";

/// A derivation DAG built by busybox: `top` needs `a` and `b`, `b` a source file.
const DAG: &str = r#"
let
  mk = name: script: derivation {
    inherit name; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" script ];
  };
  src = builtins.toFile "input.txt" "hello from a source\n";
  a = mk "a" "echo building a; echo a > $out";
  b = mk "b" "echo building b; mkdir $out; echo b > $out/b; cat ${src} > $out/src";
  top = mk "top" "echo building top; mkdir $out; cat ${a} > $out/a; ln -s ${b} $out/b";
  fail = mk "fail" "echo about to fail; echo oops >&2; exit 3";
in { inherit a b top fail; }
"#;

fn can_ssh() -> bool {
    if !can_build() {
        return false;
    }
    let have = Path::new(SSHD).exists()
        && Command::new("ssh-keygen").arg("-?").output().is_ok()
        && Command::new("ssh").arg("-V").output().is_ok();
    if have {
        return true;
    }
    assert!(
        !is_ci(),
        "CI must run the remote tests: install openssh-server"
    );
    eprintln!("SKIPPED: remote building needs {SSHD}, ssh and ssh-keygen (openssh-server)");
    false
}

/// A throw-away sshd for root on 127.0.0.1, and the settings both ends read.
struct Sshd {
    dir: PathBuf,
    port: u16,
    child: Child,
}

impl Sshd {
    fn start(tag: &str) -> Self {
        let dir = tempdir(tag);
        let conf = dir.join("conf");
        std::fs::create_dir_all(&conf).unwrap();
        std::fs::write(
            conf.join("nix.conf"),
            "sandbox = true\nsandbox-paths = /bin/sh=/bin/busybox\nsubstituters =\nbuild-users-group =\n",
        )
        .unwrap();
        for key in ["hostkey", "userkey"] {
            let o = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", ""])
                .arg("-f")
                .arg(dir.join(key))
                .output()
                .unwrap();
            assert!(o.status.success(), "ssh-keygen: {}", text(&o.stderr));
        }
        std::fs::copy(dir.join("userkey.pub"), dir.join("authorized_keys")).unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let d = dir.display();
        let conf_d = conf.display();
        // The remote firn (and nix-store) read the test's settings, not this machine's.
        let config = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/hostkey\nPermitRootLogin yes\n\
             AuthorizedKeysFile {d}/authorized_keys\nStrictModes no\nUsePAM no\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nPidFile {d}/sshd.pid\n\
             SetEnv NIX_CONF_DIR={conf_d} FIRN_CONF_DIR={conf_d} NIX_USER_CONF_FILES= \
             XDG_CONFIG_HOME={conf_d}\n"
        );
        std::fs::write(dir.join("sshd_config"), config).unwrap();
        // sshd's privilege separation directory.
        std::fs::create_dir_all("/run/sshd").unwrap();
        let child = Command::new(SSHD)
            .args(["-D", "-e", "-f"])
            .arg(dir.join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("sshd.log")).unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "sshd did not start: {}",
                std::fs::read_to_string(dir.join("sshd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { dir, port, child }
    }

    fn conf(&self) -> PathBuf {
        self.dir.join("conf")
    }

    /// A store root under the test directory.
    fn root(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// `ssh://root@127.0.0.1?remote-program=PROG&remote-store=ROOT`.
    fn url(&self, program: &str, remote: &Path) -> String {
        format!(
            "ssh://root@127.0.0.1?remote-program={program}&remote-store={}",
            remote.display()
        )
    }

    /// A Nix client with the test's settings and ssh options.
    fn nix(&self, cmd: &str) -> Command {
        let mut c = command(cmd);
        let conf = self.conf();
        c.env("NIX_CONF_DIR", &conf)
            .env("NIX_USER_CONF_FILES", "")
            .env("XDG_CONFIG_HOME", &conf)
            .env_remove("NIX_CONFIG")
            .env(
                "NIX_SSHOPTS",
                format!(
                    "-p {} -i {} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
                     -o LogLevel=ERROR",
                    self.port,
                    self.dir.join("userkey").display()
                ),
            )
            .args(["--option", "substituters", ""]);
        c
    }

    fn expr(&self) -> PathBuf {
        let p = self.dir.join("dag.nix");
        std::fs::write(&p, DAG).unwrap();
        p
    }

    /// `nix-build ATTR` into `local`, every build on the remote through `program`.
    fn remote_build(&self, local: &Path, remote: &Path, program: &str, attr: &str) -> Output {
        let builders = format!("{} x86_64-linux", self.url(program, remote));
        self.nix("nix-build")
            .arg("--store")
            .arg(local)
            .arg(self.expr())
            .args(["-A", attr, "--no-out-link", "--max-jobs", "0", "--builders"])
            .arg(builders)
            .output()
            .unwrap()
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn ok_out(o: Output, what: &str) -> String {
    assert!(
        o.status.success(),
        "{what}: {}\n{}",
        o.status,
        text(&o.stderr)
    );
    text(&o.stdout)
}

/// Each path of `top`'s closure in `root` with its NAR hash, as `nix-store -q --hash`.
fn closure_hashes(root: &Path, top: &str) -> Vec<(String, String)> {
    let r = root.to_str().unwrap();
    let paths = ok_out(
        run("nix-store", &["--store", r, "-qR", top], None),
        "nix-store -qR",
    );
    paths
        .lines()
        .map(|p| {
            let h = ok_out(
                run("nix-store", &["--store", r, "-q", "--hash", p], None),
                "nix-store -q --hash",
            );
            (p.to_owned(), h.trim().to_owned())
        })
        .collect()
}

#[test]
fn nix_builds_a_dag_on_firn_over_ssh_as_it_builds_locally() {
    if !can_ssh() {
        return;
    }
    let sshd = Sshd::start("remote-dag");
    let (local, remote, plain) = (sshd.root("local"), sshd.root("remote"), sshd.root("plain"));
    let o = sshd.remote_build(&local, &remote, firn_bin(), "top");
    let err = text(&o.stderr);
    let top = ok_out(o, "nix-build through firn").trim().to_owned();
    // Every derivation was built on the remote, its log shown by the client.
    for name in ["a", "b", "top"] {
        assert!(
            err.contains(&format!("-{name}.drv' on 'ssh://root@127.0.0.1")),
            "{name} not built remotely:\n{err}"
        );
        assert!(
            err.contains(&format!("building {name}\n")),
            "{name}'s log:\n{err}"
        );
    }
    // The same build by Nix alone.
    let o = sshd
        .nix("nix-build")
        .arg("--store")
        .arg(&plain)
        .arg(sshd.expr())
        .args(["-A", "top", "--no-out-link"])
        .output()
        .unwrap();
    assert_eq!(ok_out(o, "local nix-build").trim(), top);
    let want = closure_hashes(&plain, &top);
    assert_eq!(closure_hashes(&local, &top), want);
    assert_eq!(closure_hashes(&remote, &top), want);
    // The remote records the derivation it was sent as the deriver, as Nix's serve.
    let deriver = ok_out(
        run(
            "nix-store",
            &["--store", remote.to_str().unwrap(), "-q", "--deriver", &top],
            None,
        ),
        "deriver",
    );
    assert!(deriver.trim().ends_with("-top.drv"), "{deriver}");
    for root in [&local, &remote, &plain] {
        assert_verifies(root, &root.display().to_string());
    }
}

#[test]
fn a_failing_remote_build_fails_as_with_nix_store_serve() {
    if !can_ssh() {
        return;
    }
    let sshd = Sshd::start("remote-fail");
    let mut seen = Vec::new();
    for (i, program) in ["nix-store", firn_bin()].into_iter().enumerate() {
        let local = sshd.root(&format!("local{i}"));
        let remote = sshd.root(&format!("remote{i}"));
        let o = sshd.remote_build(&local, &remote, program, "fail");
        let err = text(&o.stderr)
            .replace(program, "PROG")
            .replace(&format!("remote{i}"), "REMOTE");
        assert!(
            err.contains("failed: builder for '"),
            "{program}: no remote failure:\n{err}"
        );
        assert!(
            err.contains("about to fail\noops\n"),
            "{program}: log:\n{err}"
        );
        // The client prints the log (its log fd) and the error (its hook's stderr) as
        // they come: under load either may be first, with either remote. The lines are
        // the same.
        let mut lines: Vec<String> = err.lines().map(str::to_owned).collect();
        lines.sort();
        seen.push((o.status.code(), lines));
        assert_verifies(&remote, program);
    }
    assert_eq!(seen[1], seen[0], "firn (right) against nix-store (left)");
}

#[test]
fn nix_copy_to_and_from_firn_over_ssh() {
    if !can_ssh() {
        return;
    }
    let sshd = Sshd::start("remote-copy");
    let (src, remote, back) = (sshd.root("src"), sshd.root("remote"), sshd.root("back"));
    let o = sshd
        .nix("nix-build")
        .arg("--store")
        .arg(&src)
        .arg(sshd.expr())
        .args(["-A", "top", "--no-out-link"])
        .output()
        .unwrap();
    let top = ok_out(o, "nix-build").trim().to_owned();
    let want = closure_hashes(&src, &top);
    let url = sshd.url(firn_bin(), &remote);
    let copy = |store: &Path, dir: &str| {
        let o = sshd
            .nix("nix")
            .args(["--extra-experimental-features", "nix-command", "copy"])
            .arg("--store")
            .arg(store)
            .args(["--no-check-sigs", dir, &url, &top])
            .output()
            .unwrap();
        ok_out(o, &format!("nix copy {dir}"));
    };
    copy(&src, "--to");
    assert_eq!(closure_hashes(&remote, &top), want);
    copy(&back, "--from");
    assert_eq!(closure_hashes(&back, &top), want);
    // Asked again, nothing is missing: the queries alone.
    copy(&src, "--to");
    let o = sshd
        .nix("nix")
        .args(["--extra-experimental-features", "nix-command", "path-info"])
        .args(["--store", &url, "-r", &top])
        .output()
        .unwrap();
    let listed = ok_out(o, "nix path-info");
    let mut paths: Vec<&str> = listed.lines().collect();
    paths.sort_unstable();
    let mut want_paths: Vec<&str> = want.iter().map(|(p, _)| p.as_str()).collect();
    want_paths.sort_unstable();
    assert_eq!(paths, want_paths);
    for root in [&src, &remote, &back] {
        assert_verifies(root, &root.display().to_string());
    }
}

/// The hello, then `cmd`, to `PROG --serve` (no `--write`).
fn serve_without_write(program: &str, root: &Path, cmd: u64) -> Output {
    let mut input = Vec::new();
    for n in [0x390c_9deb_u64, 0x207, cmd] {
        input.extend_from_slice(&n.to_le_bytes());
    }
    let r = root.to_str().unwrap();
    run(program, &["--serve", "--store", r], Some(&input))
}

#[test]
fn serve_without_write_refuses_imports_and_builds_as_nix_store() {
    if !have_nix() {
        return;
    }
    let dir = tempdir("serve-readonly");
    // ImportPaths, BuildPaths, BuildDerivation, AddToStoreNar; an unknown command.
    for cmd in [4, 6, 8, 9, 99] {
        let nix = serve_without_write("nix-store", &dir.join("nix"), cmd);
        let firn = serve_without_write(firn_bin(), &dir.join("firn"), cmd);
        assert_eq!(firn.status.code(), nix.status.code(), "command {cmd}");
        assert_eq!(text(&firn.stderr), text(&nix.stderr), "command {cmd}");
        assert_eq!(firn.stdout, nix.stdout, "command {cmd}");
    }
    // `firn serve --stdio` is the same server.
    let o = run(
        firn_bin(),
        &[
            "--store",
            dir.join("firn").to_str().unwrap(),
            "serve",
            "--stdio",
        ],
        Some(&[0x390c_9deb_u64, 0x207, 6].map(u64::to_le_bytes).concat()),
    );
    assert_eq!(text(&o.stderr), "error: building paths is not allowed\n");
}

// ---- firn as the dispatcher: `firn realise` with `builders`, over the same sshd. ----

impl Sshd {
    /// `firn realise` of `drv` in `local` with `builders` and `max-jobs`, the test's
    /// settings (sandbox, busybox) and ssh options.
    fn firn_realise(&self, local: &Path, builders: &str, max_jobs: &str, drv: &str) -> Output {
        self.firn_realise_with(local, builders, max_jobs, &[], drv)
    }

    /// [`Self::firn_realise`] with more settings.
    fn firn_realise_with(
        &self,
        local: &Path,
        builders: &str,
        max_jobs: &str,
        settings: &[(&str, &str)],
        drv: &str,
    ) -> Output {
        let mut c = self.nix(firn_bin());
        c.arg("--store")
            .arg(local)
            .args(["--option", "builders", builders])
            .args(["--option", "max-jobs", max_jobs]);
        for (k, v) in settings {
            c.args(["--option", k, v]);
        }
        c.args(["realise", drv]).output().unwrap()
    }

    fn instantiate(&self, local: &Path, attr: &str) -> String {
        instantiate_attr(local, &self.expr(), attr)
    }
}

/// The derivations `stderr` says were built, each with where: `""` for here, else the
/// machine's URI.
fn built_where(stderr: &str) -> Vec<(String, String)> {
    stderr
        .lines()
        .filter_map(|l| l.strip_prefix("building '"))
        .filter_map(|l| {
            let (drv, rest) = l.split_once('\'')?;
            let name = drv.rsplit_once('-')?.1.trim_end_matches(".drv").to_owned();
            let machine = match rest.strip_prefix(" on '") {
                Some(m) => m.split_once('\'')?.0.to_owned(),
                None => String::new(),
            };
            Some((name, machine))
        })
        .collect()
}

#[test]
fn firn_builds_a_dag_on_a_remote_firn_and_on_a_remote_nix() {
    if !can_ssh() {
        return;
    }
    let sshd = Sshd::start("dispatch-dag");
    let plain = sshd.root("plain");
    let o = sshd
        .nix("nix-build")
        .arg("--store")
        .arg(&plain)
        .arg(sshd.expr())
        .args(["-A", "top", "--no-out-link"])
        .output()
        .unwrap();
    let want_top = ok_out(o, "local nix-build").trim().to_owned();
    let want = closure_hashes(&plain, &want_top);
    for (i, program) in [firn_bin(), "nix-store"].into_iter().enumerate() {
        let (local, remote) = (
            sshd.root(&format!("local{i}")),
            sshd.root(&format!("remote{i}")),
        );
        let drv = sshd.instantiate(&local, "top");
        let url = sshd.url(program, &remote);
        let o = sshd.firn_realise(&local, &format!("{url} x86_64-linux"), "0", &drv);
        let err = text(&o.stderr);
        let top = ok_out(o, &format!("firn realise through {program}"));
        assert_eq!(top.trim(), want_top, "{program}");
        // Every build ran there, said so, and its log came back.
        let mut places = built_where(&err);
        places.sort();
        let expect: Vec<(String, String)> = ["a", "b", "top"]
            .iter()
            .map(|n| (n.to_string(), url.clone()))
            .collect();
        assert_eq!(places, expect, "{program}:\n{err}");
        for name in ["a", "b", "top"] {
            assert!(
                err.contains(&format!("building {name}\n")),
                "{program}: {name}'s log:\n{err}"
            );
        }
        assert_eq!(closure_hashes(&local, top.trim()), want, "{program}: local");
        assert_eq!(
            closure_hashes(&remote, top.trim()),
            want,
            "{program}: remote"
        );
        // The remote's output was registered here with the remote's deriver.
        let deriver = ok_out(
            run(
                "nix-store",
                &[
                    "--store",
                    local.to_str().unwrap(),
                    "-q",
                    "--deriver",
                    top.trim(),
                ],
                None,
            ),
            "deriver",
        );
        assert_eq!(deriver.trim(), drv, "{program}");
        // A second realise finds everything valid: nothing is sent again.
        let o = sshd.firn_realise(&local, &format!("{url} x86_64-linux"), "0", &drv);
        let err = text(&o.stderr);
        assert_eq!(ok_out(o, "again").trim(), want_top);
        assert!(built_where(&err).is_empty(), "{err}");
        for root in [&local, &remote] {
            assert_verifies(root, &format!("{program}: {}", root.display()));
        }
    }
}

/// Six leaves and a top: enough work that two machines with one slot each and one
/// local slot all get some.
const SPREAD: &str = r#"
let
  mk = name: script: derivation {
    inherit name; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" script ];
  };
  leaf = n: mk "leaf${toString n}" "echo leaf ${toString n}; sleep 1; echo ${toString n} > $out";
  leaves = map leaf [ 1 2 3 4 5 6 ];
in mk "spread" "cat ${toString leaves} > $out"
"#;

#[test]
fn a_dag_spreads_over_two_remotes_and_the_local_machine() {
    if !can_ssh() {
        return;
    }
    let sshd = Sshd::start("dispatch-spread");
    let expr = sshd.dir.join("spread.nix");
    std::fs::write(&expr, SPREAD).unwrap();
    let (local, r1, r2) = (sshd.root("local"), sshd.root("r1"), sshd.root("r2"));
    let drv = instantiate_attr(&local, &expr, "");
    let (u1, u2) = (sshd.url(firn_bin(), &r1), sshd.url("nix-store", &r2));
    let builders = format!("{u1} x86_64-linux - 1 ; {u2} x86_64-linux - 1");
    let o = sshd.firn_realise(&local, &builders, "1", &drv);
    let err = text(&o.stderr);
    let out = ok_out(o, "firn realise over two machines")
        .trim()
        .to_owned();
    let content = std::fs::read_to_string(local.join(out.trim_start_matches('/'))).unwrap();
    assert_eq!(content, "1\n2\n3\n4\n5\n6\n");
    let places = built_where(&err);
    assert_eq!(places.len(), 7, "{err}");
    for place in ["", &u1, &u2] {
        assert!(
            places
                .iter()
                .any(|(n, m)| m == place && n.starts_with("leaf")),
            "no leaf built at '{place}':\n{err}"
        );
    }
    // A leaf built on a machine is in that machine's store with the same NAR hash.
    let here = local.to_str().unwrap();
    for (name, machine) in &places {
        let remote = match machine {
            m if m == &u1 => &r1,
            m if m == &u2 => &r2,
            _ => continue,
        };
        let leaf_drv = ok_out(
            run("nix-store", &["--store", here, "-qR", &drv], None),
            "requisites",
        )
        .lines()
        .find(|l| l.ends_with(&format!("-{name}.drv")))
        .unwrap()
        .to_owned();
        let leaf_out = ok_out(
            run(
                "nix-store",
                &["--store", here, "-q", "--outputs", &leaf_drv],
                None,
            ),
            "outputs",
        );
        let hash = |root: &Path| {
            ok_out(
                run(
                    "nix-store",
                    &[
                        "--store",
                        root.to_str().unwrap(),
                        "-q",
                        "--hash",
                        leaf_out.trim(),
                    ],
                    None,
                ),
                "hash",
            )
        };
        assert_eq!(hash(remote), hash(&local), "{name} on {machine}");
    }
    for root in [&local, &r1, &r2] {
        assert_verifies(root, &root.display().to_string());
    }
}

#[test]
fn a_failed_remote_build_exits_100_naming_the_machine() {
    if !can_ssh() {
        return;
    }
    let sshd = Sshd::start("dispatch-fail");
    for (i, program) in [firn_bin(), "nix-store"].into_iter().enumerate() {
        let (local, remote) = (
            sshd.root(&format!("local{i}")),
            sshd.root(&format!("remote{i}")),
        );
        let drv = sshd.instantiate(&local, "fail");
        let url = sshd.url(program, &remote);
        let o = sshd.firn_realise(&local, &format!("{url} x86_64-linux"), "0", &drv);
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(100), "{program}:\n{err}");
        let want = format!(
            "error: build of '{drv}' on '{url}' failed: builder for '{drv}' failed with exit code 3"
        );
        assert!(
            err.lines().any(|l| l == want),
            "{program}: want {want}\n{err}"
        );
        // The log came back as the build wrote it.
        assert!(err.contains("about to fail\n"), "{program}:\n{err}");
        assert!(err.contains("oops\n"), "{program}:\n{err}");
        let log = ok_out(
            run(
                firn_bin(),
                &["--store", local.to_str().unwrap(), "log", &drv],
                None,
            ),
            "firn log",
        );
        assert!(log.contains("about to fail"), "{log}");
        for root in [&local, &remote] {
            assert_verifies(root, program);
        }
    }
}

#[test]
fn an_unreachable_machine_is_skipped_or_named_when_none_is_left() {
    if !can_ssh() {
        return;
    }
    let sshd = Sshd::start("dispatch-refused");
    let (local, remote) = (sshd.root("local"), sshd.root("remote"));
    let drv = sshd.instantiate(&local, "a");
    // Nothing listens on 127.0.0.2 (sshd is bound to 127.0.0.1): refused.
    let bad = format!(
        "ssh://root@127.0.0.2?remote-program={}&remote-store={}",
        firn_bin(),
        remote.display()
    );
    let o = sshd.firn_realise(&local, &format!("{bad} x86_64-linux"), "0", &drv);
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.lines()
            .any(|l| l.starts_with(&format!("warning: cannot build on '{bad}': "))),
        "{err}"
    );
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.starts_with(&format!(
            "error: cannot build '{drv}': max-jobs is 0 and no remote machine can take it ('{bad}' failed: "
        )),
        "{err}"
    );
    assert!(err.contains("Connection refused"), "ssh's reason: {err}");
    assert!(!err.contains("panicked"), "{err}");
    // With a good machine beside it (the bad one first: faster), the good one builds.
    let good = sshd.url(firn_bin(), &remote);
    let builders = format!("{bad} x86_64-linux - 1 2 ; {good} x86_64-linux - 1 1");
    let o = sshd.firn_realise(&local, &builders, "0", &drv);
    let err = text(&o.stderr);
    let out = ok_out(o, "with a good machine too");
    assert!(
        err.contains(&format!("warning: cannot build on '{bad}'")),
        "{err}"
    );
    assert_eq!(built_where(&err), [("a".to_owned(), good.clone())], "{err}");
    assert!(local.join(out.trim().trim_start_matches('/')).exists());
    assert_verifies(&local, "local");
}

#[test]
fn a_connection_dropped_mid_build_goes_to_another_machine() {
    if !can_ssh() {
        return;
    }
    let sshd = Sshd::start("dispatch-dropped");
    let expr = sshd.dir.join("slow.nix");
    std::fs::write(
        &expr,
        r#"derivation { name = "slow"; system = builtins.currentSystem; builder = "/bin/sh";
             args = [ "-c" "echo started; sleep 4; echo done > $out" ]; }"#,
    )
    .unwrap();
    let (local, r1, r2) = (sshd.root("local"), sshd.root("r1"), sshd.root("r2"));
    let drv = instantiate_attr(&local, &expr, "");
    // The first machine's program is killed two seconds in: mid-build.
    let dropper = sshd.dir.join("dropper.sh");
    std::fs::write(
        &dropper,
        format!("#!/bin/sh\nexec timeout -s KILL 2 {} \"$@\"\n", firn_bin()),
    )
    .unwrap();
    std::fs::set_permissions(
        &dropper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let bad = sshd.url(dropper.to_str().unwrap(), &r1);
    let good = sshd.url(firn_bin(), &r2);
    let builders = format!("{bad} x86_64-linux - 1 2 ; {good} x86_64-linux - 1 1");
    let o = sshd.firn_realise(&local, &builders, "0", &drv);
    let err = text(&o.stderr);
    let out = ok_out(o, "after a dropped connection");
    assert!(
        err.contains(&format!(
            "warning: cannot build on '{bad}': connection lost"
        )),
        "{err}"
    );
    let places = built_where(&err);
    assert_eq!(
        places,
        [
            ("slow".to_owned(), bad.clone()),
            ("slow".to_owned(), good.clone())
        ],
        "{err}"
    );
    let content = std::fs::read_to_string(local.join(out.trim().trim_start_matches('/'))).unwrap();
    assert_eq!(content, "done\n");
    // With only the dropping machine the build fails, naming it, and nothing is left.
    let local2 = sshd.root("local2");
    let drv2 = instantiate_attr(&local2, &expr, "");
    let o = sshd.firn_realise(&local2, &format!("{bad} x86_64-linux"), "0", &drv2);
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("('{bad}' failed: connection lost")),
        "{err}"
    );
    assert!(!local2.join(out.trim().trim_start_matches('/')).exists());
    for root in [&local, &local2, &r2] {
        assert_verifies(root, &root.display().to_string());
    }
}

#[test]
fn with_builders_use_substitutes_the_remote_fetches_inputs_from_its_caches() {
    if !can_ssh() {
        return;
    }
    let sshd = Sshd::start("dispatch-substitutes");
    let (sk, _, public) = keypair(&sshd.dir, "test-cache-1");
    let cache = sshd.dir.join("cache");
    // `a` is built here (in each fresh local store) and put in a signed cache that only
    // the remotes use.
    let with_a = |name: &str| {
        let local = sshd.root(name);
        let a_drv = sshd.instantiate(&local, "a");
        let o = sshd
            .nix(firn_bin())
            .arg("--store")
            .arg(&local)
            .args(["realise", &a_drv])
            .output()
            .unwrap();
        let a = ok_out(o, "local build of a").trim().to_owned();
        (local, a)
    };
    let (local, a) = with_a("local");
    let to = format!("file://{}?secret-key={}", cache.display(), sk.display());
    ok_out(
        sshd.nix(firn_bin())
            .arg("--store")
            .arg(&local)
            .args(["copy", "--to", &to, &a])
            .output()
            .unwrap(),
        "copy to the cache",
    );
    let conf = sshd.conf().join("nix.conf");
    let mut settings = std::fs::read_to_string(&conf).unwrap();
    settings.push_str(&format!(
        "substituters = file://{}\ntrusted-public-keys = {public}\n",
        cache.display()
    ));
    std::fs::write(&conf, settings).unwrap();
    for program in [firn_bin(), "nix-store"] {
        for use_subs in ["true", "false"] {
            let tag = format!(
                "{}-{use_subs}",
                if program == "nix-store" {
                    "nix"
                } else {
                    "firn"
                }
            );
            let remote = sshd.root(&format!("remote-{tag}"));
            let (local, _) = with_a(&format!("local-{tag}"));
            let top = sshd.instantiate(&local, "top");
            let url = sshd.url(program, &remote);
            let o = sshd.firn_realise_with(
                &local,
                &format!("{url} x86_64-linux"),
                "0",
                &[("builders-use-substitutes", use_subs)],
                &top,
            );
            ok_out(
                o,
                &format!("{program}, builders-use-substitutes {use_subs}"),
            );
            // Substituted, `a` carries the cache's signature there; sent, it has none.
            let info = ok_out(
                run(
                    "nix",
                    &[
                        "--extra-experimental-features",
                        "nix-command",
                        "path-info",
                        "--sigs",
                        "--option",
                        "substituters",
                        "",
                        "--store",
                        remote.to_str().unwrap(),
                        &a,
                    ],
                    None,
                ),
                "path-info --sigs",
            );
            assert_eq!(
                info.contains("test-cache-1:"),
                use_subs == "true",
                "{program}, builders-use-substitutes {use_subs}: {info}"
            );
            assert_verifies(&remote, program);
            assert_verifies(&local, "local");
        }
    }
}

/// The machines' slots are Nix's lock files in `<state>/current-load/`: a slot another
/// process holds (here `flock`, as a Nix build hook would) is waited for.
#[test]
fn a_slot_held_by_another_process_is_waited_for() {
    if !can_ssh() {
        return;
    }
    let sshd = Sshd::start("dispatch-slots");
    let (local, remote) = (sshd.root("local"), sshd.root("remote"));
    let drv = sshd.instantiate(&local, "a");
    let url = sshd.url(firn_bin(), &remote);
    let dir = local.join("nix/var/nix/current-load");
    std::fs::create_dir_all(&dir).unwrap();
    let slot = dir.join(format!("{}-0", url.replace('/', "_")));
    let mut holder = Command::new("flock")
        .arg(&slot)
        .args(["sleep", "3"])
        .spawn()
        .unwrap();
    // Held once a non-blocking `flock` of it fails (the file exists a moment before).
    let deadline = Instant::now() + Duration::from_secs(5);
    while Command::new("flock")
        .args(["-n"])
        .arg(&slot)
        .arg("true")
        .status()
        .unwrap()
        .success()
    {
        assert!(
            Instant::now() < deadline,
            "flock did not take {}",
            slot.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let start = Instant::now();
    let o = sshd.firn_realise(&local, &format!("{url} x86_64-linux - 1"), "0", &drv);
    let took = start.elapsed();
    let err = text(&o.stderr);
    ok_out(o, "realise behind a held slot");
    assert!(
        took >= Duration::from_millis(2500),
        "did not wait for the slot: {took:?}\n{err}"
    );
    assert_eq!(built_where(&err), [("a".to_owned(), url.clone())], "{err}");
    let _ = holder.wait();
    assert_verifies(&local, "local");
}

/// The machine's own fields: the ssh key (field 3) and the public host key (field 8,
/// base64), from a machines file (`builders = @FILE`), with ssh checking host keys
/// strictly: the right host key connects, a wrong one is a failed machine.
#[test]
fn a_machines_file_gives_the_ssh_key_and_the_host_key() {
    if !can_ssh() {
        return;
    }
    let sshd = Sshd::start("dispatch-keys");
    let (local, remote) = (sshd.root("local"), sshd.root("remote"));
    let drv = sshd.instantiate(&local, "a");
    let url = sshd.url(firn_bin(), &remote);
    let host_pub = std::fs::read_to_string(sshd.dir.join("hostkey.pub")).unwrap();
    let b64 = |s: &str| {
        let o = run("base64", &["-w0"], Some(s.as_bytes()));
        ok_out(o, "base64")
    };
    let key = sshd.dir.join("userkey");
    let realise = |machines: &str| {
        let file = sshd.dir.join("machines");
        std::fs::write(&file, machines).unwrap();
        sshd.nix(firn_bin())
            // No -i, no known-hosts shortcuts: the machine's fields must do it.
            .env(
                "NIX_SSHOPTS",
                format!(
                    "-p {} -o StrictHostKeyChecking=yes -o LogLevel=ERROR -o BatchMode=yes",
                    sshd.port
                ),
            )
            .arg("--store")
            .arg(&local)
            .args(["--option", "builders", &format!("@{}", file.display())])
            .args(["--max-jobs", "0", "realise", &drv])
            .output()
            .unwrap()
    };
    // A wrong host key (another key's) is refused by ssh: the machine fails.
    let other = std::fs::read_to_string(sshd.dir.join("userkey.pub")).unwrap();
    let o = realise(&format!(
        "# the farm\n{url} x86_64-linux {} 1 1 - - {}\n",
        key.display(),
        b64(other.trim())
    ));
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("warning: cannot build on '{url}'")),
        "{err}"
    );
    assert!(err.contains("Host key verification failed"), "{err}");
    // The right one connects, with the key of field 3.
    let o = realise(&format!(
        "{url} x86_64-linux {} 1 1 - - {}\n",
        key.display(),
        b64(host_pub.trim())
    ));
    let err = text(&o.stderr);
    ok_out(o, "with the machine's keys");
    assert_eq!(built_where(&err), [("a".to_owned(), url.clone())], "{err}");
    assert_verifies(&local, "local");
}

/// Real Nix through `firn daemon`: the client's `--builders` and `--max-jobs 0` reach the
/// daemon (a trusted client's SetOptions), whose worker sends the builds to the machine.
#[test]
fn nix_build_through_the_firn_daemon_builds_on_the_client_s_builders() {
    if !can_ssh() {
        return;
    }
    let sshd = Sshd::start("dispatch-daemon");
    let (local, remote) = (sshd.root("local"), sshd.root("remote"));
    let socket = local.join("nix/var/nix/daemon-socket/socket");
    let mut daemon = sshd
        .nix(firn_bin())
        .arg("--store")
        .arg(&local)
        .arg("daemon")
        .env_remove("NIX_DAEMON_SOCKET_PATH")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "no daemon socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    let url = sshd.url(firn_bin(), &remote);
    let o = sshd
        .nix("nix-build")
        .env(
            "NIX_REMOTE",
            format!("unix://{}?root={}", socket.display(), local.display()),
        )
        .env("NIX_STATE_DIR", sshd.dir.join("client-state"))
        .arg(sshd.expr())
        .args([
            "-A",
            "top",
            "--no-out-link",
            "--max-jobs",
            "0",
            "--builders",
        ])
        .arg(format!("{url} x86_64-linux"))
        .output()
        .unwrap();
    let err = text(&o.stderr);
    let top = ok_out(o, "nix-build through firn daemon").trim().to_owned();
    let _ = daemon.kill();
    let _ = daemon.wait();
    let mut places = built_where(&err);
    places.sort();
    let expect: Vec<(String, String)> = ["a", "b", "top"]
        .iter()
        .map(|n| (n.to_string(), url.clone()))
        .collect();
    assert_eq!(places, expect, "{err}");
    assert!(
        err.contains("building top\n"),
        "the log reaches the client:\n{err}"
    );
    assert_eq!(closure_hashes(&local, &top), closure_hashes(&remote, &top));
    for root in [&local, &remote] {
        assert_verifies(root, &root.display().to_string());
    }
}

/// Floating content-addressed derivations (`ca-derivations`): built on the machine, their
/// paths come back as the realisations of `builtOutputs` and are registered here.
#[test]
fn content_addressed_derivations_build_remotely_and_their_realisations_come_back() {
    if !can_ssh() {
        return;
    }
    let sshd = Sshd::start("dispatch-ca");
    let conf = sshd.conf().join("nix.conf");
    let mut settings = std::fs::read_to_string(&conf).unwrap();
    settings.push_str("experimental-features = ca-derivations\n");
    std::fs::write(&conf, settings).unwrap();
    let expr = sshd.dir.join("ca.nix");
    std::fs::write(
        &expr,
        r#"let mk = name: script: derivation {
             inherit name; system = builtins.currentSystem; builder = "/bin/sh";
             args = [ "-c" script ]; __contentAddressed = true;
             outputHashMode = "recursive"; outputHashAlgo = "sha256"; };
           base = mk "base" "echo base > $out";
        in mk "dep" "cat ${base} > $out; echo dep >> $out""#,
    )
    .unwrap();
    let instantiate = |root: &Path| {
        let o = sshd
            .nix("nix-instantiate")
            .arg("--store")
            .arg(root)
            .arg(&expr)
            .output()
            .unwrap();
        ok_out(o, "nix-instantiate").trim().to_owned()
    };
    // The same build here, for the paths.
    let plain = sshd.root("plain");
    let drv = instantiate(&plain);
    let o = sshd
        .nix(firn_bin())
        .arg("--store")
        .arg(&plain)
        .args(["realise", &drv])
        .output()
        .unwrap();
    let want = ok_out(o, "local CA build").trim().to_owned();
    for (i, program) in [firn_bin(), "nix-store"].into_iter().enumerate() {
        let (local, remote) = (
            sshd.root(&format!("local{i}")),
            sshd.root(&format!("remote{i}")),
        );
        let drv = instantiate(&local);
        let url = sshd.url(program, &remote);
        let o = sshd.firn_realise(&local, &format!("{url} x86_64-linux"), "0", &drv);
        let err = text(&o.stderr);
        let out = ok_out(o, &format!("CA through {program}"));
        assert_eq!(out.trim(), want, "{program}:\n{err}");
        let mut places = built_where(&err);
        places.sort();
        assert_eq!(
            places,
            [
                ("base".to_owned(), url.clone()),
                ("dep".to_owned(), url.clone())
            ],
            "{program}:\n{err}"
        );
        let content = std::fs::read_to_string(local.join(want.trim_start_matches('/'))).unwrap();
        assert_eq!(content, "base\ndep\n");
        // The realisation is known here: again, nothing is built.
        let o = sshd.firn_realise(&local, &format!("{url} x86_64-linux"), "0", &drv);
        let err = text(&o.stderr);
        assert_eq!(ok_out(o, "again").trim(), want);
        assert!(built_where(&err).is_empty(), "{program}: {err}");
        for root in [&local, &remote] {
            assert_verifies(root, program);
        }
    }
}

/// What Nix's build-remote.sh checks beyond the builds: the post-build hook runs here
/// after each remote build, with the outputs copied back; `keep-failed` reaches the
/// remote, whose note about the kept directory reaches the user.
#[test]
fn the_post_build_hook_runs_and_keep_failed_is_sent() {
    if !can_ssh() {
        return;
    }
    let sshd = Sshd::start("dispatch-hook");
    let (local, remote) = (sshd.root("local"), sshd.root("remote"));
    let url = sshd.url(firn_bin(), &remote);
    let hook = sshd.dir.join("hook.sh");
    let seen = sshd.dir.join("seen");
    std::fs::write(
        &hook,
        format!(
            "#!/bin/sh\nfor p in $OUT_PATHS; do test -e {}$p && echo \"$DRV_PATH $p\"; done >> {}\n",
            local.display(),
            seen.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let drv = sshd.instantiate(&local, "top");
    let machine = format!("{url} x86_64-linux");
    let o = sshd.firn_realise_with(
        &local,
        &machine,
        "0",
        &[("post-build-hook", hook.to_str().unwrap())],
        &drv,
    );
    let top = ok_out(o, "realise with a post-build hook")
        .trim()
        .to_owned();
    let lines = std::fs::read_to_string(&seen).unwrap();
    let mut names: Vec<&str> = lines
        .lines()
        .filter_map(|l| l.split_once(' ')?.0.rsplit_once('-'))
        .map(|(_, n)| n.trim_end_matches(".drv"))
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["a", "b", "top"], "{lines}");
    assert!(lines.contains(&format!("{drv} {top}")), "{lines}");
    // A failing build with keep-failed: the remote keeps its directory and says so.
    let fail = sshd.instantiate(&local, "fail");
    let o = sshd.firn_realise_with(&local, &machine, "0", &[("keep-failed", "true")], &fail);
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(100), "{err}");
    let kept = err
        .lines()
        .find_map(|l| l.strip_prefix("note: keeping build directory '"))
        .and_then(|l| l.strip_suffix('\''))
        .unwrap_or_else(|| panic!("no note:\n{err}"));
    assert!(Path::new(kept).is_dir(), "{kept}");
    let _ = std::fs::remove_dir_all(kept);
    assert_verifies(&local, "local");
}
