//! Why a remote build did not come back: [`RemoteError`]. A machine's failure (it
//! could not be reached, the connection broke, it spoke no serve protocol) is
//! [`RemoteError::is_machine_failure`]: the dispatcher stops using that machine and
//! tries the build elsewhere. Anything else (a local store error, an output whose NAR
//! does not match what the remote said) fails the build.

use std::io;

use firn_derivation::StorePath;
use firn_protocol::serve::ServeError;
use firn_protocol::WireError;
use firn_store::StoreError;
use thiserror::Error;

use super::ssh::SshUriError;

#[derive(Debug, Error)]
pub enum RemoteError {
    #[error(transparent)]
    Uri(#[from] SshUriError),
    #[error("no command to run")]
    NoCommand,
    #[error("cannot run '{program}': {}", firn_store::error::strerror(source))]
    Spawn { program: String, source: io::Error },
    #[error("cannot write the host key file '{}': {}", path.display(), firn_store::error::strerror(source))]
    HostKeyFile {
        path: std::path::PathBuf,
        source: io::Error,
    },
    /// The remote program never spoke (ssh failed, or it is not a serve server).
    #[error("'nix-store --serve' protocol mismatch: {0}")]
    Handshake(ServeError),
    /// The connection closed before the handshake (ssh could not connect or log in, or
    /// the remote program is not there): ssh's own words are in the log.
    #[error("connection closed before the serve protocol started")]
    Closed,
    #[error("connection lost while sending: {0}")]
    Send(io::Error),
    #[error("connection lost: {0}")]
    Receive(WireError),
    #[error("connection lost in a NAR: {0}")]
    Nar(io::Error),
    /// The remote built but does not have (or describe) an output.
    #[error("the remote has no output '{path}' after building it")]
    MissingOutput { path: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An output the remote sent does not import (wrong hash, bad NAR).
    #[error("cannot import '{path}' from the remote: {source}")]
    Import {
        path: String,
        source: Box<StoreError>,
    },
    /// A realisation in the remote's `builtOutputs` does not parse.
    #[error("the remote's realisation of '{id}' is bad: {message}")]
    BadRealisation { id: String, message: String },
    /// A local input to send is not valid (or its info is gone).
    #[error("input '{0}' is not valid here")]
    InputNotValid(StorePath),
    /// The build was stopped (killed) before it came back.
    #[error("stopped")]
    Stopped,
}

impl RemoteError {
    /// The machine failed, not the build: try elsewhere.
    pub fn is_machine_failure(&self) -> bool {
        match self {
            Self::Uri(_)
            | Self::NoCommand
            | Self::Spawn { .. }
            | Self::HostKeyFile { .. }
            | Self::Handshake(_)
            | Self::Closed
            | Self::Send(_)
            | Self::Receive(_)
            | Self::Nar(_) => true,
            Self::MissingOutput { .. }
            | Self::BadRealisation { .. }
            | Self::Store(_)
            | Self::Import { .. }
            | Self::InputNotValid(_)
            | Self::Stopped => false,
        }
    }
}
