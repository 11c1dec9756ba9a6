//! Temporary GC roots and the global GC lock, kept as Nix 2.8 keeps them, so that firn
//! and Nix protect each other's paths:
//!
//! - `ROOT/nix/var/nix/temproots/<pid>`: the store paths a process is using or about to
//!   create, each followed by a NUL byte. The owner holds an exclusive `flock` on the
//!   file for as long as it lives, so a collector that can lock the file knows the owner
//!   is dead: it unlinks the file and writes `d` into it (a process that opened the same
//!   name before the unlink sees the non-empty file once it gets the lock and starts
//!   over with a fresh one).
//! - `ROOT/nix/var/nix/gc.lock`: the collector holds it exclusively for its whole run
//!   and reads the temporary roots only once it has it; adding a temporary root appends
//!   to the file while holding it shared, so a root is either written before the
//!   collector reads the files or waits until the collector is done.
//!
//! Nix 2.8's adders do not wait: when `gc.lock` is taken they send the root to the
//! collector over `gc-socket/socket` instead (and carry on if there is no socket), so
//! firn's collector serves that socket too ([`RootsServer`]). firn's adders wait for
//! the lock, as the protocol before 2.5 did, which a Nix collector also honours.
//!
//! One temporary-roots file is kept per process and store root, shared by every
//! [`crate::Store`] of that root in the process, and removed when the last of them is
//! dropped.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use firn_derivation::{StoreDir, StorePath};
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use crate::error::StoreError;
use crate::message::{Reporter, StoreMessage};

fn io_err(path: &Path, source: io::Error) -> StoreError {
    StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn errno_err(path: &Path, e: Errno) -> StoreError {
    io_err(path, io::Error::from(e))
}

fn lock_poisoned<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// State directories (canonical) whose GC lock this process holds exclusively: adding a
/// temporary root there would wait for ourselves.
fn gc_held() -> &'static Mutex<HashSet<PathBuf>> {
    static HELD: OnceLock<Mutex<HashSet<PathBuf>>> = OnceLock::new();
    HELD.get_or_init(Default::default)
}

/// The temporary-roots file of this process, per canonical state directory.
fn registry() -> &'static Mutex<HashMap<PathBuf, Weak<Mutex<TempRootsFile>>>> {
    static REG: OnceLock<Mutex<HashMap<PathBuf, Weak<Mutex<TempRootsFile>>>>> = OnceLock::new();
    REG.get_or_init(Default::default)
}

fn open_gc_lock(state: &Path) -> Result<File, StoreError> {
    let path = state.join("gc.lock");
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(nix::libc::O_CLOEXEC)
        .open(&path)
        .map_err(|e| io_err(&path, e))
}

/// The global GC lock, held (shared or exclusive) until dropped.
#[derive(Debug)]
pub struct GcLock {
    _lock: Flock<File>,
    /// Set when exclusive: the state directory to forget in [`gc_held`] on drop.
    exclusive_on: Option<PathBuf>,
}

impl Drop for GcLock {
    fn drop(&mut self) {
        if let Some(state) = &self.exclusive_on {
            lock_poisoned(gc_held()).remove(state);
        }
    }
}

/// Take `state/gc.lock`, telling `reporter` when it has to wait.
pub(crate) fn lock_gc(
    state: &Path,
    exclusive: bool,
    reporter: &Reporter,
) -> Result<GcLock, StoreError> {
    let file = open_gc_lock(state)?;
    let (try_arg, wait_arg) = if exclusive {
        (FlockArg::LockExclusiveNonblock, FlockArg::LockExclusive)
    } else {
        (FlockArg::LockSharedNonblock, FlockArg::LockShared)
    };
    let path = state.join("gc.lock");
    let lock = match Flock::lock(file, try_arg) {
        Ok(l) => l,
        Err((file, Errno::EWOULDBLOCK)) => {
            reporter.report(&StoreMessage::WaitingForGcLock);
            Flock::lock(file, wait_arg).map_err(|(_, e)| errno_err(&path, e))?
        }
        Err((_, e)) => return Err(errno_err(&path, e)),
    };
    let exclusive_on = if exclusive {
        let key = fs::canonicalize(state).unwrap_or_else(|_| state.to_path_buf());
        lock_poisoned(gc_held()).insert(key.clone());
        Some(key)
    } else {
        None
    };
    Ok(GcLock {
        _lock: lock,
        exclusive_on,
    })
}

