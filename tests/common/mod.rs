//! Helpers shared by the end-to-end tests (each test file uses a part of them).

#![allow(dead_code, clippy::unwrap_used)]

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

pub mod tls;

/// The project's `fixtures/` directory.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

/// The variables that choose a store when no `--store` is given (Nix's and firn's);
/// tests that want them set them themselves.
pub const STORE_VARS: [&str; 5] = [
    "FIRN_STORE",
    "NIX_STORE_DIR",
    "NIX_STORE",
    "NIX_STATE_DIR",
    "NIX_LOG_DIR",
];

/// A `Command` for `cmd`, with none of [`STORE_VARS`]; for firn itself, one that reads
/// no settings file of this machine (its `/etc/nix/nix.conf` says `sandbox = false`,
/// and tests state their settings themselves).
pub fn command(cmd: &str) -> Command {
    let mut c = Command::new(cmd);
    for v in STORE_VARS {
        c.env_remove(v);
    }
    if cmd == firn_bin() {
        isolate_settings(&mut c);
    }
    c
}

/// Make `c` (a firn) see no settings file, and no `NIX_CONFIG` but `substituters =`
/// (Nix's default cache is firn's too; tests build offline, as Nix's own tests do).
pub fn isolate_settings(c: &mut Command) -> &mut Command {
    let none = std::env::temp_dir().join("firn-tests-no-config");
    c.env("NIX_CONF_DIR", &none)
        .env("FIRN_CONF_DIR", &none)
        .env("NIX_USER_CONF_FILES", "")
        .env("XDG_CONFIG_HOME", &none)
        // Nix's narinfo disk cache ($XDG_CACHE_HOME/nix): one per test process, so that
        // no entry of another run (a port used again) is seen.
        .env(
            "XDG_CACHE_HOME",
            std::env::temp_dir().join(format!("firn-tests-cache-{}", std::process::id())),
        )
        .env("NIX_CONFIG", "substituters =")
}

/// A `Command` for a program that runs firn itself (`script`, `unshare`, `setpriv`):
/// the firn it starts sees no settings file either.
pub fn command_isolated(cmd: &str) -> Command {
    let mut c = Command::new(cmd);
    for v in STORE_VARS {
        c.env_remove(v);
    }
    isolate_settings(&mut c);
    c
}

/// `firn` (the binary under test) as a `Command`, settings isolated.
pub fn firn_command() -> Command {
    command(firn_bin())
}

/// Run a command with `stdin` as its input (none: empty), without `FIRN_STORE`.
pub fn run(cmd: &str, args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = command(cmd)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    let mut pipe = child.stdin.take().unwrap();
    if let Some(input) = stdin {
        // A command may stop reading early (a refused NAR, say): its exit is the result.
        match pipe.write_all(input) {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
            r => r.unwrap(),
        }
    }
    drop(pipe);
    child.wait_with_output().unwrap()
}

/// The firn binary under test.
pub fn firn_bin() -> &'static str {
    env!("CARGO_BIN_EXE_firn")
}

/// Stdout of a successful command (the test fails with its stderr otherwise).
pub fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

pub fn is_ci() -> bool {
    std::env::var("CI").ok().as_deref() == Some("true")
}

/// Whether the real Nix 2.8 is here; in CI it must be (the test fails), elsewhere the
/// caller skips with the printed reason.
pub fn have_nix() -> bool {
    let present = Command::new("nix-store")
        .arg("--version")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(" 2.8."));
    if !present {
        assert!(!is_ci(), "CI must install nix-bin 2.8 (see .ci/run)");
        eprintln!("SKIPPED: Nix 2.8 is not installed (apt-get install nix-bin)");
    }
    present
}

/// A fresh directory for one test.
pub fn tempdir(tag: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("firn-test-{tag}-{}", std::process::id()));
    remove(&p);
    fs::create_dir_all(&p).unwrap();
    p
}

/// Remove a directory whatever its modes (store objects are read-only).
pub fn remove(p: &Path) {
    let _ = Command::new("chmod")
        .args(["-R", "u+w"])
        .arg(p)
        .stderr(Stdio::null())
        .status();
    let _ = fs::remove_dir_all(p);
}

/// Whether this machine can run the build tests (root, nix-instantiate, /bin/busybox).
/// In CI they must run: a missing piece fails the test there; elsewhere the test says
/// SKIPPED and why.
pub fn can_build() -> bool {
    let root = nix::unistd::Uid::effective().is_root();
    let nix = Command::new("nix-instantiate")
        .arg("--version")
        .output()
        .is_ok();
    let busybox = Path::new("/bin/busybox").exists();
    if root && nix && busybox {
        return true;
    }
    assert!(
        !is_ci(),
        "CI must run the build tests: root={root} nix={nix} busybox={busybox}"
    );
    eprintln!("SKIPPED: building needs root, nix-instantiate and /bin/busybox (root={root} nix={nix} busybox={busybox})");
    false
}

