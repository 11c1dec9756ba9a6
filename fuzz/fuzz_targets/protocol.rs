//! Arbitrary bytes through every decoder of the worker and serve protocols: no panic, no
//! large allocation; what decodes re-encodes to the same value
//! (`firn_fuzz::protocol_checks::check_all`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    firn_fuzz::protocol_checks::check_all(data);
});