/// This process's `temproots/<pid>`, locked exclusively while open.
#[derive(Debug)]
pub(crate) struct TempRootsFile {
    state: PathBuf,
    path: PathBuf,
    /// The process the file is named after (a forked child must not remove it).
    pid: u32,
    file: Flock<File>,
    /// `gc.lock`, opened once; taken shared around each append.
    gc_lock: Option<File>,
    /// Paths already written (a root stays until the file goes).
    added: HashSet<StorePath>,
}

impl Drop for TempRootsFile {
    fn drop(&mut self) {
        // Unlink while still holding the lock: a collector that opened the file before
        // cannot lock it and keeps our roots, one that opens it after finds nothing.
        if std::process::id() == self.pid {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// A shared handle on this process's temporary-roots file for one store root.
pub(crate) type TempRootsHandle = Arc<Mutex<TempRootsFile>>;

/// The handle for the store whose state directory is `state`, creating the file on
/// first use.
pub(crate) fn temp_roots_handle(state: &Path) -> Result<TempRootsHandle, StoreError> {
    let key = fs::canonicalize(state).map_err(|e| io_err(state, e))?;
    let mut reg = lock_poisoned(registry());
    if let Some(h) = reg.get(&key).and_then(Weak::upgrade) {
        return Ok(h);
    }
    let file = TempRootsFile::create(&key)?;
    let h = Arc::new(Mutex::new(file));
    reg.retain(|_, w| w.strong_count() > 0);
    reg.insert(key, Arc::downgrade(&h));
    Ok(h)
}

/// A handle on a temporary-roots file of its own (`temproots/<pid>-<n>`), shared with
/// no other store of this process: a daemon connection's roots go when it ends, though
/// the daemon lives on (Nix forks per connection for the same effect; Nix's collector
/// reads the leading digits of the name as the pid, as firn's does).
pub(crate) fn own_temp_roots_handle(state: &Path) -> Result<TempRootsHandle, StoreError> {
    static OWN_COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let key = fs::canonicalize(state).map_err(|e| io_err(state, e))?;
    let n = OWN_COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = format!("{}-{n}", std::process::id());
    Ok(Arc::new(Mutex::new(TempRootsFile::create_named(
        &key, &name,
    )?)))
}

impl TempRootsFile {
    fn create(state: &Path) -> Result<Self, StoreError> {
        Self::create_named(state, &std::process::id().to_string())
    }

    fn create_named(state: &Path, name: &str) -> Result<Self, StoreError> {
        let dir = state.join("temproots");
        fs::create_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
        let pid = std::process::id();
        let path = dir.join(name);
        loop {
            // A file with our pid is stale: no two live processes share a pid.
            match fs::remove_file(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_err(&path, e)),
                _ => {}
            }
            let file = OpenOptions::new()
                .read(true)
                .append(true)
                .create(true)
                .mode(0o600)
                .custom_flags(nix::libc::O_CLOEXEC)
                .open(&path)
                .map_err(|e| io_err(&path, e))?;
            let file =
                Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, e)| errno_err(&path, e))?;
            // A collector found the file unlocked (between our open and our lock),
            // deleted it and marked it: start again with a fresh one.
            let len = file.metadata().map_err(|e| io_err(&path, e))?.len();
            if len == 0 {
                return Ok(Self {
                    state: state.to_path_buf(),
                    path,
                    pid,
                    file,
                    gc_lock: None,
                    added: HashSet::new(),
                });
            }
        }
    }

