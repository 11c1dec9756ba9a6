//! Nix's environment variables for locations, end to end: with `NIX_STORE_DIR`,
//! `NIX_STATE_DIR`, `NIX_LOG_DIR` and `NIX_CONF_DIR` set and no `--store` (how Nix's own
//! functional tests run), firn uses the store they name — a store dir other than
//! `/nix/store`, the real store dir being the logical one — and real Nix 2.8, run with
//! the same variables, reads what firn wrote and computes the same paths.
//!
//! Output paths depend on the store dir, so Nix's twin store has to have the same one:
//! Nix builds first, then the directories are wiped and firn builds at the same places.
//! Building needs root, nix-instantiate and /bin/busybox (in CI these tests run).

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod common;
use common::*;

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};

/// A set of Nix directories under one base: `store`, `var`, `log`, `etc`.
struct Dirs {
    base: PathBuf,
}

impl Dirs {
    fn new(tag: &str) -> Self {
        let d = Self { base: tempdir(tag) };
        d.reset();
        d
    }

    /// Everything gone, and a fresh `etc`.
    ///
    /// `etc/nix.conf` (read by Nix and firn) says, as in Nix's own test suite,
    /// `build-users-group =`: the user pool is `$NIX_STATE_DIR/userpool`, so builds
    /// locking users in two pools (two of these tests, or these and builds in
    /// `/nix/var/nix/userpool` on this machine) could get the same uid and kill each
    /// other's builders (it happened).
    fn reset(&self) {
        remove(&self.base);
        fs::create_dir_all(self.base.join("etc")).unwrap();
        fs::write(self.base.join("etc/nix.conf"), "build-users-group =\n").unwrap();
    }

    fn store(&self) -> String {
        self.base.join("store").to_str().unwrap().to_owned()
    }

    fn vars(&self) -> Vec<(&'static str, PathBuf)> {
        vec![
            ("NIX_STORE_DIR", self.base.join("store")),
            ("NIX_STATE_DIR", self.base.join("var")),
            ("NIX_LOG_DIR", self.base.join("log")),
            ("NIX_CONF_DIR", self.base.join("etc")),
            ("FIRN_CONF_DIR", self.base.join("etc")),
            ("NIX_USER_CONF_FILES", PathBuf::new()),
        ]
    }

    /// `prog ARGS…` with the variables (less those in `without`), `stdin` as input.
    fn run_without(
        &self,
        prog: &str,
        args: &[&str],
        stdin: Option<&[u8]>,
        without: &[&str],
    ) -> Output {
        let mut c = command(prog);
        for (k, v) in self.vars() {
            if !without.contains(&k) {
                c.env(k, v);
            }
        }
        let mut child = c
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{prog}: {e}"));
        let mut pipe = child.stdin.take().unwrap();
        if let Some(input) = stdin {
            pipe.write_all(input).unwrap();
        }
        drop(pipe);
        child.wait_with_output().unwrap()
    }

    fn firn(&self, args: &[&str]) -> Output {
        self.run_without(firn_bin(), args, None, &[])
    }

    /// A Nix program with `--option substituters ''` (and `nix`'s feature flag).
    fn nix(&self, prog: &str, args: &[&str]) -> Output {
        let mut all: Vec<&str> = match prog {
            "nix" => vec!["--extra-experimental-features", "nix-command"],
            _ => vec![],
        };
        all.extend(["--option", "substituters", ""]);
        all.extend_from_slice(args);
        self.run_without(prog, &all, None, &[])
    }

    fn instantiate(&self, file: &Path) -> String {
        let drv = ok(self.nix("nix-instantiate", &[file.to_str().unwrap()]));
        let drv = drv.trim().to_owned();
        assert!(
            drv.starts_with(&format!("{}/", self.store())),
            "{drv} is not in {}",
            self.store()
        );
        drv
    }
}

/// `s` with every `"registrationTime":N` left out (the rest is Nix's JSON verbatim).
fn without_times(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find(",\"registrationTime\":") {
        out.push_str(&rest[..i]);
        rest = &rest[i + ",\"registrationTime\":".len()..];
        rest = rest.trim_start_matches(|c: char| c.is_ascii_digit());
    }
    out.push_str(rest);
    out
}

fn lines(s: &str) -> BTreeSet<String> {
    s.lines().map(str::to_owned).collect()
}

