//! Signing keys and signatures as Nix 2.8 has them (libsodium's ed25519, here
//! `ed25519-dalek`):
//!
//! - a secret key is `NAME:base64(seed ‖ public key)` (64 bytes), a public key
//!   `NAME:base64(public key)` (32 bytes), written without a trailing newline (a
//!   trailing newline or space is tolerated when reading, as Nix does);
//! - a path's fingerprint is `1;<path>;<narHash sha256:nixbase32>;<narSize>;<refs>`
//!   with the references' full paths sorted and joined by commas ([`fingerprint`]);
//! - a signature is `NAME:base64(64-byte detached signature)`; it is checked with the
//!   key of that name in `trusted-public-keys` (an unknown name, a bad length or bad
//!   base64 is simply not a valid signature).

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use firn_derivation::{Hash, StoreDir, StorePath};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum KeyError {
    /// `what` says where the key came from (a file, "standard input", a setting).
    #[error("{what}: key is corrupt: {msg}")]
    Corrupt { what: String, msg: String },
    #[error(
        "reading the key file '{path}': {}",
        firn_store::error::strerror(source)
    )]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot get random bytes for a new key: {0}")]
    Random(String),
}

/// A key name must be non-empty and, since it is written before a `:`, hold no colon
/// or whitespace (Nix does not check; a name with them makes keys no one can parse).
fn check_name(what: &str, name: &str) -> Result<(), KeyError> {
    if name.is_empty() || name.contains(|c: char| c == ':' || c.is_whitespace()) {
        return Err(KeyError::Corrupt {
            what: what.to_owned(),
            msg: format!("bad key name '{name}'"),
        });
    }
    Ok(())
}

/// Split `NAME:base64` and decode the base64.
fn split<'a>(what: &str, text: &'a str) -> Result<(&'a str, Vec<u8>), KeyError> {
    let text = text.trim_end_matches(['\n', '\r', ' ', '\t']);
    let corrupt = |msg: &str| KeyError::Corrupt {
        what: what.to_owned(),
        msg: msg.to_owned(),
    };
    let (name, b64) = text.split_once(':').ok_or_else(|| corrupt("no ':'"))?;
    check_name(what, name)?;
    let bytes = STANDARD
        .decode(b64)
        .map_err(|e| corrupt(&format!("bad base64: {e}")))?;
    Ok((name, bytes))
}

/// A secret key.
#[derive(Clone)]
pub struct SecretKey {
    pub name: String,
    key: SigningKey,
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretKey")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl SecretKey {
    /// A new key from the system's random source.
    pub fn generate(name: &str) -> Result<Self, KeyError> {
        check_name("key name", name)?;
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| KeyError::Random(e.to_string()))?;
        Ok(Self {
            name: name.to_owned(),
            key: SigningKey::from_bytes(&seed),
        })
    }

    /// Parse `NAME:base64(64 bytes)`; `what` names the source in errors. The public
    /// half must be the one the seed gives.
    pub fn parse(what: &str, text: &str) -> Result<Self, KeyError> {
        let (name, bytes) = split(what, text)?;
        let bytes: [u8; 64] = bytes.try_into().map_err(|b: Vec<u8>| KeyError::Corrupt {
            what: what.to_owned(),
            msg: format!("a secret key has 64 bytes, this one {}", b.len()),
        })?;
        let key = SigningKey::from_keypair_bytes(&bytes).map_err(|_| KeyError::Corrupt {
            what: what.to_owned(),
            msg: "its public half does not belong to its secret half".into(),
        })?;
        Ok(Self {
            name: name.to_owned(),
            key,
        })
    }

    /// Read a secret key file (`secret-key-files`, `--key-file`, `?secret-key=`).
    pub fn read_file(path: &Path) -> Result<Self, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&format!("key file '{}'", path.display()), &text)
    }

    /// `NAME:base64`, no newline (as `nix-store --generate-binary-cache-key` writes it).
    pub fn to_text(&self) -> String {
        format!(
            "{}:{}",
            self.name,
            STANDARD.encode(self.key.to_keypair_bytes())
        )
    }

    pub fn public(&self) -> PublicKey {
        PublicKey {
            name: self.name.clone(),
            key: self.key.verifying_key(),
        }
    }

    /// `NAME:base64(signature of fingerprint)`.
    pub fn sign(&self, fingerprint: &str) -> String {
        let sig = self.key.sign(fingerprint.as_bytes());
        format!("{}:{}", self.name, STANDARD.encode(sig.to_bytes()))
    }
}

/// A public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    pub name: String,
    key: VerifyingKey,
}

impl PublicKey {
    /// Parse `NAME:base64(32 bytes)`.
    pub fn parse(what: &str, text: &str) -> Result<Self, KeyError> {
        let (name, bytes) = split(what, text)?;
        let corrupt = |msg: String| KeyError::Corrupt {
            what: what.to_owned(),
            msg,
        };
        let bytes: [u8; 32] = bytes.try_into().map_err(|b: Vec<u8>| {
            corrupt(format!("a public key has 32 bytes, this one {}", b.len()))
        })?;
        let key = VerifyingKey::from_bytes(&bytes)
            .map_err(|_| corrupt("not a point of the curve".into()))?;
        Ok(Self {
            name: name.to_owned(),
            key,
        })
    }

    pub fn to_text(&self) -> String {
        format!("{}:{}", self.name, STANDARD.encode(self.key.to_bytes()))
    }