    /// Append `shown` (the printed store path) unless `path` was added already.
    pub(crate) fn add(
        &mut self,
        path: &StorePath,
        shown: &str,
        reporter: &Reporter,
    ) -> Result<(), StoreError> {
        // Even a path already recorded waits for a running collection: a caller about
        // to make a permanent root (`add_perm_root`) must not do so while a collection
        // that has not read its temp roots yet is running, or the root could appear
        // after the collection read the roots and the temp root vanish with this
        // process before it read those: the path would be deleted (Nix's addTempRoot
        // tells the collector through its socket; this waits for it to finish).
        let gc_path = self.state.join("gc.lock");
        let gc = match self.gc_lock.take() {
            Some(f) => f,
            None => open_gc_lock(&self.state)?,
        };
        let shared = match Flock::lock(gc, FlockArg::LockSharedNonblock) {
            Ok(l) => l,
            Err((gc, Errno::EWOULDBLOCK)) => {
                if lock_poisoned(gc_held()).contains(&self.state) {
                    self.gc_lock = Some(gc);
                    return Err(StoreError::TempRootWhileCollecting {
                        path: shown.to_owned(),
                    });
                }
                reporter.report(&StoreMessage::WaitingForGcLock);
                Flock::lock(gc, FlockArg::LockShared).map_err(|(_, e)| errno_err(&gc_path, e))?
            }
            Err((gc, e)) => {
                self.gc_lock = Some(gc);
                return Err(errno_err(&gc_path, e));
            }
        };
        if self.added.contains(path) {
            self.gc_lock = shared.unlock().ok();
            return Ok(());
        }
        let mut line = Vec::with_capacity(shown.len() + 1);
        line.extend_from_slice(shown.as_bytes());
        line.push(0);
        let written = (&*self.file).write_all(&line);
        // Release the shared lock; keep the open file for the next root.
        self.gc_lock = shared.unlock().ok();
        written.map_err(|e| io_err(&self.path, e))?;
        self.added.insert(path.clone());
        Ok(())
    }
}

/// Temporary roots by store path, each with the pids of the processes holding it.
pub type TempRoots = BTreeMap<StorePath, BTreeSet<String>>;

/// Read every live process's temporary roots; remove the files of dead ones (saying so,
/// as Nix does). Entries that are not store paths are skipped.
pub(crate) fn read_temp_roots(
    state: &Path,
    store_dir: &StoreDir,
    log: &mut dyn FnMut(&StoreMessage),
) -> Result<TempRoots, StoreError> {
    let dir = state.join("temproots");
    let mut roots = TempRoots::new();
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(roots),
        Err(e) => return Err(io_err(&dir, e)),
    };
    let mut names: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    names.sort();
    for name in names {
        let path = dir.join(&name);
        let file = match OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(nix::libc::O_CLOEXEC)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err(&path, e)),
        };
        let mut file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(stale) => {
                // Its owner is gone: nobody else can hold it.
                log(&StoreMessage::RemovingStaleTempRoots { file: path.clone() });
                let _ = fs::remove_file(&path);
                let _ = (&*stale).write_all(b"d");
                continue;
            }
            Err((file, Errno::EWOULDBLOCK)) => file,
            Err((_, e)) => return Err(errno_err(&path, e)),
        };
        let mut contents = Vec::new();
        file.read_to_end(&mut contents)
            .map_err(|e| io_err(&path, e))?;
        // A trailing root without its NUL is being written: not complete, not counted
        // (its writer holds the GC lock shared, so a collector never sees one).
        let complete = contents
            .iter()
            .rposition(|&b| b == 0)
            .map_or(&contents[..0], |end| &contents[..end]);
        for entry in complete.split(|&b| b == 0) {
            if let Ok(p) = store_dir.parse_path(entry) {
                roots.entry(p).or_default().insert(pid_of(&name));
            }
        }
    }
    Ok(roots)
}

/// The pid a temporary-roots file is named after (its leading digits, as Nix reads it).
fn pid_of(name: &str) -> String {
    let digits: String = name.chars().take_while(char::is_ascii_digit).collect();
    if digits.is_empty() {
        name.to_owned()
    } else {
        digits
    }
}

/// What the roots server shares with the collector.
#[derive(Debug, Default)]
struct ServerState {
    /// Hash parts of every temporary root known to this collection.
    hashes: HashSet<String>,
    /// Roots received over the socket that the collector has not looked at yet.
    new_paths: Vec<StorePath>,
    /// The hash part of the path being deleted right now: a client rooting it waits.
    pending: Option<String>,
}

type Shared = Arc<(Mutex<ServerState>, Condvar)>;

/// The connections being served, each with its thread.
type Clients = Arc<Mutex<Vec<(UnixStream, JoinHandle<()>)>>>;

/// Nix 2.8's GC roots server: while a collection runs, a Nix process that cannot take
/// `gc.lock` shared connects to `gc-socket/socket` and sends `PATH\n` for each
/// temporary root, waiting for the reply `1` (Nix 2.8 does not wait when there is no
/// socket, so without this server a Nix process could create a path under the
/// collector's feet). A root for the path being deleted is answered once the deletion
/// is over, so the client finds the path invalid and makes it again.
#[derive(Debug)]
pub(crate) struct RootsServer {
    shared: Shared,
    stop: Arc<AtomicBool>,
    socket: PathBuf,
    acceptor: Option<JoinHandle<()>>,
    clients: Clients,
}

