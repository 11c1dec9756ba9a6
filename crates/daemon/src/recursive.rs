//! Recursive Nix's private daemon (Nix's `LocalDerivationGoal::startDaemon`): a Unix
//! socket in the build directory, served by the ordinary connection loop under
//! [`Policy::Restricted`], one thread per connection, until the build ends.
//!
//! [`RecursiveDaemon`] is the [`RecursiveNix`] hook that `firn daemon`'s connections
//! and `firn realise` give their workers; inner builds get one too, so recursive Nix
//! nests.

use std::io::{self, BufReader, BufWriter};
use std::net::Shutdown;
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use firn_build::recursive::{AllowedPaths, RecursiveNix, RecursiveRequest, RecursiveServer};
use firn_store::StoreLayout;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::conn::serve_connection_with;
use crate::restrict::Policy;
use crate::{hung_up, DaemonConfig};

/// Starts the private daemon of recursive-Nix builds on a store.
#[derive(Debug, Clone)]
pub struct RecursiveDaemon {
    layout: StoreLayout,
    userpool: PathBuf,
}

impl RecursiveDaemon {
    pub fn new(layout: StoreLayout, userpool: PathBuf) -> Self {
        Self { layout, userpool }
    }
}

/// The connections of one socket (to end them when it stops).
type Streams = Arc<Mutex<Vec<UnixStream>>>;

struct Server {
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
    streams: Streams,
    socket: PathBuf,
}

impl RecursiveNix for RecursiveDaemon {
    fn start(&self, req: RecursiveRequest<'_>) -> io::Result<Box<dyn RecursiveServer>> {
        let socket = req.socket.clone();
        let err = |what: &str, e: io::Error| {
            io::Error::new(e.kind(), format!("{what} '{}': {e}", socket.display()))
        };
        match std::fs::remove_file(&socket) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(err("removing", e)),
        }
        let listener = UnixListener::bind(&socket).map_err(|e| err("binding", e))?;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| err("changing permissions of", e))?;
        if let Some((uid, gid)) = req.owner {
            nix::unistd::chown(
                &socket,
                Some(nix::unistd::Uid::from_raw(uid)),
                Some(nix::unistd::Gid::from_raw(gid)),
            )
            .map_err(|e| err("changing owner of", e.into()))?;
        }
        listener
            .set_nonblocking(true)
            .map_err(|e| err("listening on", e))?;
        let config = Arc::new(DaemonConfig {
            layout: self.layout.clone(),
            settings: req.settings.clone(),
            userpool: self.userpool.clone(),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let streams: Streams = Arc::default();
        let accept = {
            let (stop, streams, allowed) = (Arc::clone(&stop), Arc::clone(&streams), req.allowed);
            std::thread::Builder::new()
                .name("recursive-nix".into())
                .spawn(move || accept_loop(&listener, &config, &allowed, &stop, &streams))
                .map_err(|e| err("starting the thread of", e))?
        };
        Ok(Box::new(Server {
            stop,
            accept: Some(accept),
            streams,
            socket: req.socket,
        }))
    }
}

fn accept_loop(
    listener: &UnixListener,
    config: &Arc<DaemonConfig>,
    allowed: &AllowedPaths,
    stop: &Arc<AtomicBool>,
    streams: &Streams,
) {
    let mut threads: Vec<JoinHandle<()>> = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                threads.retain(|t| !t.is_finished());
                if let Ok(t) = spawn_connection(stream, config, allowed, stop, streams) {
                    threads.push(t);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
                let _ = poll(&mut fds, PollTimeout::from(100u16));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // Nothing to report to: the builder sees its connections fail.
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(50)),
        }
    }
    for t in threads {
        let _ = t.join();
    }
}

fn spawn_connection(
    stream: UnixStream,
    config: &Arc<DaemonConfig>,
    allowed: &AllowedPaths,
    stop: &Arc<AtomicBool>,
    streams: &Streams,
) -> io::Result<JoinHandle<()>> {
    stream.set_nonblocking(false)?;
    let reader = stream.try_clone()?;
    let watch = stream.try_clone()?;
    streams
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(stream.try_clone()?);
    let (config, stop) = (Arc::clone(config), Arc::clone(stop));
    let policy = Policy::Restricted(allowed.clone());
    std::thread::Builder::new()
        .name("recursive-nix-conn".into())
        .spawn(move || {
            let gone = || hung_up(watch.as_fd());
            let stop = || stop.load(Ordering::SeqCst);
            let r = BufReader::new(reader);
            let w = BufWriter::new(stream);
            // Errors end this connection; the client sees them as a broken connection.
            let _ = serve_connection_with(r, w, &config, false, policy, &gone, &stop);
        })
}

impl RecursiveServer for Server {
    fn stop(mut self: Box<Self>) {
        self.stop.store(true, Ordering::SeqCst);
        // Connections blocked reading from a client that is still there end too.
        for s in self
            .streams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            let _ = s.shutdown(Shutdown::Both);
        }
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}
