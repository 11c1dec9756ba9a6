//! The build plan against what real Nix 2.8.0 builders saw: the fixture cases env-probe,
//! env-override, structured and fod-probe (fixtures/nix-2.8-vectors), and the oracle
//! derivations in tests/data/oracle (see tests/data/README.md for how they were made).
//!
//! What the builder recorded is the plan plus what its shell adds by itself: busybox
//! `sh` exports `SHLVL=1`, and it keeps the inherited `PWD` because it names the working
//! directory (the plan sets both to `/build`), so `PWD` is compared like any other
//! variable and only `SHLVL` is taken out — after checking it is `1`.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use firn_build::plan::{plan, BuildPlan, PlanInput, ATTRS_JSON_FILE, ATTRS_SH_FILE};
use firn_derivation::{name_from_drv_base_name, parse_derivation, StoreDir};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn vectors(case: &str) -> PathBuf {
    repo().join("fixtures/nix-2.8-vectors/cases").join(case)
}

fn oracle() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/oracle")
}

/// The top `.drv` of fixture case `case`: its base name and bytes.
fn fixture_drv(case: &str) -> (String, Vec<u8>) {
    let dir = repo().join("fixtures/cases").join(case);
    let top = fs::read_to_string(dir.join("drvPath")).unwrap();
    let base = top.trim().rsplit('/').next().unwrap().to_owned();
    let text = fs::read(dir.join("drv").join(&base)).unwrap();
    (base, text)
}

fn oracle_drv(name: &str) -> (String, Vec<u8>) {
    let dir = oracle().join("drv");
    for entry in fs::read_dir(&dir).unwrap() {
        let base = entry.unwrap().file_name().into_string().unwrap();
        if base.ends_with(&format!("-{name}.drv")) {
            let text = fs::read(dir.join(&base)).unwrap();
            return (base, text);
        }
    }
    panic!("no oracle derivation {name}");
}

/// The plan as the fixtures were built: sandboxed, `/build`, `cores = 2`.
fn plan_with(base: &str, text: &[u8], cores: u32, caller: &[(&str, &str)]) -> BuildPlan {
    let sd = StoreDir::default();
    let drv = parse_derivation(&sd, text, name_from_drv_base_name(base)).unwrap();
    let outputs = drv.output_paths(&sd).unwrap();
    let caller: BTreeMap<Vec<u8>, Vec<u8>> = caller
        .iter()
        .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
        .collect();
    plan(&PlanInput {
        drv: &drv,
        store_dir: &sd,
        output_paths: &outputs,
        build_dir: Path::new("/build"),
        cores,
        caller_env: &caller,
        sandboxed: true,
        exported: &BTreeMap::new(),
    })
    .unwrap()
}

fn plan_for(base: &str, text: &[u8], caller: &[(&str, &str)]) -> BuildPlan {
    plan_with(base, text, 2, caller)
}

fn plan_env(p: &BuildPlan) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    for (k, v) in &p.env {
        let k = String::from_utf8(k.clone()).unwrap();
        let v = String::from_utf8(v.clone()).unwrap();
        assert!(
            !v.contains('\n'),
            "{k}: a multi-line value cannot be compared with an `env` listing"
        );
        assert!(m.insert(k, v).is_none());
    }
    m
}

/// An `env` listing, one `NAME=value` per line.
fn parse_env_listing(lines: &[&str]) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    for line in lines {
        let (k, v) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not NAME=value: {line:?}"));
        assert!(m.insert(k.to_owned(), v.to_owned()).is_none(), "{k} twice");
    }
    m
}

/// Take out what the builder's shell added by itself (see the module doc).
fn without_shell_vars(mut observed: BTreeMap<String, String>) -> BTreeMap<String, String> {
    assert_eq!(observed.remove("SHLVL").as_deref(), Some("1"));
    observed
}

/// `ls -la /build`: the regular files and their sizes.
fn ls_files(listing: &str) -> BTreeMap<String, usize> {
    listing
        .lines()
        .filter(|l| l.starts_with('-'))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(f.len(), 9, "{l}");
            (f[8].to_owned(), f[4].parse().unwrap())
        })
        .collect()
}

fn plan_files(p: &BuildPlan) -> BTreeMap<String, usize> {
    p.files.iter().map(|(n, c)| (n.clone(), c.len())).collect()
}