impl RootsServer {
    /// Listen on `state/gc-socket/socket` (the caller holds `gc.lock` exclusively);
    /// what a client sends that is not a store path is told to `reporter`.
    pub(crate) fn start(
        state: &Path,
        store_dir: StoreDir,
        reporter: Reporter,
    ) -> Result<Self, StoreError> {
        let dir = state.join("gc-socket");
        fs::create_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
        let socket = dir.join("socket");
        match fs::remove_file(&socket) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_err(&socket, e)),
            _ => {}
        }
        let listener = UnixListener::bind(&socket).map_err(|e| io_err(&socket, e))?;
        fs::set_permissions(&socket, fs::Permissions::from_mode(0o666))
            .map_err(|e| io_err(&socket, e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| io_err(&socket, e))?;
        let shared: Shared = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let clients: Clients = Arc::default();
        let acceptor = {
            let (shared, stop, clients) = (shared.clone(), stop.clone(), clients.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            // Blocking reads, whatever the listener's mode.
                            let _ = stream.set_nonblocking(false);
                            let Ok(mine) = stream.try_clone() else {
                                continue;
                            };
                            let (shared, sd) = (shared.clone(), store_dir.clone());
                            let reporter = reporter.clone();
                            let h = std::thread::spawn(move || {
                                serve_client(stream, &shared, &sd, &reporter)
                            });
                            lock_poisoned(&clients).push((mine, h));
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(10));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            })
        };
        Ok(Self {
            shared,
            stop,
            socket,
            acceptor: Some(acceptor),
            clients,
        })
    }

    /// Record roots found otherwise (the temporary-roots files).
    pub(crate) fn add_hashes<'a>(&self, hashes: impl IntoIterator<Item = &'a str>) {
        let mut st = lock_poisoned(&self.shared.0);
        st.hashes.extend(hashes.into_iter().map(str::to_owned));
    }

    /// Roots that arrived over the socket since the last call.
    pub(crate) fn take_new_paths(&self) -> Vec<StorePath> {
        std::mem::take(&mut lock_poisoned(&self.shared.0).new_paths)
    }

    /// Mark the path with hash part `hash` as being deleted, unless it is a root
    /// (then `false`). Call [`Self::release`] once it is deleted.
    pub(crate) fn claim(&self, hash: &str) -> bool {
        let mut st = lock_poisoned(&self.shared.0);
        if st.hashes.contains(hash) {
            return false;
        }
        st.pending = Some(hash.to_owned());
        true
    }

    /// The claimed path is gone: answer the clients waiting for it.
    pub(crate) fn release(&self) {
        lock_poisoned(&self.shared.0).pending = None;
        self.shared.1.notify_all();
    }
}

fn serve_client(stream: UnixStream, shared: &Shared, sd: &StoreDir, reporter: &Reporter) {
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    let mut lines = io::BufReader::new(stream);
    loop {
        let mut line = String::new();
        match io::BufRead::read_line(&mut lines, &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let line = line.trim_end_matches('\n');
        match sd.parse(line) {
            Ok(p) => {
                let hash = p.hash_part().to_owned();
                let (lock, cv) = &**shared;
                let mut st = lock_poisoned(lock);
                st.hashes.insert(hash.clone());
                st.new_paths.push(p);
                while st.pending.as_deref() == Some(hash.as_str()) {
                    st = cv.wait(st).unwrap_or_else(|p| p.into_inner());
                }
            }
            Err(_) => reporter.report(&StoreMessage::GarbageRoot {
                line: line.to_owned(),
            }),
        }
        if out.write_all(b"1").is_err() {
            return;
        }
    }
}

impl Drop for RootsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.release();
        if let Some(h) = self.acceptor.take() {
            let _ = h.join();
        }
        let _ = fs::remove_file(&self.socket);
        let clients = std::mem::take(&mut *lock_poisoned(&self.clients));
        for (stream, h) in clients {
            let _ = stream.shutdown(std::net::Shutdown::Both);
            let _ = h.join();
        }
    }
}
