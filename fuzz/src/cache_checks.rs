//! Checks of the binary-cache readers (`firn_cache`) on arbitrary bytes: the narinfo
//! reader, the `nix-cache-info` reader and the key readers never panic; an accepted
//! narinfo written back reads back equal, and writing that gives the same text; an
//! accepted key written back is the same key.

use firn_cache::cache_info::CacheInfo;
use firn_cache::{NarInfo, PublicKey, SecretKey};
use firn_derivation::StoreDir;

/// The input as a narinfo, a `nix-cache-info`, a secret and a public key.
pub fn check_cache_readers(data: &[u8]) {
    let sd = StoreDir::new("/nix/store").expect("the default store dir");
    if let Ok(info) = NarInfo::parse(&sd, "fuzz.narinfo", data) {
        let text = info.to_text(&sd);
        let back = NarInfo::parse(&sd, "fuzz.narinfo", text.as_bytes())
            .unwrap_or_else(|e| panic!("a narinfo written back does not read: {e}\n{text}"));
        assert_eq!(
            back, info,
            "a narinfo written back reads differently:\n{text}"
        );
        assert_eq!(back.to_text(&sd), text, "writing is not stable");
    }
    let _ = CacheInfo::parse("fuzz", data);
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(k) = SecretKey::parse("fuzz", text) {
            let again = SecretKey::parse("fuzz", &k.to_text()).expect("a written key reads");
            assert_eq!(again.to_text(), k.to_text());
            assert_eq!(again.public(), k.public());
        }
        if let Ok(k) = PublicKey::parse("fuzz", text) {
            assert_eq!(PublicKey::parse("fuzz", &k.to_text()).expect("reads"), k);
        }
    }
}
