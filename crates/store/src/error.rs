//! [`StoreError`]: every way a store operation fails, each variant carrying the path at
//! fault and the typed cause; messages are Nix's where Nix has one.

use std::io;
use std::path::{Path, PathBuf};

use firn_derivation::{DerivationError, ModuloError, ParseError, StorePathError};
use thiserror::Error;

use crate::alive::AliveReason;
use crate::db::{DbError, SCHEMA_VERSION};
use crate::lock::LockError;
use crate::nar::NarError;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("{0}")]
    Db(#[from] DbError),
    #[error("{0}")]
    Nar(#[from] NarError),
    #[error("{0}")]
    Lock(#[from] LockError),
    #[error("{0}")]
    StorePath(#[from] StorePathError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("current store schema at '{path}' is version {found}, but firn only supports {SCHEMA_VERSION}")]
    Schema { path: PathBuf, found: String },
    #[error("path '{0}' is not valid")]
    NotValid(String),
    #[error("path '{0}' is not in the store")]
    NotInStore(String),
    #[error("'{path}' is not a regular file, so it cannot be added flat")]
    NotRegularFile { path: PathBuf },
    /// The `.drv` text at `path` does not parse (the error has the byte offset).
    #[error("derivation '{path}': {source}")]
    DerivationParse { path: String, source: ParseError },
    /// The derivation `path` is not a valid one (no output, mixed output types, …).
    /// `path` is the store path, or the name of a derivation not yet in the store.
    #[error("derivation '{path}': {source}")]
    DerivationInvalid {
        path: String,
        source: DerivationError,
    },
    /// The output paths of the derivation `path` (`<name>.drv (new)` for one being
    /// added) cannot be computed: an input is missing or wrong.
    #[error("derivation '{path}': {source}")]
    DerivationOutputs {
        path: String,
        source: Box<ModuloError<ModuloError<StoreError>>>,
    },
    /// The `.drv` to become `path` has output paths other than its contents give
    /// (Nix's `checkDerivationOutputs`); the error names the derivation itself.
    #[error("{source}")]
    DerivationOutputCheck {
        path: String,
        source: Box<ModuloError<ModuloError<StoreError>>>,
    },
    /// `add_temp_root` from the process that holds `gc.lock` exclusively.
    #[error("cannot add the temporary root '{path}' while this process is collecting garbage")]
    TempRootWhileCollecting { path: String },
    /// `delete_specific` refused: `path` is still alive, for `reason`.
    #[error("cannot delete path '{path}' since it is still alive: {reason}")]
    StillAlive { path: String, reason: AliveReason },
    /// A permanent root was asked for inside the store directory (logical or on disk).
    #[error(
        "creating a garbage collector root ({path}) in the Nix store is forbidden \
         (are you running nix-build inside the store?)"
    )]
    RootInStore { path: PathBuf },
    /// A permanent root would replace something that is not a symlink into the store.
    #[error("cannot create symlink '{path}'; already exists")]
    RootExists { path: PathBuf },
    /// A NAR given with its metadata ([`crate::Store::add_nar`]) does not hash to the
    /// hash or size it came with (Nix's words).
    #[error("hash mismatch importing path '{path}';\n  specified: {expected}\n  got:       {got}")]
    NarMismatch {
        path: String,
        expected: String,
        got: String,
    },
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}
