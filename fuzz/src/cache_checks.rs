//! Checks of the binary-cache readers (`firn_cache`) on arbitrary bytes: the narinfo
//! reader, the `nix-cache-info` reader and the key readers never panic; an accepted
//! narinfo written back reads back equal, and writing that gives the same text; an
//! accepted key written back is the same key; the input as the bytes of a
//! `serve-cache` connection gives requests until it stops, and each `GET`/`HEAD` read
//! written back as a request line reads back the same.

use firn_cache::cache_info::CacheInfo;
use firn_cache::{NarInfo, PublicKey, SecretKey};
use firn_derivation::StoreDir;

/// The input as a narinfo, a `nix-cache-info`, a secret and a public key, and as the
/// bytes a client sends `serve-cache`.
pub fn check_cache_readers(data: &[u8]) {
    check_http_requests(data);
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

/// The input as a `serve-cache` connection: read requests until the connection would
/// end; a `GET`/`HEAD` read back from its own request line is the same request.
pub fn check_http_requests(data: &[u8]) {
    use firn_cache::http_request::{read_request, Request};
    let mut r = std::io::Cursor::new(data);
    for _ in 0..1000 {
        let Ok(Some(req)) = read_request(&mut r) else {
            return;
        };
        let Request::Get {
            path,
            head_only,
            keep_alive,
        } = &req
        else {
            if matches!(req, Request::OtherMethod { keep_alive: true }) {
                continue;
            }
            return;
        };
        assert!(!path.contains('?'), "the query is dropped: {path:?}");
        let method = if *head_only { "HEAD" } else { "GET" };
        let line = format!("{method} {path} HTTP/1.1\r\n\r\n");
        let back = read_request(&mut std::io::Cursor::new(line.as_bytes()))
            .expect("a cursor does not fail")
            .expect("a whole head");
        let same = Request::Get {
            path: path.clone(),
            head_only: *head_only,
            keep_alive: true,
        };
        assert_eq!(back, same, "{line:?}");
        if !keep_alive {
            return;
        }
    }
}
