//! NAR dump/hash/restore and reference scanning, against the fixtures made by real Nix
//! 2.8 and, when it is installed, against `nix-store --dump` / `nix-hash` live.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use firn_derivation::{Hash, StoreDir, StorePath};
use firn_store::canonical::RestoredMetadata;
use firn_store::nar::{
    dump_path, dump_path_pipelined, dump_path_split, dump_path_through, dump_path_to_fd, hash_path,
    hash_paths, restore_buffered_for_store, restore_path, validate, HashSink, NarError, Tee,
};
use firn_store::references::{scan_path, RefScanner};
use proptest::prelude::*;

// ---------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn vectors() -> PathBuf {
    fixtures().join("nix-2.8-vectors")
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("firn-nar-test-{tag}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.0.join(name)
    }

    /// The names in the directory.
    fn entries(&self) -> Vec<PathBuf> {
        fs::read_dir(&self.0)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Is the real `nix-store` usable? Required when `CI=true`.
fn nix_available() -> bool {
    let ok = Command::new("nix-store")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "nix-store must be installed when CI=true"
        );
        eprintln!("SKIPPED: nix-store not available, live comparison not run");
    }
    ok
}

fn nix_dump(path: &Path) -> Vec<u8> {
    let out = Command::new("nix-store")
        .arg("--dump")
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "nix-store --dump {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn nix_hash(path: &Path) -> String {
    let out = Command::new("nix-hash")
        .args(["--type", "sha256"])
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn dump(path: &Path) -> Vec<u8> {
    let mut v = Vec::new();
    dump_path(path, &mut v).unwrap();
    v
}

/// `str(data)`.
fn s(data: &[u8]) -> Vec<u8> {
    let mut v = (data.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(data);
    v.resize(v.len().div_ceil(8) * 8, 0);
    v
}

/// A NAR from tokens.
fn nar(tokens: &[&[u8]]) -> Vec<u8> {
    tokens.iter().flat_map(|t| s(t)).collect()
}

/// A string header claiming `len` bytes.
fn len_only(len: u64) -> Vec<u8> {
    len.to_le_bytes().to_vec()
}

/// Deterministic pseudo-random bytes.
fn bytes(n: usize, mut seed: u64) -> Vec<u8> {
    (0..n)
        .map(|_| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) as u8
        })
        .collect()
}

/// Every NAR in the fixtures: outputs (`cases/*/nar/*.nar`) and sources
/// (`cases/*/src/*.nar`).
fn fixture_nars() -> Vec<PathBuf> {
    let mut nars = Vec::new();
    for case in fs::read_dir(vectors().join("cases")).unwrap() {
        let case = case.unwrap().path();
        for sub in ["nar", "src"] {
            if let Ok(entries) = fs::read_dir(case.join(sub)) {
                for e in entries {
                    let p = e.unwrap().path();
                    if p.extension() == Some(OsStr::new("nar")) {
                        nars.push(p);
                    }
                }
            }
        }
    }
    nars.sort();
    nars
}

/// `key value` lines of an `.info` file.
fn info_values(info: &Path, key: &str) -> Vec<String> {
    fs::read_to_string(info)
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix(' ')))
        .map(str::to_string)
        .collect()
}

fn store_path(full: &str) -> StorePath {
    StoreDir::default().parse(full).unwrap()
}

// ---------------------------------------------------------------------------------
// Fixtures made by real Nix
// ---------------------------------------------------------------------------------

#[test]
fn fixture_nars_restore_and_dump_back_identically() {
    let nars = fixture_nars();
    assert!(nars.len() >= 25, "only {} fixture NARs", nars.len());
    let live = nix_available();
    let tmp = TempDir::new("fixtures");
    let mut with_info = 0;
    for (i, nar_file) in nars.iter().enumerate() {
        let data = fs::read(nar_file).unwrap();
        assert_eq!(validate(&mut &data[..]).unwrap(), data.len() as u64);
        let target = tmp.join(format!("r{i}"));
        restore_path(&mut &data[..], &target).unwrap();
        assert_eq!(dump(&target), data, "{}", nar_file.display());
        let (hash, size) = hash_path(&target).unwrap();
        assert_eq!(hash, Hash::sha256(&data));
        assert_eq!(size, data.len() as u64);
        if live {
            assert_eq!(
                nix_dump(&target),
                data,
                "nix-store --dump of restored {}",
                nar_file.display()
            );
        }
        let info = nar_file.with_extension("info");
        if info.exists() {
            with_info += 1;
            assert_eq!(
                info_values(&info, "narHash"),
                [hash.to_string()],
                "{}",
                info.display()
            );
            assert_eq!(info_values(&info, "narSize"), [size.to_string()]);
        }
    }
    assert!(with_info >= 20);
    // Nothing but the restored trees was left in the directory.
    assert_eq!(tmp.entries().len(), nars.len());
}

#[test]
fn restored_tree_fixture_has_expected_shape() {
    let data = fs::read(vectors().join("cases/tree/nar/out.nar")).unwrap();
    let tmp = TempDir::new("tree-shape");
    let t = tmp.join("tree");
    restore_path(&mut &data[..], &t).unwrap();
    let mode = |p: &str| {
        fs::symlink_metadata(t.join(p))
            .unwrap()
            .permissions()
            .mode()
    };
    assert_ne!(mode("bin/hello") & 0o100, 0);
    assert_ne!(mode("ownerexec") & 0o100, 0);
    assert_eq!(mode("private") & 0o111, 0);
    assert_eq!(mode("a") & 0o777, 0o644 & !umask());
    assert_eq!(
        fs::read_link(t.join("dangling")).unwrap(),
        Path::new("/nonexistent/target")
    );
    assert_eq!(fs::read_link(t.join("dirlink")).unwrap(), Path::new("bin"));
    assert_eq!(fs::read(t.join("share/doc/nine")).unwrap().len(), 9);
    assert_eq!(fs::read(t.join("share/doc/zero")).unwrap().len(), 0);
    assert!(fs::read_dir(t.join("empty")).unwrap().next().is_none());
    assert!(t.join("ünï").is_file());
}

