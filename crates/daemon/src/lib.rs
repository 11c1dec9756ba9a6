//! firn-daemon: Nix 2.8's daemon (worker protocol 1.34) on firn's store and worker, so
//! that real Nix clients (`nix-store`, `nix-build`, `nix copy --to unix://…`) use firn
//! as their store and builder. `docs/daemon.md` lists the operations, the trust rules
//! and where firn is stricter than Nix.
//!
//! - [`serve_socket`]: listen on a Unix socket, one thread per connection, each with
//!   its own [`firn_store::Store`] and worker; the peer's credentials decide access
//!   ([`trust`]);
//! - [`serve_stdio`]: one trusted connection on stdin/stdout (`nix-daemon --stdio`);
//! - [`conn`]: one connection: the handshake and the operations;
//! - [`serve`]: `firn serve` / `firn --serve`, Nix's legacy serve protocol on
//!   stdin/stdout (remote builds and `ssh://` copies);
//! - [`restrict`]: what a connection may do ([`Policy`]: everything, or a recursive-Nix
//!   build's restricted store); [`recursive`]: the private socket of such a build;
//! - [`events`]: the worker's events as stderr messages (where a NAR ends in a stream
//!   is `firn_store::nar_bound`).
//!
//! Nothing the client sends can make it panic: malformed input ends that connection
//! with an error frame.

#![forbid(unsafe_code)]

pub mod conn;
pub mod events;
pub mod export;
pub mod recursive;
pub mod restrict;
pub mod serve;
pub mod trust;

use std::fmt;
use std::io::{self, BufReader, BufWriter};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use firn_store::StoreLayout;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use thiserror::Error;

pub use conn::{serve_connection, serve_connection_with};
pub use recursive::RecursiveDaemon;
pub use restrict::Policy;
pub use trust::{Access, Peer};

/// The version `firn daemon --version` and the handshake give: Nix's, so that clients
/// (and Nix's test suite, which compares it) take firn for the Nix it speaks as.
pub const VERSION_LINE: &str = "nix-daemon (Nix) 2.8.0";

/// What every connection is served from.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub layout: StoreLayout,
    /// The daemon's settings (files, `--option`); each connection starts from a copy.
    pub settings: firn_build::Settings,
    /// Where build users are locked.
    pub userpool: PathBuf,
}

impl DaemonConfig {
    /// What serves the private sockets of recursive-Nix builds on this store (given to
    /// every worker of the daemon, restricted connections' included).
    pub fn recursive_nix(&self) -> Arc<dyn firn_build::recursive::RecursiveNix> {
        Arc::new(RecursiveDaemon::new(
            self.layout.clone(),
            self.userpool.clone(),
        ))
    }
}

/// Where a daemon listens by default: `<state dir>/daemon-socket/socket`.
pub fn default_socket_path(layout: &StoreLayout) -> PathBuf {
    layout.state_dir.join("daemon-socket/socket")
}

#[derive(Debug, Error)]
pub enum DaemonError {
    #[error("cannot listen on '{path}': {}", firn_store::error::strerror(source))]
    Listen { path: PathBuf, source: io::Error },
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Protocol(#[from] firn_protocol::WorkerError),
    #[error("cannot open the store: {0}")]
    Store(#[from] firn_store::StoreError),
}

/// What the daemon has to say about connections (the CLI prints it).
#[derive(Debug, Clone)]
pub enum DaemonLog {
    Listening {
        path: PathBuf,
    },
    Accepted {
        peer: Peer,
        trusted: bool,
    },
    Refused {
        peer: Peer,
    },
    /// A connection ended with an error.
    ConnectionError {
        pid: Option<i32>,
        error: String,
    },
    Stopping,
}

impl fmt::Display for DaemonLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Listening { path } => write!(f, "listening on '{}'", path.display()),
            Self::Accepted { peer, trusted } => write!(
                f,
                "accepted connection from pid {}, user {}{}",
                peer.pid,
                peer.user,
                if *trusted { " (trusted)" } else { "" }
            ),
            Self::Refused { peer } => write!(
                f,
                "error: user '{}' is not allowed to connect to the Nix daemon",
                peer.user
            ),
            Self::ConnectionError { pid, error } => match pid {
                Some(p) => write!(f, "error processing connection from pid {p}: {error}"),
                None => write!(f, "error processing connection: {error}"),
            },
            Self::Stopping => f.write_str("shutting down"),
        }
    }
}

/// Where [`DaemonLog`]s go.
pub type Log = Arc<dyn Fn(&DaemonLog) + Send + Sync>;

/// Whether the peer of `fd` hung up (without waiting). Only `POLLHUP` and `POLLERR`
/// are asked for (the kernel reports them whatever is asked): a `POLLRDHUP` in the
/// answer is a bit nix's `PollFlags` does not know on this target, which made
/// `revents()` `None` — the hang-up of a killed client was never seen and its build
/// ran on.
pub fn hung_up(fd: BorrowedFd<'_>) -> bool {
    let mut fds = [PollFd::new(fd, PollFlags::POLLHUP | PollFlags::POLLERR)];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(0) => false,
        Ok(_) => fds[0]
            .revents()
            .is_some_and(|r| r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR)),
        Err(_) => false,
    }
}