/// `firn --store ROOT ARGS…`.
pub fn firn_at(root: &Path, args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut all = vec!["--store", root.to_str().unwrap()];
    all.extend_from_slice(args);
    run(firn_bin(), &all, stdin)
}

/// `s` as a JSON string literal (quotes and escapes), for derivations written by hand.
pub fn json_string(s: &str) -> String {
    let mut out = Vec::new();
    firn_derivation::json::write_json_string(&mut out, s.as_bytes());
    String::from_utf8(out).unwrap()
}

/// Both verifiers accept the store at `root`: `firn verify --check-contents` and Nix
/// 2.8's `nix-store --verify --check-contents`.
pub fn assert_verifies(root: &Path, ctx: &str) {
    let v = firn_at(root, &["verify", "--check-contents"], None);
    assert!(
        v.status.success(),
        "{ctx}: firn verify: {}",
        String::from_utf8_lossy(&v.stderr)
    );
    let v = run(
        "nix-store",
        &[
            "--store",
            root.to_str().unwrap(),
            "--option",
            "substituters",
            "",
            "--verify",
            "--check-contents",
        ],
        None,
    );
    assert!(
        v.status.success(),
        "{ctx}: nix-store --verify: {}",
        String::from_utf8_lossy(&v.stderr)
    );
}

/// The entries of the store directory at `root` (without Nix's `.links`).
pub fn store_entries(root: &Path) -> std::collections::BTreeSet<String> {
    match fs::read_dir(root.join("nix/store")) {
        Ok(rd) => rd
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n != ".links")
            .collect(),
        Err(_) => std::collections::BTreeSet::new(),
    }
}

/// `nix-instantiate` of attribute `attr` of the expression file `expr` into the store at
/// `root` (the test fails with Nix's error otherwise); the `.drv` path.
pub fn instantiate_attr(root: &Path, expr: &Path, attr: &str) -> String {
    instantiate_attr_with(root, expr, attr, &[])
}

/// [`instantiate_attr`] with settings (`("experimental-features", "ca-derivations")`).
pub fn instantiate_attr_with(
    root: &Path,
    expr: &Path,
    attr: &str,
    settings: &[(&str, &str)],
) -> String {
    let mut c = command("nix-instantiate");
    c.args(["--store", root.to_str().unwrap()])
        .args(["--option", "substituters", ""]);
    for (k, v) in settings {
        c.args(["--option", k, v]);
    }
    ok(c.arg(expr).args(["-A", attr]).output().unwrap())
        .trim()
        .to_owned()
}

/// `nix-store -r` (when `cmd` is "nix-store") or `firn realise` (when it is
/// [`firn_bin`]) of `drv` in the store at `root`, in the sandbox with busybox as
/// `/bin/sh`, with the settings `opts` and the command's own arguments `extra` (before
/// `-r` for nix-store, after `realise` for firn): the same build by both, for tests
/// that compare them.
pub fn realise_in_sandbox(
    cmd: &str,
    root: &Path,
    opts: &[(&str, &str)],
    extra: &[&str],
    drv: &str,
) -> Output {
    let mut args: Vec<String> = vec!["--store".into(), root.display().to_string()];
    let defaults = [
        ("sandbox", "true"),
        ("sandbox-paths", "/bin/sh=/bin/busybox"),
    ];
    for (k, v) in defaults.iter().chain(opts) {
        args.extend(["--option".into(), (*k).into(), (*v).into()]);
    }
    if cmd == "nix-store" {
        args.extend(["--option".into(), "substituters".into(), String::new()]);
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        args.push("-r".into());
    } else {
        args.push("realise".into());
        args.extend(extra.iter().map(|a| (*a).to_owned()));
    }
    args.push(drv.to_owned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run(cmd, &args, None)
}

/// A key pair made by real Nix (`nix-store --generate-binary-cache-key NAME`) in `dir`:
/// the secret and public key files and the public key's text.
pub fn keypair(dir: &Path, name: &str) -> (PathBuf, PathBuf, String) {
    let (sk, pk) = (
        dir.join(format!("{name}.sk")),
        dir.join(format!("{name}.pk")),
    );
    let out = command("nix-store")
        .args(["--generate-binary-cache-key", name])
        .arg(&sk)
        .arg(&pk)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let public = std::fs::read_to_string(&pk).unwrap();
    (sk, pk, public)
}