fn umask() -> u32 {
    let tmp = TempDir::new("umask");
    let f = tmp.join("f");
    fs::write(&f, b"").unwrap();
    // std creates files with 0o666 & !umask.
    0o666 & !fs::metadata(&f).unwrap().permissions().mode() & 0o777
}

/// The value after `key` in a line of hashes.txt starting with `prefix`.
fn hashes_txt(prefix: &str, key: &str) -> String {
    let text = fs::read_to_string(vectors().join("hashes.txt")).unwrap();
    let line = text.lines().find(|l| l.starts_with(prefix)).unwrap();
    line.split(' ')
        .find_map(|w| w.strip_prefix(key))
        .unwrap()
        .to_string()
}

/// narHash/narSize of `nix-store --add exprs/<name>` in add-paths.txt.
fn add_paths_txt(name: &str) -> (String, u64) {
    let text = fs::read_to_string(vectors().join("add-paths.txt")).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("nix-store --add exprs/{name} ")))
        .unwrap();
    let hash = line
        .split(' ')
        .find_map(|w| w.strip_prefix("narHash="))
        .unwrap();
    let size = line
        .split(' ')
        .find_map(|w| w.strip_prefix("narSize="))
        .unwrap();
    (hash.to_string(), size.parse().unwrap())
}

#[test]
fn input_txt_and_srcdir_match_nix() {
    let exprs = fixtures().join("exprs");
    let live = nix_available();

    let input = exprs.join("input.txt");
    let (hash, size) = hash_path(&input).unwrap();
    assert_eq!(
        hash.to_base16(),
        hashes_txt("nar-hash exprs/input.txt ", "hex=")
    );
    assert_eq!((hash.to_string(), size), add_paths_txt("input.txt"));

    // srcdir as Nix saw it when making the vectors: `link-to-a` is a symlink to `a.txt`
    // (a git checkout may have it as a plain file, so rebuild it).
    let tmp = TempDir::new("srcdir");
    let src = tmp.join("srcdir");
    fs::create_dir(&src).unwrap();
    fs::copy(exprs.join("srcdir/a.txt"), src.join("a.txt")).unwrap();
    fs::copy(exprs.join("srcdir/run.sh"), src.join("run.sh")).unwrap();
    fs::set_permissions(src.join("run.sh"), fs::Permissions::from_mode(0o555)).unwrap();
    symlink("a.txt", src.join("link-to-a")).unwrap();
    let want_hex = hashes_txt("nar-hash exprs/srcdir ", "hex=");
    let (hash, size) = hash_path(&src).unwrap();
    assert_eq!(hash.to_base16(), want_hex);
    assert_eq!((hash.to_string(), size), add_paths_txt("srcdir"));
    let source_nar =
        fs::read(vectors().join("cases/with-src/src/nz11y973v9p0kp6ww97lqr379d0pmxrq-srcdir.nar"))
            .unwrap();
    assert_eq!(dump(&src), source_nar);

    // The on-disk fixture directory itself.
    let on_disk = exprs.join("srcdir");
    if fs::symlink_metadata(on_disk.join("link-to-a"))
        .unwrap()
        .file_type()
        .is_symlink()
    {
        assert_eq!(hash_path(&on_disk).unwrap().0.to_base16(), want_hex);
    } else {
        eprintln!("note: fixtures/exprs/srcdir/link-to-a is not a symlink in this checkout");
    }
    if live {
        for p in [&input, &on_disk, &src] {
            assert_eq!(dump(p), nix_dump(p), "{}", p.display());
            assert_eq!(hash_path(p).unwrap().0.to_base16(), nix_hash(p));
        }
    }
}

// ---------------------------------------------------------------------------------
// Generated trees vs the real nix-store --dump
// ---------------------------------------------------------------------------------

