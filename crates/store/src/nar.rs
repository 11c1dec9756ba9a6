//! NAR ("Nix ARchive") serialisation, byte-compatible with Nix 2.8.
//!
//! A NAR is a sequence of strings. The primitive `str(bytes)` is the length as a
//! little-endian `u64`, the bytes, then zero bytes up to the next multiple of 8 (none
//! when the length already is one, none for the empty string). Each quoted token below
//! is one `str`:
//!
//! ```text
//! nar  = "nix-archive-1" node
//! node = "(" "type" body ")"
//! body = "regular" ["executable" ""] "contents" <file bytes>
//!      | "symlink" "target" <target bytes>
//!      | "directory" { "entry" "(" "name" <name> "node" node ")" }
//! ```
//!
//! * `"executable" ""` is present iff the owner-execute bit is set; no other metadata
//!   (other mode bits, owner, times) is represented.
//! * Directory entries are sorted by name, compared as raw bytes.
//! * Only regular files, directories and symlinks exist in a NAR (anything else is
//!   `file '…' has an unsupported type`). Symlink targets are stored verbatim.
//!
//! [`dump_path`] writes exactly what `nix-store --dump` writes; [`hash_path`] gives the
//! `narHash`/`narSize` pair without materialising the NAR. [`parse`] is a streaming,
//! strict, non-recursive parser (the canonical form only: names valid and strictly
//! increasing, padding zero, nothing after the last `)`), so every NAR it accepts dumps
//! back to the same bytes; [`validate`] and [`restore_path`] are built on it.

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{Scope, ScopedJoinHandle};

use firn_derivation::{Hash, HashAlgo, Hasher};
use nix::sys::stat::{futimens, utimensat, UtimensatFlags};
use nix::sys::time::TimeSpec;

use crate::canonical::RestoredMetadata;
use crate::os_error::strerror;

/// The first string of every NAR.
pub const NAR_MAGIC: &[u8] = b"nix-archive-1";

/// Longest directory entry name accepted when reading a NAR (`NAME_MAX` on Linux).
pub const MAX_NAME_LEN: u64 = 255;

/// Longest symlink target accepted when reading a NAR (`PATH_MAX` on Linux).
pub const MAX_TARGET_LEN: u64 = 4096;

/// Longest token of the grammar is `nix-archive-1` (13 bytes); anything longer where a
/// token is expected is rejected without being read.
const MAX_TOKEN_LEN: usize = 16;

/// Size of the output buffer of [`dump_path`] (framing and file contents go through it,
/// so the sink sees few, large writes).
const DUMP_BUF_SIZE: usize = 256 * 1024;
/// The buffer a dump starts with ([`NarWriter::new`]).
const SMALL_BUF_SIZE: usize = 8 * 1024;

/// Size of the input buffer of [`parse`] and the restores.
const READ_BUF_SIZE: usize = 256 * 1024;

/// Errors of NAR dumping, parsing and restoring.
#[derive(Debug, thiserror::Error)]
pub enum NarError {
    /// The object to dump cannot be `lstat`ed (Nix's words).
    #[error("getting status of '{}': {}", path.display(), strerror(source))]
    Stat { path: PathBuf, source: io::Error },
    /// A file system operation on `path` failed.
    #[error("'{}': {}", path.display(), strerror(source))]
    Io { path: PathBuf, source: io::Error },
    /// Writing the NAR to its sink failed.
    #[error("writing NAR: {}", strerror(source))]
    Write { source: io::Error },
    /// Reading the NAR from its source failed at byte `offset`.
    #[error("reading NAR at byte {offset}: {}", strerror(source))]
    Read { offset: u64, source: io::Error },
    /// The NAR ended before the archive was complete.
    #[error("bad NAR: unexpected end of archive at byte {offset}")]
    Truncated { offset: u64 },
    /// The NAR is malformed; `offset` is the start of the offending string.
    #[error("bad NAR at byte {offset}: {msg}")]
    Format { offset: u64, msg: String },
    /// A file system object that a NAR cannot represent (fifo, socket, device).
    #[error("file '{}' has an unsupported type", path.display())]
    UnsupportedType { path: PathBuf },
    /// The target of a restore already exists.
    #[error("path '{}' already exists", path.display())]
    TargetExists { path: PathBuf },
    /// The target of a restore cannot be created (its parent is missing, not a
    /// directory, not writable); named as the target, not as the temporary sibling
    /// that was being made.
    #[error("cannot create '{}': {}", path.display(), strerror(source))]
    CreateTarget { path: PathBuf, source: io::Error },
}

impl NarError {
    fn io(path: &Path) -> impl FnOnce(io::Error) -> NarError + '_ {
        move |source| NarError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    fn format(offset: u64, msg: impl Into<String>) -> NarError {
        NarError::Format {
            offset,
            msg: msg.into(),
        }
    }
}

/// Zero bytes after a string of `len` bytes.
fn padding(len: u64) -> usize {
    ((8 - len % 8) % 8) as usize
}

// ------------------------------------------------------------------------------------
// Dumping
// ------------------------------------------------------------------------------------

/// Where [`NarWriter`] sends its full buffers.
trait BufSink {
    /// Consume `buf[..len]` and return a buffer (of the same size) to fill next.
    fn consume(&mut self, buf: Box<[u8]>, len: usize) -> Result<Box<[u8]>, NarError>;

    /// Whether [`BufSink::send_file`] may take a file's contents (no need to read
    /// them into the buffer).
    fn takes_files(&self) -> bool {
        false
    }

    /// Send the next `size` bytes of `file` to the output (everything buffered before
    /// has been consumed). `Ok(false)`: nothing was sent and the sink cannot do it;
    /// the caller reads the file itself.
    fn send_file(&mut self, _file: &File, _size: u64, _path: &Path) -> Result<bool, NarError> {
        Ok(false)
    }
}

/// Files at least this large go from the page cache straight to an [`FdSink`]'s
/// output (`sendfile`); smaller ones are read into the buffer, so that a tree of
/// small files still costs few system calls.
const SEND_FILE_MIN: u64 = 64 * 1024;

/// Writes buffers to a file descriptor and sends large files' contents to it with
/// `sendfile(2)`: for a pipe, a socket, a regular file or `/dev/null`, the pages go
/// from the page cache to the output without being copied through this process (a
/// pipe gets references to them). Outputs that `sendfile` does not take (a terminal,
/// a file opened with `O_APPEND`) fall back to reading and writing after the first
/// refusal.
struct FdSink<'fd> {
    fd: BorrowedFd<'fd>,
    send: bool,
}

impl FdSink<'_> {
    fn write_all(&self, mut data: &[u8]) -> Result<(), NarError> {
        while !data.is_empty() {
            match nix::unistd::write(self.fd, data) {
                Ok(0) => {
                    return Err(NarError::Write {
                        source: io::ErrorKind::WriteZero.into(),
                    })
                }
                Ok(n) => data = &data[n..],
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(NarError::Write { source: e.into() }),
            }
        }
        Ok(())
    }
}

