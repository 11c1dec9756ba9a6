//! Nix's builtin builders, `builtin:buildenv`, `builtin:fetchurl` and
//! `builtin:unpack-channel`: what a derivation whose `builder` is one of them does
//! (Nix 2.8 `src/libstore/builtins/`).
//!
//! Nix runs them inside its own forked process. firn does not run library code after a
//! fork (`builder/sys.rs`), so a builtin runs as an exec of firn's own binary:
//! [`exec`] plans that exec (argv, and for the sandbox the binary and the shared
//! libraries it needs, bound read-only into the root), and the binary's hidden
//! `__builtin NAME` command calls [`run`] with its environment, which is the build's.
//!
//! The builders write to the paths their attributes name (`out`), report warnings
//! through a callback and fail with a [`BuiltinError`]; they print nothing themselves.

pub mod buildenv;
mod error;
pub mod exec;
pub mod fetchurl;
pub mod unpack_channel;

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};

pub use error::BuiltinError;

/// A builtin builder, by its name after `builtin:`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Builtin {
    Buildenv,
    Fetchurl,
    UnpackChannel,
}

impl Builtin {
    /// The builder `name` (after `builtin:`), if Nix 2.8 has it.
    pub fn from_name(name: &[u8]) -> Option<Self> {
        match name {
            b"buildenv" => Some(Self::Buildenv),
            b"fetchurl" => Some(Self::Fetchurl),
            b"unpack-channel" => Some(Self::UnpackChannel),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Buildenv => "buildenv",
            Self::Fetchurl => "fetchurl",
            Self::UnpackChannel => "unpack-channel",
        }
    }
}

/// A builtin's attributes: the derivation's environment as the builder gets it (Nix
/// passes `drv.env` with the input rewrites applied; firn the build's environment,
/// which holds the same values under the same names).
#[derive(Debug, Clone, Default)]
pub struct Attrs(BTreeMap<OsString, OsString>);

impl Attrs {
    /// This process's environment.
    pub fn from_env() -> Self {
        Self(std::env::vars_os().collect())
    }

    pub fn from_pairs<K: Into<OsString>, V: Into<OsString>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        Self(
            pairs
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        )
    }

    /// Attribute `name`, or Nix's `attribute 'NAME' missing`.
    pub fn get(&self, name: &str) -> Result<&OsStr, BuiltinError> {
        self.opt(name)
            .ok_or_else(|| BuiltinError::MissingAttr(name.to_owned()))
    }

    /// Attribute `name`, if set.
    pub fn opt(&self, name: &str) -> Option<&OsStr> {
        self.0.get(OsStr::new(name)).map(OsString::as_os_str)
    }
}

/// What a builtin may need from outside its attributes.
pub struct Context<'a> {
    /// Gets each warning (Nix's `warn`), without the `warning: ` prefix.
    pub warn: &'a mut dyn FnMut(&str),
    /// `download-attempts` (Nix's default 5): how often a transient download failure
    /// is tried.
    pub download_attempts: u32,
}

impl std::fmt::Debug for Context<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("download_attempts", &self.download_attempts)
            .finish_non_exhaustive()
    }
}

/// Run builtin `name` (what follows `builtin:`) with `attrs`.
pub fn run(name: &[u8], attrs: &Attrs, cx: &mut Context<'_>) -> Result<(), BuiltinError> {
    match Builtin::from_name(name) {
        Some(Builtin::Buildenv) => buildenv::buildenv(attrs, cx),
        Some(Builtin::Fetchurl) => fetchurl::fetchurl(attrs, cx),
        Some(Builtin::UnpackChannel) => unpack_channel::unpack_channel(attrs),
        None => Err(BuiltinError::Unsupported(
            String::from_utf8_lossy(name).into_owned(),
        )),
    }
}
