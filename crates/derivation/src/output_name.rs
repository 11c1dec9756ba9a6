//! [`OutputName`]: the name of a derivation output (`out`, `dev`, …), as the build, the
//! CLI (`DRV^out,dev`) and the protocols pass it around.
//!
//! Nix 2.8 keeps output names as plain strings; in a `.drv` they are byte strings like
//! every other field, but an output name becomes part of a store path name (and a JSON
//! key with structured attributes), so it must be UTF-8: [`OutputName::from_bytes`]
//! refuses anything else, as `Derivation::output_paths` does.

use std::borrow::Borrow;
use std::fmt;

/// An output name that is not UTF-8 (the lossy text of it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NonUtf8OutputName(pub String);

/// The name of one output of a derivation.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OutputName(String);

impl OutputName {
    /// The conventional default output.
    pub fn out() -> Self {
        Self("out".to_owned())
    }

    /// An output name from a `.drv`'s bytes.
    pub fn from_bytes(name: &[u8]) -> Result<Self, NonUtf8OutputName> {
        std::str::from_utf8(name)
            .map(|s| Self(s.to_owned()))
            .map_err(|_| NonUtf8OutputName(String::from_utf8_lossy(name).into_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl From<&str> for OutputName {
    fn from(s: &str) -> Self {
        Self(s.to_owned())
    }
}

impl From<String> for OutputName {
    fn from(s: String) -> Self {
        Self(s)
    }
}

impl Borrow<str> for OutputName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for OutputName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(OutputName::from_bytes(b"dev").unwrap().as_str(), "dev");
        assert!(OutputName::from_bytes(b"\xff").is_err());
        let mut m = std::collections::BTreeMap::new();
        m.insert(OutputName::out(), 1);
        assert_eq!(m.get("out"), Some(&1));
    }
}
