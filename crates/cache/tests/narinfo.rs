//! The narinfo, nix-cache-info and key readers on hostile input: every malformed
//! input is an error naming the file, never a panic; what Nix writes (and what Hydra
//! and nix-serve write) reads back and writes out byte for byte.

#![allow(clippy::unwrap_used)]

use firn_cache::cache_info::CacheInfo;
use firn_cache::{CacheError, NarInfo, PublicKey, SecretKey};
use firn_derivation::StoreDir;

/// Written by `nix copy --to file://…?secret-key=…` (Nix 2.8).
const NIX: &str = "StorePath: /nix/store/wvy2dcy2jrc5fzcrcla4iqkpad6jrmxd-cache-top
URL: nar/03ywcfh9y00k443371za822pn6gz62kpfi10s7sq18nwyrx4c97y.nar
Compression: none
FileHash: sha256:03ywcfh9y00k443371za822pn6gz62kpfi10s7sq18nwyrx4c97y
FileSize: 488
NarHash: sha256:03ywcfh9y00k443371za822pn6gz62kpfi10s7sq18nwyrx4c97y
NarSize: 488
References: 6xdfpm8kv1gblglhfb4jzfgph2i4ihag-cache-dep
Deriver: ngfq31aknkrq5rka6ljiv5z34yxc6jw0-cache-top.drv
Sig: test-1:i/DfBLid2NYk7ifArDzNeUEIYpD3XkqfE8FtQ0WziosCAdB/QQ5yqRogIGkNM+lCVb7453fzIQRN2IB6rn2lBQ==
";

fn sd() -> StoreDir {
    StoreDir::new("/nix/store").unwrap()
}

fn parse(text: &str) -> Result<NarInfo, CacheError> {
    NarInfo::parse(&sd(), "t.narinfo", text.as_bytes())
}

#[test]
fn what_nix_writes_round_trips() {
    let info = parse(NIX).unwrap();
    assert_eq!(info.to_text(&sd()), NIX);
    assert_eq!(info.references.len(), 1);
    assert_eq!(info.nar_size, 488);
    // No references: `References: ` keeps its space.
    let none = NIX.replace(
        "References: 6xdfpm8kv1gblglhfb4jzfgph2i4ihag-cache-dep",
        "References: ",
    );
    assert_eq!(parse(&none).unwrap().to_text(&sd()), none);
}

#[test]
fn what_hydra_and_nix_serve_write_reads() {
    // No FileHash/FileSize, unknown deriver, no Compression (bzip2 then), an unknown
    // key, a `References:` without its space, lines without a colon.
    let text = "StorePath: /nix/store/wvy2dcy2jrc5fzcrcla4iqkpad6jrmxd-cache-top\nURL: nar/x.nar.bz2\n\
                NarHash: sha256:03ywcfh9y00k443371za822pn6gz62kpfi10s7sq18nwyrx4c97y\nNarSize: 488\n\
                References:\nDeriver: unknown-deriver\nSystem: x86_64-linux\nFuture: 1\njunk\n";
    let info = parse(text).unwrap();
    assert_eq!(info.compression, "bzip2");
    assert!(info.deriver.is_none() && info.references.is_empty());
    assert_eq!(info.system.as_deref(), Some("x86_64-linux"));
    // Base-16 NarHash is accepted (parseAnyPrefixed), written back as Nix writes it.
    let hex = NIX.replace(
        "NarHash: sha256:03ywcfh9y00k443371za822pn6gz62kpfi10s7sq18nwyrx4c97y",
        "NarHash: sha256:e6fc3c3e3b1d4a3fc3e9ac20ce2c16b12d7e9e27e0a8b2faf0f9ffe2d3c1c1c1",
    );
    assert!(parse(&hex).is_ok());
}

#[test]
fn hostile_narinfos_are_errors() {
    let line = |k: &str| NIX.lines().find(|l| l.starts_with(k)).unwrap().to_owned() + "\n";
    let without = |k: &str| NIX.replace(&line(k), "");
    let cases: Vec<(String, &str)> = vec![
        (String::new(), "missing"),
        (NIX.trim_end().to_owned(), "newline"),
        (without("StorePath"), "StorePath"),
        (without("URL"), "URL"),
        (without("NarHash"), "NarHash"),
        (without("NarSize"), "NarSize"),
        (NIX.replace("NarSize: 488", "NarSize: 0"), "NarSize"),
        (NIX.replace("NarSize: 488", "NarSize: -1"), "NarSize"),
        (
            NIX.replace("NarSize: 488", "NarSize: 99999999999999999999999"),
            "NarSize",
        ),
        (NIX.replace("NarSize: 488", "NarSize: 4 88"), "NarSize"),
        (NIX.replace("FileSize: 488", "FileSize: x"), "FileSize"),
        (
            NIX.replace(
                "URL: nar/03ywcfh9y00k443371za822pn6gz62kpfi10s7sq18nwyrx4c97y.nar",
                "URL: ",
            ),
            "URL",
        ),
        (NIX.replace("sha256:03yw", "sha256:zzzz"), "Hash"),
        (NIX.replace("NarHash: sha256:", "NarHash: md5:"), "NarHash"),
        (
            NIX.replace("/nix/store/wvy2", "/tmp/store/wvy2"),
            "StorePath",
        ),
        (
            NIX.replace(
                "StorePath: /nix/store/wvy2dcy2jrc5fzcrcla4iqkpad6jrmxd-cache-top",
                "StorePath: /nix/store/short",
            ),
            "StorePath",
        ),
        (NIX.replace("-cache-dep", "-cache dep/.."), "References"),
        (NIX.replace("Deriver: ngfq", "Deriver: ../ngfq"), "Deriver"),
        (NIX.to_owned() + &line("URL"), "twice"),
        (NIX.to_owned() + "CA: \n", "CA"),
    ];
    for (text, says) in cases {
        match parse(&text) {
            Err(CacheError::BadNarInfo { file, msg }) => {
                assert_eq!(file, "t.narinfo");
                assert!(msg.contains(says), "{says}: {msg}");
            }
            other => panic!("{says}: {other:?} for\n{text}"),
        }
    }
    // Not UTF-8, NUL bytes, a huge file: errors.
    assert!(NarInfo::parse(&sd(), "t", b"StorePath: \xff\n").is_err());
    assert!(NarInfo::parse(&sd(), "t", &vec![b'\n'; 17 << 20]).is_err());
    assert!(parse(&NIX.replace("cache-top\n", "cache-top\0\n")).is_err());
    // Arbitrary truncations and byte flips never panic.
    for cut in 0..NIX.len() {
        let _ = NarInfo::parse(&sd(), "t", &NIX.as_bytes()[..cut]);
        let mut flipped = NIX.as_bytes().to_vec();
        flipped[cut] ^= 0x20;
        let _ = NarInfo::parse(&sd(), "t", &flipped);
    }
}