fn write(path: &Path, data: &[u8], mode: u32) {
    fs::write(path, data).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// A tree with every kind of node and edge case `dump_path` must get right.
fn make_tree(root: &Path) {
    fs::create_dir(root).unwrap();
    for (i, n) in [0usize, 1, 7, 8, 9, 15, 16, 17].into_iter().enumerate() {
        write(&root.join(format!("size-{n}")), &bytes(n, i as u64), 0o644);
    }
    write(&root.join("big"), &bytes(3 * 1024 * 1024 + 3, 99), 0o644);
    write(&root.join("exec.sh"), b"#!/bin/sh\necho hi\n", 0o755);
    write(&root.join("owner-exec-only"), b"x", 0o744);
    write(&root.join("group-exec-not-owner"), b"y", 0o655);
    write(&root.join("read-only"), b"z", 0o444);
    fs::create_dir(root.join("empty-dir")).unwrap();
    fs::create_dir_all(root.join("deep/a/b/c/d")).unwrap();
    write(&root.join("deep/a/b/c/d/leaf"), b"leaf\n", 0o644);
    fs::create_dir(root.join("deep/a/b/empty")).unwrap();
    symlink("does/not/exist", root.join("dangling")).unwrap();
    symlink("/etc/passwd", root.join("absolute")).unwrap();
    symlink("empty-dir", root.join("dir-link")).unwrap();
    symlink("x".repeat(4095), root.join("long-target")).unwrap();
    symlink(
        OsStr::from_bytes(b"\xff\xfe target"),
        root.join("odd-target"),
    )
    .unwrap();
    let names: [&[u8]; 12] = [
        b"name with spaces",
        b".hidden",
        b"..dots",
        b"\xff\xfe-not-utf8",
        "ünï".as_bytes(),
        b"B",
        b"a",
        b"bin",
        b"new\nline",
        b"back\\slash",
        b"-dash",
        &[b'L'; 255],
    ];
    for (i, name) in names.iter().enumerate() {
        write(&root.join(OsStr::from_bytes(name)), &bytes(i, 7), 0o644);
    }
}

#[test]
fn generated_tree_matches_nix_store_dump() {
    let tmp = TempDir::new("generated");
    let root = tmp.join("root");
    make_tree(&root);
    let ours = dump(&root);
    // A top-level symlink is dumped as a symlink; a top-level file as a file.
    let top_link = tmp.join("top-link");
    symlink("root", &top_link).unwrap();
    let top_file = root.join("exec.sh");

    let (hash, size) = hash_path(&root).unwrap();
    assert_eq!(hash, Hash::sha256(&ours));
    assert_eq!(size, ours.len() as u64);
    assert_eq!(
        dump(&top_link),
        nar(&[
            b"nix-archive-1",
            b"(",
            b"type",
            b"symlink",
            b"target",
            b"root",
            b")"
        ])
    );

    // Restore and dump back.
    let back = tmp.join("back");
    restore_path(&mut &ours[..], &back).unwrap();
    assert_eq!(dump(&back), ours);
    let mode = |p: &str| {
        fs::symlink_metadata(back.join(p))
            .unwrap()
            .permissions()
            .mode()
    };
    assert_ne!(mode("exec.sh") & 0o100, 0);
    assert_ne!(mode("owner-exec-only") & 0o100, 0);
    assert_eq!(mode("group-exec-not-owner") & 0o111, 0);
    assert_eq!(mode("read-only") & 0o111, 0);

    if nix_available() {
        for p in [&root, &top_link, &top_file, &back] {
            let theirs = nix_dump(p);
            assert!(
                dump(p) == theirs,
                "dump of {} differs from nix-store --dump",
                p.display()
            );
            assert_eq!(hash_path(p).unwrap().0.to_base16(), nix_hash(p));
        }
    }
}

#[test]
fn unsupported_file_types_are_errors() {
    let tmp = TempDir::new("fifo");
    let dir = tmp.join("d");
    fs::create_dir(&dir).unwrap();
    let fifo = dir.join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
    for p in [&dir, &fifo] {
        match dump_path(p, &mut Vec::new()) {
            Err(e @ NarError::UnsupportedType { .. }) => {
                assert_eq!(
                    e.to_string(),
                    format!("file '{}' has an unsupported type", fifo.display())
                );
            }
            other => panic!("{other:?}"),
        }
    }
    // Nix's words for it: `getting status of 'PATH': No such file or directory`.
    match hash_path(&tmp.join("missing")) {
        Err(e @ NarError::Stat { .. }) => assert_eq!(
            e.to_string(),
            format!(
                "getting status of '{}': No such file or directory",
                tmp.join("missing").display()
            )
        ),
        other => panic!("{other:?}"),
    }
}

// ---------------------------------------------------------------------------------
// Strict restore
// ---------------------------------------------------------------------------------

/// `data` must be rejected by `validate` and by `restore_path`, leaving nothing behind.
#[track_caller]
fn assert_rejected(label: &str, data: &[u8]) -> NarError {
    let tmp = TempDir::new("reject");
    let err = validate(&mut &data[..]).expect_err(label);
    assert!(
        matches!(err, NarError::Format { .. } | NarError::Truncated { .. }),
        "{label}: {err:?}"
    );
    let err2 = restore_path(&mut &data[..], &tmp.join("out")).expect_err(label);
    assert_eq!(err.to_string(), err2.to_string(), "{label}");
    assert!(
        tmp.entries().is_empty(),
        "{label}: left {:?}",
        tmp.entries()
    );
    err
}

const MAGIC: &[u8] = b"nix-archive-1";

fn dir_with(entries: &[&[u8]]) -> Vec<u8> {
    let mut tokens: Vec<&[u8]> = vec![MAGIC, b"(", b"type", b"directory"];
    for name in entries {
        tokens.extend_from_slice(&[
            b"entry",
            b"(",
            b"name",
            name,
            b"node",
            b"(",
            b"type",
            b"regular",
            b"contents",
            b"x",
            b")",
            b")",
        ]);
    }
    tokens.push(b")");
    nar(&tokens)
}

#[test]
fn restore_rejects_malformed_nars() {
    let file = nar(&[
        MAGIC,
        b"(",
        b"type",
        b"regular",
        b"contents",
        b"hello\n",
        b")",
    ]);
    assert_eq!(file.len(), 120);
    assert_eq!(
        Hash::sha256(&file).to_string(),
        "sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw"
    );
    validate(&mut &file[..]).unwrap();
    validate(&mut &dir_with(&[b"a", b"b"])[..]).unwrap();

    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty input", vec![]),
        (
            "bad magic",
            nar(&[
                b"nix-archive-2",
                b"(",
                b"type",
                b"regular",
                b"contents",
                b"",
                b")",
            ]),
        ),
        ("magic only", nar(&[MAGIC])),
        (
            "no magic",
            nar(&[b"(", b"type", b"regular", b"contents", b"", b")"]),
        ),
        ("unsorted", dir_with(&[b"b", b"a"])),
        ("duplicate", dir_with(&[b"a", b"a"])),
        ("case unsorted", dir_with(&[b"a", b"B"])),
        ("name ..", dir_with(&[b".."])),
        ("name .", dir_with(&[b"."])),
        ("name a/b", dir_with(&[b"a/b"])),
        ("name /", dir_with(&[b"/"])),
        ("empty name", dir_with(&[b""])),
        ("name with NUL", dir_with(&[b"a\0b"])),
        ("name of 256 bytes", dir_with(&[&[b'n'; 256]])),
        ("unknown type", nar(&[MAGIC, b"(", b"type", b"fifo", b")"])),
        (
            "unknown token",
            nar(&[MAGIC, b"(", b"kind", b"regular", b"contents", b"", b")"]),
        ),
        (
            "contents misspelt",
            nar(&[MAGIC, b"(", b"type", b"regular", b"content", b"", b")"]),
        ),
        (
            "regular without contents",
            nar(&[MAGIC, b"(", b"type", b"regular", b")"]),
        ),
        (
            "executable with argument",
            nar(&[
                MAGIC,
                b"(",
                b"type",
                b"regular",
                b"executable",
                b"x",
                b"contents",
                b"",
                b")",
            ]),
        ),
        (
            "executable after contents",
            nar(&[
                MAGIC,
                b"(",
                b"type",
                b"regular",
                b"contents",
                b"",
                b"executable",
                b"",
                b")",
            ]),
        ),
        (
            "target in regular",
            nar(&[MAGIC, b"(", b"type", b"regular", b"target", b"x", b")"]),
        ),
        (
            "entry in regular",
            nar(&[
                MAGIC,
                b"(",
                b"type",
                b"regular",
                b"contents",
                b"",
                b"entry",
                b")",
            ]),
        ),
        (
            "empty symlink target",
            nar(&[MAGIC, b"(", b"type", b"symlink", b"target", b"", b")"]),
        ),
        (
            "NUL in symlink target",
            nar(&[MAGIC, b"(", b"type", b"symlink", b"target", b"a\0b", b")"]),
        ),
        (
            "entry missing paren",
            nar(&[
                MAGIC,
                b"(",
                b"type",
                b"directory",
                b"entry",
                b"name",
                b"a",
                b"node",
                b"(",
                b"type",
                b"regular",
                b"contents",
                b"",
                b")",
                b")",
                b")",
            ]),
        ),
        (
            "missing close",
            nar(&[MAGIC, b"(", b"type", b"regular", b"contents", b""]),
        ),
        ("trailing empty string", [file.clone(), s(b"")].concat()),
        ("trailing byte", [file.clone(), vec![0]].concat()),
        ("trailing close", [file.clone(), s(b")")].concat()),
        ("two archives", [file.clone(), file.clone()].concat()),
        ("huge token length", [s(MAGIC), len_only(u64::MAX)].concat()),
        (
            "long token length",
            [s(MAGIC), len_only(17), vec![b'('; 24]].concat(),
        ),
        (
            "huge name",
            [
                nar(&[MAGIC, b"(", b"type", b"directory", b"entry", b"(", b"name"]),
                len_only(1 << 40),
            ]
            .concat(),
        ),
        (
            "huge target",
            [
                nar(&[MAGIC, b"(", b"type", b"symlink", b"target"]),
                len_only(1 << 62),
            ]
            .concat(),
        ),
        (
            "target of 4097 bytes",
            nar(&[
                MAGIC,
                b"(",
                b"type",
                b"symlink",
                b"target",
                &[b't'; 4097],
                b")",
            ]),
        ),
        (
            "huge contents",
            [
                nar(&[MAGIC, b"(", b"type", b"regular", b"contents"]),
                len_only(1 << 62),
                vec![0; 64],
            ]
            .concat(),
        ),
        (
            "max contents",
            [
                nar(&[MAGIC, b"(", b"type", b"regular", b"contents"]),
                len_only(u64::MAX),
                vec![0; 64],
            ]
            .concat(),
        ),
    ];
    // Non-zero padding: after the magic, in the contents, in a name.
    let mut p = file.clone();
    p[21] = 1;
    cases.push(("non-zero padding after magic", p));
    let mut p = file.clone();
    p[8 + 16 + 16 + 16 + 16 + 16 + 8 + 6] = b'!';
    cases.push(("non-zero padding in contents", p));
    let mut p = dir_with(&[b"a"]);
    let at = p.windows(8).position(|w| w == b"a\0\0\0\0\0\0\0").unwrap();
    p[at + 7] = 0x80;
    cases.push(("non-zero padding in name", p));

    for (label, data) in &cases {
        let err = assert_rejected(label, data);
        eprintln!("{label}: {err}");
    }

    // Error offsets point at the offending string.
    match assert_rejected("unsorted", &dir_with(&[b"b", b"a"])) {
        NarError::Format { offset, msg } => {
            let data = dir_with(&[b"b", b"a"]);
            assert_eq!(&data[offset as usize..offset as usize + 9], &s(b"a")[..9]);
            assert!(msg.contains("not sorted"), "{msg}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn every_prefix_of_a_nar_is_rejected() {
    let data = fs::read(vectors().join("cases/tree/nar/out.nar")).unwrap();
    let tmp = TempDir::new("prefix");
    let target = tmp.join("out");
    for len in 0..data.len() {
        let prefix = &data[..len];
        match validate(&mut &prefix[..]) {
            Err(NarError::Truncated { offset }) => assert_eq!(offset, len as u64),
            other => panic!("prefix {len}: {other:?}"),
        }
        assert!(
            restore_path(&mut &prefix[..], &target).is_err(),
            "prefix {len}"
        );
        assert!(
            tmp.entries().is_empty(),
            "prefix {len}: left {:?}",
            tmp.entries()
        );
    }
    restore_path(&mut &data[..], &target).unwrap();
    assert_eq!(dump(&target), data);
}

#[test]
fn restore_target_must_not_exist() {
    let tmp = TempDir::new("exists");
    let data = nar(&[MAGIC, b"(", b"type", b"regular", b"contents", b"new", b")"]);
    let file = tmp.join("file");
    fs::write(&file, b"old").unwrap();
    let dir = tmp.join("dir");
    fs::create_dir(&dir).unwrap();
    let dangling = tmp.join("dangling");
    symlink("nowhere", &dangling).unwrap();
    for target in [&file, &dir, &dangling] {
        match restore_path(&mut &data[..], target) {
            Err(NarError::TargetExists { path }) => assert_eq!(&path, target),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(fs::read(&file).unwrap(), b"old");
    assert!(fs::read_dir(&dir).unwrap().next().is_none());
    assert!(!tmp.join("nowhere").exists());
    assert_eq!(tmp.entries().len(), 3);
    // Parent missing: an error naming the target (not the temporary sibling being
    // made), nothing created.
    match restore_path(&mut &data[..], &tmp.join("no/such/parent")) {
        Err(e @ NarError::CreateTarget { .. }) => assert_eq!(
            e.to_string(),
            format!(
                "cannot create '{}': No such file or directory",
                tmp.join("no/such/parent").display()
            )
        ),
        other => panic!("{other:?}"),
    }
    assert_eq!(tmp.entries().len(), 3);
}

#[test]
fn restore_never_writes_through_a_symlink() {
    let tmp = TempDir::new("symlink-attack");
    let victim = tmp.join("victim");
    fs::create_dir(&victim).unwrap();
    let victim_bytes = victim.as_os_str().as_bytes();
    // `l` -> victim, then `l` again as a directory holding a file (a duplicate), or
    // `m` -> victim then `l` as a directory (unsorted): both rejected before writing.
    let file_node: [&[u8]; 6] = [b"(", b"type", b"regular", b"contents", b"pwned", b")"];
    for second in [b"l".as_slice(), b"k".as_slice()] {
        let first: &[u8] = if second == b"l" { b"l" } else { b"m" };
        let mut tokens: Vec<&[u8]> = vec![
            MAGIC,
            b"(",
            b"type",
            b"directory",
            b"entry",
            b"(",
            b"name",
            first,
            b"node",
            b"(",
            b"type",
            b"symlink",
            b"target",
            victim_bytes,
            b")",
            b")",
            b"entry",
            b"(",
            b"name",
            second,
            b"node",
            b"(",
            b"type",
            b"directory",
            b"entry",
            b"(",
            b"name",
            b"pwned",
            b"node",
        ];
        tokens.extend_from_slice(&file_node);
        tokens.extend_from_slice(&[b")", b")", b")", b")"]);
        let data = nar(&tokens);
        let out = tmp.join("out");
        assert!(restore_path(&mut &data[..], &out).is_err());
        assert!(!out.exists());
        assert!(fs::read_dir(&victim).unwrap().next().is_none());
    }
    assert_eq!(tmp.entries(), [victim]);
}

#[test]
fn restore_streams_large_files() {
    let tmp = TempDir::new("large");
    let src = tmp.join("src");
    fs::create_dir(&src).unwrap();
    write(&src.join("big"), &bytes(5 * 1024 * 1024 + 1, 5), 0o755);
    let data = dump(&src);
    // Feed it through a reader returning odd-sized short reads.
    struct Dribble<'a>(&'a [u8], usize);
    impl std::io::Read for Dribble<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.1 = self.1 % 7919 + 1;
            let n = self.1.min(buf.len()).min(self.0.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }
    let out = tmp.join("out");
    restore_path(&mut Dribble(&data, 0), &out).unwrap();
    assert_eq!(dump(&out), data);
}

#[test]
fn tee_and_hash_sink() {
    let tmp = TempDir::new("tee");
    let root = tmp.join("root");
    make_tree(&root);
    let mut tee = Tee(HashSink::new(), Vec::new());
    dump_path(&root, &mut tee).unwrap();
    let Tee(sink, bytes) = tee;
    let (hash, size) = sink.finish();
    assert_eq!(hash, Hash::sha256(&bytes));
    assert_eq!(size, bytes.len() as u64);
    assert_eq!((hash, size), hash_path(&root).unwrap());
}

/// A sink that fails once it has taken `limit` bytes.
struct FailAfter {
    taken: usize,
    limit: usize,
}

impl Write for FailAfter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.taken + buf.len() > self.limit {
            return Err(std::io::Error::other("disk full"));
        }
        self.taken += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn pipelined_dump_is_identical_and_reports_sink_errors() {
    let tmp = TempDir::new("pipelined");
    let root = tmp.join("root");
    make_tree(&root);
    let want = dump(&root);
    assert!(want.len() > 3 << 20);
    // Large (piped) and small (written in place) outputs.
    for p in [root.clone(), root.join("exec.sh"), root.join("deep")] {
        let mut got = Vec::new();
        dump_path_pipelined(&p, &mut got).unwrap();
        assert_eq!(got, dump(&p), "{}", p.display());
    }
    // A failing sink, before and after the helper thread starts.
    for limit in [0, 100, 1 << 20, 2 << 20, want.len() - 1] {
        let mut sink = FailAfter { taken: 0, limit };
        match dump_path_pipelined(&root, &mut sink) {
            Err(NarError::Write { source }) => assert_eq!(source.to_string(), "disk full"),
            other => panic!("limit {limit}: {other:?}"),
        }
        let mut sink = FailAfter { taken: 0, limit };
        assert!(matches!(
            dump_path(&root, &mut sink),
            Err(NarError::Write { .. })
        ));
    }
    let mut sink = FailAfter {
        taken: 0,
        limit: want.len(),
    };
    dump_path_pipelined(&root, &mut sink).unwrap();
    assert_eq!(sink.taken, want.len());
    // A panicking sink: the panic reaches the caller (no deadlock, no lost panic).
    struct Panics(usize);
    impl Write for Panics {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            assert!(self.0 < 2 << 20, "sink panics on purpose");
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        dump_path_pipelined(&root, &mut Panics(0))
    }));
    assert!(r.is_err());
    // A file system error is reported as such, whichever thread is running.
    let mut sink = HashSink::new();
    assert!(matches!(
        dump_path_pipelined(&tmp.join("missing"), &mut sink),
        Err(NarError::Stat { .. })
    ));
}

/// A tree with files on both sides of every threshold of the dumpers: the 64 KiB of
/// `sendfile`, the 256 KiB buffer, the 1 MiB of the pipeline and of early write-out.
fn make_sized_tree(root: &Path) {
    make_tree(root);
    let sizes = [
        64 * 1024 - 1,
        64 * 1024,
        64 * 1024 + 1,
        256 * 1024 + 5,
        (1 << 20) - 3,
        1 << 20,
        (2 << 20) + 7,
    ];
    for (i, n) in sizes.into_iter().enumerate() {
        write(
            &root.join(format!("sized-{n}")),
            &bytes(n, 50 + i as u64),
            0o755,
        );
    }
}

/// The bytes `dump_path_to_fd` writes to a pipe, read on another thread.
fn dump_to_pipe(p: &Path) -> (Result<(), NarError>, Vec<u8>) {
    let (mut r, w) = std::io::pipe().unwrap();
    let reader = std::thread::spawn(move || {
        let mut got = Vec::new();
        std::io::Read::read_to_end(&mut r, &mut got).unwrap();
        got
    });
    let res = dump_path_to_fd(p, std::os::fd::AsFd::as_fd(&w));
    drop(w);
    (res, reader.join().unwrap())
}

#[test]
fn dump_to_a_descriptor_is_identical_whatever_it_is() {
    let tmp = TempDir::new("fd");
    let root = tmp.join("root");
    make_sized_tree(&root);
    for p in [
        root.clone(),
        root.join("sized-2097159"),
        root.join("exec.sh"),
    ] {
        let want = dump(&p);
        // A pipe (sendfile moves page references), a regular file, a file opened to
        // append (sendfile refuses it: plain writes), /dev/null.
        let (res, got) = dump_to_pipe(&p);
        res.unwrap();
        assert!(got == want, "pipe: {}", p.display());
        let out = tmp.join("out.nar");
        let f = fs::File::create(&out).unwrap();
        dump_path_to_fd(&p, std::os::fd::AsFd::as_fd(&f)).unwrap();
        drop(f);
        assert!(fs::read(&out).unwrap() == want, "file: {}", p.display());
        let f = fs::OpenOptions::new().append(true).open(&out).unwrap();
        dump_path_to_fd(&p, std::os::fd::AsFd::as_fd(&f)).unwrap();
        drop(f);
        let mut twice = want.clone();
        twice.extend_from_slice(&want);
        assert!(fs::read(&out).unwrap() == twice, "append: {}", p.display());
        let null = fs::OpenOptions::new()
            .write(true)
            .open("/dev/null")
            .unwrap();
        dump_path_to_fd(&p, std::os::fd::AsFd::as_fd(&null)).unwrap();
    }
    if nix_available() {
        let (res, got) = dump_to_pipe(&root);
        res.unwrap();
        assert!(got == nix_dump(&root), "differs from nix-store --dump");
    }
    // A reader that goes away: a write error (EPIPE), not a hang or a panic.
    let (r, w) = std::io::pipe().unwrap();
    drop(r);
    match dump_path_to_fd(&root, std::os::fd::AsFd::as_fd(&w)) {
        Err(NarError::Write { source }) => {
            assert_eq!(source.kind(), std::io::ErrorKind::BrokenPipe)
        }
        other => panic!("{other:?}"),
    }
    // A missing path is the path's error.
    let f = fs::File::create(tmp.join("x")).unwrap();
    assert!(matches!(
        dump_path_to_fd(&tmp.join("missing"), std::os::fd::AsFd::as_fd(&f)),
        Err(NarError::Stat { .. })
    ));
}

#[test]
fn split_dump_gives_both_consumers_the_same_bytes() {
    let tmp = TempDir::new("split");
    let root = tmp.join("root");
    make_sized_tree(&root);
    for p in [root.clone(), root.join("exec.sh"), root.join("deep")] {
        let want = dump(&p);
        let (mut here, mut there) = (Vec::new(), Vec::new());
        dump_path_split(&p, &mut here, &mut there).unwrap();
        assert!(here == want && there == want, "{}", p.display());
    }
    // Either consumer failing is a write error, before or after the thread starts.
    let total = dump(&root).len();
    for limit in [0, 100, 1 << 20, total - 1] {
        let mut here = FailAfter { taken: 0, limit };
        let r = dump_path_split(&root, &mut here, &mut HashSink::new());
        assert!(matches!(r, Err(NarError::Write { .. })), "here {limit}");
        let mut there = FailAfter { taken: 0, limit };
        let r = dump_path_split(&root, &mut HashSink::new(), &mut there);
        assert!(matches!(r, Err(NarError::Write { .. })), "there {limit}");
    }
}

#[test]
fn dump_through_a_reader_restores_the_same_tree_and_stops_cleanly() {
    let tmp = TempDir::new("through");
    let root = tmp.join("root");
    make_sized_tree(&root);
    let want = dump(&root);
    // Hashed on the dumping thread, read here.
    let mut sink = HashSink::new();
    let (dumped, got) = dump_path_through(&root, &mut sink, |r| {
        let mut got = Vec::new();
        std::io::Read::read_to_end(r, &mut got).map(|_| got)
    });
    dumped.unwrap();
    assert!(got.unwrap() == want);
    assert_eq!(sink.finish(), (Hash::sha256(&want), want.len() as u64));
    // Restored straight from it (with early write-out): dumps back to the same NAR.
    let target = tmp.join("restored");
    let (dumped, restored) = dump_path_through(&root, &mut std::io::sink(), |r| {
        restore_buffered_for_store(r, &target)
    });
    dumped.unwrap();
    // Made canonical on the way (this process owns what it creates).
    assert_eq!(restored.unwrap(), RestoredMetadata::Canonical);
    assert!(dump(&target) == want);
    let mut pending = vec![target.clone()];
    while let Some(p) = pending.pop() {
        let m = fs::symlink_metadata(&p).unwrap();
        assert_eq!((m.mtime(), m.mtime_nsec()), (1, 0), "{}", p.display());
        let mode = m.mode() & 0o7777;
        if m.is_dir() {
            assert_eq!(mode, 0o555, "{}", p.display());
            pending.extend(fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        } else if m.is_file() {
            assert!(mode == 0o444 || mode == 0o555, "{}: {mode:o}", p.display());
        }
    }
    // A consumer that stops early: the dumper gets a write error, nobody hangs.
    let (dumped, ()) = dump_path_through(&root, &mut std::io::sink(), |r| {
        let mut buf = [0; 1000];
        std::io::Read::read_exact(r, &mut buf).unwrap();
    });
    assert!(matches!(dumped, Err(NarError::Write { .. })), "{dumped:?}");
    // A dumper that fails: the consumer sees the end of the NAR.
    let (dumped, read) = dump_path_through(&tmp.join("missing"), &mut std::io::sink(), |r| {
        let mut got = Vec::new();
        std::io::Read::read_to_end(r, &mut got).map(|_| got.len())
    });
    assert!(matches!(dumped, Err(NarError::Stat { .. })));
    assert_eq!(read.unwrap(), 0);
}

#[test]
fn hash_paths_hashes_each_path_in_order() {
    let tmp = TempDir::new("hashpaths");
    let root = tmp.join("root");
    make_sized_tree(&root);
    let mut paths: Vec<PathBuf> = fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    paths.sort();
    paths.insert(3, tmp.join("missing"));
    let got = hash_paths(&paths);
    assert_eq!(got.len(), paths.len());
    for (p, h) in paths.iter().zip(got) {
        match h {
            Ok(h) => assert_eq!(h, hash_path(p).unwrap(), "{}", p.display()),
            Err(_) => assert!(p.ends_with("missing")),
        }
    }
    assert!(hash_paths::<PathBuf>(&[]).is_empty());
}

// ---------------------------------------------------------------------------------
// Random mutations
// ---------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Mutation {
    Set(usize, u8),
    Insert(usize, u8),
    Delete(usize),
    /// Overwrite an aligned u64 (a length field, often).
    Length(usize, u64),
    /// Copy an aligned 8-byte word over another.
    CopyWord(usize, usize),
    Truncate(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<usize>().prop_map(Mutation::Delete),
        (any::<usize>(), prop_oneof![0u64..300, any::<u64>()])
            .prop_map(|(i, v)| Mutation::Length(i, v)),
        (any::<usize>(), any::<usize>()).prop_map(|(i, j)| Mutation::CopyWord(i, j)),
        any::<usize>().prop_map(Mutation::Truncate),
    ]
}

fn apply(data: &mut Vec<u8>, m: &Mutation) {
    if data.is_empty() {
        return;
    }
    let len = data.len();
    let words = len / 8;
    match *m {
        Mutation::Set(i, b) => data[i % len] = b,
        Mutation::Insert(i, b) => data.insert(i % (len + 1), b),
        Mutation::Delete(i) => {
            data.remove(i % len);
        }
        Mutation::Length(i, v) if words > 0 => {
            let at = (i % words) * 8;
            data[at..at + 8].copy_from_slice(&v.to_le_bytes());
        }
        Mutation::CopyWord(i, j) if words > 0 => {
            let (from, to) = ((i % words) * 8, (j % words) * 8);
            let w: [u8; 8] = data[from..from + 8].try_into().unwrap();
            data[to..to + 8].copy_from_slice(&w);
        }
        Mutation::Truncate(i) => data.truncate(i % len),
        _ => {}
    }
}

fn base_nars() -> Vec<Vec<u8>> {
    vec![
        fs::read(vectors().join("cases/tree/nar/out.nar")).unwrap(),
        fs::read(vectors().join("cases/fixed-rec/nar/out.nar")).unwrap(),
        dir_with(&[b"a", b"b", b"c"]),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, failure_persistence: None, ..ProptestConfig::default() })]

    /// A mutated NAR never panics; when rejected nothing is left behind, when accepted it
    /// is canonical (it dumps back to the same bytes).
    #[test]
    fn mutated_nars_never_panic_or_leave_files(
        which in 0usize..3,
        mutations in prop::collection::vec(mutation(), 1..6),
    ) {
        let mut data = base_nars().swap_remove(which);
        for m in &mutations {
            apply(&mut data, m);
        }
        let valid = validate(&mut &data[..]);
        let tmp = TempDir::new("mutate");
        let out = tmp.join("out");
        match restore_path(&mut &data[..], &out) {
            Ok(()) => {
                prop_assert!(valid.is_ok());
                prop_assert_eq!(dump(&out), data);
                prop_assert_eq!(tmp.entries(), vec![out]);
            }
            Err(e) => {
                prop_assert!(valid.is_err(), "restore failed but validate accepted: {}", e);
                prop_assert!(tmp.entries().is_empty(), "left {:?}", tmp.entries());
            }
        }
    }
}

