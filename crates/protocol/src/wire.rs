//! The primitives of Nix's serialisation (`libutil/serialise.{hh,cc}`), shared by the
//! worker and the serve protocol.
//!
//! ```text
//! int        = u64 little-endian (8 bytes)
//! bool       = int 0 | int 1                       (anything else is an error)
//! bytes      = int len, len bytes, zero padding to a multiple of 8
//! string     = bytes (UTF-8 where firn reads it as text)
//! list<T>    = int n, n × T                        (sets: the same; written sorted)
//! map<K,V>   = int n, n × (K, V)
//! path       = string "<store dir>/<hash>-<name>"  (parsed against the StoreDir)
//! opt-path   = string, "" for none                 (likewise optional content addresses)
//! framed     = { int len (≥ 1), len raw bytes (no padding) }, int 0
//! fields     = int n, n × (int 0, int | int 1, string)   (the logger's Fields)
//! ```
//!
//! A [`Reader`] reads these from any [`Read`], counting the bytes it consumed so that
//! every error carries the offset at which it was found and the name of the field. Every
//! length (strings, frames) and count (lists, maps) is checked against [`Limits`] before
//! anything is allocated, and strings are read incrementally, so a huge length in a short
//! input costs neither memory nor time. A [`Writer`] writes them to any [`Write`].
//!
//! Narrowing reads follow `readNum<T>`: a value too large for the target type is an error,
//! never truncated.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read, Write};

use firn_derivation::{StoreDir, StorePath, StorePathError};
use thiserror::Error;

/// The smallest chunk a string read grows its buffer by; strings are read in pieces of at
/// most this many bytes beyond what has arrived.
const READ_STEP: usize = 64 * 1024;

/// Hard limits on what a [`Reader`] accepts. Exceeding one is [`WireError::TooLong`] or
/// [`WireError::TooMany`], raised before any allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest string or byte string (default 64 MiB: a build's environment, an
    /// AddTextToStore text).
    pub max_string: u64,
    /// Most items in a list, set or map, and fields of a log message (default 1 Mi).
    pub max_items: u64,
    /// Longest single chunk of a framed stream (default 64 MiB; Nix's senders write at
    /// most 32 KiB at a time).
    pub max_frame: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_string: 64 << 20,
            max_items: 1 << 20,
            max_frame: 64 << 20,
        }
    }
}