fn file<'p>(p: &'p BuildPlan, name: &str) -> &'p [u8] {
    &p.files.iter().find(|(n, _)| n == name).unwrap().1
}

// A NAR reader, just enough for the fixtures' outputs.

#[derive(Debug)]
enum Nar {
    File(Vec<u8>),
    Symlink,
    Dir(BTreeMap<String, Nar>),
}

impl Nar {
    fn parse(bytes: &[u8]) -> Nar {
        let mut r = NarReader { b: bytes, pos: 0 };
        r.expect("nix-archive-1");
        let n = r.node();
        assert_eq!(r.pos, bytes.len(), "trailing bytes");
        n
    }

    fn get(&self, name: &str) -> &[u8] {
        match self {
            Nar::Dir(entries) => match &entries[name] {
                Nar::File(c) => c,
                other => panic!("{name}: {other:?}"),
            },
            other => panic!("not a directory: {other:?}"),
        }
    }

    fn contents(&self) -> &[u8] {
        match self {
            Nar::File(c) => c,
            other => panic!("not a file: {other:?}"),
        }
    }
}

struct NarReader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl NarReader<'_> {
    fn str(&mut self) -> Vec<u8> {
        let len = u64::from_le_bytes(self.b[self.pos..self.pos + 8].try_into().unwrap()) as usize;
        self.pos += 8;
        let s = self.b[self.pos..self.pos + len].to_vec();
        self.pos += len.div_ceil(8) * 8;
        s
    }

    fn expect(&mut self, s: &str) {
        assert_eq!(String::from_utf8(self.str()).unwrap(), s);
    }

    fn node(&mut self) -> Nar {
        self.expect("(");
        self.expect("type");
        let node = match &self.str()[..] {
            b"regular" => {
                let mut tag = self.str();
                if tag == b"executable" {
                    self.expect("");
                    tag = self.str();
                }
                assert_eq!(tag, b"contents");
                Nar::File(self.str())
            }
            b"symlink" => {
                self.expect("target");
                self.str();
                Nar::Symlink
            }
            b"directory" => {
                let mut entries = BTreeMap::new();
                loop {
                    let tag = self.str();
                    if tag == b")" {
                        return Nar::Dir(entries);
                    }
                    assert_eq!(tag, b"entry");
                    self.expect("(");
                    self.expect("name");
                    let name = String::from_utf8(self.str()).unwrap();
                    self.expect("node");
                    let child = self.node();
                    self.expect(")");
                    entries.insert(name, child);
                }
            }
            other => panic!("node type {other:?}"),
        };
        self.expect(")");
        node
    }
}

fn read_nar(case: &str, output: &str) -> Nar {
    Nar::parse(&fs::read(vectors(case).join("nar").join(format!("{output}.nar"))).unwrap())
}

/// The lines of the `=== /build/probe/env` section a probe printed to its build log.
fn probe_env_section(log: &str) -> Vec<&str> {
    let mut lines = log
        .lines()
        .skip_while(|l| *l != "=== /build/probe/env")
        .skip(1);
    let section: Vec<&str> = lines
        .by_ref()
        .take_while(|l| !l.starts_with("[exit "))
        .collect();
    assert!(!section.is_empty());
    section
}

#[test]
fn env_probe_environment_is_what_the_sandboxed_builder_saw() {
    let (base, text) = fixture_drv("env-probe");
    let p = plan_for(&base, &text, &[]);
    let listing = fs::read_to_string(vectors("env-probe").join("probe-output/env")).unwrap();
    let lines: Vec<&str> = listing.lines().collect();
    assert_eq!(lines.last(), Some(&"[exit 0]"));
    let observed = without_shell_vars(parse_env_listing(&lines[..lines.len() - 1]));
    assert_eq!(plan_env(&p), observed);

    assert_eq!(p.program, b"/bin/sh");
    assert_eq!(
        p.argv,
        vec![b"sh".to_vec(), b"-c".to_vec(), b". $probe $out".to_vec()]
    );
    assert_eq!(p.cwd, Path::new("/build"));
    assert!(p.files.is_empty());
    let pwd = fs::read_to_string(vectors("env-probe").join("probe-output/pwd")).unwrap();
    assert_eq!(pwd, "/build\n[exit 0]\n");
    // The build directory starts empty: nothing to write.
    let ls = fs::read_to_string(vectors("env-probe").join("probe-output/ls-build")).unwrap();
    assert!(ls_files(&ls).is_empty());
}

