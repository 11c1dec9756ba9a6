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
pub use crate::os_error::strerror;

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
    #[error("'{}': {}", path.display(), strerror(source))]
    Io { path: PathBuf, source: io::Error },
    #[error("current store schema at '{path}' is version {found}, but firn only supports {SCHEMA_VERSION}")]
    Schema { path: PathBuf, found: String },
    #[error("path '{0}' is not valid")]
    NotValid(String),
    /// The argument, made absolute and its symlinks followed, is outside the store (Nix's
    /// `followLinksToStorePath`; its words).
    #[error("path '{0}' is not in the Nix store")]
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
    /// A directory of the store's layout could not be made (Nix's words: the first
    /// directory of the path that could not be created).
    #[error("creating directory '{path}': {}", strerror(source))]
    CreateDir { path: PathBuf, source: io::Error },
    /// Something in the way of the store's layout is not a directory.
    #[error("'{path}' is not a directory")]
    NotADirectory { path: PathBuf },
    /// An imported NAR (a substitute, `copy --from`) is not the one its metadata names.
    #[error("hash mismatch importing path '{path}';\n  specified: sha256:{expected}\n  got:       sha256:{got}")]
    NarHashMismatch {
        path: String,
        expected: String,
        got: String,
    },
    #[error("size mismatch importing path '{path}';\n  specified: {expected}\n  got:       {got}")]
    NarSizeMismatch {
        path: String,
        expected: u64,
        got: u64,
    },
    /// An imported path's content is not what its content address says (Nix's words).
    #[error(
        "ca hash mismatch importing path '{path}';\n  specified: {specified}\n  got:       {got}"
    )]
    ContentAddressMismatch {
        path: String,
        specified: String,
        got: String,
    },
    #[error("path '{path}' has a bad content address '{ca}': {why}")]
    BadContentAddress {
        path: String,
        ca: String,
        why: String,
    },
    #[error("the NAR of '{path}' has data after its end")]
    NarTrailingData { path: String },
    /// The store belongs to another user, whose files this one may not write.
    #[error("the store at '{root}' belongs to user '{}' and cannot be opened by '{}'", owner.name, user.name)]
    NotOwner {
        root: PathBuf,
        owner: Account,
        user: Account,
        /// What failed (`…/big-lock: Permission denied`).
        source: Box<StoreError>,
    },
    /// A NAR given with its metadata ([`crate::Store::add_nar`]) does not hash to the
    /// hash or size it came with (Nix's words).
    #[error("hash mismatch importing path '{path}';\n  specified: {expected}\n  got:       {got}")]
    NarMismatch {
        path: String,
        expected: String,
        got: String,
    },
}

/// A user, by uid and (when the password database has it) name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub uid: u32,
    /// The user's name, or the uid in decimal when it has none.
    pub name: String,
}

impl Account {
    pub fn from_uid(uid: u32) -> Self {
        let name = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
            .ok()
            .flatten()
            .map_or_else(|| uid.to_string(), |u| u.name);
        Self { uid, name }
    }
}

impl StoreError {
    /// Whether the cause is an `EACCES`/`EPERM` on a file of the store.
    pub fn is_permission_denied(&self) -> bool {
        match self {
            StoreError::Io { source, .. } | StoreError::CreateDir { source, .. } => {
                source.kind() == io::ErrorKind::PermissionDenied
            }
            _ => false,
        }
    }
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}