// ---------------------------------------------------------------------------------
// Reference scanning over real NARs
// ---------------------------------------------------------------------------------

/// All non-.drv store paths in the vectors.
fn all_output_paths() -> Vec<StorePath> {
    fs::read_to_string(vectors().join("paths.txt"))
        .unwrap()
        .lines()
        .map(store_path)
        .filter(|p| !p.is_derivation())
        .collect()
}

#[test]
fn fixture_references_are_found() {
    let candidates = all_output_paths();
    let tmp = TempDir::new("refs");
    let mut checked = 0;
    for nar_file in fixture_nars() {
        let info = nar_file.with_extension("info");
        if !info.exists() {
            continue;
        }
        let data = fs::read(&nar_file).unwrap();
        let want: BTreeSet<StorePath> = info_values(&info, "reference")
            .iter()
            .map(|p| store_path(p))
            .collect();
        // Over the NAR bytes, in chunks of several sizes.
        for chunk in [1, 7, 31, 32, 33, 4096, usize::MAX] {
            let mut scanner = RefScanner::new(&candidates);
            for c in data.chunks(chunk.min(data.len().max(1))) {
                scanner.write_all(c).unwrap();
            }
            assert_eq!(
                scanner.into_found(),
                want,
                "{} chunk {chunk}",
                nar_file.display()
            );
        }
        // Over a restored tree, with the hash in the same pass.
        let target = tmp.join(format!("t{checked}"));
        restore_path(&mut &data[..], &target).unwrap();
        let scan = scan_path(&target, &candidates).unwrap();
        assert_eq!(scan.references, want);
        assert_eq!(
            [scan.nar_hash.to_string()],
            info_values(&info, "narHash").as_slice()
        );
        assert_eq!(scan.nar_size, data.len() as u64);
        checked += 1;
    }
    assert!(checked >= 20);
}