/// Why bytes could not be read as what was expected. `pos` is the offset (in bytes
/// consumed by the [`Reader`]) where the faulty item starts; `what` names the field.
#[derive(Debug, Error)]
pub enum WireError {
    #[error("unexpected end of input at byte {pos} reading {what}")]
    Eof { pos: u64, what: &'static str },
    #[error("I/O error at byte {pos} reading {what}: {source}")]
    Io {
        pos: u64,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("at byte {pos}: {what} is {value}, more than the largest allowed, {max}")]
    Overflow {
        pos: u64,
        what: &'static str,
        value: u64,
        max: u64,
    },
    #[error("at byte {pos}: {what} must be 0 or 1, not {value}")]
    BadBool {
        pos: u64,
        what: &'static str,
        value: u64,
    },
    #[error("at byte {pos}: {what} has length {len}, over the limit of {limit}")]
    TooLong {
        pos: u64,
        what: &'static str,
        len: u64,
        limit: u64,
    },
    #[error("at byte {pos}: {what} has {count} items, over the limit of {limit}")]
    TooMany {
        pos: u64,
        what: &'static str,
        count: u64,
        limit: u64,
    },
    #[error("at byte {pos}: non-zero padding after {what}")]
    NonZeroPadding { pos: u64, what: &'static str },
    #[error("at byte {pos}: {what} is not valid UTF-8")]
    NotUtf8 { pos: u64, what: &'static str },
    #[error("at byte {pos}: {what}: {source}")]
    StorePath {
        pos: u64,
        what: &'static str,
        #[source]
        source: StorePathError,
    },
    #[error("at byte {pos}: {what}: unknown field type {value} (0 int, 1 string)")]
    BadFieldType {
        pos: u64,
        what: &'static str,
        value: u64,
    },
    #[error("at byte {pos}: {what}: {message}")]
    Invalid {
        pos: u64,
        what: &'static str,
        message: String,
    },
}

impl WireError {
    /// The offset the error was found at.
    pub fn position(&self) -> u64 {
        match self {
            Self::Eof { pos, .. }
            | Self::Io { pos, .. }
            | Self::Overflow { pos, .. }
            | Self::BadBool { pos, .. }
            | Self::TooLong { pos, .. }
            | Self::TooMany { pos, .. }
            | Self::NonZeroPadding { pos, .. }
            | Self::NotUtf8 { pos, .. }
            | Self::StorePath { pos, .. }
            | Self::BadFieldType { pos, .. }
            | Self::Invalid { pos, .. } => *pos,
        }
    }

    /// True if the input simply ended (a peer that hung up), as opposed to bad bytes.
    pub fn is_eof(&self) -> bool {
        matches!(self, Self::Eof { .. })
    }
}

/// Shorthand for results of this module.
pub type WireResult<T> = Result<T, WireError>;

/// One value of the logger's `Fields` (activity and result messages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Field {
    /// Type 0.
    Int(u64),
    /// Type 1; bytes, since build log lines need not be UTF-8.
    String(Vec<u8>),
}

impl From<u64> for Field {
    fn from(v: u64) -> Self {
        Self::Int(v)
    }
}

impl From<&str> for Field {
    fn from(v: &str) -> Self {
        Self::String(v.as_bytes().to_vec())
    }
}

/// Reads Nix's primitives from `R`, counting bytes, within [`Limits`].
#[derive(Debug)]
pub struct Reader<R> {
    inner: R,
    pos: u64,
    limits: Limits,
    store_dir: StoreDir,
}

impl<R: Read> Reader<R> {
    /// A reader with the default limits and store directory `/nix/store`.
    pub fn new(inner: R) -> Self {
        Self::with_config(inner, StoreDir::default(), Limits::default())
    }

    /// A reader that parses store paths against `store_dir`, within `limits`.
    pub fn with_config(inner: R, store_dir: StoreDir, limits: Limits) -> Self {
        Self {
            inner,
            pos: 0,
            limits,
            store_dir,
        }
    }

    /// Bytes consumed so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    pub fn store_dir(&self) -> &StoreDir {
        &self.store_dir
    }

    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    pub fn into_inner(self) -> R {
        self.inner
    }

    /// Fill `buf` exactly; `at` is the position errors name.
    fn fill(&mut self, buf: &mut [u8], at: u64, what: &'static str) -> WireResult<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.inner.read(&mut buf[done..]) {
                Ok(0) => return Err(WireError::Eof { pos: at, what }),
                Ok(n) => {
                    done += n;
                    self.pos += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(WireError::Io {
                        pos: at,
                        what,
                        source: e,
                    })
                }
            }
        }
        Ok(())
    }

    /// Read up to `buf.len()` raw bytes (for framed streams and raw NARs); 0 at the end.
    pub fn read_raw(&mut self, buf: &mut [u8], what: &'static str) -> WireResult<usize> {
        loop {
            match self.inner.read(buf) {
                Ok(n) => {
                    self.pos += n as u64;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(WireError::Io {
                        pos: self.pos,
                        what,
                        source: e,
                    })
                }
            }
        }
    }

    /// Read exactly `buf.len()` raw bytes.
    pub fn read_exact_raw(&mut self, buf: &mut [u8], what: &'static str) -> WireResult<()> {
        let at = self.pos;
        self.fill(buf, at, what)
    }

    /// A u64.
    pub fn read_u64(&mut self, what: &'static str) -> WireResult<u64> {
        let mut b = [0u8; 8];
        let at = self.pos;
        self.fill(&mut b, at, what)?;
        Ok(u64::from_le_bytes(b))
    }

    /// A u64 that must not exceed `max` (`readNum<T>`); `pos` in the error is the int's.
    pub fn read_u64_max(&mut self, max: u64, what: &'static str) -> WireResult<u64> {
        let pos = self.pos;
        let value = self.read_u64(what)?;
        if value > max {
            return Err(WireError::Overflow {
                pos,
                what,
                value,
                max,
            });
        }
        Ok(value)
    }

    /// An `unsigned int` (`readInt`): values ≥ 2^32 are an error.
    pub fn read_u32(&mut self, what: &'static str) -> WireResult<u32> {
        let v = self.read_u64_max(u64::from(u32::MAX), what)?;
        Ok(u32::try_from(v).unwrap_or(u32::MAX))
    }

    /// A bool: exactly 0 or 1.
    pub fn read_bool(&mut self, what: &'static str) -> WireResult<bool> {
        let pos = self.pos;
        match self.read_u64(what)? {
            0 => Ok(false),
            1 => Ok(true),
            value => Err(WireError::BadBool { pos, what, value }),
        }
    }

    /// A count of list items, checked against the limit.
    pub fn read_count(&mut self, what: &'static str) -> WireResult<usize> {
        let pos = self.pos;
        let count = self.read_u64(what)?;
        if count > self.limits.max_items {
            return Err(WireError::TooMany {
                pos,
                what,
                count,
                limit: self.limits.max_items,
            });
        }
        usize::try_from(count).map_err(|_| WireError::TooMany {
            pos,
            what,
            count,
            limit: self.limits.max_items,
        })
    }

    /// The zero padding after `len` bytes of a string.
    fn read_padding(&mut self, len: u64, what: &'static str) -> WireResult<()> {
        let pad = ((8 - len % 8) % 8) as usize;
        if pad > 0 {
            let mut b = [0u8; 8];
            let at = self.pos;
            self.fill(&mut b[..pad], at, what)?;
            if b[..pad].iter().any(|&c| c != 0) {
                return Err(WireError::NonZeroPadding { pos: at, what });
            }
        }
        Ok(())
    }

    /// A byte string with its padding, at most `max_string` long.
    pub fn read_bytes(&mut self, what: &'static str) -> WireResult<Vec<u8>> {
        let pos = self.pos;
        let len = self.read_u64(what)?;
        if len > self.limits.max_string {
            return Err(WireError::TooLong {
                pos,
                what,
                len,
                limit: self.limits.max_string,
            });
        }
        let total = usize::try_from(len).map_err(|_| WireError::TooLong {
            pos,
            what,
            len,
            limit: self.limits.max_string,
        })?;
        // Grow as the data arrives: a lying length costs at most READ_STEP.
        let mut buf = Vec::with_capacity(total.min(READ_STEP));
        while buf.len() < total {
            let start = buf.len();
            let step = (total - start).min(READ_STEP);
            buf.resize(start + step, 0);
            let at = self.pos;
            self.fill(&mut buf[start..], at, what)?;
        }
        self.read_padding(len, what)?;
        Ok(buf)
    }

    /// A UTF-8 string.
    pub fn read_string(&mut self, what: &'static str) -> WireResult<String> {
        let pos = self.pos;
        let b = self.read_bytes(what)?;
        String::from_utf8(b).map_err(|_| WireError::NotUtf8 { pos, what })
    }

    /// A string that must equal `expected` (e.g. the `"Error"` of an error message).
    pub fn expect_string(&mut self, expected: &str, what: &'static str) -> WireResult<()> {
        let pos = self.pos;
        let s = self.read_bytes(what)?;
        if s != expected.as_bytes() {
            return Err(WireError::Invalid {
                pos,
                what,
                message: format!(
                    "expected '{expected}', got '{}'",
                    String::from_utf8_lossy(&s)
                ),
            });
        }
        Ok(())
    }

    /// A list of strings.
    pub fn read_string_list(&mut self, what: &'static str) -> WireResult<Vec<String>> {
        let n = self.read_count(what)?;
        let mut v = Vec::with_capacity(n.min(1024));
        for _ in 0..n {
            v.push(self.read_string(what)?);
        }
        Ok(v)
    }

    /// A list of byte strings.
    pub fn read_bytes_list(&mut self, what: &'static str) -> WireResult<Vec<Vec<u8>>> {
        let n = self.read_count(what)?;
        let mut v = Vec::with_capacity(n.min(1024));
        for _ in 0..n {
            v.push(self.read_bytes(what)?);
        }
        Ok(v)
    }

    /// A set of strings (duplicates collapse, as in `std::set`).
    pub fn read_string_set(&mut self, what: &'static str) -> WireResult<BTreeSet<String>> {
        Ok(self.read_string_list(what)?.into_iter().collect())
    }

    /// A map of strings; for a repeated key the first value wins (`std::map::emplace`).
    pub fn read_string_map(&mut self, what: &'static str) -> WireResult<BTreeMap<String, String>> {
        let n = self.read_count(what)?;
        let mut m = BTreeMap::new();
        for _ in 0..n {
            let k = self.read_string(what)?;
            let v = self.read_string(what)?;
            m.entry(k).or_insert(v);
        }
        Ok(m)
    }

    /// A full store path.
    pub fn read_store_path(&mut self, what: &'static str) -> WireResult<StorePath> {
        let pos = self.pos;
        let b = self.read_bytes(what)?;
        self.store_dir
            .parse_path(&b)
            .map_err(|source| WireError::StorePath { pos, what, source })
    }

    /// A store path or `""` for none.
    pub fn read_opt_store_path(&mut self, what: &'static str) -> WireResult<Option<StorePath>> {
        let pos = self.pos;
        let b = self.read_bytes(what)?;
        if b.is_empty() {
            return Ok(None);
        }
        self.store_dir
            .parse_path(&b)
            .map(Some)
            .map_err(|source| WireError::StorePath { pos, what, source })
    }

    /// A set of store paths.
    pub fn read_store_path_set(&mut self, what: &'static str) -> WireResult<BTreeSet<StorePath>> {
        Ok(self.read_store_path_list(what)?.into_iter().collect())
    }

    /// A list of store paths (order kept).
    pub fn read_store_path_list(&mut self, what: &'static str) -> WireResult<Vec<StorePath>> {
        let n = self.read_count(what)?;
        let mut v = Vec::with_capacity(n.min(1024));
        for _ in 0..n {
            v.push(self.read_store_path(what)?);
        }
        Ok(v)
    }

    /// The logger's `Fields`.
    pub fn read_fields(&mut self, what: &'static str) -> WireResult<Vec<Field>> {
        let n = self.read_count(what)?;
        let mut v = Vec::with_capacity(n.min(64));
        for _ in 0..n {
            let pos = self.pos;
            match self.read_u64(what)? {
                0 => v.push(Field::Int(self.read_u64(what)?)),
                1 => v.push(Field::String(self.read_bytes(what)?)),
                value => return Err(WireError::BadFieldType { pos, what, value }),
            }
        }
        Ok(v)
    }

    /// A reader of the framed stream that starts here. Read it to its end (or
    /// [`FramedReader::drain`] it) before reading what follows.
    pub fn framed(&mut self) -> FramedReader<'_, R> {
        FramedReader {
            reader: self,
            left: 0,
            done: false,
        }
    }
}