/// A derivation with a dependency whose builders need only shell built-ins (the host's
/// `/bin/sh` without the sandbox, busybox in it); `dep` prints to its log.
const TOP: &str = r#"
let dep = derivation { name = "dep"; system = "x86_64-linux"; builder = "/bin/sh";
  args = ["-c" "echo dep > $out; echo built dep"]; };
in derivation { name = "top"; system = "x86_64-linux"; builder = "/bin/sh";
  args = ["-c" "echo ${dep} > $out; while read l; do echo got $l; done < ${dep} >> $out"]; }
"#;

const LONE: &str = r#"derivation { name = "lone"; system = "x86_64-linux"; builder = "/bin/sh";
  args = ["-c" "echo lone > $out"]; }"#;

fn exprs(tag: &str) -> PathBuf {
    let dir = tempdir(tag);
    fs::write(dir.join("top.nix"), TOP).unwrap();
    fs::write(dir.join("lone.nix"), LONE).unwrap();
    dir
}

#[test]
fn realise_in_the_store_the_variables_name_as_nix_does() {
    if !can_build() || !have_nix() {
        return;
    }
    let ex = exprs("envdirs-exprs");
    for sandbox in [true, false] {
        let d = Dirs::new(if sandbox {
            "envdirs-sb"
        } else {
            "envdirs-nosb"
        });
        let ctx = format!("sandbox {sandbox}");
        // Nix builds in the store the variables name (without the sandbox: Nix 2.8 as
        // root would need /bin/sh in it).
        let drv = d.instantiate(&ex.join("top.nix"));
        let nix_out = ok(d.nix("nix-store", &["--option", "sandbox", "false", "-r", &drv]));
        let top = nix_out.trim().to_owned();
        let nix_requisites = ok(d.nix("nix-store", &["-q", "--requisites", &top]));
        let nix_info = without_times(&ok(d.nix("nix", &["path-info", "--json", "-r", &top])));

        // The same places, anew, built by firn.
        d.reset();
        assert_eq!(d.instantiate(&ex.join("top.nix")), drv, "{ctx}");
        let mut args = vec!["realise"];
        match sandbox {
            true => args.extend([
                "--option",
                "sandbox",
                "true",
                "--option",
                "sandbox-paths",
                "/bin/sh=/bin/busybox",
            ]),
            false => args.extend(["--option", "sandbox", "false"]),
        }
        args.push(&drv);
        assert_eq!(ok(d.firn(&args)), nix_out, "{ctx}: output paths are Nix's");

        // Nix reads firn's store as its own, and the two agree on it.
        for q in ["--references", "--requisites"] {
            let theirs = ok(d.nix("nix-store", &["-q", q, &top]));
            assert_eq!(ok(d.firn(&["query", q, &top])), theirs, "{ctx} {q}");
        }
        assert_eq!(
            ok(d.nix("nix-store", &["-q", "--requisites", &top])),
            nix_requisites,
            "{ctx}: the closure Nix built"
        );
        let theirs = ok(d.nix("nix", &["path-info", "--json", "-r", &top]));
        assert_eq!(
            without_times(&theirs),
            nix_info,
            "{ctx}: hashes, sizes, refs"
        );
        let single = ok(d.nix("nix", &["path-info", "--json", &top]));
        assert_eq!(ok(d.firn(&["path-info", "--json", &top])), single, "{ctx}");
        ok(d.nix("nix-store", &["--verify", "--check-contents"]));
        ok(d.firn(&["verify", "--check-contents"]));

        // Logs in NIX_LOG_DIR, read by both; the database in NIX_STATE_DIR; nothing at
        // the chroot store's places.
        let dep = ok(d.firn(&["query", "--references", &top]));
        let dep = dep.trim();
        assert_eq!(ok(d.firn(&["log", dep])), "built dep\n", "{ctx}");
        assert_eq!(ok(d.nix("nix-store", &["-l", dep])), "built dep\n", "{ctx}");
        assert!(d.base.join("log/drvs").is_dir(), "{ctx}");
        assert!(d.base.join("var/db/db.sqlite").is_file(), "{ctx}");
        assert_eq!(
            fs::read_to_string(d.base.join("var/db/schema")).unwrap(),
            "10"
        );
        assert!(!d.base.join("nix").exists() && !d.base.join("store/nix").exists());

        // `--store ROOT` too: Nix's chroot store, objects in ROOT/nix/store but named
        // in NIX_STORE_DIR; the builder sees them there (bound at the logical dir).
        let root = d.base.join("root");
        let root_s = root.to_str().unwrap();
        let in_root = ok(d.nix(
            "nix-instantiate",
            &["--store", root_s, ex.join("top.nix").to_str().unwrap()],
        ));
        assert_eq!(in_root.trim(), drv, "{ctx}");
        let mut root_args = vec!["--store", root_s];
        root_args.extend_from_slice(&args);
        assert_eq!(ok(d.firn(&root_args)), nix_out, "{ctx}: in --store ROOT");
        let base = top.rsplit('/').next().unwrap();
        assert!(root.join("nix/store").join(base).is_file(), "{ctx}");
        assert_eq!(
            ok(d.nix(
                "nix-store",
                &["--store", root_s, "-q", "--requisites", &top]
            )),
            nix_requisites,
            "{ctx}"
        );
        assert!(root.join("nix/var/log/nix/drvs").is_dir(), "{ctx}");
        remove(&d.base);
    }
    remove(&ex);
}