#[test]
fn self_reference_in_file_and_symlink() {
    let info = vectors().join("cases/selfref/nar/out.info");
    let me = store_path(&info_values(&info, "path")[0]);
    let data = fs::read(vectors().join("cases/selfref/nar/out.nar")).unwrap();
    let mut scanner = RefScanner::new([&me]);
    scanner.feed(&data);
    assert_eq!(scanner.into_found(), BTreeSet::from([me.clone()]));
    assert_eq!(
        info_values(&info, "reference"),
        [format!("/nix/store/{me}")]
    );
}

#[test]
fn hash_parts_in_names_targets_and_contents_across_every_split() {
    let a = store_path("/nix/store/0c7dqn2sj3mkwfsmvvmzswbrxrjn28vl-in-name");
    let b = store_path("/nix/store/ppbhpyhsxzg8mj3q4jhn6fb5jw6xlmgd-in-target");
    let c = store_path("/nix/store/h6wkc51crvbp90yp7wbhib7ys4l5fq2f-in-contents");
    let d = store_path("/nix/store/9xji3nyajb9g4cfpdmriq49lfnmwwzg6-absent");
    let e = store_path("/nix/store/1fp6mxkkg5xsk2sw5ncj43g189aj67fr-in-exec");
    let tmp = TempDir::new("ref-tree");
    let root = tmp.join("root");
    fs::create_dir(&root).unwrap();
    write(&root.join(format!("{}-x", a.hash_part())), b"", 0o644);
    symlink(format!("/nix/store/{b}/bin/sh"), root.join("link")).unwrap();
    write(
        &root.join("data"),
        format!("\0\0prefix{}suffix", c.hash_part()).as_bytes(),
        0o644,
    );
    write(
        &root.join("tool"),
        format!("#!/nix/store/{e}/bin/sh\n").as_bytes(),
        0o755,
    );
    // Near misses of `d`: one character changed, cut short, upper case.
    let mut near = d.hash_part().to_string().into_bytes();
    near[10] = b'e';
    write(
        &root.join("near"),
        &[
            &near[..],
            b" ",
            &d.hash_part().as_bytes()[..31],
            b" ",
            d.hash_part().to_uppercase().as_bytes(),
        ]
        .concat(),
        0o644,
    );

    let candidates = [a.clone(), b.clone(), c.clone(), d.clone(), e.clone()];
    let want = BTreeSet::from([a, b, c, e]);
    let data = dump(&root);
    for i in 0..=data.len() {
        let mut scanner = RefScanner::new(&candidates);
        scanner.feed(&data[..i]);
        scanner.feed(&data[i..]);
        assert_eq!(scanner.into_found(), want, "split at {i}");
    }
    let scan = scan_path(&root, &candidates).unwrap();
    assert_eq!(scan.references, want);
    assert_eq!((scan.nar_hash, scan.nar_size), hash_path(&root).unwrap());
}

