//! Arbitrary bytes as a narinfo, a nix-cache-info and signing keys: no panic; what
//! reads writes back to itself (`firn_fuzz::cache_checks::check_cache_readers`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    firn_fuzz::cache_checks::check_cache_readers(data);
});