/// A framed stream being read: yields the chunks' bytes, then end of input at the 0
/// terminator. As an [`io::Read`], its errors are [`io::Error`]s wrapping a
/// [`WireError`] ([`FramedReader::read_chunk`] returns the typed error).
#[derive(Debug)]
pub struct FramedReader<'a, R> {
    reader: &'a mut Reader<R>,
    left: u64,
    done: bool,
}

impl<R: Read> FramedReader<'_, R> {
    /// True once the terminator was read.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Read some data into `buf`: 0 only at the terminator (or for an empty `buf`).
    pub fn read_chunk(&mut self, buf: &mut [u8]) -> WireResult<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        while self.left == 0 {
            if self.done {
                return Ok(0);
            }
            let pos = self.reader.pos;
            let len = self.reader.read_u64("frame length")?;
            if len == 0 {
                self.done = true;
                return Ok(0);
            }
            let limit = self.reader.limits.max_frame;
            if len > limit {
                return Err(WireError::TooLong {
                    pos,
                    what: "frame",
                    len,
                    limit,
                });
            }
            self.left = len;
        }
        let want = usize::try_from(self.left)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let at = self.reader.pos;
        self.reader.fill(&mut buf[..want], at, "frame data")?;
        self.left -= want as u64;
        Ok(want)
    }

    /// Read everything up to the terminator and throw it away (what `FramedSource`'s
    /// destructor does); returns the number of data bytes skipped.
    pub fn drain(&mut self) -> WireResult<u64> {
        let mut buf = [0u8; 8192];
        let mut total = 0u64;
        loop {
            let n = self.read_chunk(&mut buf)?;
            if n == 0 {
                return Ok(total);
            }
            total += n as u64;
        }
    }

    /// Read the whole stream into memory, at most `max` bytes (else [`WireError::TooLong`]).
    pub fn read_to_vec(&mut self, max: u64) -> WireResult<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            let pos = self.reader.pos;
            let n = self.read_chunk(&mut buf)?;
            if n == 0 {
                return Ok(out);
            }
            if (out.len() + n) as u64 > max {
                return Err(WireError::TooLong {
                    pos,
                    what: "framed data",
                    len: (out.len() + n) as u64,
                    limit: max,
                });
            }
            out.extend_from_slice(&buf[..n]);
        }
    }
}

