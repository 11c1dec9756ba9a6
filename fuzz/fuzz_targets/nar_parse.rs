//! Arbitrary bytes as a NAR, no I/O: no panic; what parses is canonical (rebuilt from
//! the parse events it is the input) (`firn_fuzz::nar_checks::check_parse`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    firn_fuzz::nar_checks::check_parse(data);
});
