//! `firn daemon` driven by real Nix 2.8 clients over its socket: builds (with
//! dependencies, failing — compared with the real `nix-daemon` —, two at once, one whose
//! client is killed), queries, `--add`, `--verify`, `--gc`, an untrusted client's
//! refusals, and malformed input.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

const BUSYBOX: &str = "/bin/sh=/bin/busybox";

/// A daemon on a chroot store at `root`, stopped (SIGTERM) when dropped.
struct Daemon {
    child: Child,
    root: PathBuf,
    socket: PathBuf,
}

impl Daemon {
    fn start(root: &Path, options: &[(&str, &str)]) -> Self {
        let socket = root.join("nix/var/nix/daemon-socket/socket");
        let mut c = firn_command();
        c.arg("--store").arg(root);
        c.args(["--option", "sandbox-paths", BUSYBOX]);
        for (k, v) in options {
            c.args(["--option", k, v]);
        }
        let child = c
            .arg("daemon")
            .env_remove("NIX_DAEMON_SOCKET_PATH")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_for(&socket, "the daemon's socket");
        Self {
            child,
            root: root.to_path_buf(),
            socket,
        }
    }

    fn url(&self) -> String {
        format!(
            "unix://{}?root={}",
            self.socket.display(),
            self.root.display()
        )
    }

    /// A Nix client (`nix-store`, `nix-build`, …) talking to this daemon.
    fn client(&self, cmd: &str) -> Command {
        let mut c = command_isolated(cmd);
        c.env("NIX_REMOTE", self.url())
            .env("HOME", &self.root)
            .env("NIX_STATE_DIR", self.root.join("client-state"));
        c
    }

    fn run(&self, cmd: &str, args: &[&str]) -> Output {
        self.client(cmd).args(args).output().unwrap()
    }