impl<R: Read> Read for FramedReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_chunk(buf).map_err(|e| match e {
            WireError::Eof { .. } => io::Error::new(io::ErrorKind::UnexpectedEof, e),
            e => io::Error::other(e),
        })
    }
}

/// Writes Nix's primitives to `W`.
#[derive(Debug)]
pub struct Writer<W> {
    inner: W,
    store_dir: StoreDir,
}

impl<W: Write> Writer<W> {
    /// A writer for store directory `/nix/store`.
    pub fn new(inner: W) -> Self {
        Self::with_store_dir(inner, StoreDir::default())
    }

    pub fn with_store_dir(inner: W, store_dir: StoreDir) -> Self {
        Self { inner, store_dir }
    }

    pub fn store_dir(&self) -> &StoreDir {
        &self.store_dir
    }

    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    pub fn into_inner(self) -> W {
        self.inner
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }

    /// Raw bytes, no length or padding (a NAR after NarFromPath, a serve dump).
    pub fn write_raw(&mut self, b: &[u8]) -> io::Result<()> {
        self.inner.write_all(b)
    }

    pub fn write_u64(&mut self, v: u64) -> io::Result<()> {
        self.inner.write_all(&v.to_le_bytes())
    }

    pub fn write_bool(&mut self, v: bool) -> io::Result<()> {
        self.write_u64(u64::from(v))
    }

