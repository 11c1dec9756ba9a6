//! Cryptographic hashes as Nix names, parses and prints them.
//!
//! Algorithms: `md5`, `sha1`, `sha256`, `sha512`. Textual forms, for a hash of `n` bytes:
//!
//! | form      | length            | example (sha256)                                   |
//! |-----------|-------------------|----------------------------------------------------|
//! | base16    | `2n`              | `5891b5b5…46f6be03` (upper case accepted on input) |
//! | nixbase32 | `ceil(8n/5)`      | `00xyyr3f…4asvb4aq`                                |
//! | base64    | `4 * ceil(n/3)`   | `WJG1tSLV…Eb2vgM=`                                 |
//! | SRI       | `algo-` + base64  | `sha256-WJG1tSLV…Eb2vgM=`                          |
//!
//! Any of the first three may carry an `algo:` prefix. The form is recognised by length
//! (the lengths never collide), exactly as Nix 2.8's `Hash::Hash(rest, type, isSRI)`
//! does, including its leniencies: base64 stops at the first `=`, skips newlines and
//! ignores non-zero trailing bits. Error texts are Nix's.

use std::fmt;

use sha2::Digest;
use thiserror::Error;

use crate::nixbase32;

/// A hash algorithm Nix knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HashAlgo {
    Md5,
    Sha1,
    Sha256,
    Sha512,
}

impl HashAlgo {
    /// All algorithms, weakest first.
    pub const ALL: [HashAlgo; 4] = [Self::Md5, Self::Sha1, Self::Sha256, Self::Sha512];

    /// Digest size in bytes.
    pub const fn size(self) -> usize {
        match self {
            Self::Md5 => 16,
            Self::Sha1 => 20,
            Self::Sha256 => 32,
            Self::Sha512 => 64,
        }
    }

    /// Nix's name (`printHashType`).
    pub const fn name(self) -> &'static str {
        match self {
            Self::Md5 => "md5",
            Self::Sha1 => "sha1",
            Self::Sha256 => "sha256",
            Self::Sha512 => "sha512",
        }
    }

    /// Parse a name as `parseHashType` does (exact, lower case).
    pub fn parse(s: &str) -> Result<Self, HashError> {
        Self::from_bytes(s.as_bytes()).ok_or_else(|| HashError::UnknownAlgo(s.to_owned()))
    }

    pub(crate) fn from_bytes(s: &[u8]) -> Option<Self> {
        match s {
            b"md5" => Some(Self::Md5),
            b"sha1" => Some(Self::Sha1),
            b"sha256" => Some(Self::Sha256),
            b"sha512" => Some(Self::Sha512),
            _ => None,
        }
    }

    fn base16_len(self) -> usize {
        self.size() * 2
    }

    fn base32_len(self) -> usize {
        nixbase32::encoded_len(self.size())
    }

    fn base64_len(self) -> usize {
        self.size().div_ceil(3) * 4
    }
}

impl fmt::Display for HashAlgo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for HashAlgo {
    type Err = HashError;
    fn from_str(s: &str) -> Result<Self, HashError> {
        Self::parse(s)
    }
}

/// Why a string is not a hash. The messages are Nix 2.8's.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HashError {
    #[error("unknown hash algorithm '{0}'")]
    UnknownAlgo(String),
    #[error("hash '{hash}' has wrong length for hash type '{algo}'")]
    WrongLength { hash: String, algo: HashAlgo },
    #[error("invalid base-16 hash '{0}'")]
    InvalidBase16(String),
    #[error("invalid base-32 hash '{0}'")]
    InvalidBase32(String),
    #[error("invalid base-64 hash '{0}'")]
    InvalidBase64(String),
    #[error("invalid SRI hash '{0}'")]
    InvalidSri(String),
    #[error("invalid character {0:?} in base-64 string")]
    InvalidBase64Char(char),
    #[error("hash '{0}' does not include a type, nor is the type otherwise known from context")]
    NoType(String),
    #[error("hash '{hash}' should have type '{expected}'")]
    TypeMismatch { hash: String, expected: HashAlgo },
}

/// Textual encodings of a hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Base16,
    NixBase32,
    Base64,
}

/// A digest together with its algorithm.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hash {
    algo: HashAlgo,
    bytes: [u8; 64],
}

