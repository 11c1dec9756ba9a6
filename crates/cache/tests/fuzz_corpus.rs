//! The `cache` fuzz target's corpus and regressions as a regression test, on stable:
//! every file of `fuzz/corpus/cache` and `fuzz/regressions/cache` goes through the
//! target's checks (included from the fuzz crate): no panic, accepted narinfos and keys
//! write back to themselves. See `fuzz/README.md`.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

#[path = "../../../fuzz/src/cache_checks.rs"]
mod checks;

fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    v.sort();
    v
}

#[test]
fn corpus_and_regressions_pass_the_checks() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    let corpus = files(&fuzz.join("corpus/cache"));
    assert!(
        !corpus.is_empty(),
        "fuzz/corpus/cache is empty: the test would pass vacuously"
    );
    let mut failed = Vec::new();
    for path in corpus.iter().chain(&files(&fuzz.join("regressions/cache"))) {
        let data = std::fs::read(path).unwrap();
        if std::panic::catch_unwind(|| checks::check_cache_readers(&data)).is_err() {
            failed.push(path.display().to_string());
        }
    }
    assert!(failed.is_empty(), "inputs failing the checks: {failed:#?}");
}