    /// Whether `sig` (just the 64 bytes) signs `fingerprint`.
    fn verifies(&self, fingerprint: &str, sig: &[u8]) -> bool {
        let Ok(bytes) = <[u8; 64]>::try_from(sig) else {
            return false;
        };
        self.key
            .verify_strict(fingerprint.as_bytes(), &Signature::from_bytes(&bytes))
            .is_ok()
    }
}

/// The keys signatures are checked against, by name (`trusted-public-keys`, plus the
/// public halves of `secret-key-files`, as Nix does).
#[derive(Debug, Clone, Default)]
pub struct PublicKeys {
    keys: BTreeMap<String, PublicKey>,
}

impl PublicKeys {
    /// From the words of `trusted-public-keys`; `what` names the setting for errors.
    pub fn parse<'a>(
        what: &str,
        texts: impl IntoIterator<Item = &'a str>,
    ) -> Result<Self, KeyError> {
        let mut keys = Self::default();
        for t in texts {
            keys.add(PublicKey::parse(what, t)?);
        }
        Ok(keys)
    }

    pub fn add(&mut self, key: PublicKey) {
        self.keys.insert(key.name.clone(), key);
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Whether `sig` (`NAME:base64`) is a valid signature of `fingerprint` by the key
    /// named `NAME`.
    pub fn verify(&self, fingerprint: &str, sig: &str) -> bool {
        let Some((name, b64)) = sig.split_once(':') else {
            return false;
        };
        let Some(key) = self.keys.get(name) else {
            return false;
        };
        let Ok(bytes) = STANDARD.decode(b64) else {
            return false;
        };
        key.verifies(fingerprint, &bytes)
    }

    /// How many of `sigs` are valid signatures of `fingerprint` (by different keys).
    pub fn count_valid<'a>(
        &self,
        fingerprint: &str,
        sigs: impl IntoIterator<Item = &'a String>,
    ) -> usize {
        let mut by: BTreeSet<&str> = BTreeSet::new();
        for s in sigs {
            if self.verify(fingerprint, s) {
                by.insert(s.split_once(':').map_or("", |(n, _)| n));
            }
        }
        by.len()
    }
}

/// The keys a store trusts (`getDefaultPublicKeys`): the words of
/// `trusted-public-keys` and the public halves of the `secret-key-files`.
pub fn trusted_keys(
    trusted_public_keys: &[String],
    secret_key_files: &[String],
) -> Result<PublicKeys, KeyError> {
    let mut keys = PublicKeys::parse(
        "trusted-public-keys",
        trusted_public_keys.iter().map(|s| s.as_str()),
    )?;
    for f in secret_key_files {
        keys.add(SecretKey::read_file(std::path::Path::new(f))?.public());
    }
    Ok(keys)
}

/// `ValidPathInfo::fingerprint`: `1;<path>;sha256:<nixbase32>;<narSize>;<refs>`. `None`
/// when the NAR size is 0 (Nix refuses to make that fingerprint).
pub fn fingerprint(
    store_dir: &StoreDir,
    path: &StorePath,
    nar_hash: &Hash,
    nar_size: u64,
    references: &BTreeSet<StorePath>,
) -> Option<String> {
    if nar_size == 0 {
        return None;
    }
    let refs: Vec<String> = references.iter().map(|r| store_dir.display(r)).collect();
    Some(format!(
        "1;{};sha256:{};{};{}",
        store_dir.display(path),
        nar_hash.to_nixbase32(),
        nar_size,
        refs.join(",")
    ))
}

/// The fingerprint of a path the store knows.
pub fn info_fingerprint(store_dir: &StoreDir, info: &firn_store::ValidPathInfo) -> Option<String> {
    fingerprint(
        store_dir,
        &info.path,
        &info.nar_hash,
        info.nar_size,
        &info.references,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_sign() {
        let k = SecretKey::generate("test-1").unwrap();
        let text = k.to_text();
        assert_eq!(text.len(), 95);
        let back = SecretKey::parse("t", &format!("{text}\n")).unwrap();
        assert_eq!(back.to_text(), text);
        let pk = k.public();
        assert_eq!(pk.to_text().len(), 51);
        let mut keys = PublicKeys::default();
        keys.add(pk);
        let sig = k.sign("1;x");
        assert!(keys.verify("1;x", &sig));
        assert!(!keys.verify("1;y", &sig));
        let other = sig.replacen("test-1", "test-2", 1);
        assert!(!keys.verify("1;x", &other));
    }

    #[test]
    fn hostile_keys_are_errors_not_panics() {
        for bad in [
            "",
            ":",
            "name",
            "name:",
            ":AAAA",
            "na me:AAAA",
            "name:!!!!",
            "name:AAAA",
            "name:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        ] {
            assert!(SecretKey::parse("t", bad).is_err(), "{bad:?}");
            assert!(PublicKey::parse("t", bad).is_err(), "{bad:?}");
        }
        // A secret key whose public half is not its own.
        let k = SecretKey::generate("k").unwrap();
        let mut bytes = k.key.to_keypair_bytes();
        bytes[40] ^= 1;
        let forged = format!("k:{}", STANDARD.encode(bytes));
        assert!(SecretKey::parse("t", &forged).is_err());
        let keys = PublicKeys::default();
        for sig in ["", ":", "k:", "k:AAAA", "nocolon", "k:!!"] {
            assert!(!keys.verify("1;x", sig));
        }
    }
}
