//! `builtin:unpack-channel` (what `nix-channel --update` builds): unpack the tarball
//! attribute `src` into attribute `out`, which must then hold exactly one entry, renamed
//! to attribute `channelName` (Nix 2.8 `builtins/unpack-channel.cc`).
//!
//! Nix reads the tarball with libarchive, whatever its compression; firn reads tar
//! archives plain or compressed with gzip, bzip2, xz or zstd (recognised by their
//! magic numbers, as libarchive does), which covers the channels' `nixexprs.tar.xz`
//! and `.tar.bz2`/`.tar.gz`. Entries that would leave `out` (`..`, through symlinks)
//! are not written. Modes and times need no care: the store canonicalises them.

use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use super::error::quoted;
use super::{Attrs, BuiltinError};

/// Run the builder with `attrs` (`out`, `channelName`, `src`).
pub fn unpack_channel(attrs: &Attrs) -> Result<(), BuiltinError> {
    let out = PathBuf::from(attrs.get("out")?);
    let channel_name = attrs.get("channelName")?;
    let src = PathBuf::from(attrs.get("src")?);
    fs::create_dir_all(&out).map_err(BuiltinError::sys(quoted("creating directory", &out)))?;
    unpack_tarfile(&src, &out)?;
    let entries: Vec<_> = fs::read_dir(&out)
        .and_then(|rd| {
            rd.map(|e| e.map(|e| e.file_name()))
                .collect::<Result<_, _>>()
        })
        .map_err(BuiltinError::sys(quoted("reading directory", &out)))?;
    let [entry] = &entries[..] else {
        return Err(BuiltinError::ChannelEntries(src));
    };
    fs::rename(out.join(entry), out.join(channel_name))
        .map_err(BuiltinError::sys("renaming channel directory"))
}

/// How a tarball is compressed, from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Bzip2,
    Xz,
    Zstd,
}

/// The compression whose magic number `head` starts with (none otherwise).
pub fn detect_compression(head: &[u8]) -> Compression {
    if head.starts_with(&[0x1f, 0x8b]) {
        Compression::Gzip
    } else if head.starts_with(b"BZh") {
        Compression::Bzip2
    } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        Compression::Xz
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Compression::Zstd
    } else {
        Compression::None
    }
}

/// Unpack the (possibly compressed) tar archive `tarball` into `dest` (Nix's
/// `unpackTarfile`).
pub fn unpack_tarfile(tarball: &Path, dest: &Path) -> Result<(), BuiltinError> {
    let archive_err = |source: io::Error| BuiltinError::Archive {
        context: format!("unpacking '{}'", tarball.display()),
        source,
    };
    let file = File::open(tarball).map_err(|source| BuiltinError::Archive {
        context: format!("failed to open archive '{}'", tarball.display()),
        source,
    })?;
    let mut input = BufReader::new(file);
    let head = input.fill_buf().map_err(archive_err)?;
    let reader: Box<dyn Read> = match detect_compression(head) {
        Compression::None => Box::new(input),
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(input)),
        Compression::Bzip2 => Box::new(bzip2::bufread::MultiBzDecoder::new(input)),
        Compression::Xz => Box::new(xz2::bufread::XzDecoder::new_multi_decoder(input)),
        Compression::Zstd => {
            Box::new(zstd::stream::read::Decoder::with_buffer(input).map_err(archive_err)?)
        }
    };
    fs::create_dir_all(dest).map_err(BuiltinError::sys(quoted("creating directory", dest)))?;
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.unpack(dest).map_err(archive_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magic_numbers() {
        assert_eq!(detect_compression(&[0x1f, 0x8b, 8]), Compression::Gzip);
        assert_eq!(detect_compression(b"BZh91AY"), Compression::Bzip2);
        assert_eq!(
            detect_compression(&[0xfd, b'7', b'z', b'X', b'Z', 0, 0]),
            Compression::Xz
        );
        assert_eq!(
            detect_compression(&[0x28, 0xb5, 0x2f, 0xfd]),
            Compression::Zstd
        );
        assert_eq!(detect_compression(b"nixexprs/"), Compression::None);
        assert_eq!(detect_compression(b""), Compression::None);
    }
}