impl BufSink for FdSink<'_> {
    fn consume(&mut self, buf: Box<[u8]>, len: usize) -> Result<Box<[u8]>, NarError> {
        self.write_all(&buf[..len])?;
        Ok(buf)
    }

    fn takes_files(&self) -> bool {
        self.send
    }

    fn send_file(&mut self, file: &File, size: u64, path: &Path) -> Result<bool, NarError> {
        use nix::errno::Errno;
        let mut left = size;
        while left > 0 {
            let want = usize::try_from(left.min(1 << 30)).unwrap_or(1 << 30);
            match nix::sys::sendfile::sendfile64(self.fd, file, None, want) {
                Ok(0) => return Err(shrank(path)),
                Ok(n) => left -= n as u64,
                Err(Errno::EINTR) => {}
                // Refused before anything was sent: this output cannot take it.
                Err(Errno::EINVAL | Errno::ENOSYS | Errno::EOPNOTSUPP) if left == size => {
                    self.send = false;
                    return Ok(false);
                }
                Err(e @ (Errno::EPIPE | Errno::ENOSPC | Errno::EDQUOT | Errno::EAGAIN)) => {
                    return Err(NarError::Write { source: e.into() })
                }
                Err(e) => return Err(NarError::io(path)(e.into())),
            }
        }
        Ok(true)
    }
}

/// Passes every buffer through `pre` (on the dumping thread) before `inner` takes it.
struct PreSink<'p, P: Write + ?Sized, S: BufSink> {
    pre: &'p mut P,
    inner: S,
}

impl<P: Write + ?Sized, S: BufSink> BufSink for PreSink<'_, P, S> {
    fn consume(&mut self, buf: Box<[u8]>, len: usize) -> Result<Box<[u8]>, NarError> {
        self.pre
            .write_all(&buf[..len])
            .map_err(|source| NarError::Write { source })?;
        self.inner.consume(buf, len)
    }
}

fn shrank(path: &Path) -> NarError {
    NarError::Io {
        path: path.to_path_buf(),
        source: io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "file shrank while it was being dumped",
        ),
    }
}

/// Writes buffers to a [`Write`] in place.
struct WriteSink<'w, W: Write + ?Sized>(&'w mut W);

impl<W: Write + ?Sized> BufSink for WriteSink<'_, W> {
    fn consume(&mut self, buf: Box<[u8]>, len: usize) -> Result<Box<[u8]>, NarError> {
        self.0
            .write_all(&buf[..len])
            .map_err(|source| NarError::Write { source })?;
        Ok(buf)
    }
}

/// Buffers framing and file contents (read straight into the buffer) so that the sink
/// sees `DUMP_BUF_SIZE` writes.
struct NarWriter<S: BufSink> {
    sink: S,
    buf: Box<[u8]>,
    len: usize,
}

impl<S: BufSink> NarWriter<S> {
    /// Starts with a small buffer: most NARs dumped (a build's output to scan, a `.drv`)
    /// are a few KiB, and a 256 KiB buffer per dump was a fresh allocation, its page
    /// faults and its free every time. It becomes a full one when it first fills up.
    fn new(sink: S) -> Self {
        Self {
            sink,
            buf: vec![0; SMALL_BUF_SIZE].into_boxed_slice(),
            len: 0,
        }
    }

    /// Make room in the buffer: grow the small first buffer, or pass a full one on.
    fn make_room(&mut self) -> Result<(), NarError> {
        if self.buf.len() < DUMP_BUF_SIZE {
            let mut big = new_buffer();
            big[..self.len].copy_from_slice(&self.buf[..self.len]);
            self.buf = big;
            return Ok(());
        }
        self.flush_buf()
    }

    fn flush_buf(&mut self) -> Result<(), NarError> {
        if self.len > 0 {
            let buf = std::mem::take(&mut self.buf);
            self.buf = self.sink.consume(buf, self.len)?;
            self.len = 0;
        }
        Ok(())
    }

    fn put(&mut self, mut data: &[u8]) -> Result<(), NarError> {
        while !data.is_empty() {
            if self.len == self.buf.len() {
                self.make_room()?;
            }
            let n = data.len().min(self.buf.len() - self.len);
            self.buf[self.len..self.len + n].copy_from_slice(&data[..n]);
            self.len += n;
            data = &data[n..];
        }
        Ok(())
    }

    fn pad(&mut self, len: u64) -> Result<(), NarError> {
        self.put(&[0; 8][..padding(len)])
    }

    fn str(&mut self, s: &[u8]) -> Result<(), NarError> {
        self.put(&(s.len() as u64).to_le_bytes())?;
        self.put(s)?;
        self.pad(s.len() as u64)
    }

    fn strs(&mut self, strs: &[&[u8]]) -> Result<(), NarError> {
        strs.iter().try_for_each(|s| self.str(s))
    }

    /// `str(contents)` of a file of `size` bytes, read straight into the buffer.
    fn contents(&mut self, file: &mut File, size: u64, path: &Path) -> Result<(), NarError> {
        self.put(&size.to_le_bytes())?;
        if size >= SEND_FILE_MIN && self.sink.takes_files() {
            self.flush_buf()?;
            if self.sink.send_file(file, size, path)? {
                return self.pad(size);
            }
        }
        let mut left = size;
        while left > 0 {
            if self.len == self.buf.len() {
                self.make_room()?;
            }
            let want = (self.buf.len() - self.len).min(usize::try_from(left).unwrap_or(usize::MAX));
            match file.read(&mut self.buf[self.len..self.len + want]) {
                Ok(0) => return Err(shrank(path)),
                Ok(n) => {
                    self.len += n;
                    left -= n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(NarError::io(path)(e)),
            }
        }
        self.pad(size)
    }
}

fn new_buffer() -> Box<[u8]> {
    vec![0; DUMP_BUF_SIZE].into_boxed_slice()
}

/// Serialise the file system object at `path` as a NAR into `out`, byte-identical to
/// `nix-store --dump`. A symlink at `path` itself is dumped as a symlink (not followed).
///
/// File contents are streamed through a fixed buffer; `out` sees large writes only.
/// See [`dump_path_pipelined`] to consume the NAR on a second thread.
pub fn dump_path(path: &Path, out: &mut impl Write) -> Result<(), NarError> {
    dump_with(path, WriteSink(out))
}

/// [`dump_path`] to a file descriptor (standard output of `firn dump`): the same
/// bytes, but the contents of files of 64 KiB or more go from the page cache to `out`
/// with `sendfile(2)` instead of through a buffer of this process (where `out` is a
/// pipe, a socket, a regular file or `/dev/null`; other outputs get plain writes).
/// Everything written before is written first (nothing is buffered on `out`'s side).
pub fn dump_path_to_fd(path: &Path, out: BorrowedFd<'_>) -> Result<(), NarError> {
    dump_with(
        path,
        FdSink {
            fd: out,
            send: true,
        },
    )
}

/// Like [`dump_path_pipelined`], but every part of the NAR also goes to `here`, on
/// this thread, before `there` gets it on the helper thread: two consumers of one
/// NAR on two cores (e.g. a reference scanner here, the NAR hash there). Both see
/// the same bytes in the same order.
pub fn dump_path_split<P: Write + ?Sized, W: Write + Send>(
    path: &Path,
    here: &mut P,
    there: &mut W,
) -> Result<(), NarError> {
    let pipe = Pipe::default();
    std::thread::scope(|scope| {
        let mut sink = PipeSink {
            scope,
            pipe: &pipe,
            state: PipeState::Direct(there, 0),
        };
        let dumped = dump_with(
            path,
            PreSink {
                pre: here,
                inner: &mut sink,
            },
        );
        sink.finish(dumped)
    })
}

fn dump_with<S: BufSink>(path: &Path, sink: S) -> Result<(), NarError> {
    let mut w = NarWriter::new(sink);
    w.str(NAR_MAGIC)?;
    let md = fs::symlink_metadata(path).map_err(|source| NarError::Stat {
        path: path.to_path_buf(),
        source,
    })?;
    let mut path = path.to_path_buf();
    dump_node(&mut w, &mut path, &md)?;
    w.flush_buf()
}

/// Dump the object at `path`, whose `lstat` is `md`.
fn dump_node<S: BufSink>(
    w: &mut NarWriter<S>,
    path: &mut PathBuf,
    md: &fs::Metadata,
) -> Result<(), NarError> {
    let ft = md.file_type();
    if ft.is_file() {
        // Open before writing anything, so that an unreadable file fails cleanly.
        let mut file = OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&*path)
            .map_err(NarError::io(path))?;
        if md.mode() & 0o100 != 0 {
            w.strs(&[b"(", b"type", b"regular", b"executable", b"", b"contents"])?;
        } else {
            w.strs(&[b"(", b"type", b"regular", b"contents"])?;
        }
        w.contents(&mut file, md.len(), path)?;
    } else if ft.is_dir() {
        // Stat every entry relative to the directory (no path walk), and close the
        // directory before descending so that deep trees do not pile up descriptors.
        let mut entries: Vec<(OsString, fs::Metadata)> = fs::read_dir(&*path)
            .and_then(|entries| {
                entries
                    .map(|e| e.and_then(|e| Ok((e.file_name(), e.metadata()?))))
                    .collect()
            })
            .map_err(NarError::io(path))?;
        entries.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        w.strs(&[b"(", b"type", b"directory"])?;
        for (name, md) in entries {
            w.strs(&[b"entry", b"(", b"name", name.as_bytes(), b"node"])?;
            path.push(&name);
            let r = dump_node(w, path, &md);
            path.pop();
            r?;
            w.str(b")")?;
        }
    } else if ft.is_symlink() {
        let target = fs::read_link(&*path).map_err(NarError::io(path))?;
        w.strs(&[
            b"(",
            b"type",
            b"symlink",
            b"target",
            target.as_os_str().as_bytes(),
        ])?;
    } else {
        return Err(NarError::UnsupportedType { path: path.clone() });
    }
    w.str(b")")
}

