//! The checks of the `nar_parse` and `nar_restore` fuzz targets. The regression test
//! `crates/store/tests/fuzz_corpus.rs` includes this very file (`#[path]`), so the
//! committed corpus goes through exactly what the fuzzer checks.
//!
//! - `nar_parse` (no I/O): whatever `nar::parse` accepts, rebuilt from its events, is the
//!   input byte for byte (the parser accepts the canonical form only); the events obey
//!   the documented rules (valid, strictly increasing names; non-empty symlink targets
//!   without NUL, at most `MAX_TARGET_LEN` bytes; file sizes as announced); `validate`
//!   agrees.
//! - `nar_restore`: restoring into `<sandbox>/out`, a fresh directory per run, never
//!   panics; afterwards the sandbox holds exactly `out` if the restore succeeded and
//!   nothing at all if it failed, and the directory holding the sandboxes holds nothing
//!   else (nothing written outside the target); the restore fails whenever the parse
//!   does, and succeeds whenever it does, I/O limits (`ENAMETOOLONG`) aside; a restored
//!   tree dumps back to the input byte for byte.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use firn_store::canonical::{delete_path, RestoredMetadata};
use firn_store::nar::{
    dump_path, parse, restore_buffered_for_store, restore_path, validate, NarError, NarVisitor,
    MAX_NAME_LEN, MAX_TARGET_LEN, NAR_MAGIC,
};

/// Serialises the events of [`parse`] back into a NAR, checking them on the way.
#[derive(Debug, Default)]
struct Rebuild {
    out: Vec<u8>,
    /// Per depth: the node there is a directory whose `)` is not written yet, and its
    /// last entry name.
    open: Vec<(bool, Vec<u8>)>,
    /// Bytes of the current file still to come.
    file_left: Option<u64>,
}

impl Rebuild {
    fn new() -> Self {
        let mut r = Self {
            open: vec![(false, Vec::new())],
            ..Self::default()
        };
        r.str(NAR_MAGIC);
        r
    }

    fn str(&mut self, s: &[u8]) {
        self.out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        self.out.extend_from_slice(s);
        self.out.resize(self.out.len() + (8 - s.len() % 8) % 8, 0);
    }

    fn strs(&mut self, strs: &[&[u8]]) {
        for s in strs {
            self.str(s);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        assert_eq!(self.open.len(), 1, "parse ended inside an entry");
        assert!(self.file_left.is_none(), "parse ended inside a file");
        if self.open[0].0 {
            self.str(b")");
        }
        self.out
    }
}

impl NarVisitor for Rebuild {
    fn directory(&mut self) -> Result<(), NarError> {
        self.strs(&[b"(", b"type", b"directory"]);
        if let Some(top) = self.open.last_mut() {
            top.0 = true;
        }
        Ok(())
    }

    fn symlink(&mut self, target: &[u8]) -> Result<(), NarError> {
        assert!(!target.is_empty(), "empty symlink target");
        assert!(!target.contains(&0), "NUL in a symlink target");
        assert!(target.len() as u64 <= MAX_TARGET_LEN, "over-long target");
        self.strs(&[b"(", b"type", b"symlink", b"target", target, b")"]);
        Ok(())
    }

    fn file_begin(&mut self, executable: bool, size: u64) -> Result<(), NarError> {
        assert!(self.file_left.is_none(), "file inside a file");
        if executable {
            self.strs(&[b"(", b"type", b"regular", b"executable", b"", b"contents"]);
        } else {
            self.strs(&[b"(", b"type", b"regular", b"contents"]);
        }
        self.out.extend_from_slice(&size.to_le_bytes());
        self.file_left = Some(size);
        Ok(())
    }

    fn file_data(&mut self, data: &[u8]) -> Result<(), NarError> {
        let left = self.file_left.unwrap_or(0);
        assert!(
            !data.is_empty() && data.len() as u64 <= left,
            "file data outside a file or beyond its size"
        );
        self.file_left = Some(left - data.len() as u64);
        self.out.extend_from_slice(data);
        Ok(())
    }

    fn file_end(&mut self) -> Result<(), NarError> {
        assert_eq!(
            self.file_left.take(),
            Some(0),
            "file shorter than announced"
        );
        let len = self.out.len();
        self.out.resize(len + (8 - len % 8) % 8, 0);
        self.str(b")");
        Ok(())
    }