#[test]
fn store_commands_in_the_store_the_variables_name() {
    if !have_nix() {
        return;
    }
    let d = Dirs::new("envdirs-cmds");
    let src = tempdir("envdirs-cmds-src");
    fs::write(src.join("hello"), "hello\n").unwrap();
    fs::write(src.join("other"), "other\n").unwrap();
    let hello = src.join("hello");
    let hello = hello.to_str().unwrap();
    let other = src.join("other");
    let other = other.to_str().unwrap();

    // firn adds, Nix finds the same path valid; and the other way round.
    let p = ok(d.firn(&["add", hello]));
    assert!(p.starts_with(&format!("{}/", d.store())), "{p}");
    assert_eq!(ok(d.nix("nix-store", &["--add", hello])), p);
    let q = ok(d.nix("nix-store", &["--add", other]));
    assert_eq!(ok(d.firn(&["add", other])), q);
    let p = p.trim();
    assert_eq!(
        d.firn(&["dump", p]).stdout,
        d.nix("nix-store", &["--dump", p]).stdout
    );
    assert_eq!(
        ok(d.firn(&["query", "--hash", p])),
        ok(d.nix("nix-store", &["-q", "--hash", p]))
    );

    // `derivation add` computes the paths Nix computes for this store dir.
    let json = format!(
        r#"{{"name":"x","outputs":{{"out":{{}}}},"inputSrcs":[],"inputDrvs":{{}},"system":"x86_64-linux","builder":"/bin/busybox","args":["sh","-c",{}],"env":{{"name":"x","out":"","builder":"/bin/busybox","system":"x86_64-linux"}}}}"#,
        json_string("echo x > $out")
    );
    let added = d.run_without(
        firn_bin(),
        &["derivation", "add"],
        Some(json.as_bytes()),
        &[],
    );
    let drv = ok(added).trim().to_owned();
    let expr = src.join("x.nix");
    fs::write(
        &expr,
        r#"derivation { name = "x"; builder = "/bin/busybox"; args = ["sh" "-c" "echo x > $out"]; system = "x86_64-linux"; }"#,
    )
    .unwrap();
    assert_eq!(d.instantiate(&expr), drv);
    assert_eq!(
        ok(d.firn(&["derivation", "show", &drv])),
        ok(d.nix("nix", &["show-derivation", &drv])),
        "keyed by the store dir's path"
    );
    assert_eq!(
        ok(d.firn(&["query", "--outputs", &drv])),
        ok(d.nix("nix-store", &["-q", "--outputs", &drv]))
    );
    ok(d.firn(&["verify", "--check-contents"]));
    ok(d.nix("nix-store", &["--verify", "--check-contents"]));

    // `--store ROOT` given too: the chroot layout under ROOT (state and logs there,
    // not in NIX_STATE_DIR), with NIX_STORE_DIR still naming the paths, as Nix 2.8 does.
    let root = d.base.join("root");
    let root_s = root.to_str().unwrap();
    let in_root = ok(d.firn(&["--store", root_s, "add", hello]));
    assert_eq!(
        in_root.trim(),
        p,
        "the logical store dir is NIX_STORE_DIR's"
    );
    let base = p.rsplit('/').next().unwrap();
    assert!(root.join("nix/store").join(base).is_file());
    assert!(root.join("nix/var/nix/db/db.sqlite").is_file());
    let nix_root = d.base.join("nix-root");
    let nix_in_root = ok(d.nix(
        "nix-store",
        &["--store", nix_root.to_str().unwrap(), "--add", hello],
    ));
    assert_eq!(in_root, nix_in_root);
    // Without NIX_STORE_DIR, `--store ROOT` is today's chroot store at /nix/store.
    let root2 = d.base.join("root2");
    let out = d.run_without(
        firn_bin(),
        &["--store", root2.to_str().unwrap(), "add", hello],
        None,
        &["NIX_STORE_DIR"],
    );
    let plain = ok(out);
    assert!(plain.starts_with("/nix/store/"), "{plain}");
    let nix_root2 = d.base.join("nix-root2");
    let out = d.run_without(
        "nix-store",
        &[
            "--store",
            nix_root2.to_str().unwrap(),
            "--option",
            "substituters",
            "",
            "--add",
            hello,
        ],
        None,
        &["NIX_STORE_DIR"],
    );
    assert_eq!(plain, ok(out));
    assert!(root2
        .join("nix/store")
        .join(plain.trim().rsplit('/').next().unwrap())
        .is_file());

    // A relative location is refused, naming the variable, as Nix refuses it.
    let mut c = firn_command();
    let out = c
        .env("NIX_STATE_DIR", "relative/var")
        .args(["query", "--hash", p])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "error: NIX_STATE_DIR: not an absolute path: 'relative/var'\n"
    );
    remove(&d.base);
    remove(&src);
}