    /// A byte string with its padding.
    pub fn write_bytes(&mut self, b: &[u8]) -> io::Result<()> {
        self.write_u64(b.len() as u64)?;
        self.inner.write_all(b)?;
        let pad = (8 - b.len() % 8) % 8;
        self.inner.write_all(&[0u8; 8][..pad])
    }

    pub fn write_str(&mut self, s: &str) -> io::Result<()> {
        self.write_bytes(s.as_bytes())
    }

    /// A list (or set) of strings, in the iterator's order.
    pub fn write_strings<I, S>(&mut self, items: I) -> io::Result<()>
    where
        I: IntoIterator<Item = S>,
        I::IntoIter: ExactSizeIterator,
        S: AsRef<[u8]>,
    {
        let it = items.into_iter();
        self.write_u64(it.len() as u64)?;
        for s in it {
            self.write_bytes(s.as_ref())?;
        }
        Ok(())
    }

    /// A map of strings.
    pub fn write_string_map<K: AsRef<[u8]>, V: AsRef<[u8]>>(
        &mut self,
        m: &BTreeMap<K, V>,
    ) -> io::Result<()> {
        self.write_u64(m.len() as u64)?;
        for (k, v) in m {
            self.write_bytes(k.as_ref())?;
            self.write_bytes(v.as_ref())?;
        }
        Ok(())
    }

