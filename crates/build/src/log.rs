//! A running build's log: the builder's output, bzip2-compressed, at
//! `LOG/drvs/<2 chars>/<rest>.bz2` (LOG is the store's log dir: `ROOT/nix/var/log/nix`,
//! `NIX_LOG_DIR`) (written under a temporary name and
//! renamed when the build is over, as Nix does), with the size so far (for
//! `max-build-log-size`), the time of the last output (for `max-silent-time`) and the
//! last lines (for messages and the progress line).
//!
//! Most builds say little: their output is kept in memory up to [`BUFFERED_MAX`] and
//! compressed when the build is over (with bzip2's smallest block, which holds all of
//! it), and an empty log is the 14 bytes of an empty bzip2 stream. Only a build that says
//! more gets a streaming encoder (some 5 MB of bzip2 state), for the rest of its life.

use std::collections::VecDeque;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use firn_derivation::StorePath;

/// How many lines of output are kept for messages unless told otherwise (Nix's
/// `log-lines` default).
pub const TAIL_LINES: usize = 10;

/// Where the build log of `drv` is kept, `log_dir` being the store's log directory
/// ([`firn_store::StoreLayout::log_dir`]), as Nix 2.8's `LocalStore::addBuildLog`.
pub fn log_path(log_dir: &Path, drv: &StorePath) -> PathBuf {
    let base = drv.base_name();
    log_dir
        .join("drvs")
        .join(&base[..2])
        .join(format!("{}.bz2", &base[2..]))
}

/// How much output is kept in memory before the log is compressed as it comes.
pub const BUFFERED_MAX: usize = 64 * 1024;

/// An empty bzip2 stream (block size 9): the header and the end-of-stream marker with a
/// combined CRC of 0, as `bzip2 < /dev/null` writes it.
const EMPTY_BZIP2: [u8; 14] = *b"BZh9\x17\x72\x45\x38\x50\x90\0\0\0\0";

/// Where a log's bytes go.
enum Sink {
    /// Not more than [`BUFFERED_MAX`] bytes so far, kept until the end.
    Buffered(File, Vec<u8>),
    /// Compressed as they come.
    Streaming(bzip2::write::BzEncoder<File>),
}

impl Sink {
    fn write(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            Sink::Buffered(_, buf) if buf.len() + data.len() <= BUFFERED_MAX => {
                buf.extend_from_slice(data);
                Ok(())
            }
            Sink::Buffered(file, buf) => {
                let file = file.try_clone()?;
                let mut enc = bzip2::write::BzEncoder::new(file, bzip2::Compression::default());
                enc.write_all(buf)?;
                enc.write_all(data)?;
                *self = Sink::Streaming(enc);
                Ok(())
            }
            Sink::Streaming(enc) => enc.write_all(data),
        }
    }

    fn finish(self) -> io::Result<()> {
        match self {
            Sink::Buffered(mut file, buf) if buf.is_empty() => file.write_all(&EMPTY_BZIP2),
            Sink::Buffered(file, buf) => {
                let mut enc = bzip2::write::BzEncoder::new(file, bzip2::Compression::fast());
                enc.write_all(&buf)?;
                enc.finish().map(drop)
            }
            Sink::Streaming(enc) => enc.finish().map(drop),
        }
    }
}

/// The log of one build.
pub struct BuildLog {
    file: Option<Sink>,
    tmp: PathBuf,
    path: PathBuf,
    /// Bytes of output so far.
    pub size: u64,
    pub started: Instant,
    pub last_output: Instant,
    tail: VecDeque<String>,
    /// How many lines `tail` keeps (at least one, for the progress line).
    tail_lines: usize,
    partial: Vec<u8>,
    /// Where the next byte of the unfinished line goes (a carriage return moves it back).
    column: usize,
}