/// Serve one trusted connection on stdin/stdout (`nix-daemon --stdio`).
pub fn serve_stdio(
    config: &DaemonConfig,
    stop: &(dyn Fn() -> bool + Sync),
) -> Result<(), DaemonError> {
    let stdin = io::stdin();
    let watch = stdin.as_fd().try_clone_to_owned()?;
    let r = BufReader::new(stdin.lock());
    let w = BufWriter::new(io::stdout().lock());
    let gone = || hung_up(watch.as_fd());
    serve_connection(r, w, config, true, &gone, stop)
}

/// Listen on `socket` until `stop` says so (checked every 200 ms), then remove the
/// socket and give running connections up to 3 s to end (they see `stop` too).
pub fn serve_socket(
    config: Arc<DaemonConfig>,
    socket: &Path,
    stop: fn() -> bool,
    log: Log,
) -> Result<(), DaemonError> {
    let listen_err = |source| DaemonError::Listen {
        path: socket.to_path_buf(),
        source,
    };
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).map_err(listen_err)?;
    }
    match std::fs::remove_file(socket) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(listen_err(e)),
    }
    let listener = UnixListener::bind(socket).map_err(listen_err)?;
    // As Nix: anyone may connect; who may do what is decided per connection.
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o666)).map_err(listen_err)?;
    listener.set_nonblocking(true).map_err(listen_err)?;
    log(&DaemonLog::Listening {
        path: socket.to_path_buf(),
    });
    let mut threads: Vec<JoinHandle<()>> = Vec::new();
    while !stop() {
        match listener.accept() {
            Ok((stream, _)) => {
                threads.retain(|t| !t.is_finished());
                match spawn_connection(stream, &config, stop, &log) {
                    Ok(Some(t)) => threads.push(t),
                    Ok(None) => {}
                    Err(e) => log(&DaemonLog::ConnectionError {
                        pid: None,
                        error: e.to_string(),
                    }),
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
                let _ = poll(&mut fds, PollTimeout::from(200u16));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                log(&DaemonLog::ConnectionError {
                    pid: None,
                    error: e.to_string(),
                });
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    log(&DaemonLog::Stopping);
    let _ = std::fs::remove_file(socket);
    let deadline = Instant::now() + Duration::from_secs(3);
    while threads.iter().any(|t| !t.is_finished()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Nix's `LocalStore::createUser` for each client: `profiles/per-user/USER` and
/// `gcroots/per-user/USER` (0755, owned by the user; their parents 1777), where
/// `nix-env`, `nix-channel` and `nix profile` keep the user's profiles.
fn create_user_dirs(layout: &StoreLayout, peer: &trust::Peer) -> io::Result<()> {
    let state = &layout.state_dir;
    for parent in [
        state.join("profiles/per-user"),
        state.join("gcroots/per-user"),
    ] {
        let err = |what: &str, path: &Path, e: io::Error| {
            io::Error::new(e.kind(), format!("{what} '{}': {e}", path.display()))
        };
        std::fs::create_dir_all(&parent).map_err(|e| err("creating directory", &parent, e))?;
        std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(0o1777))
            .map_err(|e| err("could not set permissions on", &parent, e))?;
        let dir = parent.join(&peer.user);
        std::fs::create_dir_all(&dir).map_err(|e| err("creating directory", &dir, e))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| err("changing permissions of directory", &dir, e))?;
        nix::unistd::chown(
            &dir,
            Some(nix::unistd::Uid::from_raw(peer.uid)),
            Some(nix::unistd::Gid::effective()),
        )
        .map_err(|e| err("changing owner of directory", &dir, e.into()))?;
    }
    Ok(())
}

fn spawn_connection(
    stream: UnixStream,
    config: &Arc<DaemonConfig>,
    stop: fn() -> bool,
    log: &Log,
) -> io::Result<Option<JoinHandle<()>>> {
    stream.set_nonblocking(false)?;
    let peer = Peer::of(&stream)?;
    let trusted = match trust::access(&peer, &config.settings) {
        Access::Trusted => true,
        Access::Untrusted => false,
        Access::Refused => {
            log(&DaemonLog::Refused { peer });
            return Ok(None);
        }
    };
    log(&DaemonLog::Accepted {
        peer: peer.clone(),
        trusted,
    });
    if let Err(e) = create_user_dirs(&config.layout, &peer) {
        log(&DaemonLog::ConnectionError {
            pid: Some(peer.pid),
            error: e.to_string(),
        });
        return Ok(None);
    }
    let reader = stream.try_clone()?;
    let watch = stream.try_clone()?;
    let config = Arc::clone(config);
    let log = Arc::clone(log);
    let t = std::thread::Builder::new()
        .name(format!("conn-{}", peer.pid))
        .spawn(move || {
            let gone = || hung_up(watch.as_fd());
            let stop = || stop();
            let r = BufReader::new(reader);
            let w = BufWriter::new(stream);
            if let Err(e) = serve_connection(r, w, &config, trusted, &gone, &stop) {
                log(&DaemonLog::ConnectionError {
                    pid: Some(peer.pid),
                    error: e.to_string(),
                });
            }
        })?;
    Ok(Some(t))
}
