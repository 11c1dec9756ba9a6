//! Why a builder could not be started or run.

use std::ffi::CString;
use std::io;
use std::path::{Path, PathBuf};

use nix::libc;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ExecError {
    #[error("{path}: {}", firn_store::error::strerror(source))]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "starting builder '{program}': {}",
        firn_store::error::strerror(source)
    )]
    Spawn { program: String, source: io::Error },
    /// A step of the sandbox's set-up failed; firn never falls back to an unsandboxed
    /// build (`--option sandbox false` is the explicit way).
    #[error("{step}: {}{}", firn_store::error::strerror(source), hint(source))]
    SandboxSetup { step: String, source: io::Error },
    #[error("the group '{0}' specified in 'build-users-group' does not exist")]
    NoSuchGroup(String),
    #[error("the build users group '{0}' has no members")]
    NoMembers(String),
    #[error(
        "looking up the group '{group}' of 'build-users-group': {}",
        firn_store::error::strerror(source)
    )]
    GroupLookup { group: String, source: io::Error },
    #[error(transparent)]
    Plan(#[from] crate::plan::PlanError),
    #[error("making the build's cgroup: {}", firn_store::error::strerror(source))]
    Cgroup { source: io::Error },
    /// firn's own binary or its libraries, which run builtin builders, were not found.
    #[error("starting builder 'builtin:{builtin}': {msg}")]
    Builtin { builtin: String, msg: String },
    #[error("building in a store whose real directory '{real}' is not its logical one needs root (the store is mounted at {logical} for the builder); run as root or use the sandbox")]
    NeedRoot { real: String, logical: String },
}

/// What to do about a set-up error that has a usual cause.
fn hint(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EUSERS) => {
            " (the limit on user namespaces is reached: see /proc/sys/user/max_user_namespaces; --option sandbox false builds without the sandbox)"
        }
        Some(libc::EPERM) | Some(libc::EACCES) => {
            " (user namespaces are not allowed here; --option sandbox false builds without the sandbox)"
        }
        _ => "",
    }
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ExecError + '_ {
    move |source| ExecError::Io {
        path: path.to_path_buf(),
        source,
    }
}

pub(crate) fn cstring(b: &[u8]) -> Result<CString, ExecError> {
    CString::new(b).map_err(|_| ExecError::Spawn {
        program: String::from_utf8_lossy(b).into_owned(),
        source: io::Error::new(io::ErrorKind::InvalidInput, "contains a NUL byte"),
    })
}