    fn entry_begin(&mut self, name: &[u8]) -> Result<(), NarError> {
        let Some((is_dir, prev)) = self.open.last_mut() else {
            panic!("entry outside the root");
        };
        assert!(*is_dir, "entry in a node that is not a directory");
        assert!(
            !name.is_empty()
                && name != b"."
                && name != b".."
                && !name.contains(&b'/')
                && !name.contains(&0)
                && name.len() as u64 <= MAX_NAME_LEN,
            "invalid entry name '{}'",
            name.escape_ascii()
        );
        assert!(prev.as_slice() < name, "entries not strictly increasing");
        *prev = name.to_vec();
        self.strs(&[b"entry", b"(", b"name", name, b"node"]);
        self.open.push((false, Vec::new()));
        Ok(())
    }

    fn entry_end(&mut self) -> Result<(), NarError> {
        assert!(self.open.len() > 1, "entry_end without entry_begin");
        if let Some((true, _)) = self.open.pop() {
            self.str(b")");
        }
        self.str(b")");
        Ok(())
    }
}

/// The check of the `nar_parse` target. Returns whether the input is a valid NAR.
pub fn check_parse(data: &[u8]) -> bool {
    let mut rebuild = Rebuild::new();
    let parsed = parse(&mut &data[..], &mut rebuild);
    let validated = validate(&mut &data[..]);
    match (parsed, validated) {
        (Ok(size), Ok(vsize)) => {
            assert_eq!(size, data.len() as u64, "parse returned a wrong size");
            assert_eq!(vsize, size, "validate returned a different size");
            let rebuilt = rebuild.finish();
            assert!(
                rebuilt == data,
                "an accepted NAR is not canonical: rebuilt {} bytes, input {} bytes",
                rebuilt.len(),
                data.len()
            );
            true
        }
        (Err(e), Err(v)) => {
            assert_eq!(e.to_string(), v.to_string(), "validate fails differently");
            false
        }
        (p, v) => panic!("parse and validate disagree: {p:?} vs {v:?}"),
    }
}

static RUN: AtomicU64 = AtomicU64::new(0);

/// The names in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = match fs::read_dir(dir) {
        Ok(entries) => entries
            .map(|e| match e {
                Ok(e) => e.file_name().to_string_lossy().into_owned(),
                Err(e) => panic!("reading {}: {e}", dir.display()),
            })
            .collect(),
        Err(e) => panic!("reading {}: {e}", dir.display()),
    };
    v.sort();
    v
}

/// Whether `e` comes from a limit of the file system rather than from the NAR.
fn is_io_limit(e: &NarError) -> bool {
    match e {
        NarError::Io { source, .. } | NarError::CreateTarget { source, .. } => {
            source.raw_os_error() == Some(36) // ENAMETOOLONG
                || source.kind() == io::ErrorKind::StorageFull
                || source.kind() == io::ErrorKind::QuotaExceeded
        }
        _ => false,
    }
}

/// A fresh, empty directory `<prefix>-<n>` below `base`: its name and path.
fn new_sandbox(base: &Path, prefix: &str) -> (String, PathBuf) {
    let run = format!("{prefix}-{}", RUN.fetch_add(1, Ordering::Relaxed));
    let sandbox = base.join(&run);
    if let Err(e) = fs::create_dir(&sandbox) {
        panic!("creating {}: {e}", sandbox.display());
    }
    (run, sandbox)
}

/// The check of the `nar_restore` target: restore `data` into a fresh sandbox below
/// `base` (a directory that holds nothing else), check what is on disk, clean up.
pub fn check_restore(base: &Path, data: &[u8]) {
    let valid = check_parse(data);
    let (run, sandbox) = new_sandbox(base, "run");
    let target = sandbox.join("out");
    let restored = restore_path(&mut &data[..], &target);
    let outside = names(base);
    let inside = names(&sandbox);
    let dumped = restored.as_ref().ok().map(|()| {
        let mut nar = Vec::new();
        dump_path(&target, &mut nar).map(|()| nar)
    });
    // Clean up before asserting, so that one failure does not fail every later run.
    let cleaned = fs::remove_dir_all(&sandbox);
    assert_eq!(outside, [run], "something was written next to the sandbox");
    check_outcome("restore", &restored, valid, &inside);
    match dumped {
        None => {}
        Some(Ok(nar)) => assert!(
            nar == data,
            "the restored tree dumps to a different NAR ({} bytes, input {} bytes)",
            nar.len(),
            data.len()
        ),
        Some(Err(e)) => panic!("dumping the restored tree failed: {e}"),
    }
    if let Err(e) = cleaned {
        panic!("removing {}: {e}", sandbox.display());
    }
    check_store_restore(base, data, restored.is_ok());
}