/// Output written in place before [`dump_path_pipelined`] starts its helper thread.
const PIPELINE_THRESHOLD: u64 = 1 << 20;

/// At most this many buffers circulate between the dumping and the consuming thread
/// (allocated only when the dumper runs ahead of the consumer).
const PIPELINE_BUFFERS: usize = 16;

// Neither side spins while it waits: it sleeps on its condition variable at once.
// Until 2026-12 a side yielded its CPU for up to 2 ms first (for virtual machines slow
// to wake a sleeping thread); measured on this 2-core VM, `firn add` of a 999 MB NAR
// took the same wall time without it and 0.6 s less CPU (3.03 s against 3.68 s,
// medians of 5), and a dump with a trivial consumer used half the CPU.

#[derive(Default)]
struct PipeQueues {
    /// Filled buffers and their lengths, in order.
    full: VecDeque<(Box<[u8]>, usize)>,
    free: Vec<Box<[u8]>>,
    /// Buffers allocated for the pipe so far.
    allocated: usize,
    /// The dumper is done (or failed): no more full buffers will come.
    closed: bool,
    /// The consumer stopped (finished or failed): no more free buffers will come.
    consumer_gone: bool,
    dumper_sleeping: bool,
    consumer_sleeping: bool,
}

/// Two queues of buffers between the dumper and the consumer. Each side has a condition
/// variable to sleep on, notified only when that side said it sleeps.
#[derive(Default)]
struct Pipe {
    queues: Mutex<PipeQueues>,
    dumper: Condvar,
    consumer: Condvar,
}

/// What the dumper gets back for a full buffer.
enum Exchanged {
    Buffer(Box<[u8]>),
    Allocate,
    ConsumerGone,
}

impl Pipe {
    fn lock(&self) -> MutexGuard<'_, PipeQueues> {
        // A panic while holding the lock leaves consistent queues; carry on.
        self.queues.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Wait until `ready` gives a value, sleeping on `cv` with `*sleeping(queues)` set.
    fn wait_until<T>(
        &self,
        cv: &Condvar,
        sleeping: fn(&mut PipeQueues) -> &mut bool,
        mut ready: impl FnMut(&mut PipeQueues) -> Option<T>,
    ) -> T {
        let mut q = self.lock();
        loop {
            if let Some(t) = ready(&mut q) {
                return t;
            }
            *sleeping(&mut q) = true;
            q = cv.wait(q).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Dumper: pass a full buffer, get an empty one (`None`: the consumer is gone).
    fn exchange(&self, buf: Box<[u8]>, len: usize) -> Option<Box<[u8]>> {
        {
            let mut q = self.lock();
            if q.consumer_gone {
                return None;
            }
            q.full.push_back((buf, len));
            if std::mem::take(&mut q.consumer_sleeping) {
                self.consumer.notify_one();
            }
        }
        let got = self.wait_until(
            &self.dumper,
            |q| &mut q.dumper_sleeping,
            |q| {
                if let Some(free) = q.free.pop() {
                    Some(Exchanged::Buffer(free))
                } else if q.consumer_gone {
                    Some(Exchanged::ConsumerGone)
                } else if q.allocated < PIPELINE_BUFFERS {
                    q.allocated += 1;
                    Some(Exchanged::Allocate)
                } else {
                    None
                }
            },
        );
        match got {
            Exchanged::Buffer(buf) => Some(buf),
            Exchanged::Allocate => Some(new_buffer()),
            Exchanged::ConsumerGone => None,
        }
    }

    /// Dumper: no more buffers.
    fn close(&self) {
        let mut q = self.lock();
        q.closed = true;
        self.consumer.notify_one();
    }

    /// Consumer: the next full buffer, `None` at the end.
    fn next_full(&self) -> Option<(Box<[u8]>, usize)> {
        self.wait_until(
            &self.consumer,
            |q| &mut q.consumer_sleeping,
            |q| match q.full.pop_front() {
                Some(full) => Some(Some(full)),
                None if q.closed => Some(None),
                None => None,
            },
        )
    }

    /// Consumer: give back a buffer.
    fn recycle(&self, buf: Box<[u8]>) {
        let mut q = self.lock();
        q.free.push(buf);
        if std::mem::take(&mut q.dumper_sleeping) {
            self.dumper.notify_one();
        }
    }

    /// Consumer: stopped.
    fn consumer_stopped(&self) {
        let mut q = self.lock();
        q.consumer_gone = true;
        self.dumper.notify_one();
    }
}

/// Marks the consumer stopped when it returns or unwinds.
struct ConsumerGuard<'p>(&'p Pipe);

impl Drop for ConsumerGuard<'_> {
    fn drop(&mut self) {
        self.0.consumer_stopped();
    }
}

