//! Arbitrary bytes as show-derivation JSON: no panic; what reads writes and re-reads
//! equal, and prints as a `.drv` that reads back equal (`firn_fuzz::derivation_checks`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| firn_fuzz::derivation_checks::check_json(data));
