//! Arbitrary bytes restored as a NAR into a fresh sandbox directory: no panic, nothing
//! written outside the target, nothing left by a failed restore, and a restored tree
//! dumps back to the input (`firn_fuzz::nar_checks::check_restore`).
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

static BASE: OnceLock<PathBuf> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let base = BASE.get_or_init(|| firn_fuzz::nar_checks::sandbox_base("restore"));
    firn_fuzz::nar_checks::check_restore(base, data);
});