impl Hash {
    /// A hash from raw digest bytes; `None` if the length does not fit `algo`.
    pub fn from_slice(algo: HashAlgo, digest: &[u8]) -> Option<Self> {
        if digest.len() != algo.size() {
            return None;
        }
        let mut bytes = [0; 64];
        bytes[..digest.len()].copy_from_slice(digest);
        Some(Self { algo, bytes })
    }

    /// Hash `data` with `algo`.
    pub fn digest(algo: HashAlgo, data: &[u8]) -> Self {
        let mut h = Hasher::new(algo);
        h.update(data);
        h.finish()
    }

    /// The sha256 of `data` (the hash Nix uses for everything structural).
    pub fn sha256(data: &[u8]) -> Self {
        Self::digest(HashAlgo::Sha256, data)
    }

    pub fn algo(&self) -> HashAlgo {
        self.algo
    }

    /// The digest bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.algo.size()]
    }

    /// Parse the hash field of a `.drv` output (`Hash::parseNonSRIUnprefixed`): base16,
    /// nixbase32 or base64 of a known algorithm, with no prefix.
    pub fn parse_non_sri_unprefixed(s: &str, algo: HashAlgo) -> Result<Self, HashError> {
        Self::parse_body(s, algo, false)
    }

    /// Parse `algo:rest`, `algo-base64` (SRI) or, when `algo` is given, a bare hash
    /// (`Hash::parseAny`). A prefix that disagrees with `algo` is an error.
    pub fn parse_any(s: &str, algo: Option<HashAlgo>) -> Result<Self, HashError> {
        let (parsed_algo, rest, is_sri) = if let Some((a, rest)) = s.split_once(':') {
            (Some(HashAlgo::parse(a)?), rest, false)
        } else if let Some((a, rest)) = s.split_once('-') {
            (Some(HashAlgo::parse(a)?), rest, true)
        } else {
            (None, s, false)
        };
        let algo = match (parsed_algo, algo) {
            (None, None) => return Err(HashError::NoType(s.to_owned())),
            (Some(p), Some(e)) if p != e => {
                return Err(HashError::TypeMismatch {
                    hash: s.to_owned(),
                    expected: e,
                })
            }
            (Some(a), _) | (None, Some(a)) => a,
        };
        Self::parse_body(rest, algo, is_sri)
    }

    /// Parse an SRI hash `algo-base64`.
    pub fn parse_sri(s: &str) -> Result<Self, HashError> {
        let (a, rest) = s
            .split_once('-')
            .ok_or_else(|| HashError::InvalidSri(s.to_owned()))?;
        Self::parse_body(rest, HashAlgo::parse(a)?, true)
    }

    fn parse_body(rest: &str, algo: HashAlgo, is_sri: bool) -> Result<Self, HashError> {
        let mut bytes = [0u8; 64];
        let n = algo.size();
        let s = rest.as_bytes();
        if !is_sri && s.len() == algo.base16_len() {
            for (i, pair) in s.chunks_exact(2).enumerate() {
                match (hex_digit(pair[0]), hex_digit(pair[1])) {
                    (Some(hi), Some(lo)) => bytes[i] = hi << 4 | lo,
                    _ => return Err(HashError::InvalidBase16(rest.to_owned())),
                }
            }
        } else if !is_sri && s.len() == algo.base32_len() {
            nixbase32::decode_into(s, &mut bytes[..n])
                .map_err(|_| HashError::InvalidBase32(rest.to_owned()))?;
        } else if is_sri || s.len() == algo.base64_len() {
            let decoded = base64_decode(s)?;
            if decoded.len() != n {
                return Err(if is_sri {
                    HashError::InvalidSri(rest.to_owned())
                } else {
                    HashError::InvalidBase64(rest.to_owned())
                });
            }
            bytes[..n].copy_from_slice(&decoded);
        } else {
            return Err(HashError::WrongLength {
                hash: rest.to_owned(),
                algo,
            });
        }
        Ok(Self { algo, bytes })
    }

    /// Lower-case hex, no prefix.
    pub fn to_base16(&self) -> String {
        let mut s = String::with_capacity(self.algo.size() * 2);
        for b in self.as_bytes() {
            s.push(char::from(HEX[(b >> 4) as usize]));
            s.push(char::from(HEX[(b & 15) as usize]));
        }
        s
    }

    pub fn to_nixbase32(&self) -> String {
        nixbase32::encode(self.as_bytes())
    }

    /// Padded standard base64.
    pub fn to_base64(&self) -> String {
        base64_encode(self.as_bytes())
    }

    /// `algo-base64`, as `nix path-info --json` prints a narHash.
    pub fn to_sri(&self) -> String {
        format!("{}-{}", self.algo, self.to_base64())
    }

    /// The hash in `encoding`, optionally with the `algo:` prefix (`Hash::to_string`).
    pub fn encode(&self, encoding: Encoding, with_algo: bool) -> String {
        let body = match encoding {
            Encoding::Base16 => self.to_base16(),
            Encoding::NixBase32 => self.to_nixbase32(),
            Encoding::Base64 => self.to_base64(),
        };
        if with_algo {
            format!("{}:{}", self.algo, body)
        } else {
            body
        }
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algo, self.to_base16())
    }
}