/// The same NAR restored for the store (`restore_buffered_for_store`, from the bytes as a
/// `BufRead`): it succeeds iff the plain restore did, leaves nothing after a failure
/// (read-only directories included), and after a success every node has the store's
/// canonical metadata (mtime 1; files 0444/0555, directories 0555) and the tree dumps
/// back to the input.
fn check_store_restore(base: &Path, data: &[u8], plain_ok: bool) {
    let (_, sandbox) = new_sandbox(base, "store-run");
    let target = sandbox.join("out");
    let restored = restore_buffered_for_store(&mut &data[..], &target);
    let inside = names(&sandbox);
    let checked = restored.as_ref().ok().map(|metadata| {
        let mut nar = Vec::new();
        dump_path(&target, &mut nar).map(|()| (*metadata, nar, not_canonical(&target)))
    });
    let cleaned = delete_path(&target).and_then(|()| fs::remove_dir(&sandbox));
    check_outcome("store restore", &restored, plain_ok, &inside);
    match checked {
        None => {}
        Some(Ok((metadata, nar, wrong))) => {
            assert!(
                nar == data,
                "the store-restored tree dumps to a different NAR"
            );
            if metadata == RestoredMetadata::Canonical {
                assert!(
                    wrong.is_empty(),
                    "not canonical after a store restore: {wrong:?}"
                );
            }
        }
        Some(Err(e)) => panic!("dumping the store-restored tree failed: {e}"),
    }
    if let Err(e) = cleaned {
        panic!("removing {}: {e}", sandbox.display());
    }
}

/// `what` (a restore) succeeded iff it should have (`accept`; file system limits
/// aside), and left in its sandbox (`inside`) `out` alone after a success, nothing after
/// a failure.
fn check_outcome<T>(what: &str, restored: &Result<T, NarError>, accept: bool, inside: &[String]) {
    match restored {
        Ok(_) => {
            assert!(accept, "{what} accepted a NAR it should reject");
            assert_eq!(inside, ["out"], "a successful {what} left other files");
        }
        Err(e) => {
            assert!(
                !accept || is_io_limit(e),
                "{what} rejected a NAR it should accept: {e}"
            );
            assert!(
                inside.is_empty(),
                "a failed {what} ({e}) left files behind: {inside:?}"
            );
        }
    }
}

/// The nodes at or below `root` whose metadata is not the store's canonical one.
fn not_canonical(root: &Path) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let mut wrong = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(p) = pending.pop() {
        let m = match fs::symlink_metadata(&p) {
            Ok(m) => m,
            Err(e) => panic!("reading {}: {e}", p.display()),
        };
        let mode = m.mode() & 0o7777;
        let mode_ok = if m.is_dir() {
            mode == 0o555
        } else if m.is_file() {
            mode == 0o444 || mode == 0o555
        } else {
            true
        };
        if !mode_ok || m.mtime() != 1 || m.mtime_nsec() != 0 {
            wrong.push(format!("{} ({mode:o}, mtime {})", p.display(), m.mtime()));
        }
        if m.is_dir() {
            match fs::read_dir(&p) {
                Ok(entries) => pending.extend(entries.filter_map(Result::ok).map(|e| e.path())),
                Err(e) => panic!("listing {}: {e}", p.display()),
            }
        }
    }
    wrong
}

/// A fresh directory to hold the sandboxes of [`check_restore`]: `$FIRN_FUZZ_TMP` or
/// the system temp dir, `/firn-fuzz-nar-<tag>-<pid>`.
pub fn sandbox_base(tag: &str) -> PathBuf {
    let root = std::env::var_os("FIRN_FUZZ_TMP")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let base = root.join(format!("firn-fuzz-nar-{tag}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&base);
    if let Err(e) = fs::create_dir_all(&base) {
        panic!("creating {}: {e}", base.display());
    }
    base
}
