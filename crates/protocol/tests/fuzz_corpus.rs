//! The fuzz corpus as a regression test, on stable: every file of `fuzz/corpus/protocol`
//! and `fuzz/regressions/protocol` goes through the checks of the `protocol` fuzz target
//! (included from the fuzz crate itself): no panic in any decoder, and what decodes
//! re-encodes to the same value. Also every prefix of every recorded session, so that
//! truncation at each byte is covered. See `fuzz/README.md`.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

#[path = "../../../fuzz/src/protocol_checks.rs"]
mod checks;

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

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

fn panics(data: &[u8]) -> Option<String> {
    catch_unwind(AssertUnwindSafe(|| checks::check_all(data)))
        .err()
        .map(|p| {
            p.downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default()
        })
}

#[test]
fn protocol_corpus_and_regressions() {
    let corpus = files(&fuzz_dir().join("corpus/protocol"));
    assert!(
        !corpus.is_empty(),
        "fuzz/corpus/protocol is empty or missing: the test would pass vacuously"
    );
    let mut inputs = corpus;
    inputs.extend(files(&fuzz_dir().join("regressions/protocol")));
    let failed: Vec<String> = inputs
        .iter()
        .filter_map(|p| panics(&std::fs::read(p).unwrap()).map(|m| format!("{}: {m}", p.display())))
        .collect();
    assert!(
        failed.is_empty(),
        "{} inputs fail:\n{}",
        failed.len(),
        failed.join("\n")
    );
}

#[test]
fn every_prefix_of_the_recorded_sessions() {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let mut n = 0;
    for dir in ["worker", "serve"] {
        for p in files(&data.join(dir)) {
            let bytes = std::fs::read(&p).unwrap();
            for end in 0..=bytes.len() {
                if let Some(m) = panics(&bytes[..end]) {
                    panic!("{} cut at {end}: {m}", p.display());
                }
                n += 1;
            }
        }
    }
    assert!(n > 1000, "only {n} prefixes");
}