enum PipeState<'scope, W: Write + Send> {
    /// Writing in place; `u64` bytes so far.
    Direct(&'scope mut W, u64),
    Piped(ScopedJoinHandle<'scope, io::Result<()>>),
    Done,
}

/// A [`BufSink`] that hands buffers to a consumer thread once the output is large.
struct PipeSink<'scope, 'env, W: Write + Send> {
    scope: &'scope Scope<'scope, 'env>,
    pipe: &'scope Pipe,
    state: PipeState<'scope, W>,
}

impl<'scope, W: Write + Send> PipeSink<'scope, '_, W> {
    /// Start the consumer thread; `buf` (already written) becomes the first buffer.
    fn start(&mut self, out: &'scope mut W, buf: Box<[u8]>) -> Box<[u8]> {
        let pipe = self.pipe;
        pipe.lock().allocated = 1;
        let consumer = self.scope.spawn(move || -> io::Result<()> {
            let _guard = ConsumerGuard(pipe);
            while let Some((buf, len)) = pipe.next_full() {
                out.write_all(&buf[..len])?;
                pipe.recycle(buf);
            }
            Ok(())
        });
        self.state = PipeState::Piped(consumer);
        buf
    }

    /// Stop the consumer and combine its result with the dumper's.
    fn finish(&mut self, dumped: Result<(), NarError>) -> Result<(), NarError> {
        match std::mem::replace(&mut self.state, PipeState::Done) {
            PipeState::Piped(consumer) => {
                self.pipe.close();
                match consumer.join() {
                    Ok(Ok(())) => dumped,
                    // The consumer's error is the cause of any "consumer gone" error.
                    Ok(Err(source)) => Err(NarError::Write { source }),
                    Err(panic) => std::panic::resume_unwind(panic),
                }
            }
            _ => dumped,
        }
    }
}

impl<W: Write + Send> Drop for PipeSink<'_, '_, W> {
    fn drop(&mut self) {
        // Only when the dumper unwinds (`finish` leaves `Done`): let the consumer end, or
        // the scope would wait for it forever.
        if let PipeState::Piped(_) = self.state {
            self.pipe.close();
        }
    }
}

fn consumer_gone() -> NarError {
    NarError::Write {
        source: io::Error::new(io::ErrorKind::BrokenPipe, "NAR consumer thread stopped"),
    }
}

impl<W: Write + Send> BufSink for &mut PipeSink<'_, '_, W> {
    fn consume(&mut self, buf: Box<[u8]>, len: usize) -> Result<Box<[u8]>, NarError> {
        match std::mem::replace(&mut self.state, PipeState::Done) {
            PipeState::Direct(out, written) => {
                out.write_all(&buf[..len])
                    .map_err(|source| NarError::Write { source })?;
                let written = written + len as u64;
                if written < PIPELINE_THRESHOLD {
                    self.state = PipeState::Direct(out, written);
                    Ok(buf)
                } else {
                    Ok(self.start(out, buf))
                }
            }
            PipeState::Piped(consumer) => {
                self.state = PipeState::Piped(consumer);
                self.pipe.exchange(buf, len).ok_or_else(consumer_gone)
            }
            PipeState::Done => Err(consumer_gone()),
        }
    }
}

/// Like [`dump_path`], but once the NAR exceeds 1 MiB the writes to `out` happen on a
/// helper thread, so that reading the files overlaps with consuming the NAR (hashing,
/// reference scanning). Same bytes, same errors; an error of `out` is reported as
/// [`NarError::Write`].
pub fn dump_path_pipelined<W: Write + Send>(path: &Path, out: &mut W) -> Result<(), NarError> {
    let pipe = Pipe::default();
    std::thread::scope(|scope| {
        let mut sink = PipeSink {
            scope,
            pipe: &pipe,
            state: PipeState::Direct(out, 0),
        };
        let dumped = dump_with(path, &mut sink);
        sink.finish(dumped)
    })
}

/// Closes the pipe (no more full buffers) when dropped.
struct CloseGuard<'p>(&'p Pipe);

impl Drop for CloseGuard<'_> {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// The dumping side of [`dump_path_through`]: every full buffer goes to the consumer.
struct QueueSink<'p>(&'p Pipe);

impl BufSink for QueueSink<'_> {
    fn consume(&mut self, buf: Box<[u8]>, len: usize) -> Result<Box<[u8]>, NarError> {
        self.0.exchange(buf, len).ok_or_else(consumer_gone)
    }
}

/// The consuming side of [`dump_path_through`]: the NAR as a [`Read`], buffer by
/// buffer as the dumping thread fills them (no copy through a kernel pipe).
pub struct DumpReader<'p> {
    pipe: &'p Pipe,
    cur: Option<(Box<[u8]>, usize, usize)>,
    done: bool,
}

impl std::fmt::Debug for DumpReader<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DumpReader")
            .field("done", &self.done)
            .finish()
    }
}

/// The dumper's buffers themselves, lent in turn.
impl BufRead for DumpReader<'_> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        loop {
            if let Some((_, len, pos)) = &self.cur {
                if *pos < *len {
                    break;
                }
            }
            if let Some((buf, _, _)) = self.cur.take() {
                self.pipe.recycle(buf);
            }
            if self.done {
                return Ok(&[]);
            }
            match self.pipe.next_full() {
                Some((buf, len)) => self.cur = Some((buf, len, 0)),
                None => {
                    self.done = true;
                    return Ok(&[]);
                }
            }
        }
        match &self.cur {
            Some((buf, len, pos)) => Ok(&buf[*pos..*len]),
            None => Ok(&[]),
        }
    }

    fn consume(&mut self, n: usize) {
        if let Some((_, len, pos)) = &mut self.cur {
            *pos = (*pos + n).min(*len);
        }
    }
}

impl Read for DumpReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let avail = self.fill_buf()?;
        let n = out.len().min(avail.len());
        out[..n].copy_from_slice(&avail[..n]);
        self.consume(n);
        Ok(n)
    }
}

/// Dump `path` on a helper thread, passing the NAR through `here` there (a hash,
/// say), and give it to `consume` on this thread as a [`Read`] (to restore it, say):
/// the two halves of the work on two cores, the buffers handed over without being
/// copied. Returns the dumper's result (a [`NarError::Write`] if `consume` stopped
/// reading early) and `consume`'s.
pub fn dump_path_through<H: Write + Send + ?Sized, T>(
    path: &Path,
    here: &mut H,
    consume: impl FnOnce(&mut DumpReader<'_>) -> T,
) -> (Result<(), NarError>, T) {
    let pipe = Pipe::default();
    // The dumper's own first buffer counts.
    pipe.lock().allocated = 1;
    std::thread::scope(|scope| {
        let pipe = &pipe;
        let dumper = scope.spawn(move || {
            // Closed however the dumper ends (a panic too), so the consumer sees the end.
            let _closed = CloseGuard(pipe);
            dump_with(
                path,
                PreSink {
                    pre: here,
                    inner: QueueSink(pipe),
                },
            )
        });
        let consumed = {
            let _guard = ConsumerGuard(pipe);
            let mut reader = DumpReader {
                pipe,
                cur: None,
                done: false,
            };
            consume(&mut reader)
        };
        let dumped = match dumper.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        (dumped, consumed)
    })
}

/// A [`Write`] sink computing the hash (sha256 unless made by [`HashSink::with_algo`])
/// and the byte count of everything written to it.
#[derive(Debug, Clone)]
pub struct HashSink {
    hasher: Hasher,
    size: u64,
}

impl HashSink {
    /// A sha256 sink.
    pub fn new() -> Self {
        Self::with_algo(HashAlgo::Sha256)
    }

    pub fn with_algo(algo: HashAlgo) -> Self {
        Self {
            hasher: Hasher::new(algo),
            size: 0,
        }
    }

    /// Bytes written so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The hash and the byte count.
    pub fn finish(self) -> (Hash, u64) {
        (self.hasher.finish(), self.size)
    }
}

impl Default for HashSink {
    fn default() -> Self {
        Self::new()
    }
}

impl Write for HashSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.hasher.update(buf);
        self.size += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A [`Write`] combinator writing everything to both sinks (first `.0`, then `.1`), e.g.
/// `Tee(HashSink::new(), RefScanner::new(..))` to hash and scan a NAR in one pass.
#[derive(Debug, Clone, Default)]
pub struct Tee<A, B>(pub A, pub B);

impl<A: Write, B: Write> Write for Tee<A, B> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write_all(buf)?;
        self.1.write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()?;
        self.1.flush()
    }
}

