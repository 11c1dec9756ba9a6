//! The client end of the serve protocol (`firn_protocol::serve`) over the system's
//! `ssh`, as Nix 2.8's `LegacySSHStore` speaks it: handshake, QueryValidPaths,
//! AddToStoreNar, BuildDerivation, QueryPathInfos, DumpStorePath.
//!
//! The remote program's stderr (ssh's own stderr) goes where the caller says: the
//! build's log, since that is where a serving `nix-store --serve` or `firn serve`
//! writes the builder's output.

use std::collections::BTreeSet;
use std::io::{self, BufReader, BufWriter, Read};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};

use firn_derivation::{StoreDir, StorePath};
use firn_protocol::serve::{
    self, BuildSettings, ServePathInfo, ServeRequest, SERVE_PROTOCOL_VERSION,
};
use firn_protocol::types::ValidPathInfo;
use firn_protocol::{BasicDerivation, BuildResult, Limits, Reader, Writer};

use super::error::RemoteError;

/// A running `ssh … --serve --write` and the protocol on its stdin and stdout.
#[derive(Debug)]
pub struct ServeConnection {
    to: Writer<BufWriter<ChildStdin>>,
    from: Reader<BufReader<ChildStdout>>,
    /// The server's protocol version.
    pub version: u64,
}

/// The ssh process, shared so that it can be killed while the protocol runs.
pub type SharedChild = Arc<Mutex<Child>>;

impl ServeConnection {
    /// Start `argv` with `stderr` and say hello. The child is returned at once (before
    /// the handshake) so that the caller can kill it while this waits.
    pub fn spawn(argv: &[String], stderr: Stdio) -> Result<(SharedChild, Pipes), RemoteError> {
        let (program, args) = argv.split_first().ok_or(RemoteError::NoCommand)?;
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .map_err(|source| RemoteError::Spawn {
                program: program.clone(),
                source,
            })?;
        let pipes = Pipes {
            stdin: child.stdin.take(),
            stdout: child.stdout.take(),
        };
        Ok((Arc::new(Mutex::new(child)), pipes))
    }

    /// The handshake over `pipes` (Nix: `'nix-store --serve' protocol mismatch`).
    pub fn handshake(pipes: Pipes, store_dir: &StoreDir) -> Result<Self, RemoteError> {
        let (Some(stdin), Some(stdout)) = (pipes.stdin, pipes.stdout) else {
            return Err(RemoteError::NoCommand);
        };
        let mut to =
            Writer::with_store_dir(BufWriter::with_capacity(1 << 16, stdin), store_dir.clone());
        let mut from = Reader::with_config(
            BufReader::with_capacity(1 << 16, stdout),
            store_dir.clone(),
            Limits::default(),
        );
        // A remote that is gone before it read our hello is a closed connection too.
        let closed = |_| RemoteError::Closed;
        serve::write_client_hello(&mut to, SERVE_PROTOCOL_VERSION).map_err(closed)?;
        to.flush().map_err(closed)?;
        let version = serve::read_server_hello(&mut from).map_err(|e| match e.is_eof() {
            true => RemoteError::Closed,
            false => RemoteError::Handshake(e),
        })?;
        Ok(Self { to, from, version })
    }

    fn send(&mut self, req: &ServeRequest) -> Result<(), RemoteError> {
        req.write(&mut self.to, self.version)
            .and_then(|()| self.to.flush())
            .map_err(RemoteError::Send)
    }

    /// The paths of `paths` the remote has (`substitute`: it may fetch them from its
    /// substituters first, `builders-use-substitutes`).
    pub fn query_valid_paths(
        &mut self,
        paths: &BTreeSet<StorePath>,
        substitute: bool,
    ) -> Result<BTreeSet<StorePath>, RemoteError> {
        self.send(&ServeRequest::QueryValidPaths {
            lock: false,
            substitute,
            paths: paths.clone(),
        })?;
        self.from
            .read_store_path_set("valid paths")
            .map_err(RemoteError::Receive)
    }

    /// Send one path: its info, then exactly `info.nar_size` bytes that `dump` writes.
    pub fn add_to_store_nar(
        &mut self,
        info: &firn_store::ValidPathInfo,
        dump: impl FnOnce(&mut dyn io::Write) -> Result<(), RemoteError>,
    ) -> Result<(), RemoteError> {
        self.send(&ServeRequest::AddToStoreNar(ValidPathInfo::from_store(
            info,
        )))?;
        dump(self.to.get_mut())?;
        self.to.flush().map_err(RemoteError::Send)?;
        serve::read_ok(&mut self.from).map_err(RemoteError::Receive)
    }

    /// Build `drv` (sent whole) on the remote and wait for its result.
    pub fn build_derivation(
        &mut self,
        drv_path: &StorePath,
        drv: &BasicDerivation,
        settings: &BuildSettings,
    ) -> Result<BuildResult, RemoteError> {
        self.send(&ServeRequest::BuildDerivation {
            drv_path: drv_path.clone(),
            drv: drv.clone(),
            settings: settings.clone(),
        })?;
        serve::read_build_result(&mut self.from).map_err(RemoteError::Receive)
    }

    pub fn query_path_infos(
        &mut self,
        paths: &BTreeSet<StorePath>,
    ) -> Result<Vec<ServePathInfo>, RemoteError> {
        self.send(&ServeRequest::QueryPathInfos(paths.clone()))?;
        serve::read_path_infos(&mut self.from).map_err(RemoteError::Receive)
    }

    /// Ask for `path`'s NAR and hand `read` a reader of exactly its bytes (the stream
    /// has no length: [`firn_store::nar_bound::NarBounded`] follows the archive).
    pub fn dump_store_path<T>(
        &mut self,
        path: &StorePath,
        read: impl FnOnce(&mut dyn Read) -> Result<T, RemoteError>,
    ) -> Result<T, RemoteError> {
        self.send(&ServeRequest::DumpStorePath(path.clone()))?;
        let mut nar = firn_store::nar_bound::NarBounded::new(self.from.get_mut());
        let v = read(&mut nar)?;
        // What the reader left of the archive (an error stopped it) is not ours to
        // leave in the stream; a failed connection is dropped anyway.
        nar.skip().map_err(RemoteError::Nar)?;
        Ok(v)
    }
}

/// The ends of the child's stdin and stdout, before the handshake.
#[derive(Debug)]
pub struct Pipes {
    stdin: Option<ChildStdin>,
    stdout: Option<ChildStdout>,
}