/// `algo:nixbase32`, the form `nix-store -q --hash` prints.
impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algo, self.to_nixbase32())
    }
}

/// Incremental hashing with any of Nix's algorithms.
#[derive(Clone)]
pub enum Hasher {
    Md5(md5::Md5),
    Sha1(sha1::Sha1),
    Sha256(sha2::Sha256),
    Sha512(sha2::Sha512),
}

impl fmt::Debug for Hasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hasher({})", self.algo())
    }
}

impl Hasher {
    pub fn new(algo: HashAlgo) -> Self {
        match algo {
            HashAlgo::Md5 => Self::Md5(md5::Md5::new()),
            HashAlgo::Sha1 => Self::Sha1(sha1::Sha1::new()),
            HashAlgo::Sha256 => Self::Sha256(sha2::Sha256::new()),
            HashAlgo::Sha512 => Self::Sha512(sha2::Sha512::new()),
        }
    }

    pub fn algo(&self) -> HashAlgo {
        match self {
            Self::Md5(_) => HashAlgo::Md5,
            Self::Sha1(_) => HashAlgo::Sha1,
            Self::Sha256(_) => HashAlgo::Sha256,
            Self::Sha512(_) => HashAlgo::Sha512,
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        match self {
            Self::Md5(h) => h.update(data),
            Self::Sha1(h) => h.update(data),
            Self::Sha256(h) => h.update(data),
            Self::Sha512(h) => h.update(data),
        }
    }

    pub fn finish(self) -> Hash {
        let algo = self.algo();
        let mut bytes = [0u8; 64];
        match self {
            Self::Md5(h) => bytes[..16].copy_from_slice(&h.finalize()),
            Self::Sha1(h) => bytes[..20].copy_from_slice(&h.finalize()),
            Self::Sha256(h) => bytes[..32].copy_from_slice(&h.finalize()),
            Self::Sha512(h) => bytes.copy_from_slice(&h.finalize()),
        }
        Hash { algo, bytes }
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn base64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(B64[(n >> (18 - 6 * i) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Nix 2.8's lenient decoder: stops at the first `=`, skips `\n`, drops leftover bits.
fn base64_decode(s: &[u8]) -> Result<Vec<u8>, HashError> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut d, mut bits) = (0u32, 0u32);
    for &c in s {
        let v = match c {
            b'=' => break,
            b'\n' => continue,
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return Err(HashError::InvalidBase64Char(char::from(c))),
        };
        d = (d << 6 | u32::from(v)) & 0xffff;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((d >> bits) as u8);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HELLO: &str = "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03";
    const HELLO32: &str = "00xyyr3fi8l6hb839bv3f7yb86yjv7xi1cgh1xnhipym4asvb4aq";
    const HELLO64: &str = "WJG1tSLV3whtD/CxEPvZ0hu0/HFjrzTQgoai6Eb2vgM=";

    // Every line of nix-2.8-vectors/hashes.txt: nix-hash --flat in hex and nixbase32.
    #[test]
    fn digests_match_nix_hash() {
        let vectors = include_str!("../../../fixtures/nix-2.8-vectors/hashes.txt");
        let mut seen = 0;
        for line in vectors.lines().filter(|l| l.starts_with("flat ")) {
            let fields: Vec<&str> = line.split(' ').collect();
            let algo = HashAlgo::parse(fields[1]).unwrap();
            let data = match fields[2] {
                "\"\"" => "",
                "\"hello\\n\"" => "hello\n",
                "\"abc\"" => "abc",
                other => panic!("unexpected input {other}"),
            };
            let h = Hash::digest(algo, data.as_bytes());
            assert_eq!(format!("hex={}", h.to_base16()), fields[3], "{line}");
            assert_eq!(format!("base32={}", h.to_nixbase32()), fields[4], "{line}");
            seen += 1;
        }
        assert_eq!(seen, 12);
        assert_eq!(Hash::sha256(b"hello\n").to_base64(), HELLO64);
    }

    #[test]
    fn parse_forms() {
        let want = Hash::sha256(b"hello\n");
        for s in [HELLO, HELLO32, HELLO64, &HELLO.to_uppercase()] {
            assert_eq!(
                Hash::parse_non_sri_unprefixed(s, HashAlgo::Sha256).unwrap(),
                want
            );
        }
        for s in [
            format!("sha256:{HELLO}"),
            format!("sha256:{HELLO32}"),
            format!("sha256-{HELLO64}"),
        ] {
            assert_eq!(Hash::parse_any(&s, None).unwrap(), want, "{s}");
        }
        assert_eq!(Hash::parse_sri(&want.to_sri()).unwrap(), want);
        // Nix's leniency: newline skipped, non-zero trailing bits ignored.
        let lenient = "WJG1tSLV3whtD/CxEPvZ0hu0/HFjrzTQgoai6Eb2\nvgM";
        assert_eq!(
            Hash::parse_any(&format!("sha256-{lenient}"), None).unwrap(),
            want
        );
        let trailing = "WJG1tSLV3whtD/CxEPvZ0hu0/HFjrzTQgoai6Eb2vgN=";
        assert_eq!(
            Hash::parse_non_sri_unprefixed(trailing, HashAlgo::Sha256).unwrap(),
            want
        );
    }

    // Error texts observed from `nix show-derivation` on crafted fixed-output .drv files.
    #[test]
    fn parse_errors() {
        let s256 = HashAlgo::Sha256;
        let e = |s: &str| {
            Hash::parse_non_sri_unprefixed(s, s256)
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            e("abc"),
            "hash 'abc' has wrong length for hash type 'sha256'"
        );
        assert_eq!(
            e(&format!("sha256-{HELLO64}")),
            format!("hash 'sha256-{HELLO64}' has wrong length for hash type 'sha256'")
        );
        let b32 = "e0xyyr3fi8l6hb839bv3f7yb86yjv7xi1cgh1xnhipym4asvb4aq";
        assert_eq!(e(b32), format!("invalid base-32 hash '{b32}'"));
        let b32 = "20xyyr3fi8l6hb839bv3f7yb86yjv7xi1cgh1xnhipym4asvb4aq";
        assert_eq!(e(b32), format!("invalid base-32 hash '{b32}'"));
        let b16 = format!("g{}", &HELLO[1..]);
        assert_eq!(e(&b16), format!("invalid base-16 hash '{b16}'"));
        let b64 = "WJG1tSLV3whtD/CxEPvZ0hu0/HFjrzTQgoai6Eb2vgMA";
        assert_eq!(e(b64), format!("invalid base-64 hash '{b64}'"));
        let b64 = "WJG1tSLV3whtD/CxEPvZ0hu0/HFjrzTQgoai6Eb2vg==";
        assert_eq!(e(b64), format!("invalid base-64 hash '{b64}'"));
        assert!(matches!(
            Hash::parse_non_sri_unprefixed("WJG1tSLV3whtD_CxEPvZ0hu0_HFjrzTQgoai6Eb2vgM=", s256),
            Err(HashError::InvalidBase64Char('_'))
        ));
        assert_eq!(
            HashAlgo::parse("sha3").unwrap_err().to_string(),
            "unknown hash algorithm 'sha3'"
        );
        assert!(matches!(
            Hash::parse_any(HELLO, None),
            Err(HashError::NoType(_))
        ));
        assert!(matches!(
            Hash::parse_any(&format!("sha1:{HELLO}"), Some(s256)),
            Err(HashError::TypeMismatch { .. })
        ));
    }

    proptest::proptest! {
        #[test]
        fn every_form_roundtrips(data in proptest::collection::vec(proptest::num::u8::ANY, 0..100), a in 0usize..4) {
            let algo = HashAlgo::ALL[a];
            let h = Hash::digest(algo, &data);
            for enc in [Encoding::Base16, Encoding::NixBase32, Encoding::Base64] {
                proptest::prop_assert_eq!(Hash::parse_any(&h.encode(enc, true), None).unwrap(), h);
                proptest::prop_assert_eq!(Hash::parse_non_sri_unprefixed(&h.encode(enc, false), algo).unwrap(), h);
            }
            proptest::prop_assert_eq!(Hash::parse_sri(&h.to_sri()).unwrap(), h);
        }
    }
}
