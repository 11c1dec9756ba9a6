//! NAR compression. Writing: `xz` (the default of binary caches), `zstd`, `bzip2` or
//! `none`. Reading as Nix 2.8 reads: `none` or `""` is raw; any other name is only a
//! hint, the format is recognised from the data (xz, zstd, bzip2), and raw data under
//! another name is `input compression not recognized`.

use std::io::{self, Read, Write};

use crate::error::CacheError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    None,
    #[default]
    Xz,
    Zstd,
    Bzip2,
}

impl Compression {
    pub fn parse(name: &str) -> Result<Self, CacheError> {
        match name {
            "none" => Ok(Self::None),
            "xz" => Ok(Self::Xz),
            "zstd" => Ok(Self::Zstd),
            "bzip2" => Ok(Self::Bzip2),
            other => Err(CacheError::UnknownCompression(other.to_owned())),
        }
    }

    /// The `Compression:` value.
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Xz => "xz",
            Self::Zstd => "zstd",
            Self::Bzip2 => "bzip2",
        }
    }

    /// What follows `.nar` in the file name.
    pub fn extension(self) -> &'static str {
        match self {
            Self::None => "",
            Self::Xz => ".xz",
            Self::Zstd => ".zst",
            Self::Bzip2 => ".bz2",
        }
    }

    /// A writer compressing into `out`; `finish` it to flush the end of the stream.
    pub fn encoder<'a, W: Write + 'a>(self, out: W) -> io::Result<Encoder<'a, W>> {
        Ok(match self {
            Self::None => Encoder::None(out),
            Self::Xz => Encoder::Xz(xz2::write::XzEncoder::new(out, 6)),
            Self::Zstd => Encoder::Zstd(zstd::stream::write::Encoder::new(out, 3)?),
            Self::Bzip2 => Encoder::Bzip2(bzip2::write::BzEncoder::new(
                out,
                bzip2::Compression::best(),
            )),
        })
    }
}

/// A compressing writer.
pub enum Encoder<'a, W: Write> {
    None(W),
    Xz(xz2::write::XzEncoder<W>),
    Zstd(zstd::stream::write::Encoder<'a, W>),
    Bzip2(bzip2::write::BzEncoder<W>),
}

impl<W: Write> std::fmt::Debug for Encoder<'_, W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Encoder")
    }
}

impl<W: Write> Encoder<'_, W> {
    /// End the stream and give the inner writer back.
    pub fn finish(self) -> io::Result<W> {
        match self {
            Self::None(w) => Ok(w),
            Self::Xz(e) => e.finish(),
            Self::Zstd(e) => e.finish(),
            Self::Bzip2(e) => e.finish(),
        }
    }
}

impl<W: Write> Write for Encoder<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::None(w) => w.write(buf),
            Self::Xz(e) => e.write(buf),
            Self::Zstd(e) => e.write(buf),
            Self::Bzip2(e) => e.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Self::None(w) => w.flush(),
            Self::Xz(e) => e.flush(),
            Self::Zstd(e) => e.flush(),
            Self::Bzip2(e) => e.flush(),
        }
    }
}

/// A reader giving the decompressed NAR of `input`, whose narinfo says `method`;
/// `file` names it in errors.
pub fn decoder<'a>(
    method: &str,
    mut input: Box<dyn Read + Send + 'a>,
    file: &str,
) -> Result<Box<dyn Read + Send + 'a>, CacheError> {
    if method.is_empty() || method == "none" {
        return Ok(input);
    }
    let mut magic = [0u8; 6];
    let mut n = 0;
    while n < magic.len() {
        match input.read(&mut magic[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(CacheError::Decompress {
                    file: file.to_owned(),
                    method: method.to_owned(),
                    source,
                })
            }
        }
    }
    let head = magic[..n].to_vec();
    let rejoined: Box<dyn Read + Send + 'a> = Box::new(io::Cursor::new(head.clone()).chain(input));
    if head.starts_with(&[0xFD, b'7', b'z', b'X', b'Z', 0]) {
        Ok(Box::new(xz2::read::XzDecoder::new_multi_decoder(rejoined)))
    } else if head.starts_with(&[0x28, 0xB5, 0x2F, 0xFD]) {
        let d = zstd::stream::read::Decoder::new(rejoined).map_err(|source| {
            CacheError::Decompress {
                file: file.to_owned(),
                method: method.to_owned(),
                source,
            }
        })?;
        Ok(Box::new(d))
    } else if head.starts_with(b"BZh") {
        Ok(Box::new(bzip2::read::MultiBzDecoder::new(rejoined)))
    } else {
        Err(CacheError::CompressionNotRecognized {
            file: file.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_raw_under_a_name() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        for c in [
            Compression::None,
            Compression::Xz,
            Compression::Zstd,
            Compression::Bzip2,
        ] {
            let mut enc = c.encoder(Vec::new()).unwrap();
            enc.write_all(&data).unwrap();
            let packed = enc.finish().unwrap();
            let mut out = Vec::new();
            decoder(c.name(), Box::new(&packed[..]), "t")
                .unwrap()
                .read_to_end(&mut out)
                .unwrap();
            assert_eq!(out, data, "{c:?}");
        }
        assert!(matches!(
            decoder("xz", Box::new(&b"nix-archive-1"[..]), "t"),
            Err(CacheError::CompressionNotRecognized { .. })
        ));
        // A truncated xz stream is an error, not a short success.
        let mut enc = Compression::Xz.encoder(Vec::new()).unwrap();
        enc.write_all(&data).unwrap();
        let packed = enc.finish().unwrap();
        let mut out = Vec::new();
        let r = decoder("xz", Box::new(&packed[..packed.len() / 2]), "t")
            .unwrap()
            .read_to_end(&mut out);
        assert!(r.is_err());
    }
}