#[test]
fn cache_info_and_keys_on_hostile_input() {
    let info = CacheInfo::parse(
        "c",
        b"StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\nnoise\n",
    )
    .unwrap();
    assert_eq!(info.priority, Some(40));
    assert!(info.want_mass_query);
    // What Nix writes: no final newline.
    assert_eq!(
        CacheInfo::parse("c", b"StoreDir: /nix/store")
            .unwrap()
            .store_dir
            .as_deref(),
        Some("/nix/store")
    );
    assert!(CacheInfo::parse("c", b"Priority: high\n").is_err());
    assert!(CacheInfo::parse("c", b"Priority: \xff\n").is_err());
    assert!(CacheInfo::parse("c", &vec![b'x'; 1 << 20]).is_err());
    // Keys: Nix's own pair, with the trailing newline an editor adds.
    let sk = "test-1:CnxsI+7oDqyh+hinJrus4GINGmOFD6gpWMSguzNxFGe4jpo/LLKIKOUYq1Mg6Xnw4s6GppyaJRMmwDf36GQUtg==\n";
    let k = SecretKey::parse("sk", sk).unwrap();
    assert_eq!(k.to_text(), sk.trim_end());
    let pk = k.public().to_text();
    assert_eq!(
        pk, "test-1:uI6aPyyyiCjlGKtTIOl58OLOhqacmiUTJsA39+hkFLY=",
        "the public key nix-store --generate-binary-cache-key wrote"
    );
    assert_eq!(PublicKey::parse("pk", &pk).unwrap().to_text(), pk);
    for bad in [
        "", "\n", "x", "x:", ":x", "x: AAAA", "x:AAAA", "x:A===", "a:b:c", "x y:AAAA",
    ] {
        assert!(SecretKey::parse("sk", bad).is_err(), "{bad:?}");
        assert!(PublicKey::parse("pk", bad).is_err(), "{bad:?}");
    }
    // A 32-byte value that is not a curve point.
    let not_point = format!("x:{}", "/".repeat(42) + "8=");
    let _ = PublicKey::parse("pk", &not_point);
}

#[test]
fn nar_urls_must_stay_inside_the_cache() {
    use firn_cache::cache_info::CacheInfo;
    use firn_cache::{BinaryCache, CacheUrl};
    let info = parse(NIX).unwrap();
    for base in ["http://127.0.0.1:9/cache", "file:///nonexistent-firn-cache"] {
        let cache = BinaryCache::with_info(
            &CacheUrl::parse(base).unwrap(),
            CacheInfo::new("/nix/store"),
            &Default::default(),
        )
        .unwrap();
        for url in [
            "../x.nar",
            "nar/../../x.nar",
            "/etc/passwd",
            "http://elsewhere/x.nar",
            "file:///etc/passwd",
            "nar/x.nar#frag",
            "nar\\..\\x.nar",
            "./nar/x.nar",
            // Over HTTP a query follows the path, which must not be empty.
            if base.starts_with("http") { "?x" } else { "" },
        ] {
            let mut bad = info.clone();
            bad.url = url.to_owned();
            match cache.open_nar(&bad) {
                Err(CacheError::NarUrlOutsideCache { url: u, .. }) => assert_eq!(u, url),
                Err(e) => panic!("{base} {url}: {e}"),
                Ok(_) => panic!("{base} {url}: accepted"),
            }
        }
    }
    // Cache URLs firn cannot open are errors naming them.
    for bad in [
        "https://",
        "s3://b",
        "file://relative",
        "http://",
        "daemon",
        "file:///x?colour=red",
        "file:///x?compression=lz5",
    ] {
        assert!(CacheUrl::parse(bad).is_err(), "{bad}");
    }
    assert!(CacheUrl::parse("https://cache.nixos.org/").is_ok());
}
