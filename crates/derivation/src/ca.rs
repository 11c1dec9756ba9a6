//! Content-addressing methods of fixed outputs.

use std::fmt;

use crate::hash::{Hash, HashAlgo};

/// How content is hashed: the file's bytes (`flat`) or its NAR serialisation (`r:`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FileIngestionMethod {
    Flat,
    Recursive,
}

impl FileIngestionMethod {
    /// `""` or `"r:"`, as in a `.drv`'s hashAlgo field (`makeFileIngestionPrefix`).
    pub const fn prefix(self) -> &'static str {
        match self {
            Self::Flat => "",
            Self::Recursive => "r:",
        }
    }
}

/// The declared hash of a fixed-output derivation's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FixedOutputHash {
    pub method: FileIngestionMethod,
    pub hash: Hash,
}

impl FixedOutputHash {
    /// `[r:]algo`, the `.drv` hashAlgo field (`printMethodAlgo`).
    pub fn method_algo(&self) -> MethodAlgo {
        MethodAlgo(*self)
    }
}

/// Display adaptor for `[r:]algo`.
#[derive(Debug, Clone, Copy)]
pub struct MethodAlgo(FixedOutputHash);

impl fmt::Display for MethodAlgo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.0.method.prefix(), self.0.hash.algo())
    }
}

/// A content address (`ContentAddress`, the `ca` of a path), written with a nixbase32
/// hash: `text:sha256:<hash>` | `fixed:` [`r:`] `<algo>:<hash>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ContentAddress {
    /// `text:sha256:…`: text with references (`.drv` files, `builtins.toFile`).
    Text(Hash),
    /// `fixed:[r:]algo:…`.
    Fixed {
        method: FileIngestionMethod,
        hash: Hash,
    },
}

impl ContentAddress {
    /// Parse as `parseContentAddress` does.
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("content address '{s}' {why}");
        if let Some(rest) = s.strip_prefix("text:") {
            let body = rest
                .strip_prefix("sha256:")
                .ok_or_else(|| bad("must use sha256 for text"))?;
            let hash = Hash::parse_non_sri_unprefixed(body, HashAlgo::Sha256)
                .map_err(|e| bad(&e.to_string()))?;
            Ok(Self::Text(hash))
        } else if let Some(rest) = s.strip_prefix("fixed:") {
            let (method, rest) = match rest.strip_prefix("r:") {
                Some(r) => (FileIngestionMethod::Recursive, r),
                None => (FileIngestionMethod::Flat, rest),
            };
            let (algo, body) = rest
                .split_once(':')
                .ok_or_else(|| bad("lacks a hash algorithm"))?;
            let algo = HashAlgo::parse(algo).map_err(|e| bad(&e.to_string()))?;
            let hash =
                Hash::parse_non_sri_unprefixed(body, algo).map_err(|e| bad(&e.to_string()))?;
            Ok(Self::Fixed { method, hash })
        } else {
            Err(bad("has an unknown prefix"))
        }
    }

    pub fn hash(&self) -> &Hash {
        match self {
            Self::Text(h) | Self::Fixed { hash: h, .. } => h,
        }
    }
}

impl fmt::Display for ContentAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Text(h) => write!(f, "text:sha256:{}", h.to_nixbase32()),
            Self::Fixed { method, hash } => write!(
                f,
                "fixed:{}{}:{}",
                method.prefix(),
                hash.algo(),
                hash.to_nixbase32()
            ),
        }
    }
}
