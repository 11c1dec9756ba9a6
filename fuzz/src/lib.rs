//! The checks behind the fuzz targets in `fuzz_targets/`. Each module is also included,
//! file for file, by a regression test of the root workspace
//! (`crates/{derivation,store,protocol,cache}/tests/fuzz_corpus.rs`), which
//! runs the committed corpus and regressions through them on stable.

pub mod cache_checks;
pub mod derivation_checks;
pub mod nar_checks;
pub mod protocol_checks;
