//! [`CacheError`]: every way a cache operation fails, naming what is at fault.

use std::path::PathBuf;

use firn_store::StoreError;
use thiserror::Error;

use crate::keys::KeyError;

#[derive(Debug, Error)]
pub enum CacheError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Key(#[from] KeyError),
    #[error("{path}: {}", firn_store::error::strerror(source))]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A store URL firn cannot open as a binary cache.
    #[error("don't know how to open binary cache '{url}'{}", if reason.is_empty() { String::new() } else { format!(": {reason}") })]
    BadUrl { url: String, reason: String },
    #[error("binary cache '{url}' is for Nix stores with prefix '{theirs}', not '{ours}'")]
    WrongStoreDir {
        url: String,
        theirs: String,
        ours: String,
    },
    /// A `.narinfo` (named by its file or URL) that does not parse.
    #[error("NAR info file '{file}' is corrupt: {msg}")]
    BadNarInfo { file: String, msg: String },
    /// A `realisations/<id>.doi` that does not parse or names another output.
    #[error("realisation '{file}' is not valid: {msg}")]
    BadRealisation { file: String, msg: String },
    #[error("'{file}' is corrupt: {msg}")]
    BadCacheInfo { file: String, msg: String },
    /// A narinfo whose `URL` leaves the cache (`../x`, `/etc/passwd`, `http://…`).
    #[error("NAR info file '{file}' names the NAR '{url}', which is not inside the cache")]
    NarUrlOutsideCache { file: String, url: String },
    #[error("unknown compression method '{0}'")]
    UnknownCompression(String),
    #[error("NAR '{file}': input compression not recognized")]
    CompressionNotRecognized { file: String },
    #[error("NAR '{file}' ({method}): {source}")]
    Decompress {
        file: String,
        method: String,
        source: std::io::Error,
    },
    #[error("path '{path}' is not valid in binary cache '{url}'")]
    NotInCache { path: String, url: String },
    #[error(
        "cannot add path '{path}' because it lacks a signature by a trusted key (from '{url}')"
    )]
    NoTrustedSignature { path: String, url: String },
    #[error("refusing to copy corrupted path '{path}' to binary cache: its NAR hash is {got}, the database says {expected}")]
    CorruptLocalPath {
        path: String,
        expected: String,
        got: String,
    },
    #[error("cannot compute the fingerprint of path '{path}': its NAR size is zero")]
    ZeroNarSize { path: String },
    #[error("unable to download '{url}': {msg}")]
    Http { url: String, msg: String },
    /// The `ssl-cert-file` bundle cannot be used.
    #[error("cannot use the CA bundle '{}' (setting 'ssl-cert-file'): {msg}", file.display())]
    CaBundle { file: PathBuf, msg: String },
    #[error("serving a binary cache on '{listen}': {msg}")]
    Serve { listen: String, msg: String },
    #[error("importing '{path}' from '{url}': {source}")]
    Import {
        path: String,
        url: String,
        source: Box<CacheError>,
    },
}

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> CacheError {
    let path = path.into();
    move |source| CacheError::Io { path, source }
}