/// `narHash` (sha256 of the NAR) and `narSize` of the object at `path`, streaming
/// (hashing on a second thread for large paths, see [`dump_path_pipelined`]).
pub fn hash_path(path: &Path) -> Result<(Hash, u64), NarError> {
    let mut sink = HashSink::new();
    dump_path_pipelined(path, &mut sink)?;
    Ok(sink.finish())
}

/// What [`hash_path`] returns.
pub type HashResult = Result<(Hash, u64), NarError>;

/// [`hash_path`] of each of `paths`, on up to one thread per core (each path's NAR is
/// one SHA-256 stream, so a single large path is hashed as [`hash_path`] does: read on
/// one core, hashed on the other; so are the last paths, once no other path waits).
/// The results are in the order of `paths`.
pub fn hash_paths<P: AsRef<Path> + Sync>(paths: &[P]) -> Vec<HashResult> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(paths.len());
    if threads <= 1 {
        return paths.iter().map(|p| hash_path(p.as_ref())).collect();
    }
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<HashResult>>> =
        Mutex::new((0..paths.len()).map(|_| None).collect());
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(p) = paths.get(i) else { break };
                // While other paths wait, every core already has one: reading and
                // hashing on the same thread saves the hand-over (a third of the system
                // time of a store's verify). The last ones may end alone on a core, so
                // they are read and hashed on two, as one path is.
                let r = if i + threads < paths.len() {
                    let mut sink = HashSink::new();
                    dump_path(p.as_ref(), &mut sink).map(|()| sink.finish())
                } else {
                    hash_path(p.as_ref())
                };
                results.lock().unwrap_or_else(PoisonError::into_inner)[i] = Some(r);
            });
        }
    });
    results
        .into_inner()
        .unwrap_or_else(PoisonError::into_inner)
        .into_iter()
        .map(|r| {
            r.unwrap_or_else(|| {
                Err(NarError::Format {
                    offset: 0,
                    msg: "a hashing thread stopped".into(),
                })
            })
        })
        .collect()
}

// ------------------------------------------------------------------------------------
// Parsing
// ------------------------------------------------------------------------------------

/// Receives the events of [`parse`]. Events describe a walk of the tree: a node event
/// (`directory`, `symlink`, or `file_begin`/`file_data`*/`file_end`) applies to the
/// current position, which starts at the root; `entry_begin(name)` descends into the
/// entry `name` of the current directory and `entry_end` comes back up. Every method
/// defaults to doing nothing; an error aborts the parse and is returned by it.
pub trait NarVisitor {
    /// A directory; its entries follow.
    fn directory(&mut self) -> Result<(), NarError> {
        Ok(())
    }

    /// A symlink (target non-empty, no NUL byte, at most [`MAX_TARGET_LEN`] bytes).
    fn symlink(&mut self, _target: &[u8]) -> Result<(), NarError> {
        Ok(())
    }

    /// A regular file of `size` bytes; the contents follow in `file_data` chunks.
    fn file_begin(&mut self, _executable: bool, _size: u64) -> Result<(), NarError> {
        Ok(())
    }

    fn file_data(&mut self, _data: &[u8]) -> Result<(), NarError> {
        Ok(())
    }

    fn file_end(&mut self) -> Result<(), NarError> {
        Ok(())
    }

    /// Descend into the (valid, strictly increasing) entry `name`.
    fn entry_begin(&mut self, _name: &[u8]) -> Result<(), NarError> {
        Ok(())
    }

    fn entry_end(&mut self) -> Result<(), NarError> {
        Ok(())
    }

    /// The directory begun by the matching [`NarVisitor::directory`] has no more
    /// entries.
    fn directory_end(&mut self) -> Result<(), NarError> {
        Ok(())
    }
}

/// A visitor that does nothing: [`validate`].
struct NoopVisitor;

impl NarVisitor for NoopVisitor {}

/// Reading with byte offsets for error messages, from a [`BufRead`]: file contents go to
/// the visitor straight from the source's buffer (a [`DumpReader`] lends the dumper's
/// buffers, so a NAR restored while it is dumped is not copied once more on the way).
struct NarReader<'r, R: BufRead + ?Sized> {
    inner: &'r mut R,
    /// Offset of the next unread byte.
    consumed: u64,
}

impl<'r, R: BufRead + ?Sized> NarReader<'r, R> {
    fn new(inner: &'r mut R) -> Self {
        Self { inner, consumed: 0 }
    }

    /// Offset of the next unread byte.
    fn offset(&self) -> u64 {
        self.consumed
    }