    /// A full store path.
    pub fn write_store_path(&mut self, p: &StorePath) -> io::Result<()> {
        let s = self.store_dir.display(p);
        self.write_str(&s)
    }

    /// A store path or `""`.
    pub fn write_opt_store_path(&mut self, p: Option<&StorePath>) -> io::Result<()> {
        match p {
            Some(p) => self.write_store_path(p),
            None => self.write_str(""),
        }
    }

    /// A list or set of store paths, in the iterator's order.
    pub fn write_store_paths<'a, I>(&mut self, paths: I) -> io::Result<()>
    where
        I: IntoIterator<Item = &'a StorePath>,
        I::IntoIter: ExactSizeIterator,
    {
        let it = paths.into_iter();
        self.write_u64(it.len() as u64)?;
        for p in it {
            self.write_store_path(p)?;
        }
        Ok(())
    }

    /// The logger's `Fields`.
    pub fn write_fields(&mut self, fields: &[Field]) -> io::Result<()> {
        self.write_u64(fields.len() as u64)?;
        for f in fields {
            match f {
                Field::Int(i) => {
                    self.write_u64(0)?;
                    self.write_u64(*i)?;
                }
                Field::String(s) => {
                    self.write_u64(1)?;
                    self.write_bytes(s)?;
                }
            }
        }
        Ok(())
    }

    /// A framed stream starting here; [`FramedWriter::finish`] writes the terminator.
    pub fn framed(&mut self) -> FramedWriter<'_, W> {
        FramedWriter {
            writer: self,
            finished: false,
        }
    }

    /// `data` as one framed stream (one chunk unless empty, then the terminator).
    pub fn write_framed(&mut self, data: &[u8]) -> io::Result<()> {
        let mut f = self.framed();
        f.write_all(data)?;
        f.finish()
    }
}

/// A framed stream being written: every non-empty `write` is one chunk.
#[derive(Debug)]
pub struct FramedWriter<'a, W: Write> {
    writer: &'a mut Writer<W>,
    finished: bool,
}

impl<W: Write> FramedWriter<'_, W> {
    /// Write the 0 terminator.
    pub fn finish(mut self) -> io::Result<()> {
        self.finished = true;
        self.writer.write_u64(0)
    }

    /// True once [`FramedWriter::finish`] ran (for callers holding it by reference).
    pub fn is_finished(&self) -> bool {
        self.finished
    }
}