#[test]
fn env_override_output_is_the_sorted_environment() {
    // The builder ran `env | sort > $out`: compare byte for byte.
    let (base, text) = fixture_drv("env-override");
    let p = plan_for(&base, &text, &[]);
    let mut lines: Vec<Vec<u8>> = p.env_strings();
    lines.push(b"SHLVL=1".to_vec()); // added by the shell, see the module doc
    lines.sort();
    let mut expected = Vec::new();
    for l in lines {
        expected.extend_from_slice(&l);
        expected.push(b'\n');
    }
    let nar = read_nar("env-override", "out");
    assert_eq!(
        String::from_utf8_lossy(nar.contents()),
        String::from_utf8_lossy(&expected)
    );
    // The points of the case: PATH/HOME/NIX_BUILD_CORES overridden, the rest forced.
    let env = plan_env(&p);
    assert_eq!(env["PATH"], "/custom-path");
    assert_eq!(env["HOME"], "/custom-home");
    assert_eq!(env["NIX_BUILD_CORES"], "99");
    assert_eq!(env["TMPDIR"], "/build");
    assert_eq!(env["TERM"], "xterm-256color");
    assert_eq!(env["NIX_LOG_FD"], "2");
}

/// Structured attributes: `.attrs.json` and `.attrs.sh` byte for byte, the environment
/// except for Nix 2.8's `NIX_ATTRS_*_FILE`, which name the host-side build directory
/// (`host_dir`) where the plan names the one the builder sees.
fn check_structured(p: &BuildPlan, out: &Nar, host_dir: &str) {
    assert_eq!(
        String::from_utf8_lossy(file(p, ATTRS_JSON_FILE)),
        String::from_utf8_lossy(out.get("attrs.json"))
    );
    assert_eq!(
        String::from_utf8_lossy(file(p, ATTRS_SH_FILE)),
        String::from_utf8_lossy(out.get("attrs.sh"))
    );
    let listing = String::from_utf8(out.get("env").to_vec()).unwrap();
    let lines: Vec<&str> = listing.lines().collect();
    let mut observed = without_shell_vars(parse_env_listing(&lines));
    let mut expected = plan_env(p);
    for (var, file) in [
        ("NIX_ATTRS_JSON_FILE", ATTRS_JSON_FILE),
        ("NIX_ATTRS_SH_FILE", ATTRS_SH_FILE),
    ] {
        assert_eq!(observed.remove(var).unwrap(), format!("{host_dir}/{file}"));
        assert_eq!(expected.remove(var).unwrap(), format!("/build/{file}"));
    }
    assert_eq!(expected, observed);
    // The builder's view of /build: exactly the plan's files.
    let ls = String::from_utf8(out.get("ls-build").to_vec()).unwrap();
    assert_eq!(plan_files(p), ls_files(&ls));
}

#[test]
fn structured_attrs_files_and_environment() {
    let (base, text) = fixture_drv("structured");
    let p = plan_for(&base, &text, &[]);
    check_structured(
        &p,
        &read_nar("structured", "out"),
        "/tmp/nix-build-structured.drv-0",
    );
    // No attribute variables at all.
    assert!(p.env_var(b"out").is_none());
    assert!(p.env_var(b"__json").is_none());
}

#[test]
fn fod_probe_environment_includes_impure_vars() {
    let (base, text) = fixture_drv("fod-probe");
    let p = plan_for(&base, &text, &[("PROBE_IMPURE_VAR", "from-caller")]);
    let log = fs::read_to_string(vectors("fod-probe").join("realise.stderr")).unwrap();
    let observed = without_shell_vars(parse_env_listing(&probe_env_section(&log)));
    assert_eq!(plan_env(&p), observed);
    assert_eq!(observed["NIX_OUTPUT_CHECKED"], "1");
}