#[test]
fn gc_in_the_store_the_variables_name_deletes_what_nix_would() {
    if !can_build() || !have_nix() {
        return;
    }
    let ex = exprs("envdirs-gc-exprs");
    let d = Dirs::new("envdirs-gc");
    let top = d.instantiate(&ex.join("top.nix"));
    let lone = d.instantiate(&ex.join("lone.nix"));
    let result = d.base.join("result");
    let sb = ["--option", "sandbox", "false"];
    let mut args = vec!["realise"];
    args.extend(sb);
    args.extend(["--add-root", result.to_str().unwrap(), &top]);
    // As `nix-store -r --add-root`, the root is printed.
    assert_eq!(ok(d.firn(&args)).trim(), result.to_str().unwrap());
    let top_out = fs::read_link(&result).unwrap().to_str().unwrap().to_owned();
    let mut args = vec!["realise"];
    args.extend(sb);
    args.push(&lone);
    let lone_out = ok(d.firn(&args));
    // The root is Nix's indirect root in NIX_STATE_DIR.
    assert!(top_out.ends_with("-top"), "{top_out}");
    let auto: Vec<_> = fs::read_dir(d.base.join("var/gcroots/auto"))
        .unwrap()
        .map(|e| fs::read_link(e.unwrap().path()).unwrap())
        .collect();
    assert_eq!(auto, std::slice::from_ref(&result));
    assert_eq!(
        ok(d.firn(&["query", "--roots", top_out.trim()])),
        ok(d.nix("nix-store", &["-q", "--roots", top_out.trim()]))
    );

    let dead = lines(&ok(d.nix("nix-store", &["--gc", "--print-dead"])));
    let live = lines(&ok(d.nix("nix-store", &["--gc", "--print-live"])));
    assert_eq!(lines(&ok(d.firn(&["gc", "--print-dead"]))), dead);
    assert_eq!(lines(&ok(d.firn(&["gc", "--print-live"]))), live);
    assert!(
        dead.contains(lone_out.trim()) && dead.contains(&lone),
        "{dead:?}"
    );
    assert!(live.contains(top_out.trim()), "{live:?}");
    ok(d.firn(&["gc"]));
    for p in &dead {
        assert!(fs::symlink_metadata(p).is_err(), "{p} should be deleted");
    }
    for p in &live {
        assert!(fs::symlink_metadata(p).is_ok(), "{p} should be kept");
    }
    assert_eq!(ok(d.nix("nix-store", &["--gc", "--print-dead"])), "");
    ok(d.nix("nix-store", &["--verify", "--check-contents"]));
    ok(d.firn(&["verify", "--check-contents"]));
    remove(&d.base);
    remove(&ex);
}