impl std::fmt::Debug for BuildLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BuildLog")
            .field("path", &self.path)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl BuildLog {
    /// Start the log at `path` (its directory is created), keeping the last
    /// [`TAIL_LINES`] lines.
    pub fn create(path: PathBuf) -> io::Result<Self> {
        Self::with_tail(path, TAIL_LINES)
    }

    /// [`BuildLog::create`], keeping the last `tail_lines` lines (`log-lines`).
    pub fn with_tail(path: PathBuf, tail_lines: usize) -> io::Result<Self> {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
        let file = File::create(&tmp)?;
        let now = Instant::now();
        Ok(Self {
            file: Some(Sink::Buffered(file, Vec::new())),
            tmp,
            path,
            size: 0,
            started: now,
            last_output: now,
            tail: VecDeque::new(),
            tail_lines: tail_lines.max(1),
            partial: Vec::new(),
            column: 0,
        })
    }

    /// Output of the builder, as it came.
    pub fn write(&mut self, data: &[u8]) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        self.last_output = Instant::now();
        self.size += data.len() as u64;
        if let Some(f) = &mut self.file {
            f.write(data)?;
        }
        for &b in data {
            match b {
                b'\n' => {
                    let line = String::from_utf8_lossy(&self.partial).into_owned();
                    self.partial.clear();
                    self.column = 0;
                    self.tail.push_back(line);
                    if self.tail.len() > self.tail_lines {
                        self.tail.pop_front();
                    }
                }
                // A carriage return goes back to the start of the line, as on a terminal
                // and in Nix's `handleChildOutput`: what follows overwrites, so "a\r\n"
                // (ssh's line ends) is "a".
                b'\r' => self.column = 0,
                _ => {
                    match self.partial.get_mut(self.column) {
                        Some(c) => *c = b,
                        None => self.partial.push(b),
                    }
                    self.column += 1;
                }
            }
        }
        Ok(())
    }

    /// The last complete line of output.
    pub fn last_line(&self) -> Option<&str> {
        self.tail.back().map(String::as_str)
    }

    /// The last lines of output (at most the `tail_lines` it was made with).
    pub fn tail(&self) -> impl Iterator<Item = &str> {
        self.tail.iter().map(String::as_str)
    }

    /// Where the finished log is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Remove the unfinished log file (a build that never started has no log); what was
    /// said stays readable here.
    pub fn discard(&mut self) {
        if self.file.take().is_some() {
            let _ = fs::remove_file(&self.tmp);
        }
    }

    /// Finish the log file and rename it into place. Not synced: a log is not store
    /// content, and an fsync per build is a measurable part of a trivial build.
    pub fn finish(&mut self) -> io::Result<()> {
        if let Some(sink) = self.file.take() {
            sink.finish()?;
            fs::rename(&self.tmp, &self.path)?;
        }
        Ok(())
    }
}

impl Drop for BuildLog {
    fn drop(&mut self) {
        self.discard();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_tail_size_and_file() {
        let dir = std::env::temp_dir().join(format!("firn-log-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let sd = firn_derivation::StoreDir::default();
        let drv = sd
            .parse("/nix/store/qhk42s8j7kqg82l6ncz33d8xx332vz9f-x.drv")
            .unwrap();
        let path = log_path(&dir, &drv);
        assert_eq!(
            path,
            dir.join("drvs/qh/k42s8j7kqg82l6ncz33d8xx332vz9f-x.drv.bz2")
        );
        let mut log = BuildLog::create(path.clone()).unwrap();
        log.write(b"one\ntwo\rTWO\nthr").unwrap();
        assert_eq!(log.size, 15);
        assert_eq!(log.last_line(), Some("TWO"));
        assert_eq!(log.tail().collect::<Vec<_>>(), ["one", "TWO"]);
        log.write(b"ee\r\nprogress 10%\rprogress 100%\rdone\n")
            .unwrap();
        assert_eq!(
            log.tail().collect::<Vec<_>>(),
            ["one", "TWO", "three", "doneress 100%"]
        );
        assert!(!path.exists(), "renamed into place only when finished");
        log.finish().unwrap();
        let text = String::from_utf8(decompressed(&path)).unwrap();
        assert_eq!(
            text,
            "one\ntwo\rTWO\nthree\r\nprogress 10%\rprogress 100%\rdone\n"
        );
        // An empty log is an empty bzip2 stream; one longer than what is kept in
        // memory is compressed as it comes, and reads back whole.
        let empty = dir.join("drvs/ee/empty.bz2");
        BuildLog::create(empty.clone()).unwrap().finish().unwrap();
        assert_eq!(decompressed(&empty), b"");
        let long = dir.join("drvs/ll/long.bz2");
        let mut log = BuildLog::create(long.clone()).unwrap();
        let line = b"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcde\n";
        let mut want = Vec::new();
        for i in 0..3000 {
            let chunk = &line[..(i % 64) + 1];
            log.write(chunk).unwrap();
            want.extend_from_slice(chunk);
        }
        assert!(want.len() > BUFFERED_MAX);
        log.finish().unwrap();
        let got = decompressed(&long);
        assert!(got == want, "{} bytes back of {}", got.len(), want.len());
        // A log dropped unfinished leaves nothing.
        let other = dir.join("drvs/zz/other.bz2");
        drop(BuildLog::create(other.clone()).unwrap());
        assert_eq!(fs::read_dir(other.parent().unwrap()).unwrap().count(), 0);
        let _ = fs::remove_dir_all(&dir);
    }

    /// The bytes of the bzip2 file at `path`.
    fn decompressed(path: &Path) -> Vec<u8> {
        let mut got = Vec::new();
        std::io::Read::read_to_end(
            &mut bzip2::read::BzDecoder::new(File::open(path).unwrap()),
            &mut got,
        )
        .unwrap();
        got
    }
}