#[test]
fn oracle_env_pass_as_file_placeholders_and_forced_vars() {
    let (base, text) = oracle_drv("plan-oracle-env");
    // PLAN_ORACLE_SET was set when Nix built it; not fixed-output, so it must not matter.
    let p = plan_for(&base, &text, &[("PLAN_ORACLE_SET", "from-caller")]);
    let dir = oracle().join("plan-oracle-env");
    let listing = fs::read_to_string(dir.join("env")).unwrap();
    let observed = without_shell_vars(parse_env_listing(&listing.lines().collect::<Vec<_>>()));
    assert_eq!(plan_env(&p), observed);

    // The passAsFile files, copied by the builder as file<name>.
    let mut copied = BTreeMap::new();
    for entry in fs::read_dir(&dir).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if let Some(attr) = name.strip_prefix("file") {
            copied.insert(attr.to_owned(), fs::read(dir.join(&name)).unwrap());
        }
    }
    let planned: BTreeMap<String, Vec<u8>> = p.files.iter().cloned().collect();
    assert_eq!(planned.len(), 2);
    assert_eq!(planned, copied);
    let ls = fs::read_to_string(dir.join("ls-build")).unwrap();
    assert_eq!(plan_files(&p), ls_files(&ls));

    // argv[0] as `$0` of `sh -c`, and a placeholder in the arguments rewritten.
    assert_eq!(fs::read_to_string(dir.join("argv0")).unwrap(), "sh\n");
    assert_eq!(p.argv[0], b"sh");
    let out = fs::read_to_string(dir.join("placeholder-arg")).unwrap();
    let script = String::from_utf8(p.argv[2].clone()).unwrap();
    assert!(
        script.contains(&format!("echo {} >", out.trim())),
        "{script}"
    );
}

#[test]
fn oracle_fod_impure_vars_set_unset_and_overriding() {
    let (base, text) = oracle_drv("plan-oracle-fod");
    // What the caller had of the variables the derivation names (PLAN_ORACLE_UNSET,
    // NIX_OUTPUT_CHECKED and NIX_LOG_FD were unset; see tests/data/README.md).
    let p = plan_for(
        &base,
        &text,
        &[("PLAN_ORACLE_SET", "from-caller"), ("TMPDIR", "/tmp")],
    );
    let log = fs::read_to_string(oracle().join("plan-oracle-fod.stderr")).unwrap();
    // The builder ran `env | sort >&2`: the lines after "building '…'...".
    let lines: Vec<&str> = log
        .lines()
        .skip_while(|l| !l.starts_with("building '"))
        .skip(1)
        .filter(|l| !l.starts_with("warning: "))
        .collect();
    let observed = without_shell_vars(parse_env_listing(&lines));
    assert_eq!(plan_env(&p), observed);
    // The points of the case.
    assert_eq!(observed["PLAN_ORACLE_UNSET"], "");
    assert_eq!(observed["NIX_OUTPUT_CHECKED"], "");
    assert_eq!(observed["TMPDIR"], "/tmp");
    assert_eq!(observed["NIX_LOG_FD"], "2");
}

#[test]
fn oracle_structured_every_json_shape() {
    let (base, text) = oracle_drv("plan-oracle-structured");
    let p = plan_for(&base, &text, &[("PLAN_ORACLE_SET", "from-caller")]);
    let dir = oracle().join("plan-oracle-structured");
    let mut entries = BTreeMap::new();
    for name in ["attrs.json", "attrs.sh", "env", "ls-build"] {
        entries.insert(
            name.to_owned(),
            Nar::File(fs::read(dir.join(name)).unwrap()),
        );
    }
    check_structured(
        &p,
        &Nar::Dir(entries),
        "/tmp/nix-build-plan-oracle-structured.drv-0",
    );
}

#[test]
fn the_comparisons_can_fail() {
    // Sanity of the harness: a plan that differs in one variable does not match.
    let (base, text) = fixture_drv("env-probe");
    let p = plan_with(&base, &text, 3, &[]);
    let listing = fs::read_to_string(vectors("env-probe").join("probe-output/env")).unwrap();
    let lines: Vec<&str> = listing.lines().collect();
    let observed = without_shell_vars(parse_env_listing(&lines[..lines.len() - 1]));
    assert_ne!(plan_env(&p), observed);
    // A fixed-output derivation without the caller's variable gets it empty, unlike
    // what the fod-probe builder saw.
    let (base, text) = fixture_drv("fod-probe");
    let p = plan_for(&base, &text, &[]);
    assert_eq!(p.env_var(b"PROBE_IMPURE_VAR"), Some(&b""[..]));
}
