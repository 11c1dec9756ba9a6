//! The check Nix makes when a path arrives with a content address (`ca` in the database
//! and in narinfos; parsed as `firn_derivation::ContentAddress`): the content must hash
//! to it (`LocalStore::hashCAPath`).
//!
//! Grammar (`parseContentAddress`): `text:sha256:<nixbase32>` (text with references:
//! `.drv` files, `builtins.toFile`) or `fixed:[r:]<algo>:<hash>` (flat file bytes, or
//! with `r:` the NAR).
//!
//! A recursive hash is taken *modulo the path's own hash part* (`HashModuloSink`): every
//! occurrence of the 32 characters in the NAR is hashed as 32 zero bytes, and the
//! offsets of the occurrences are hashed after the NAR as `|<offset>` each, so that a
//! path referring to itself has an address that does not depend on its own name. For
//! paths without self-references this is the plain NAR hash.

use std::io::{self, Write};
use std::path::Path;

use firn_derivation::{ContentAddress, FileIngestionMethod, Hash, HashAlgo, Hasher};

use crate::error::{io_err, StoreError};
use crate::nar;

/// How a content address hashes, and the hash it names.
fn method_and_hash(ca: &ContentAddress) -> (FileIngestionMethod, Hash) {
    match *ca {
        ContentAddress::Text(hash) => (FileIngestionMethod::Flat, hash),
        ContentAddress::Fixed { method, hash } => (method, hash),
    }
}

/// A sink hashing what it is given with every occurrence of `modulus` zeroed, then the
/// offsets of the occurrences (`HashModuloSink` over a `RewritingSink`).
pub struct HashModuloSink {
    modulus: Vec<u8>,
    hasher: Hasher,
    /// The last `modulus.len() - 1` bytes, which may start an occurrence.
    pending: Vec<u8>,
    /// Bytes passed on to the hasher so far.
    pos: u64,
    matches: Vec<u64>,
}

impl std::fmt::Debug for HashModuloSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HashModuloSink")
            .field("pos", &self.pos)
            .field("matches", &self.matches)
            .finish_non_exhaustive()
    }
}

impl HashModuloSink {
    pub fn new(algo: HashAlgo, modulus: &[u8]) -> Self {
        Self {
            modulus: modulus.to_vec(),
            hasher: Hasher::new(algo),
            pending: Vec::new(),
            pos: 0,
            matches: Vec::new(),
        }
    }

    pub fn finish(mut self) -> Hash {
        self.hasher.update(&self.pending);
        for m in &self.matches {
            self.hasher.update(format!("|{m}").as_bytes());
        }
        self.hasher.finish()
    }
}

impl Write for HashModuloSink {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let len = self.modulus.len();
        if len == 0 {
            self.hasher.update(data);
            return Ok(data.len());
        }
        let mut s = std::mem::take(&mut self.pending);
        s.extend_from_slice(data);
        let mut j = 0;
        // memmem, not a window-by-window compare: this runs over every byte imported.
        while let Some(k) = memchr::memmem::find(&s[j..], &self.modulus) {
            let at = j + k;
            self.matches.push(self.pos + at as u64);
            s[at..at + len].fill(0);
            j = at + len;
        }
        let keep = if s.len() < len { s.len() } else { len - 1 };
        let consumed = s.len() - keep;
        self.hasher.update(&s[..consumed]);
        self.pos += consumed as u64;
        self.pending = s.split_off(consumed);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The hash of the tree or file at `real` as content address `ca` computes it, modulo
/// `hash_part` (the path's own hash part).
pub fn hash_ca_path(real: &Path, ca: &ContentAddress, hash_part: &str) -> Result<Hash, StoreError> {
    let (method, expected) = method_and_hash(ca);
    let mut sink = HashModuloSink::new(expected.algo(), hash_part.as_bytes());
    match method {
        FileIngestionMethod::Recursive => nar::dump_path(real, &mut sink)?,
        FileIngestionMethod::Flat => {
            let mut f = std::fs::File::open(real).map_err(io_err(real))?;
            io::copy(&mut f, &mut sink).map_err(io_err(real))?;
        }
    }
    Ok(sink.finish())
}

/// Check that the content at `real` (not yet valid) is what `ca` says, as Nix's
/// `addToStore` does for an imported path (`ca hash mismatch importing path …`).
pub fn check_content_address(
    shown: &str,
    hash_part: &str,
    ca: &str,
    real: &Path,
) -> Result<(), StoreError> {
    let parsed = ContentAddress::parse(ca).map_err(|why| StoreError::BadContentAddress {
        path: shown.to_owned(),
        ca: ca.to_owned(),
        why,
    })?;
    let got = hash_ca_path(real, &parsed, hash_part)?;
    let specified = method_and_hash(&parsed).1;
    if got != specified {
        return Err(StoreError::ContentAddressMismatch {
            path: shown.to_owned(),
            specified: specified.to_string(),
            got: got.to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn modulo(chunks: &[&[u8]], modulus: &[u8]) -> Hash {
        let mut s = HashModuloSink::new(HashAlgo::Sha256, modulus);
        for c in chunks {
            s.write_all(c).unwrap();
        }
        s.finish()
    }

    fn sha256(b: &[u8]) -> Hash {
        let mut h = Hasher::new(HashAlgo::Sha256);
        h.update(b);
        h.finish()
    }

    #[test]
    fn modulo_zeroes_occurrences_and_hashes_their_offsets_across_chunks() {
        // Expected values built by hand from the definition, not by the sink.
        let want = sha256(b"ab\0\0\0cd\0\0\0|2|7");
        assert_eq!(modulo(&[b"abxyzcdxyz"], b"xyz"), want);
        assert_eq!(modulo(&[b"abx", b"y", b"zcdxy", b"z"], b"xyz"), want);
        assert_eq!(modulo(&[b"a", b"", b"bxyzcdxyz"], b"xyz"), want);
        // No occurrence: the plain hash.
        assert_eq!(modulo(&[b"abc", b"def"], b"xyz"), sha256(b"abcdef"));
        assert_eq!(modulo(&[b"xy"], b"xyz"), sha256(b"xy"));
    }

    #[test]
    fn parses_nix_content_addresses() {
        let h = "sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s";
        assert!(matches!(
            ContentAddress::parse(&format!("fixed:r:{h}")),
            Ok(ContentAddress::Fixed {
                method: FileIngestionMethod::Recursive,
                ..
            })
        ));
        assert!(matches!(
            ContentAddress::parse(&format!("fixed:{h}")),
            Ok(ContentAddress::Fixed {
                method: FileIngestionMethod::Flat,
                ..
            })
        ));
        assert!(matches!(
            ContentAddress::parse(&format!("text:{h}")),
            Ok(ContentAddress::Text(_))
        ));
        assert!(ContentAddress::parse("fixed:r:sha256:zzz").is_err());
        assert!(ContentAddress::parse("source:sha256:abc").is_err());
        assert!(ContentAddress::parse("text:md5:d41d8cd98f00b204e9800998ecf8427e").is_err());
    }
}
