//! Arbitrary bytes as a `.drv`: no panic; what parses prints and re-parses identically,
//! and its show-derivation JSON reads back equal (`firn_fuzz::derivation_checks`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| firn_fuzz::derivation_checks::check_aterm(data));
