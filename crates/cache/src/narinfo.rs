//! `<hashPart>.narinfo`: what a binary cache says about one store path.
//!
//! The writer follows Nix 2.8's `NarInfo::to_string` exactly: `StorePath`, `URL`,
//! `Compression`, `FileHash`, `FileSize`, `NarHash`, `NarSize`, `References` (base
//! names, sorted; `References: ` with its space when empty), `Deriver` (when known),
//! `System` (when known), one `Sig` per signature, `CA` (when content-addressed), each
//! `Key: value\n`. The reader takes what Nix writes and what Hydra and nix-serve write
//! (no `FileHash`/`FileSize`, `Deriver: unknown-deriver`, `References:` without a
//! space), and refuses — with the file and the reason — anything else: a missing final
//! newline, a missing or malformed required field (`StorePath`, `URL`, `NarHash`,
//! `NarSize` ≠ 0), a path outside our store dir, a repeated single field, more than
//! [`MAX_NARINFO_SIZE`] bytes. Unknown keys are ignored, as Nix ignores them.

use std::collections::BTreeSet;

use firn_derivation::{Hash, HashAlgo, StoreDir, StorePath};

use crate::error::CacheError;

/// A narinfo larger than this is refused before it is parsed (a closure of 100 000
/// references is about 6 MB).
pub const MAX_NARINFO_SIZE: u64 = 16 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarInfo {
    pub path: StorePath,
    /// Where the NAR is, relative to the cache.
    pub url: String,
    /// As written (`xz`, `zstd`, `none`, …); absent means `bzip2`, as in Nix.
    pub compression: String,
    pub file_hash: Option<Hash>,
    pub file_size: Option<u64>,
    pub nar_hash: Hash,
    pub nar_size: u64,
    pub references: BTreeSet<StorePath>,
    pub deriver: Option<StorePath>,
    pub system: Option<String>,
    pub sigs: Vec<String>,
    pub ca: Option<String>,
}

impl NarInfo {
    /// The text Nix writes.
    pub fn to_text(&self, sd: &StoreDir) -> String {
        let mut s = String::new();
        s.push_str(&format!("StorePath: {}\n", sd.display(&self.path)));
        s.push_str(&format!("URL: {}\n", self.url));
        s.push_str(&format!("Compression: {}\n", self.compression));
        if let Some(h) = &self.file_hash {
            s.push_str(&format!("FileHash: sha256:{}\n", h.to_nixbase32()));
        }
        if let Some(n) = self.file_size {
            s.push_str(&format!("FileSize: {n}\n"));
        }
        s.push_str(&format!(
            "NarHash: sha256:{}\n",
            self.nar_hash.to_nixbase32()
        ));
        s.push_str(&format!("NarSize: {}\n", self.nar_size));
        let refs: Vec<&str> = self.references.iter().map(|r| r.base_name()).collect();
        s.push_str(&format!("References: {}\n", refs.join(" ")));
        if let Some(d) = &self.deriver {
            s.push_str(&format!("Deriver: {}\n", d.base_name()));
        }
        if let Some(sys) = &self.system {
            s.push_str(&format!("System: {sys}\n"));
        }
        for sig in &self.sigs {
            s.push_str(&format!("Sig: {sig}\n"));
        }
        if let Some(ca) = &self.ca {
            s.push_str(&format!("CA: {ca}\n"));
        }
        s
    }

