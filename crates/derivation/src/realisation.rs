//! `DrvOutput` and `Realisation`: what a content-addressed derivation's output turned
//! out to be (experimental feature `ca-derivations`).
//!
//! A `DrvOutput` names an output by the derivation's (masked) modulo hash and the
//! output's name, written `sha256:<hex>!out`. A `Realisation` says which store path
//! that output is, with the realisations it depends on and signatures. Its JSON is what
//! Nix 2.8 writes (`Realisation::toJSON`, keys sorted as nlohmann prints them) and
//! sends over the worker protocol.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde_json::{Map, Value};
use thiserror::Error;

use crate::hash::{Hash, HashError};
use crate::store_path::{StorePath, StorePathError};

/// An output of a derivation, by the derivation's modulo hash (`DrvOutput`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DrvOutput {
    pub hash: Hash,
    pub output: String,
}

impl PartialOrd for DrvOutput {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for DrvOutput {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.str_hash(), &self.output).cmp(&(other.str_hash(), &other.output))
    }
}

/// A `DrvOutput` or `Realisation` that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RealisationError {
    #[error("invalid derivation output id '{0}'")]
    BadId(String),
    #[error("invalid derivation output id '{id}': {source}")]
    BadHash { id: String, source: HashError },
    #[error("Drv output info file '{whence}' is corrupt, missing field {field}")]
    MissingField { whence: String, field: &'static str },
    #[error("Drv output info file '{whence}' is corrupt: {msg}")]
    Corrupt { whence: String, msg: String },
    #[error(transparent)]
    StorePath(#[from] StorePathError),
}

impl DrvOutput {
    pub fn new(hash: Hash, output: impl Into<String>) -> Self {
        Self {
            hash,
            output: output.into(),
        }
    }

    /// `sha256:<hex>` (`strHash`), the `drvPath` column of the Realisations table.
    pub fn str_hash(&self) -> String {
        format!("{}:{}", self.hash.algo(), self.hash.to_base16())
    }

    /// `DrvOutput::parse`: `<hash>!<output>`, split at the last `!`; the hash prefixed
    /// by its algorithm (base16, nixbase32 or base64).
    pub fn parse(s: &str) -> Result<Self, RealisationError> {
        let (hash, output) = s
            .rsplit_once('!')
            .ok_or_else(|| RealisationError::BadId(s.to_owned()))?;
        let hash = Hash::parse_any(hash, None).map_err(|source| RealisationError::BadHash {
            id: s.to_owned(),
            source,
        })?;
        Ok(Self::new(hash, output))
    }
}

impl fmt::Display for DrvOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}!{}", self.str_hash(), self.output)
    }
}

/// Which store path an output of a derivation is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Realisation {
    pub id: DrvOutput,
    pub out_path: StorePath,
    pub signatures: BTreeSet<String>,
    /// The realisations of input derivations this output refers to.
    pub dependent_realisations: BTreeMap<DrvOutput, StorePath>,
}

impl Realisation {
    pub fn new(id: DrvOutput, out_path: StorePath) -> Self {
        Self {
            id,
            out_path,
            signatures: BTreeSet::new(),
            dependent_realisations: BTreeMap::new(),
        }
    }

    fn json_object(&self, with_signatures: bool) -> Map<String, Value> {
        let deps: Map<String, Value> = self
            .dependent_realisations
            .iter()
            .map(|(k, v)| (k.to_string(), Value::String(v.base_name().to_owned())))
            .collect();
        let mut m = Map::new();
        m.insert("dependentRealisations".into(), Value::Object(deps));
        m.insert("id".into(), Value::String(self.id.to_string()));
        m.insert(
            "outPath".into(),
            Value::String(self.out_path.base_name().to_owned()),
        );
        if with_signatures {
            m.insert(
                "signatures".into(),
                Value::Array(
                    self.signatures
                        .iter()
                        .map(|s| Value::String(s.clone()))
                        .collect(),
                ),
            );
        }
        m
    }

