//! The CLI's errors: one line each, with Nix's exit codes.

use std::io;
use std::path::Path;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum CliError {
    /// Anything the user can fix: bad input, unknown path, bad setting.
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Setting(#[from] firn_build::SettingError),
    #[error("{source} (in '{origin}')")]
    SettingIn {
        source: firn_build::SettingError,
        origin: String,
    },
    #[error(transparent)]
    Config(firn_build::config::ConfigError),
    #[error("reading '{path}': {}", firn_store::error::strerror(source))]
    Read { path: String, source: io::Error },
    /// A file that cannot be opened (Nix's words).
    #[error("opening file '{path}': {}", firn_store::error::strerror(source))]
    Open { path: String, source: io::Error },
    /// `--store` names no store firn can open (Nix's words).
    #[error("don't know how to open Nix store '{0}'")]
    UnknownStore(String),
    /// The store belongs to another user; `advice` says what to do instead.
    #[error("{source}: {advice}")]
    ForeignStore {
        source: Box<firn_store::StoreError>,
        advice: String,
    },
    /// `firn run`: the command could not be started (exit 127 when it is not there,
    /// 126 when it cannot be run, as shells and Nix do).
    #[error(
        "unable to execute '{program}': {}",
        firn_store::error::strerror(source)
    )]
    Exec {
        program: String,
        source: std::io::Error,
    },
    /// `firn run`: the namespace for the store could not be set up.
    #[error("{what}: {}", firn_store::error::strerror(source))]
    Namespace {
        what: String,
        source: std::io::Error,
    },
    #[error("writing to standard output: {0}")]
    Stdout(io::Error),
    #[error("standard output was closed")]
    BrokenPipe,
    /// The command has printed its own diagnostics; exit 1 without another line.
    #[error("failed")]
    Silent,
    /// Failures already reported; exit with this status (Nix's build exit codes).
    #[error("failed with status {0}")]
    Exit(u8),
}

impl CliError {
    pub fn usage(msg: impl Into<String>) -> Self {
        Self::Usage(msg.into())
    }

    pub fn read(path: &Path, source: io::Error) -> Self {
        Self::Read {
            path: path.display().to_string(),
            source,
        }
    }

    pub fn stdout(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::BrokenPipe {
            Self::BrokenPipe
        } else {
            Self::Stdout(e)
        }
    }

    /// Nix's exit status: 1 for every failure that is not a build failure, 127/126 for a
    /// command `firn run` cannot start.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Exec { source, .. }
                if matches!(
                    source.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
                ) =>
            {
                127
            }
            Self::Exec { .. } => 126,
            _ => 1,
        }
    }
}