    /// Parse the narinfo `text` read from `file` (named in errors).
    pub fn parse(sd: &StoreDir, file: &str, text: &[u8]) -> Result<Self, CacheError> {
        let bad = |msg: String| CacheError::BadNarInfo {
            file: file.to_owned(),
            msg,
        };
        if text.len() as u64 > MAX_NARINFO_SIZE {
            return Err(bad(format!("it is larger than {MAX_NARINFO_SIZE} bytes")));
        }
        let text = std::str::from_utf8(text).map_err(|e| bad(format!("not UTF-8: {e}")))?;
        if !text.is_empty() && !text.ends_with('\n') {
            return Err(bad("it does not end with a newline".into()));
        }
        let mut path = None;
        let mut url = None;
        let mut compression = None;
        let mut file_hash = None;
        let mut file_size = None;
        let mut nar_hash = None;
        let mut nar_size = None;
        let mut references = None;
        let mut deriver = None;
        let mut system = None;
        let mut sigs = Vec::new();
        let mut ca = None;
        fn once<T>(slot: &mut Option<T>, key: &str, v: T) -> Result<(), String> {
            if slot.is_some() {
                return Err(format!("field '{key}' appears twice"));
            }
            *slot = Some(v);
            Ok(())
        }
        let number = |key: &str, v: &str| -> Result<u64, String> {
            if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!("field '{key}' is not a number: '{v}'"));
            }
            v.parse::<u64>()
                .map_err(|_| format!("field '{key}' is out of range: '{v}'"))
        };
        let hash = |key: &str, v: &str| -> Result<Hash, String> {
            Hash::parse_any(v, Some(HashAlgo::Sha256)).map_err(|e| format!("field '{key}': {e}"))
        };
        let base_path = |key: &str, v: &str| -> Result<StorePath, String> {
            StorePath::from_base_name(v.as_bytes())
                .map_err(|e| format!("field '{key}': '{v}': {e}"))
        };
        for (n, line) in text.lines().enumerate() {
            let Some((key, value)) = line.split_once(':') else {
                // Nix skips lines without a colon.
                continue;
            };
            let value = value.strip_prefix(' ').unwrap_or(value);
            let r: Result<(), String> = (|| match key {
                "StorePath" => {
                    let p = sd
                        .parse(value)
                        .map_err(|e| format!("field 'StorePath': '{value}': {e}"))?;
                    once(&mut path, key, p)
                }
                "URL" => {
                    if value.is_empty() {
                        return Err("field 'URL' is empty".into());
                    }
                    once(&mut url, key, value.to_owned())
                }
                "Compression" => once(&mut compression, key, value.to_owned()),
                "FileHash" => once(&mut file_hash, key, hash(key, value)?),
                "FileSize" => once(&mut file_size, key, number(key, value)?),
                "NarHash" => once(&mut nar_hash, key, hash(key, value)?),
                "NarSize" => once(&mut nar_size, key, number(key, value)?),
                "References" => {
                    let refs = value
                        .split(' ')
                        .filter(|r| !r.is_empty())
                        .map(|r| base_path(key, r))
                        .collect::<Result<BTreeSet<_>, _>>()?;
                    once(&mut references, key, refs)
                }
                "Deriver" => {
                    let d = if value == "unknown-deriver" || value.is_empty() {
                        None
                    } else {
                        Some(base_path(key, value)?)
                    };
                    once(&mut deriver, key, d)
                }
                "System" => once(&mut system, key, value.to_owned()),
                "Sig" => {
                    sigs.push(value.to_owned());
                    Ok(())
                }
                "CA" => {
                    if value.is_empty() {
                        return Err("field 'CA' is empty".into());
                    }
                    once(&mut ca, key, value.to_owned())
                }
                _ => Ok(()),
            })();
            r.map_err(|m| bad(format!("line {}: {m}", n + 1)))?;
        }
        let missing = |k: &str| bad(format!("field '{k}' is missing"));
        let nar_size = nar_size.ok_or_else(|| missing("NarSize"))?;
        if nar_size == 0 {
            return Err(bad("field 'NarSize' is 0".into()));
        }
        Ok(NarInfo {
            path: path.ok_or_else(|| missing("StorePath"))?,
            url: url.ok_or_else(|| missing("URL"))?,
            compression: compression.unwrap_or_else(|| "bzip2".to_owned()),
            file_hash,
            file_size,
            nar_hash: nar_hash.ok_or_else(|| missing("NarHash"))?,
            nar_size,
            references: references.unwrap_or_default(),
            deriver: deriver.flatten(),
            system,
            sigs,
            ca,
        })
    }
}