    /// `Realisation::toJSON().dump()`: keys sorted, no spaces, `outPath` the base name.
    pub fn to_json(&self) -> String {
        Value::Object(self.json_object(true)).to_string()
    }

    /// `Realisation::fingerprint`: the JSON without `signatures`, what is signed.
    pub fn fingerprint(&self) -> String {
        Value::Object(self.json_object(false)).to_string()
    }

    /// `Realisation::fromJSON`; `whence` names where it came from, for messages.
    pub fn from_json(text: &str, whence: &str) -> Result<Self, RealisationError> {
        let corrupt = |msg: String| RealisationError::Corrupt {
            whence: whence.to_owned(),
            msg,
        };
        let v: Value = serde_json::from_str(text).map_err(|e| corrupt(e.to_string()))?;
        let obj = v
            .as_object()
            .ok_or_else(|| corrupt("not an object".into()))?;
        let field = |name: &'static str| -> Result<&str, RealisationError> {
            obj.get(name)
                .and_then(Value::as_str)
                .ok_or(RealisationError::MissingField {
                    whence: whence.to_owned(),
                    field: name,
                })
        };
        let id = DrvOutput::parse(field("id")?)?;
        let out_path = StorePath::from_base_name(field("outPath")?.as_bytes())?;
        let mut signatures = BTreeSet::new();
        if let Some(sigs) = obj.get("signatures") {
            let sigs = sigs
                .as_array()
                .ok_or_else(|| corrupt("'signatures' is not a list".into()))?;
            for s in sigs {
                let s = s
                    .as_str()
                    .ok_or_else(|| corrupt("a signature is not a string".into()))?;
                signatures.insert(s.to_owned());
            }
        }
        let mut dependent_realisations = BTreeMap::new();
        if let Some(deps) = obj.get("dependentRealisations") {
            let deps = deps
                .as_object()
                .ok_or_else(|| corrupt("'dependentRealisations' is not an object".into()))?;
            for (k, v) in deps {
                let v = v.as_str().ok_or_else(|| {
                    corrupt(format!("'dependentRealisations.{k}' is not a string"))
                })?;
                dependent_realisations.insert(
                    DrvOutput::parse(k)?,
                    StorePath::from_base_name(v.as_bytes())?,
                );
            }
        }
        Ok(Self {
            id,
            out_path,
            signatures,
            dependent_realisations,
        })
    }

    /// `isCompatibleWith`: the same output path (signatures may differ).
    pub fn is_compatible_with(&self, other: &Realisation) -> bool {
        self.id == other.id && self.out_path == other.out_path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Recorded from real Nix 2.8 (`nix build --json` builtOutputs).
    const NIX: &str = r#"{"dependentRealisations":{},"id":"sha256:1b5a0c9c7d4e4e0d1f9b3b7e9d1c0b5e8f0a3c2d1e4f5a6b7c8d9e0f1a2b3c4d!out","outPath":"7r3fg0w1p2mzm4bxj4pxrhmlgqlxgnq3-rootCA","signatures":[]}"#;

    #[test]
    fn json_roundtrips_as_nix_writes_it() {
        let r = Realisation::from_json(NIX, "test").unwrap();
        assert_eq!(r.id.output, "out");
        assert_eq!(r.out_path.name(), "rootCA");
        assert_eq!(r.to_json(), NIX);
        assert_eq!(DrvOutput::parse(&r.id.to_string()).unwrap(), r.id);
        assert!(!r.fingerprint().contains("signatures"));
    }

    #[test]
    fn bad_ids_and_fields_are_errors() {
        assert!(DrvOutput::parse("sha256:00").is_err());
        assert!(DrvOutput::parse("nohash!out").is_err());
        let e = Realisation::from_json(r#"{"id":"x"}"#, "w").unwrap_err();
        assert!(matches!(e, RealisationError::BadId(_)), "{e}");
        let e = Realisation::from_json("{}", "w").unwrap_err();
        assert_eq!(
            e.to_string(),
            "Drv output info file 'w' is corrupt, missing field id"
        );
    }
}