// ---------------------------------------------------------------------------------
// Throughput (run with: cargo test --release -p firn-store --test nar -- --ignored --nocapture)
// ---------------------------------------------------------------------------------

#[test]
#[ignore = "benchmark: writes ~300 MB to the temp dir"]
fn bench_hash_path_large_tree() {
    let mb: usize = std::env::var("FIRN_NAR_BENCH_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let tmp = TempDir::new("bench");
    let root = tmp.join("tree");
    fs::create_dir(&root).unwrap();
    let chunk = bytes(1 << 20, 42);
    let mut total = 0usize;
    // A third in 8 big files, a third in 64 KiB files, a third in 4 KiB files.
    let third = mb * (1 << 20) / 3;
    for i in 0..8 {
        let mut f = fs::File::create(root.join(format!("big-{i}"))).unwrap();
        for _ in 0..third / 8 / chunk.len() {
            f.write_all(&chunk).unwrap();
            total += chunk.len();
        }
    }
    for (size, dirname) in [(64 << 10, "medium"), (4 << 10, "small")] {
        let d = root.join(dirname);
        fs::create_dir(&d).unwrap();
        for i in 0..third / size {
            let sub = d.join(format!("{:03}", i % 100));
            if i < 100 {
                fs::create_dir(&sub).unwrap();
            }
            fs::write(sub.join(format!("f{i}")), &chunk[i % 1000..i % 1000 + size]).unwrap();
            total += size;
        }
    }
    let warm = hash_path(&root).unwrap();
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = std::time::Instant::now();
        let r = hash_path(&root).unwrap();
        best = best.min(t.elapsed().as_secs_f64());
        assert_eq!(r, warm);
    }
    let nar_mb = warm.1 as f64 / 1e6;
    eprintln!(
        "hash_path: {} MB of contents, NAR {nar_mb:.0} MB, best {best:.3} s = {:.2} GB/s",
        total / 1_000_000,
        warm.1 as f64 / best / 1e9
    );
    if nix_available() {
        let t = std::time::Instant::now();
        let h = nix_hash(&root);
        eprintln!("nix-hash: {:.3} s", t.elapsed().as_secs_f64());
        assert_eq!(h, warm.0.to_base16());
    }
}