    fn stop(&mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "the daemon did not stop within 5 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn wait_for(p: &Path, what: &str) {
    let start = Instant::now();
    while !p.exists() {
        assert!(start.elapsed() < Duration::from_secs(20), "no {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn ok_out(o: Output, what: &str) -> String {
    assert!(
        o.status.success(),
        "{what}: exit {:?}: {}",
        o.status.code(),
        text(&o.stderr)
    );
    text(&o.stdout)
}

/// A derivation with the busybox shell as builder.
fn drv_expr(name: &str, script: &str, extra: &str) -> String {
    format!(
        "derivation {{ name = \"{name}\"; system = builtins.currentSystem; builder = \"/bin/sh\"; \
         args = [\"-c\" {script:?}]; {extra} }}"
    )
}

fn write_expr(dir: &Path, file: &str, expr: &str) -> String {
    let p = dir.join(file);
    std::fs::write(&p, expr).unwrap();
    p.to_str().unwrap().to_owned()
}

#[test]
fn nix_clients_build_query_add_verify_and_collect_through_the_daemon() {
    if !can_build() || !have_nix() {
        return;
    }
    let dir = tempdir("daemon-main");
    let root = dir.join("root");
    let mut d = Daemon::start(&root, &[]);
    let dep = drv_expr("dep", "echo dep-log; echo dep > $out", "");
    let expr = format!(
        "let dep = {dep}; in {}",
        drv_expr(
            "top",
            "echo building top; cat $dep > $out; echo top >> $out",
            "inherit dep;"
        )
    );
    let file = write_expr(&dir, "top.nix", &expr);
    let drv = ok_out(d.run("nix-instantiate", &[&file]), "nix-instantiate");
    let drv = drv.trim();
    let out = d.run("nix-store", &["-r", drv]);
    let stderr = text(&out.stderr);
    let outp = ok_out(out, "nix-store -r");
    let outp = outp.trim();
    // The build log came through the daemon, line by line.
    assert!(
        stderr.contains("dep-log") && stderr.contains("building top"),
        "{stderr}"
    );
    let real = root.join(outp.trim_start_matches('/'));
    assert_eq!(std::fs::read_to_string(&real).unwrap(), "dep\ntop\n");

    let refs = ok_out(d.run("nix-store", &["-q", "--references", drv]), "refs");
    assert!(refs.lines().any(|l| l.ends_with("-dep.drv")), "{refs}");
    let reqs = ok_out(d.run("nix-store", &["-q", "--requisites", outp]), "reqs");
    assert_eq!(reqs.trim(), outp, "top's output refers to nothing");
    let outs = ok_out(d.run("nix-store", &["-q", "--outputs", drv]), "outputs");
    assert_eq!(outs.trim(), outp);

    // `nix path-info --json` through the daemon says what real Nix reads from the db.
    let pi = |c: &mut Command| {
        ok_out(
            c.args([
                "--extra-experimental-features",
                "nix-command",
                "path-info",
                "--json",
                outp,
            ])
            .output()
            .unwrap(),
            "path-info",
        )
    };
    let via_daemon = pi(&mut d.client("nix"));
    let local = pi(command_isolated("nix")
        .env("NIX_STATE_DIR", dir.join("client-state"))
        .args(["--store", root.to_str().unwrap()]));
    assert_eq!(via_daemon, local);
    assert!(via_daemon.contains("\"narHash\":\"sha256-"), "{via_daemon}");

    // nix-store --add, then --verify --check-contents.
    let src = dir.join("hello.txt");
    std::fs::write(&src, "hello\n").unwrap();
    let added = ok_out(d.run("nix-store", &["--add", src.to_str().unwrap()]), "add");
    let local = ok_out(
        command_isolated("nix-store")
            .env("NIX_STATE_DIR", dir.join("client-state"))
            .args(["--store", root.to_str().unwrap(), "--add"])
            .arg(&src)
            .output()
            .unwrap(),
        "local add",
    );
    assert_eq!(added, local);
    ok_out(
        d.run("nix-store", &["--verify", "--check-contents"]),
        "verify",
    );

    // A GC through the daemon: the rooted output stays, the unrooted one goes.
    let link = dir.join("result");
    ok_out(
        d.run(
            "nix-store",
            &[
                "-r",
                drv,
                "--add-root",
                link.to_str().unwrap(),
                "--indirect",
            ],
        ),
        "add-root",
    );
    let dep_out = ok_out(
        d.run("nix-store", &["-q", "--outputs", &refs_drv(&refs)]),
        "dep outputs",
    );
    let dep_real = root.join(dep_out.trim().trim_start_matches('/'));
    assert!(dep_real.exists());
    let gc = d.run("nix-store", &["--gc"]);
    let gc_err = text(&gc.stderr);
    assert!(gc.status.success(), "{gc_err}");
    assert!(gc_err.contains("deleting"), "{gc_err}");
    assert!(real.exists(), "the rooted output was collected");
    assert!(!dep_real.exists(), "the dead dependency was kept");
    let roots = ok_out(d.run("nix-store", &["--gc", "--print-roots"]), "roots");
    assert!(roots.contains(outp), "{roots}");
    drop(std::fs::remove_file(&link));
    let status = d.stop();
    assert!(status.success() || status.code().is_some(), "{status:?}");
    assert!(!d.socket.exists(), "the socket was left behind");
    assert_verifies(&root, "after the daemon");
    remove(&dir);
}

fn refs_drv(refs: &str) -> String {
    refs.lines()
        .find(|l| l.ends_with("-dep.drv"))
        .unwrap()
        .to_owned()
}

/// The real nix-daemon on a chroot store, with firn's test settings.
fn real_daemon(dir: &Path) -> (Child, String) {
    let root = dir.join("nix-root");
    let conf = dir.join("nix-conf");
    std::fs::create_dir_all(&conf).unwrap();
    std::fs::write(
        conf.join("nix.conf"),
        format!("sandbox = true\nsandbox-paths = {BUSYBOX}\nsubstituters =\nbuild-users-group =\n"),
    )
    .unwrap();
    let socket = dir.join("nix-daemon.sock");
    let child = command("nix-daemon")
        .args(["--store", root.to_str().unwrap()])
        .env("NIX_CONF_DIR", &conf)
        .env("NIX_DAEMON_SOCKET_PATH", &socket)
        .env("NIX_STATE_DIR", dir.join("nix-state"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(&socket, "nix-daemon's socket");
    (
        child,
        format!("unix://{}?root={}", socket.display(), root.display()),
    )
}

#[test]
fn a_failing_build_fails_as_with_the_real_nix_daemon() {
    if !can_build() || !have_nix() {
        return;
    }
    let dir = tempdir("daemon-fail");
    let d = Daemon::start(&dir.join("root"), &[]);
    let (mut nixd, nix_url) = real_daemon(&dir);
    let dep = drv_expr("fail-dep", "echo line one; echo about to fail; exit 3", "");
    let file = write_expr(
        &dir,
        "fail.nix",
        &format!(
            "let dep = {dep}; in {}",
            drv_expr("fail-top", "cat $dep > $out", "inherit dep;")
        ),
    );
    let build = |url: &str| {
        let mut c = command_isolated("nix-build");
        c.env("NIX_REMOTE", url)
            .env("HOME", &dir)
            .env("NIX_STATE_DIR", dir.join("client-state"))
            .args(["--no-out-link", &file]);
        c.output().unwrap()
    };
    let firn = build(&d.url());
    let nix = build(&nix_url);
    let _ = nixd.kill();
    let _ = nixd.wait();
    assert_eq!(firn.status.code(), nix.status.code(), "exit status");
    assert_ne!(firn.status.code(), Some(0));
    // From the first error on, the client prints the same.
    let errors = |o: &Output| {
        let e = text(&o.stderr);
        e[e.find("error:").unwrap_or(0)..].to_owned()
    };
    assert_eq!(errors(&firn), errors(&nix));
    assert!(
        errors(&firn).contains("failed with exit code 3"),
        "{}",
        errors(&firn)
    );
    assert!(
        errors(&firn).contains("> about to fail"),
        "{}",
        errors(&firn)
    );
    remove(&dir);
}

#[test]
fn two_clients_build_at_once() {
    if !can_build() || !have_nix() {
        return;
    }
    let dir = tempdir("daemon-two");
    let root = dir.join("root");
    let d = Daemon::start(&root, &[("max-jobs", "2")]);
    let inst = |name: &str, script: &str| {
        let f = write_expr(&dir, &format!("{name}.nix"), &drv_expr(name, script, ""));
        ok_out(d.run("nix-instantiate", &[&f]), "instantiate")
            .trim()
            .to_owned()
    };
    let a = inst("slow-a", "sleep 1; echo a > $out");
    let b = inst("slow-b", "sleep 1; echo b > $out");
    let spawn = |drv: &str| {
        d.client("nix-store")
            .args(["-r", drv])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let start = Instant::now();
    let (ca, cb) = (spawn(&a), spawn(&b));
    let (oa, ob) = (
        ca.wait_with_output().unwrap(),
        cb.wait_with_output().unwrap(),
    );
    let pa = ok_out(oa, "client a");
    let pb = ok_out(ob, "client b");
    assert!(pa.trim().ends_with("-slow-a") && pb.trim().ends_with("-slow-b"));
    assert!(start.elapsed() < Duration::from_secs(30));

    drop(d);
    assert_verifies(&root, "after two clients");
    remove(&dir);
}

/// A client killed while its build runs: the build stops, nothing is registered.
#[test]
fn a_killed_clients_build_stops() {
    if !can_build() || !have_nix() {
        return;
    }
    let dir = tempdir("daemon-kill");
    let root = dir.join("root");
    let d = Daemon::start(&root, &[]);
    let inst = |name: &str, script: &str| {
        let f = write_expr(&dir, &format!("{name}.nix"), &drv_expr(name, script, ""));
        ok_out(d.run("nix-instantiate", &[&f]), "instantiate")
            .trim()
            .to_owned()
    };
    let spawn = |drv: &str| {
        d.client("nix-store")
            .args(["-r", drv])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let k = inst("killed", "echo started; sleep 37; echo late > $out");
    let mut c = spawn(&k);
    let start = Instant::now();
    let running = || {
        Command::new("pgrep")
            .args(["-f", "sleep 37"])
            .output()
            .unwrap()
            .status
            .success()
    };
    while !running() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the build never started"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    c.kill().unwrap();
    c.wait().unwrap();
    let start = Instant::now();
    while running() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the build of a killed client kept running: {}",
            text(
                &Command::new("ps")
                    .args(["-eo", "pid,ppid,pgid,stat,cmd"])
                    .output()
                    .unwrap()
                    .stdout
            )
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "the killed client's build stopped after {:?}",
        start.elapsed()
    );
    let outs = ok_out(d.run("nix-store", &["-q", "--outputs", &k]), "outputs");
    let valid = d.run("nix-store", &["--check-validity", outs.trim()]);
    assert!(
        !valid.status.success(),
        "the killed build's output is valid"
    );
    drop(d);
    assert_verifies(&root, "after a killed client");
    remove(&dir);
}

/// A Nix client run as `nobody` (uid 65534), with a home of its own.
fn as_nobody(d: &Daemon, home: &Path, cmd: &str) -> Command {
    let mut c = command_isolated("setpriv");
    c.args([
        "--reuid",
        "65534",
        "--regid",
        "65534",
        "--clear-groups",
        cmd,
    ])
    .env("NIX_REMOTE", d.url())
    .env("HOME", home)
    .env("NIX_STATE_DIR", home.join("state"));
    c
}

#[test]
fn an_untrusted_client_cannot_add_unsigned_paths_or_repair_or_unsandbox() {
    if !can_build() || !have_nix() {
        return;
    }
    let dir = tempdir("daemon-trust");
    let home = dir.join("home");
    std::fs::create_dir_all(&home).unwrap();
    // A path built elsewhere, in a store that nobody may read and write.
    let src = dir.join("src");
    let f = write_expr(&dir, "one.nix", &drv_expr("one", "echo one > $out", ""));
    let drv = ok_out(
        command_isolated("nix-instantiate")
            .env("NIX_STATE_DIR", dir.join("client-state"))
            .args(["--store", src.to_str().unwrap(), &f])
            .output()
            .unwrap(),
        "instantiate",
    );
    let one = ok_out(
        firn_command()
            .args(["--store", src.to_str().unwrap()])
            .args(["--option", "sandbox-paths", BUSYBOX, "realise", drv.trim()])
            .output()
            .unwrap(),
        "realise",
    );
    let chown = |p: &Path| {
        assert!(Command::new("chown")
            .args(["-R", "65534:65534"])
            .arg(p)
            .status()
            .unwrap()
            .success())
    };
    chown(&src);
    chown(&home);
    let copy_args = |d: &Daemon| {
        vec![
            "--extra-experimental-features".to_owned(),
            "nix-command".to_owned(),
            "copy".to_owned(),
            "--no-check-sigs".to_owned(),
            "--from".to_owned(),
            src.display().to_string(),
            "--to".to_owned(),
            d.url(),
            one.trim().to_owned(),
        ]
    };
    let root = dir.join("root");
    {
        let d = Daemon::start(&root, &[]);
        let o = as_nobody(&d, &home, "nix")
            .args(copy_args(&d))
            .output()
            .unwrap();
        let e = text(&o.stderr);
        assert!(
            !o.status.success(),
            "an untrusted client added an unsigned path"
        );
        assert!(
            e.contains("because it lacks a signature by a trusted key"),
            "{e}"
        );
        let o = as_nobody(&d, &home, "nix-store")
            .args(["--verify", "--repair"])
            .output()
            .unwrap();
        assert!(text(&o.stderr).contains("you are not privileged to repair paths"));
        // `sandbox = false` from an untrusted client is ignored: the build is sandboxed.
        let marker = dir.join("host-only");
        std::fs::create_dir_all(&marker).unwrap();
        let script = format!(
            "if [ -d {} ]; then echo unsandboxed > $out; else echo sandboxed > $out; fi",
            marker.display()
        );
        let f = write_expr(&dir, "sb.nix", &drv_expr("sb", &script, ""));
        let sb = ok_out(d.run("nix-instantiate", &[&f]), "instantiate sb");
        let o = as_nobody(&d, &home, "nix-store")
            .args(["-r", sb.trim(), "--option", "sandbox", "false"])
            .output()
            .unwrap();
        let out = ok_out(o, "untrusted build");
        let real = root.join(out.trim().trim_start_matches('/'));
        assert_eq!(std::fs::read_to_string(real).unwrap(), "sandboxed\n");
        // A trusted client (root) may add the same path unsigned.
        let o = d.client("nix").args(copy_args(&d)).output().unwrap();
        ok_out(o, "trusted copy");
    }
    // In `trusted-users`, nobody may too.
    let root2 = dir.join("root2");
    let d = Daemon::start(&root2, &[("trusted-users", "root nobody")]);
    let o = as_nobody(&d, &home, "nix")
        .args(copy_args(&d))
        .output()
        .unwrap();
    ok_out(o, "copy by a trusted nobody");
    let o = d.run("nix-store", &["--check-validity", one.trim()]);
    assert!(o.status.success());
    drop(d);
    assert_verifies(&root2, "after the copies");
    remove(&dir);
}

/// Raw bytes on the socket: a bad magic ends the connection; an unknown op gets the
/// error frame and then the end; the daemon serves the next client.
#[test]
fn malformed_input_ends_that_connection_with_an_error() {
    if !can_build() {
        return;
    }
    let dir = tempdir("daemon-bad");
    let d = Daemon::start(&dir.join("root"), &[]);
    let mut s = UnixStream::connect(&d.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&0x1234u64.to_le_bytes()).unwrap();
    let mut buf = Vec::new();
    let n = s.read_to_end(&mut buf).unwrap();
    assert_eq!(n, 0, "a bad magic got an answer");

    let mut s = UnixStream::connect(&d.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut hello = Vec::new();
    for v in [0x6e69_7863u64, 0x122, 0, 0, 999] {
        hello.extend_from_slice(&v.to_le_bytes());
    }
    s.write_all(&hello).unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    let mut r = firn_protocol::Reader::new(&buf[..]);
    firn_protocol::worker::read_server_hello(&mut r).unwrap();
    assert_eq!(
        firn_protocol::worker::read_daemon_version(&mut r).unwrap(),
        "2.8.0"
    );
    assert_eq!(
        firn_protocol::StderrMsg::read(&mut r).unwrap(),
        firn_protocol::StderrMsg::Last
    );
    match firn_protocol::StderrMsg::read(&mut r).unwrap() {
        firn_protocol::StderrMsg::Error(e) => {
            assert_eq!(e.message(), "invalid operation 999")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(r.position(), buf.len() as u64, "more after the error");
    // Still serving.
    if have_nix() {
        ok_out(
            d.run("nix-store", &["--verify"]),
            "verify after bad clients",
        );
    }
    remove(&dir);
}

/// `nix-build --post-build-hook H` through firn and through the real nix-daemon: the hook
/// runs once per built derivation (not for a valid one), its output reaches the client
/// as Nix's `post-build-hook: …` lines, and a failing hook fails the client as with
/// `nix-daemon` while the outputs stay valid. `OUT_PATHS`: Nix 2.8 passes it empty (a
/// known defect), firn passes the outputs.
#[test]
fn a_post_build_hook_runs_after_each_build_as_with_the_real_nix_daemon() {
    if !can_build() || !have_nix() {
        return;
    }
    let dir = tempdir("daemon-hook");
    let d = Daemon::start(&dir.join("root"), &[]);
    let (mut nixd, nix_url) = real_daemon(&dir);
    let hook = dir.join("hook.sh");
    let record = dir.join("record");
    std::fs::write(
        &hook,
        format!(
            "#!/bin/sh\necho \"$DRV_PATH|$OUT_PATHS\" >> {}\necho hook says hi\necho to stderr >&2\nexit \"$(cat {}/hook-exit)\"\n",
            record.display(),
            dir.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let file = write_expr(
        &dir,
        "hook.nix",
        &format!(
            "{{ ok = {}; bad = {}; }}",
            drv_expr(
                "hook-ok",
                "echo ok > $out; echo > $dev",
                "outputs = [\"out\" \"dev\"];"
            ),
            drv_expr("hook-bad", "echo bad > $out", "")
        ),
    );
    let build = |url: &str, attr: &str| {
        let mut c = command_isolated("nix-build");
        c.env("NIX_REMOTE", url)
            .env("HOME", &dir)
            .env("NIX_STATE_DIR", dir.join("client-state"))
            .args(["--no-out-link", &file, "-A", attr])
            .args(["--post-build-hook", hook.to_str().unwrap()]);
        c.output().unwrap()
    };
    let read_record = || {
        let r = std::fs::read_to_string(&record).unwrap_or_default();
        let _ = std::fs::remove_file(&record);
        r
    };
    std::fs::write(dir.join("hook-exit"), "0").unwrap();
    let mut seen = Vec::new();
    for url in [d.url(), nix_url.clone()] {
        let first = build(&url, "ok");
        let out = ok_out(first.clone(), "nix-build with a hook");
        let stderr = text(&first.stderr);
        assert!(stderr.contains("running post-build-hook '"), "{stderr}");
        assert!(stderr.contains("post-build-hook: hook says hi"), "{stderr}");
        assert!(stderr.contains("post-build-hook: to stderr"), "{stderr}");
        let rec = read_record();
        assert_eq!(rec.lines().count(), 1, "one build, one hook run: {rec}");
        // Built already: no hook.
        ok_out(build(&url, "ok"), "second nix-build");
        assert_eq!(read_record(), "", "the hook ran for a valid path");
        seen.push((out, rec));
    }
    let (firn_rec, nix_rec) = (&seen[0].1, &seen[1].1);
    let (drv, outs) = firn_rec.trim().split_once('|').unwrap();
    assert!(drv.ends_with("-hook-ok.drv"), "{firn_rec}");
    let outs: Vec<&str> = outs.split(' ').collect();
    assert_eq!(outs.len(), 2, "OUT_PATHS has both outputs: {firn_rec}");
    let mut sorted = outs.clone();
    sorted.sort();
    assert_eq!(outs, sorted, "sorted, as Nix prints a path set");
    let out = outs
        .iter()
        .find(|o| o.ends_with("-hook-ok"))
        .expect(firn_rec);
    assert!(
        outs.iter().any(|o| o.ends_with("-hook-ok-dev")),
        "{firn_rec}"
    );
    assert!(seen[0].0.contains(out), "nix-build printed {}", seen[0].0);
    // The same derivation path as Nix's (both record it), Nix's OUT_PATHS is empty.
    assert_eq!(nix_rec.trim().split_once('|').unwrap().0, drv);

    std::fs::write(dir.join("hook-exit"), "3").unwrap();
    let firn = build(&d.url(), "bad");
    let nix = build(&nix_url, "bad");
    let _ = nixd.kill();
    let _ = nixd.wait();
    assert_eq!(firn.status.code(), nix.status.code(), "exit status");
    assert_ne!(firn.status.code(), Some(0));
    let last_error = |o: &Output| {
        let e = text(&o.stderr);
        e[e.rfind("error:").unwrap_or(0)..].trim().to_owned()
    };
    assert_eq!(last_error(&firn), last_error(&nix));
    assert!(
        last_error(&firn).contains("failed with exit code 3"),
        "{}",
        last_error(&firn)
    );
    // The output was registered before the hook ran.
    let drv = ok_out(
        d.run("nix-instantiate", &[&file, "-A", "bad"]),
        "instantiate",
    );
    let out = ok_out(
        d.run("nix-store", &["-q", "--outputs", drv.trim()]),
        "outputs",
    );
    ok_out(
        d.run("nix-store", &["--check-validity", out.trim()]),
        "valid after a failed hook",
    );
    drop(d);
    assert_verifies(&dir.join("root"), "after a failing hook");
    remove(&dir);
}

/// `nix-build --secret-key-files K` through firn and through the real nix-daemon: every
/// built output is signed when registered (Nix's `signPathInfo`), with the very
/// signature Nix makes (ed25519 is deterministic), and `nix store verify` accepts it.
#[test]
fn built_outputs_are_signed_with_secret_key_files_as_by_the_real_nix_daemon() {
    if !can_build() || !have_nix() {
        return;
    }
    let dir = tempdir("daemon-sign");
    let d = Daemon::start(&dir.join("root"), &[]);
    let (mut nixd, nix_url) = real_daemon(&dir);
    let (sk, pk, _) = keypair(&dir, "test.example.org-1");
    let dep = drv_expr("sign-dep", "echo dep > $out", "");
    let file = write_expr(
        &dir,
        "sign.nix",
        &format!(
            "let dep = {dep}; in {}",
            drv_expr(
                "sign-top",
                "cat $dep > $out; echo $dep >> $out",
                "inherit dep;"
            )
        ),
    );
    let info = |url: &str| {
        let mut c = command_isolated("nix-build");
        c.env("NIX_REMOTE", url)
            .env("HOME", &dir)
            .env("NIX_STATE_DIR", dir.join("client-state"))
            .args(["--no-out-link", &file])
            .args(["--secret-key-files", sk.to_str().unwrap()]);
        let out = ok_out(c.output().unwrap(), "nix-build --secret-key-files");
        let mut c = command_isolated("nix");
        c.env("NIX_REMOTE", url)
            .env("HOME", &dir)
            .env("NIX_STATE_DIR", dir.join("client-state"))
            .args(["--extra-experimental-features", "nix-command"])
            .args(["path-info", "--json", "--recursive", out.trim()]);
        let json: serde_json::Value =
            serde_json::from_str(&ok_out(c.output().unwrap(), "nix path-info")).unwrap();
        let mut c = command_isolated("nix");
        c.env("NIX_REMOTE", url)
            .env("HOME", &dir)
            .env("NIX_STATE_DIR", dir.join("client-state"))
            .args(["--extra-experimental-features", "nix-command"])
            .args(["store", "verify", "--recursive", "--sigs-needed", "1"])
            .args([
                "--trusted-public-keys",
                std::fs::read_to_string(&pk).unwrap().trim(),
            ])
            .arg(out.trim());
        ok_out(c.output().unwrap(), "nix store verify --sigs-needed 1");
        json.as_array()
            .unwrap()
            .iter()
            .map(|p| (p["path"].to_string(), p["signatures"].to_string()))
            .collect::<Vec<_>>()
    };
    let firn = info(&d.url());
    let nix = info(&nix_url);
    let _ = nixd.kill();
    let _ = nixd.wait();
    assert_eq!(firn.len(), 2, "{firn:?}");
    assert!(
        firn.iter().all(|(_, s)| s.contains("test.example.org-1:")),
        "{firn:?}"
    );
    assert_eq!(firn, nix);
    remove(&dir);
}

/// `nix copy --from` a cache whose narinfo pairs a path's content address with another
/// path's NAR (substitute-with-invalid-ca.sh): the daemon's AddToStoreNar refuses it with
/// Nix's `ca hash mismatch importing path`, and nothing becomes valid.
#[test]
fn add_to_store_nar_checks_the_content_address() {
    if !can_build() || !have_nix() {
        return;
    }
    let dir = tempdir("daemon-ca");
    let d = Daemon::start(&dir.join("root"), &[]);
    let cache = dir.join("cache");
    let url = format!("file://{}", cache.display());
    let nix = |args: &[&str]| {
        let mut c = d.client("nix");
        c.args(["--extra-experimental-features", "nix-command"])
            .args(args);
        c.output().unwrap()
    };
    let mut paths = Vec::new();
    for name in ["good", "bad"] {
        let f = dir.join(format!("{name}.txt"));
        std::fs::write(&f, format!("I'm a {name} path\n")).unwrap();
        let p = ok_out(d.run("nix-store", &["--add", f.to_str().unwrap()]), "add");
        ok_out(nix(&["copy", "--to", &url, p.trim()]), "copy --to");
        paths.push(p.trim().to_owned());
    }
    ok_out(d.run("nix-store", &["--delete", &paths[0]]), "delete good");
    let narinfo = |p: &str| {
        let hash = &p.rsplit('/').next().unwrap()[..32];
        cache.join(format!("{hash}.narinfo"))
    };
    let bad_info = std::fs::read_to_string(narinfo(&paths[1])).unwrap();
    let good_file = narinfo(&paths[0]);
    let good_info = std::fs::read_to_string(&good_file).unwrap();
    let fields = ["URL", "FileHash", "FileSize", "NarHash", "NarSize"];
    let mut spoilt: Vec<String> = good_info
        .lines()
        .filter(|l| !fields.iter().any(|f| l.starts_with(&format!("{f}:"))))
        .map(str::to_owned)
        .collect();
    spoilt.extend(
        bad_info
            .lines()
            .filter(|l| fields.iter().any(|f| l.starts_with(&format!("{f}:"))))
            .map(str::to_owned),
    );
    assert!(
        spoilt.iter().any(|l| l.starts_with("CA: fixed:r:sha256:")),
        "{good_info}"
    );
    std::fs::write(&good_file, spoilt.join("\n") + "\n").unwrap();
    let out = nix(&["copy", "--from", &url, "--no-require-sigs", &paths[0]]);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "the forged path was imported: {err}");
    assert!(err.contains("ca hash mismatch importing path"), "{err}");
    assert!(!d
        .run("nix-store", &["--check-validity", &paths[0]])
        .status
        .success());
    drop(d);
    assert_verifies(&dir.join("root"), "after a refused import");
    remove(&dir);
}

/// optimise-store.sh through firn: `--auto-optimise-store` from the client links the
/// identical files of two builds, a build without it does not, `nix-store --optimise`
/// (the OptimiseStore op) links the rest, `--gc` empties `.links` once nothing else uses
/// its files, and the store verifies all along.
#[test]
fn optimisation_hard_links_identical_files_through_the_daemon() {
    if !can_build() || !have_nix() {
        return;
    }
    let dir = tempdir("daemon-optimise");
    let d = Daemon::start(&dir.join("root"), &[]);
    let build = |name: &str, auto: bool| {
        let f = write_expr(
            &dir,
            &format!("{name}.nix"),
            &drv_expr(name, "mkdir $out; echo hello > $out/foo", ""),
        );
        let mut args = vec!["--no-out-link", f.as_str()];
        if auto {
            args.push("--auto-optimise-store");
        }
        let out = ok_out(d.run("nix-build", &args), "nix-build");
        dir.join("root")
            .join(out.trim().trim_start_matches('/'))
            .join("foo")
    };
    use std::os::unix::fs::MetadataExt;
    let ino = |p: &Path| std::fs::metadata(p).unwrap().ino();
    let (f1, f2) = (build("opt1", true), build("opt2", true));
    assert_eq!(ino(&f1), ino(&f2), "auto-optimised outputs share the file");
    assert_eq!(std::fs::metadata(&f1).unwrap().nlink(), 3);
    let f3 = build("opt3", false);
    assert_ne!(
        ino(&f1),
        ino(&f3),
        "a build without auto-optimise is not linked"
    );
    let o = d.run("nix-store", &["--optimise"]);
    ok_out(o.clone(), "nix-store --optimise");
    assert!(
        text(&o.stderr).contains("freed by hard-linking"),
        "{}",
        text(&o.stderr)
    );
    assert_eq!(ino(&f1), ino(&f3), "--optimise linked the third");
    let links = dir.join("root/nix/store/.links");
    assert!(std::fs::read_dir(&links).unwrap().count() > 0);
    ok_out(d.run("nix-store", &["--gc"]), "nix-store --gc");
    assert_eq!(
        std::fs::read_dir(&links).unwrap().count(),
        0,
        ".links is empty after the collection"
    );
    drop(d);
    assert_verifies(&dir.join("root"), "after optimising and collecting");
    remove(&dir);
}

/// `nix copy --from` a signed cache into the daemon: refused while the signing key is
/// not trusted (and the path is not content-addressed), accepted once the client (a
/// trusted user) passes `--trusted-public-keys`, with the signature kept.
#[test]
fn imported_paths_need_a_signature_by_a_trusted_key() {
    if !can_build() || !have_nix() {
        return;
    }
    let dir = tempdir("daemon-sigcheck");
    let d = Daemon::start(&dir.join("root"), &[]);
    let (sk, _, pk) = keypair(&dir, "cache.example.org-1");
    let nix = |args: &[&str]| {
        let mut c = d.client("nix");
        c.args(["--extra-experimental-features", "nix-command"])
            .args(args);
        c.output().unwrap()
    };
    let file = write_expr(
        &dir,
        "s.nix",
        &drv_expr("sigcheck", "echo signed > $out", ""),
    );
    let out = ok_out(d.run("nix-build", &["--no-out-link", &file]), "nix-build");
    let out = out.trim();
    let url = format!(
        "file://{}?secret-key={}",
        dir.join("cache").display(),
        sk.display()
    );
    ok_out(nix(&["copy", "--to", &url, out]), "copy --to");
    ok_out(d.run("nix-store", &["--delete", out]), "delete");
    let from = format!("file://{}", dir.join("cache").display());
    let refused = nix(&["copy", "--from", &from, out]);
    assert!(!refused.status.success());
    assert!(
        text(&refused.stderr).contains("lacks a signature by a trusted key"),
        "{}",
        text(&refused.stderr)
    );
    ok_out(
        nix(&[
            "copy",
            "--from",
            &from,
            "--trusted-public-keys",
            pk.trim(),
            out,
        ]),
        "copy --from with the key trusted",
    );
    let info = ok_out(nix(&["path-info", "--sigs", out]), "path-info --sigs");
    assert!(info.contains("cache.example.org-1:"), "{info}");
    drop(d);
    assert_verifies(&dir.join("root"), "after the imports");
    remove(&dir);
}

/// Each connection has its own temporary roots (`temproots/<pid>-<n>`): when one ends,
/// what it rooted can be collected although another connection (with roots of its own)
/// is still open. (With one file per daemon process, the open connection kept the
/// finished one's roots alive; Nix forks per connection.)
#[test]
fn a_finished_connections_temporary_roots_go_with_it() {
    if !can_build() || !have_nix() {
        return;
    }
    let dir = tempdir("daemon-temproots");
    let d = Daemon::start(&dir.join("root"), &[]);
    // A connection that stays open, with a temporary root of its own.
    let mut held = UnixStream::connect(&d.socket).unwrap();
    held.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut msg = Vec::new();
    for v in [0x6e69_7863u64, 0x122, 0, 0] {
        msg.extend_from_slice(&v.to_le_bytes());
    }
    held.write_all(&msg).unwrap();
    let mut hello = [0u8; 16];
    held.read_exact(&mut hello).unwrap();
    // The version string and the first STDERR_LAST follow; then AddTempRoot (11).
    let frame = |s: &str| {
        let mut v = (s.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(s.as_bytes());
        v.resize(v.len().div_ceil(8) * 8, 0);
        v
    };
    let other = "/nix/store/00000000000000000000000000000000-other";
    let mut op = 11u64.to_le_bytes().to_vec();
    op.extend(frame(other));
    held.write_all(&op).unwrap();
    // Wait for AddTempRoot's reply (STDERR_LAST, then 1) so the root is written.
    let mut seen = Vec::new();
    let last_then_one: Vec<u8> = [0x616c_7473u64, 1]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let mut buf = [0u8; 256];
    while !seen.ends_with(&last_then_one) {
        let n = held.read(&mut buf).unwrap();
        assert!(n > 0, "the daemon closed the held connection");
        seen.extend_from_slice(&buf[..n]);
    }
    let f = dir.join("unrooted.txt");
    std::fs::write(&f, "nothing keeps me\n").unwrap();
    let p = ok_out(d.run("nix-store", &["--add", f.to_str().unwrap()]), "add");
    let p = p.trim();
    // The adding connection has ended: nothing roots the path any more.
    let roots = ok_out(
        d.run("nix-store", &["--gc", "--print-roots"]),
        "print-roots",
    );
    assert!(
        !roots.contains(p),
        "still rooted after its connection ended: {roots}"
    );
    assert!(
        roots.contains(other),
        "the open connection's root is listed: {roots}"
    );
    ok_out(d.run("nix-store", &["--gc"]), "gc");
    assert!(
        !d.run("nix-store", &["--check-validity", p])
            .status
            .success(),
        "the path of a finished connection was not collected"
    );
    drop(held);
    drop(d);
    assert_verifies(&dir.join("root"), "after the collection");
    remove(&dir);
}

/// The substitution queries through the daemon: with a trusted client's `substituters`
/// (a file:// cache real Nix wrote), `nix-store -r --dry-run` says what will be fetched
/// exactly as real Nix does on a local store, `nix path-info` style queries see the
/// substitute, and the build then fetches instead of building.
#[test]
fn the_daemon_answers_substitution_queries_from_its_caches() {
    if !can_build() || !have_nix() {
        return;
    }
    let dir = tempdir("daemon-substq");
    let file = write_expr(
        &dir,
        "s.nix",
        &format!(
            "let dep = {}; in {}",
            drv_expr("subst-dep", "echo dep > $out", ""),
            drv_expr("subst-top", "echo $dep > $out", "inherit dep;")
        ),
    );
    // Real Nix builds it in a store of its own and copies it to a cache.
    let src = dir.join("src");
    let nix_local = |root: &Path, cmd: &str, args: &[&str]| {
        let mut c = command_isolated(cmd);
        c.args(["--store", root.to_str().unwrap()])
            .args(["--option", "sandbox-paths", BUSYBOX])
            .args(args);
        c.output().unwrap()
    };
    let out = ok_out(
        nix_local(&src, "nix-build", &["--no-out-link", &file]),
        "nix-build",
    );
    let cache = format!("file://{}", dir.join("cache").display());
    ok_out(
        nix_local(
            &src,
            "nix",
            &[
                "--extra-experimental-features",
                "nix-command",
                "copy",
                "--to",
                &cache,
                out.trim(),
            ],
        ),
        "copy --to",
    );
    let subst = [
        "--option",
        "substituters",
        cache.as_str(),
        "--option",
        "require-sigs",
        "false",
    ];
    let d = Daemon::start(&dir.join("root"), &[]);
    let drv = ok_out(d.run("nix-instantiate", &[&file]), "instantiate");
    let mut args = subst.to_vec();
    args.extend(["-r", "--dry-run", drv.trim()]);
    let firn = d.run("nix-store", &args);
    let fresh = dir.join("fresh");
    ok_out(
        nix_local(&fresh, "nix-instantiate", &[&file]),
        "instantiate locally",
    );
    let nix = nix_local(&fresh, "nix-store", &args);
    let firn_err = text(&firn.stderr);
    assert!(
        firn_err.contains("these 2 paths will be fetched"),
        "{firn_err}"
    );
    assert_eq!(
        firn_err.replace(&*dir.join("root").to_string_lossy(), ""),
        text(&nix.stderr).replace(&*fresh.to_string_lossy(), ""),
        "dry run as real Nix's"
    );
    // The build fetches both paths.
    let mut args = subst.to_vec();
    args.extend(["--no-out-link", file.as_str()]);
    let built = d.run("nix-build", &args);
    let err = text(&built.stderr);
    assert_eq!(ok_out(built, "nix-build from the cache").trim(), out.trim());
    assert!(err.contains("copying path"), "{err}");
    assert!(
        !err.contains("building '"),
        "built instead of fetched: {err}"
    );
    drop(d);
    assert_verifies(&dir.join("root"), "after substituting through the daemon");
    // A plain path, not a derivation: `nix-store -r PATH` fetches it too (BuildPaths of
    // an opaque path), and one no cache has is Nix's error.
    let d = Daemon::start(&dir.join("root2"), &[]);
    let mut args = subst.to_vec();
    args.extend(["-r", out.trim()]);
    let got = d.run("nix-store", &args);
    let err = text(&got.stderr);
    assert_eq!(ok_out(got, "nix-store -r PATH").trim(), out.trim(), "{err}");
    assert!(err.contains("copying path"), "{err}");
    let missing = format!("/nix/store/{}-missing", "0".repeat(32));
    let mut args = subst.to_vec();
    args.extend(["-r", missing.as_str()]);
    let got = d.run("nix-store", &args);
    assert_eq!(got.status.code(), Some(1));
    assert!(
        text(&got.stderr).contains("there is no substituter that can build it"),
        "{}",
        text(&got.stderr)
    );
    drop(d);
    assert_verifies(&dir.join("root2"), "after nix-store -r PATH");
    remove(&dir);
}
