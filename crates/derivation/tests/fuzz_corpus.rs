//! The fuzz corpus as a regression test, on stable: every file of `fuzz/corpus/aterm`,
//! `fuzz/corpus/json` and `fuzz/regressions/{aterm,json}` goes through the checks of the
//! `aterm` and `json` fuzz targets, which are included from the fuzz crate itself (no
//! panic, `.drv` and JSON round trips). See `fuzz/README.md`.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

#[path = "../../../fuzz/src/derivation_checks.rs"]
mod checks;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

/// The files of `dir` (none if it does not exist), sorted.
fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file() && !p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .collect();
    v.sort();
    v
}

/// Run `check` on every file of `fuzz/corpus/<target>` and `fuzz/regressions/<target>`;
/// fail listing every file that panics. The corpus must not be empty.
fn run(target: &str, check: fn(&[u8])) {
    let corpus = files(&fuzz_dir().join("corpus").join(target));
    assert!(
        !corpus.is_empty(),
        "fuzz/corpus/{target} is empty or missing: the test would pass vacuously"
    );
    let regressions = files(&fuzz_dir().join("regressions").join(target));
    let mut failed = Vec::new();
    for path in corpus.iter().chain(&regressions) {
        let data = std::fs::read(path).unwrap();
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| check(&data))) {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            failed.push(format!("{}: {msg}", path.display()));
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} inputs fail the `{target}` fuzz checks:\n{}",
        failed.len(),
        corpus.len() + regressions.len(),
        failed.join("\n")
    );
}

#[test]
fn aterm_corpus_and_regressions() {
    run("aterm", checks::check_aterm);
}

#[test]
fn json_corpus_and_regressions() {
    run("json", checks::check_json);
}

/// The aterm inputs through the JSON check and back: every input of one target is also
/// a fine input of the other (most are rejected at once, which is the point: no panic).
#[test]
fn corpora_crossed() {
    for (target, check) in [
        ("json", checks::check_aterm as fn(&[u8])),
        ("aterm", checks::check_json),
    ] {
        for path in files(&fuzz_dir().join("corpus").join(target)) {
            check(&std::fs::read(path).unwrap());
        }
    }
}