impl<W: Write> Write for FramedWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        self.writer.write_u64(buf.len() as u64)?;
        self.writer.inner.write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.writer.flush()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn reader(b: &[u8]) -> Reader<&[u8]> {
        Reader::new(b)
    }

    #[test]
    fn string_padding_and_positions() {
        let mut w = Writer::new(Vec::new());
        w.write_str("abc").unwrap();
        w.write_u64(7).unwrap();
        let b = w.into_inner();
        assert_eq!(b.len(), 8 + 8 + 8);
        assert_eq!(&b[8..16], b"abc\0\0\0\0\0");
        let mut r = reader(&b);
        assert_eq!(r.read_string("s").unwrap(), "abc");
        assert_eq!(r.position(), 16);
        assert_eq!(r.read_u64("n").unwrap(), 7);
    }

    #[test]
    fn bad_padding_is_an_error() {
        let mut b = 3u64.to_le_bytes().to_vec();
        b.extend_from_slice(b"abc\0\0\x01\0\0");
        let e = reader(&b).read_string("name").unwrap_err();
        assert!(
            matches!(e, WireError::NonZeroPadding { pos: 11, .. }),
            "{e}"
        );
    }

    #[test]
    fn huge_length_is_refused_before_allocation() {
        let b = u64::MAX.to_le_bytes();
        let e = reader(&b).read_bytes("x").unwrap_err();
        assert!(matches!(e, WireError::TooLong { pos: 0, .. }), "{e}");
        // Under the limit but far longer than the input: an EOF, not a 60 MiB buffer.
        let b = (60u64 << 20).to_le_bytes();
        let e = reader(&b).read_bytes("x").unwrap_err();
        assert!(e.is_eof(), "{e}");
        let b = u64::MAX.to_le_bytes();
        let e = reader(&b).read_string_list("l").unwrap_err();
        assert!(matches!(e, WireError::TooMany { .. }), "{e}");
    }

    #[test]
    fn bools_and_narrowing() {
        let b = 2u64.to_le_bytes();
        assert!(matches!(
            reader(&b).read_bool("flag").unwrap_err(),
            WireError::BadBool { value: 2, .. }
        ));
        let b = (1u64 << 32).to_le_bytes();
        assert!(matches!(
            reader(&b).read_u32("n").unwrap_err(),
            WireError::Overflow { .. }
        ));
        let b = u64::from(u32::MAX).to_le_bytes();
        assert_eq!(reader(&b).read_u32("n").unwrap(), u32::MAX);
    }

    #[test]
    fn framed_round_trip_and_drain() {
        let mut w = Writer::new(Vec::new());
        {
            let mut f = w.framed();
            f.write_all(b"hello ").unwrap();
            f.write_all(b"").unwrap();
            f.write_all(b"world").unwrap();
            f.finish().unwrap();
        }
        w.write_u64(42).unwrap();
        let b = w.into_inner();
        // 6 and 5 bytes unpadded.
        assert_eq!(b.len(), 8 + 6 + 8 + 5 + 8 + 8);
        let mut r = reader(&b);
        let data = r.framed().read_to_vec(100).unwrap();
        assert_eq!(data, b"hello world");
        assert_eq!(r.read_u64("after").unwrap(), 42);
        let mut r = reader(&b);
        assert_eq!(r.framed().drain().unwrap(), 11);
        assert_eq!(r.read_u64("after").unwrap(), 42);
        // Truncated: an error, not a hang or a panic.
        let mut r = reader(&b[..12]);
        assert!(r.framed().drain().unwrap_err().is_eof());
        let mut r = reader(&b);
        assert!(matches!(
            r.framed().read_to_vec(3).unwrap_err(),
            WireError::TooLong { .. }
        ));
    }

    #[test]
    fn store_paths_and_fields() {
        let p = StoreDir::default()
            .parse("/nix/store/qhk42s8j7kqg82l6ncz33d8xx332vz9f-single")
            .unwrap();
        let mut w = Writer::new(Vec::new());
        w.write_opt_store_path(Some(&p)).unwrap();
        w.write_opt_store_path(None).unwrap();
        w.write_fields(&[Field::Int(5), Field::from("x")]).unwrap();
        w.write_str("/tmp/x").unwrap();
        w.write_u64(1).unwrap();
        w.write_u64(2).unwrap();
        let b = w.into_inner();
        let mut r = reader(&b);
        assert_eq!(r.read_opt_store_path("p").unwrap(), Some(p));
        assert_eq!(r.read_opt_store_path("p").unwrap(), None);
        assert_eq!(
            r.read_fields("f").unwrap(),
            vec![Field::Int(5), Field::String(b"x".to_vec())]
        );
        let e = r.read_store_path("p").unwrap_err();
        assert!(matches!(e, WireError::StorePath { .. }), "{e}");
        assert!(matches!(
            r.read_fields("f").unwrap_err(),
            WireError::BadFieldType { value: 2, .. }
        ));
    }
}
