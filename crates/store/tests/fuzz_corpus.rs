//! The fuzz corpus as a regression test, on stable: every file of
//! `fuzz/corpus/{nar_parse,nar_restore}` and `fuzz/regressions/{nar_parse,nar_restore}`
//! goes through the checks of the `nar_parse` and `nar_restore` fuzz targets, which are
//! included from the fuzz crate itself: no panic, accepted NARs are canonical, a restore
//! writes nothing outside its target (nothing at all when it fails) and dumps back to
//! the same bytes. See `fuzz/README.md`.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

#[path = "../../../fuzz/src/nar_checks.rs"]
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

/// Every input of both NAR targets: the corpora must not be empty.
fn inputs() -> Vec<PathBuf> {
    let mut all = Vec::new();
    for target in ["nar_parse", "nar_restore"] {
        let corpus = files(&fuzz_dir().join("corpus").join(target));
        assert!(
            !corpus.is_empty(),
            "fuzz/corpus/{target} is empty or missing: the test would pass vacuously"
        );
        all.extend(corpus);
        all.extend(files(&fuzz_dir().join("regressions").join(target)));
    }
    all
}

/// Run `check` on every input; fail listing every input that panics. `after_panic`
/// cleans up what a panicking check left.
fn run(what: &str, check: impl Fn(&[u8]), after_panic: impl Fn()) {
    let inputs = inputs();
    let mut failed = Vec::new();
    let mut valid = 0;
    for path in &inputs {
        let data = std::fs::read(path).unwrap();
        let result = catch_unwind(AssertUnwindSafe(|| {
            check(&data);
            checks::check_parse(&data)
        }));
        match result {
            Ok(ok) => valid += usize::from(ok),
            Err(panic) => {
                after_panic();
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_default();
                failed.push(format!("{}: {msg}", path.display()));
            }
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} inputs fail the {what} fuzz checks:\n{}",
        failed.len(),
        inputs.len(),
        failed.join("\n")
    );
    assert!(
        valid > 0,
        "no valid NAR in the corpus: the round trips went untested"
    );
}

#[test]
fn nar_parse_corpus_and_regressions() {
    run(
        "nar_parse",
        |data| {
            checks::check_parse(data);
        },
        || {},
    );
}

#[test]
fn nar_restore_corpus_and_regressions() {
    let base = checks::sandbox_base("test");
    run(
        "nar_restore",
        |data| checks::check_restore(&base, data),
        || {
            // Whatever a failed run left, so that it does not fail the next ones too.
            let _ = std::fs::remove_dir_all(&base);
            std::fs::create_dir_all(&base).unwrap();
        },
    );
    std::fs::remove_dir_all(&base).unwrap();
}