    /// The next buffered bytes (at least one), or a [`NarError::Truncated`] at the end
    /// of the input.
    fn available(&mut self) -> Result<&[u8], NarError> {
        loop {
            match self.inner.fill_buf() {
                // Re-borrowed below: the loop's borrow cannot outlive an Interrupted.
                Ok([]) => {
                    return Err(NarError::Truncated {
                        offset: self.consumed,
                    })
                }
                Ok(_) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(NarError::Read {
                        offset: self.consumed,
                        source,
                    })
                }
            }
        }
        self.inner.fill_buf().map_err(|source| NarError::Read {
            offset: self.consumed,
            source,
        })
    }

    /// Whether any input is left.
    fn more(&mut self) -> Result<bool, NarError> {
        match self.available() {
            Ok(_) => Ok(true),
            Err(NarError::Truncated { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn consume(&mut self, n: usize) {
        self.inner.consume(n);
        self.consumed += n as u64;
    }

    fn read_exact(&mut self, out: &mut [u8]) -> Result<(), NarError> {
        let mut done = 0;
        while done < out.len() {
            let avail = self.available()?;
            let n = avail.len().min(out.len() - done);
            out[done..done + n].copy_from_slice(&avail[..n]);
            self.consume(n);
            done += n;
        }
        Ok(())
    }

    fn u64(&mut self) -> Result<u64, NarError> {
        let mut b = [0; 8];
        self.read_exact(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn padding(&mut self, len: u64) -> Result<(), NarError> {
        let offset = self.offset();
        let mut b = [0; 8];
        let p = &mut b[..padding(len)];
        self.read_exact(p)?;
        if p.iter().any(|&c| c != 0) {
            return Err(NarError::format(offset, "non-zero padding"));
        }
        Ok(())
    }

    /// A short string where a token is expected: its offset, bytes and length.
    fn token(&mut self) -> Result<(u64, [u8; MAX_TOKEN_LEN], usize), NarError> {
        let offset = self.offset();
        let len = self.u64()?;
        if len > MAX_TOKEN_LEN as u64 {
            return Err(NarError::format(
                offset,
                format!("expected a token, found a string of {len} bytes"),
            ));
        }
        let mut b = [0; MAX_TOKEN_LEN];
        self.read_exact(&mut b[..len as usize])?;
        self.padding(len)?;
        Ok((offset, b, len as usize))
    }

    fn expect(&mut self, expected: &[u8]) -> Result<(), NarError> {
        let (offset, b, len) = self.token()?;
        if &b[..len] != expected {
            return Err(unexpected(
                offset,
                &b[..len],
                &format!("'{}'", expected.escape_ascii()),
            ));
        }
        Ok(())
    }

    /// A string of at most `max` bytes (checked before anything is allocated).
    fn bounded(&mut self, max: u64, what: &str) -> Result<(u64, Vec<u8>), NarError> {
        let offset = self.offset();
        let len = self.u64()?;
        if len > max {
            return Err(NarError::format(
                offset,
                format!("{what} of {len} bytes is longer than {max} bytes"),
            ));
        }
        let mut v = vec![0; len as usize];
        self.read_exact(&mut v)?;
        self.padding(len)?;
        Ok((offset, v))
    }

    /// Stream `len` bytes of file contents and their padding to the visitor.
    fn contents<V: NarVisitor + ?Sized>(&mut self, len: u64, v: &mut V) -> Result<(), NarError> {
        let mut left = len;
        while left > 0 {
            let avail = self.available()?;
            let n = avail.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            v.file_data(&avail[..n])?;
            self.consume(n);
            left -= n as u64;
        }
        self.padding(len)
    }
}

fn unexpected(offset: u64, found: &[u8], expected: &str) -> NarError {
    NarError::format(
        offset,
        format!("expected {expected}, found '{}'", found.escape_ascii()),
    )
}

/// Why `name` cannot be a directory entry, if it cannot.
fn invalid_name(name: &[u8]) -> Option<&'static str> {
    if name.is_empty() {
        Some("empty")
    } else if name == b"." || name == b".." {
        Some("not allowed")
    } else if name.contains(&b'/') {
        Some("contains '/'")
    } else if name.contains(&0) {
        Some("contains a NUL byte")
    } else {
        None
    }
}

/// Parse a NAR from `input`, strictly, reporting its structure to `visitor`. Reads
/// `input` to its end (nothing may follow the archive) and returns the NAR's size.
///
/// Rejected: a wrong magic, non-zero padding, unknown or misplaced tokens, non-canonical
/// forms (a regular file without `contents`, `executable` with a non-empty argument),
/// invalid entry names (empty, `.`, `..`, containing `/` or NUL), entries that are not
/// strictly increasing (unsorted or duplicate), empty or NUL-containing symlink
/// targets, over-long names/targets/tokens (rejected before allocation), truncation and
/// trailing data. Nesting depth is limited only by the input (no recursion).
pub fn parse<R, V>(input: &mut R, visitor: &mut V) -> Result<u64, NarError>
where
    R: Read + ?Sized,
    V: NarVisitor + ?Sized,
{
    parse_buffered(&mut BufReader::with_capacity(READ_BUF_SIZE, input), visitor)
}

/// [`parse`] from a [`BufRead`], whose buffers the visitor gets file contents in.
pub fn parse_buffered<R, V>(input: &mut R, visitor: &mut V) -> Result<u64, NarError>
where
    R: BufRead + ?Sized,
    V: NarVisitor + ?Sized,
{
    let mut r = NarReader::new(input);
    {
        let (offset, b, len) = r.token()?;
        if &b[..len] != NAR_MAGIC {
            return Err(NarError::format(offset, "not a NAR (bad magic)"));
        }
    }
    // The last entry name of every open directory (empty: none yet; names are non-empty).
    let mut dirs: Vec<Vec<u8>> = Vec::new();
    'node: loop {
        r.expect(b"(")?;
        r.expect(b"type")?;
        let (offset, b, len) = r.token()?;
        let mut complete = true;
        match &b[..len] {
            b"regular" => {
                let (offset, b, len) = r.token()?;
                let executable = match &b[..len] {
                    b"executable" => {
                        r.expect(b"")?;
                        r.expect(b"contents")?;
                        true
                    }
                    b"contents" => false,
                    other => return Err(unexpected(offset, other, "'executable' or 'contents'")),
                };
                let size = r.u64()?;
                visitor.file_begin(executable, size)?;
                r.contents(size, visitor)?;
                visitor.file_end()?;
                r.expect(b")")?;
            }
            b"symlink" => {
                r.expect(b"target")?;
                let (offset, target) = r.bounded(MAX_TARGET_LEN, "symlink target")?;
                if target.is_empty() {
                    return Err(NarError::format(offset, "empty symlink target"));
                }
                if target.contains(&0) {
                    return Err(NarError::format(
                        offset,
                        "symlink target containing a NUL byte",
                    ));
                }
                visitor.symlink(&target)?;
                r.expect(b")")?;
            }
            b"directory" => {
                visitor.directory()?;
                dirs.push(Vec::new());
                complete = false;
            }
            other => {
                return Err(unexpected(
                    offset,
                    other,
                    "'regular', 'symlink' or 'directory'",
                ));
            }
        }
        loop {
            if complete {
                if dirs.is_empty() {
                    break 'node;
                }
                r.expect(b")")?; // the end of "entry" "("
                visitor.entry_end()?;
            }
            let (offset, b, len) = r.token()?;
            match &b[..len] {
                b")" => {
                    dirs.pop();
                    visitor.directory_end()?;
                    complete = true;
                }
                b"entry" => {
                    r.expect(b"(")?;
                    r.expect(b"name")?;
                    let (offset, name) = r.bounded(MAX_NAME_LEN, "file name")?;
                    if let Some(why) = invalid_name(&name) {
                        return Err(NarError::format(
                            offset,
                            format!("invalid file name '{}' ({why})", name.escape_ascii()),
                        ));
                    }
                    let Some(prev) = dirs.last_mut() else {
                        return Err(NarError::format(offset, "entry outside a directory"));
                    };
                    if name <= *prev {
                        let msg = if name == *prev {
                            format!("duplicate directory entry '{}'", name.escape_ascii())
                        } else {
                            format!(
                                "directory entry '{}' is not sorted after '{}'",
                                name.escape_ascii(),
                                prev.escape_ascii()
                            )
                        };
                        return Err(NarError::format(offset, msg));
                    }
                    r.expect(b"node")?;
                    visitor.entry_begin(&name)?;
                    *prev = name;
                    continue 'node;
                }
                other => return Err(unexpected(offset, other, "'entry' or ')'")),
            }
        }
    }
    if r.more()? {
        return Err(NarError::format(
            r.offset(),
            "trailing data after the end of the archive",
        ));
    }
    Ok(r.offset())
}

/// Check that `input` is a valid NAR (see [`parse`]), without writing anything; returns
/// its size.
pub fn validate(input: &mut impl Read) -> Result<u64, NarError> {
    parse(input, &mut NoopVisitor)
}

// ------------------------------------------------------------------------------------
// Restoring
// ------------------------------------------------------------------------------------

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Writes the tree below a temporary sibling of the target; removes it when dropped
/// unless committed.
struct Restorer {
    /// Directory of the target, and the name used to build temporary names.
    parent: PathBuf,
    name: OsString,
    /// The temporary top-level node, once created.
    tmp: Option<PathBuf>,
    /// The current position (below `tmp`).
    path: PathBuf,
    depth: usize,
    file: Option<File>,
    destination: Destination,
    /// The file being written is large enough for its write-out to start at once.
    writeback_this: bool,
    /// For the store: every node so far was given its canonical metadata as it was
    /// made, and is owned by this process's user and group (false until the top node
    /// exists, and for good once it is not).
    canonical: bool,
}

/// Where a NAR is restored, which decides what the restorer does beyond creating the
/// nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Destination {
    /// Anywhere (`nix-store --restore`): modes 0644/0755 less the umask, times as made.
    Anywhere,
    /// A store object about to be made durable and valid: large files' write-out
    /// starts as soon as they are written ([`crate::durable::start_writeback`]), and
    /// each node gets the store's canonical metadata as it is made (files 0444 or
    /// 0555, directories 0555 once their last entry exists, mtime 1), so that no second
    /// walk over the tree ([`crate::canonical::canonicalise_path_metadata`]) is needed.
    Store,
}

impl Restorer {
    /// Create the node at the current position with `create`; at the top, pick a fresh
    /// temporary name.
    fn create<T>(&mut self, create: impl Fn(&Path) -> io::Result<T>) -> Result<T, NarError> {
        if self.depth > 0 || self.tmp.is_some() {
            return create(&self.path).map_err(NarError::io(&self.path));
        }
        // Keep temporary names well below NAME_MAX whatever the target's name.
        let short = &self.name.as_bytes()[..self.name.len().min(100)];
        let pid = std::process::id();
        let mut attempts = 0;
        loop {
            let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
            let mut tmp_name = b".".to_vec();
            tmp_name.extend_from_slice(short);
            tmp_name.extend_from_slice(format!(".tmp-{pid}-{n}").as_bytes());
            let tmp = self.parent.join(OsStr::from_bytes(&tmp_name));
            match create(&tmp) {
                Ok(t) => {
                    self.path.clone_from(&tmp);
                    self.canonical = self.destination == Destination::Store && owned_by_us(&tmp);
                    self.tmp = Some(tmp);
                    return Ok(t);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempts < 100 => {
                    attempts += 1;
                }
                Err(source) => {
                    return Err(NarError::CreateTarget {
                        path: self.parent.join(&self.name),
                        source,
                    })
                }
            }
        }
    }

    /// Give the node at the current position the store's canonical mtime (1), not
    /// following a symlink.
    fn set_canonical_mtime(&self) -> Result<(), NarError> {
        utimensat(
            None,
            &self.path,
            &TimeSpec::UTIME_OMIT,
            &TimeSpec::new(1, 0),
            UtimensatFlags::NoFollowSymlink,
        )
        .map_err(|e| NarError::io(&self.path)(e.into()))
    }

    fn commit(mut self, target: &Path) -> Result<(), NarError> {
        self.file = None;
        let Some(tmp) = self.tmp.clone() else {
            return Err(NarError::format(0, "empty archive"));
        };
        use nix::errno::Errno;
        use nix::fcntl::{renameat2, RenameFlags};
        match renameat2(None, &tmp, None, target, RenameFlags::RENAME_NOREPLACE) {
            Ok(()) => {}
            Err(Errno::EEXIST) => {
                return Err(NarError::TargetExists {
                    path: target.to_path_buf(),
                })
            }
            // File systems without RENAME_NOREPLACE: check, then rename.
            Err(Errno::EINVAL | Errno::ENOSYS) => {
                if fs::symlink_metadata(target).is_ok() {
                    return Err(NarError::TargetExists {
                        path: target.to_path_buf(),
                    });
                }
                fs::rename(&tmp, target).map_err(NarError::io(target))?;
            }
            Err(e) => return Err(NarError::io(target)(e.into())),
        }
        self.tmp = None;
        Ok(())
    }
}

impl Drop for Restorer {
    fn drop(&mut self) {
        self.file = None;
        if let Some(tmp) = self.tmp.take() {
            // Directories may be 0555 already (a store restore).
            let _ = crate::canonical::delete_path(&tmp);
        }
    }
}

impl NarVisitor for Restorer {
    fn directory(&mut self) -> Result<(), NarError> {
        self.create(|p| DirBuilder::new().mode(0o755).create(p))
    }

    fn directory_end(&mut self) -> Result<(), NarError> {
        if self.canonical {
            // All its entries exist: nothing changes it from here on (renaming it
            // within the store directory touches neither its mode nor its times).
            fs::set_permissions(&self.path, fs::Permissions::from_mode(0o555))
                .map_err(NarError::io(&self.path))?;
            self.set_canonical_mtime()?;
        }
        Ok(())
    }

    fn symlink(&mut self, target: &[u8]) -> Result<(), NarError> {
        self.create(|p| std::os::unix::fs::symlink(OsStr::from_bytes(target), p))?;
        if self.canonical {
            self.set_canonical_mtime()?;
        }
        Ok(())
    }

    fn file_begin(&mut self, executable: bool, size: u64) -> Result<(), NarError> {
        let store = self.destination == Destination::Store;
        self.writeback_this = store && size >= crate::durable::WRITEBACK_MIN;
        let mode = match (store, executable) {
            // Read-only from the start: the descriptor is open for writing already.
            (true, true) => 0o555,
            (true, false) => 0o444,
            (false, true) => 0o755,
            (false, false) => 0o644,
        };
        let file = self.create(|p| {
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .custom_flags(nix::libc::O_NOFOLLOW)
                .open(p)
        })?;
        if self.canonical {
            // The umask may have taken bits away.
            file.set_permissions(fs::Permissions::from_mode(mode))
                .map_err(NarError::io(&self.path))?;
        }
        self.file = Some(file);
        Ok(())
    }

    fn file_data(&mut self, data: &[u8]) -> Result<(), NarError> {
        match &mut self.file {
            Some(f) => f.write_all(data).map_err(NarError::io(&self.path)),
            None => Ok(()),
        }
    }

    fn file_end(&mut self) -> Result<(), NarError> {
        if let Some(f) = &self.file {
            if self.canonical {
                // After the last write, which would set it again.
                futimens(f.as_raw_fd(), &TimeSpec::UTIME_OMIT, &TimeSpec::new(1, 0))
                    .map_err(|e| NarError::io(&self.path)(e.into()))?;
            }
            if self.writeback_this {
                crate::durable::start_writeback(f);
            }
        }
        self.file = None;
        Ok(())
    }

    fn entry_begin(&mut self, name: &[u8]) -> Result<(), NarError> {
        self.path.push(OsStr::from_bytes(name));
        self.depth += 1;
        Ok(())
    }

    fn entry_end(&mut self) -> Result<(), NarError> {
        self.path.pop();
        self.depth -= 1;
        Ok(())
    }
}

/// Whether the node just made at `path` belongs to this process's user and group, so
/// that everything made below it does too (a directory inherits a set-group-ID parent's
/// group, and then so do its entries).
fn owned_by_us(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok_and(|m| {
        m.uid() == nix::unistd::geteuid().as_raw() && m.gid() == nix::unistd::getegid().as_raw()
    })
}

/// Restore the NAR read from `input` at `target`, which must not exist.
///
/// The NAR is fully validated as by [`parse`]. The tree is written below a temporary
/// sibling of `target` (`.<name>.tmp-<pid>-<n>`), which is renamed to `target` (without
/// replacing anything) once the whole input has been read; on any error the temporary
/// is removed, so a failed restore leaves nothing behind. Files are created with
/// `O_CREAT|O_EXCL|O_NOFOLLOW` and directories with `mkdir`, never through a symlink.
/// Executable files get mode 0755, other files 0644, directories 0755 (less the umask).
pub fn restore_path(input: &mut impl Read, target: &Path) -> Result<(), NarError> {
    let mut input = BufReader::with_capacity(READ_BUF_SIZE, input);
    restore_path_with(&mut input, target, Destination::Anywhere).map(|_| ())
}

/// [`restore_buffered_for_store`] from any reader (buffered here).
pub fn restore_path_for_store(
    input: &mut impl Read,
    target: &Path,
) -> Result<RestoredMetadata, NarError> {
    let mut input = BufReader::with_capacity(READ_BUF_SIZE, input);
    restore_buffered_for_store(&mut input, target)
}

/// [`restore_path`] for a store object that is going to be made durable and valid
/// ([`Destination::Store`]): each large file's write-out to the disk starts as soon as
/// it is written, so that the final sync has little left to wait for, and the nodes get
/// the store's canonical metadata as they are made. Says whether the tree still needs
/// [`crate::canonical::canonicalise_path_metadata`]. File contents are written straight
/// from `input`'s buffers (a [`DumpReader`]'s are the dumper's).
pub fn restore_buffered_for_store(
    input: &mut impl BufRead,
    target: &Path,
) -> Result<RestoredMetadata, NarError> {
    restore_path_with(input, target, Destination::Store)
}

/// Restore; what is left to do about the tree's metadata.
fn restore_path_with(
    input: &mut impl BufRead,
    target: &Path,
    destination: Destination,
) -> Result<RestoredMetadata, NarError> {
    if fs::symlink_metadata(target).is_ok() {
        return Err(NarError::TargetExists {
            path: target.to_path_buf(),
        });
    }
    // Only `""` has no name and does not exist (`/`, `.` and `..` do): as `mkdir("")`.
    let name = target.file_name().ok_or_else(|| NarError::CreateTarget {
        path: target.to_path_buf(),
        source: io::Error::from_raw_os_error(nix::libc::ENOENT),
    })?;
    let parent = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut restorer = Restorer {
        parent,
        name: name.to_os_string(),
        tmp: None,
        path: PathBuf::new(),
        depth: 0,
        file: None,
        destination,
        writeback_this: false,
        canonical: false,
    };
    parse_buffered(input, &mut restorer)?;
    let metadata = match restorer.canonical {
        true => RestoredMetadata::Canonical,
        false => RestoredMetadata::NeedsCanonicalising,
    };
    restorer.commit(target)?;
    Ok(metadata)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(data: &[u8]) -> Vec<u8> {
        let mut v = (data.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(data);
        v.resize(v.len() + padding(data.len() as u64), 0);
        v
    }

    fn nar(tokens: &[&[u8]]) -> Vec<u8> {
        tokens.iter().flat_map(|t| s(t)).collect()
    }

    #[test]
    fn padding_sizes() {
        assert_eq!(padding(0), 0);
        assert_eq!(padding(1), 7);
        assert_eq!(padding(7), 1);
        assert_eq!(padding(8), 0);
        assert_eq!(padding(9), 7);
        assert_eq!(padding(u64::MAX), 1);
    }

    #[derive(Default)]
    struct Recorder(Vec<String>);

    impl NarVisitor for Recorder {
        fn directory(&mut self) -> Result<(), NarError> {
            self.0.push("dir".into());
            Ok(())
        }
        fn symlink(&mut self, target: &[u8]) -> Result<(), NarError> {
            self.0.push(format!("symlink {}", target.escape_ascii()));
            Ok(())
        }
        fn file_begin(&mut self, executable: bool, size: u64) -> Result<(), NarError> {
            self.0.push(format!("file {executable} {size}"));
            Ok(())
        }
        fn file_data(&mut self, data: &[u8]) -> Result<(), NarError> {
            self.0.push(format!("data {}", data.escape_ascii()));
            Ok(())
        }
        fn file_end(&mut self) -> Result<(), NarError> {
            self.0.push("end".into());
            Ok(())
        }
        fn entry_begin(&mut self, name: &[u8]) -> Result<(), NarError> {
            self.0.push(format!("enter {}", name.escape_ascii()));
            Ok(())
        }
        fn entry_end(&mut self) -> Result<(), NarError> {
            self.0.push("leave".into());
            Ok(())
        }
    }

    #[test]
    #[rustfmt::skip]
    fn visitor_events() {
        let data = nar(&[
            b"nix-archive-1", b"(", b"type", b"directory",
            b"entry", b"(", b"name", b"d", b"node", b"(", b"type", b"directory",
                b"entry", b"(", b"name", b"x", b"node",
                    b"(", b"type", b"regular", b"executable", b"", b"contents", b"hi", b")",
                b")",
            b")", b")",
            b"entry", b"(", b"name", b"l", b"node", b"(", b"type", b"symlink", b"target", b"d/x", b")", b")",
            b")",
        ]);
        let mut rec = Recorder::default();
        let size = parse(&mut &data[..], &mut rec).expect("valid");
        assert_eq!(size, data.len() as u64);
        assert_eq!(
            rec.0,
            [
                "dir", "enter d", "dir", "enter x", "file true 2", "data hi", "end", "leave",
                "leave", "enter l", "symlink d/x", "leave"
            ]
        );
    }

    #[test]
    fn deep_nesting_does_not_recurse() {
        // 100k nested directories: a recursive parser would overflow the test stack.
        let depth = 100_000;
        let mut data = nar(&[b"nix-archive-1", b"(", b"type", b"directory"]);
        let open = nar(&[
            b"entry",
            b"(",
            b"name",
            b"d",
            b"node",
            b"(",
            b"type",
            b"directory",
        ]);
        let close = nar(&[b")", b")"]);
        for _ in 0..depth {
            data.extend_from_slice(&open);
        }
        for _ in 0..depth {
            data.extend_from_slice(&close);
        }
        data.extend_from_slice(&s(b")"));
        assert_eq!(validate(&mut &data[..]).expect("valid"), data.len() as u64);
    }

    #[test]
    fn error_offsets() {
        let data = nar(&[b"nix-archive-1", b"(", b"type", b"fifo", b")"]);
        match validate(&mut &data[..]) {
            Err(NarError::Format { offset, msg }) => {
                assert_eq!(offset, 56);
                assert!(msg.contains("fifo"), "{msg}");
            }
            other => panic!("{other:?}"),
        }
        match validate(&mut &data[..30]) {
            Err(NarError::Truncated { offset }) => assert_eq!(offset, 30),
            other => panic!("{other:?}"),
        }
    }
}
